"""Build fastneg as pure Python (metadata in pyproject.toml).

The wheel carries the C++ sources of the CPU kernels as package data (``fastneg/_csrc``, copied
from ``csrc/``); they are compiled on first use (fastneg.backends.cpu), not at install.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """build_py, plus csrc/*.cpp and *.h copied into the built package as fastneg/_csrc."""

    def run(self) -> None:
        super().run()
        source = os.path.join(HERE, "csrc")
        target = os.path.join(self.build_lib, "fastneg", "_csrc")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(source)):
            if name.endswith((".cpp", ".h")):
                shutil.copyfile(os.path.join(source, name), os.path.join(target, name))


setup(cmdclass={"build_py": BuildPyWithSources})
