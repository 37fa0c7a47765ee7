"""Build fastneg: the Python package plus the C++ CPU kernels in csrc/ (OpenMP on).

The extension is compiled against the torch already installed, so install with
``pip install --no-build-isolation .`` (see README).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - explained to the user
    raise SystemExit(
        "fastneg builds its C++ kernels against an installed torch: run "
        "`pip install torch` first, then `pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fastneg", "version.py")) as f:
        return f.read().split('"')[1]


setup(
    name="fastneg",
    version=read_version(),
    description="Fused contrastive losses with false-negative masking and SimANS weighting, never materialising B x N",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastneg", "fastneg.*"]),
    ext_modules=[
        CppExtension(
            "fastneg._C",
            sorted(glob.glob("csrc/*.cpp", root_dir=HERE)),
            depends=sorted(glob.glob("csrc/*.h", root_dir=HERE)),
            extra_compile_args=["-O3", "-std=c++20", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["fastneg = fastneg.tools.cli:main"]},
    install_requires=["torch>=2.6", "numpy"],
    # the optional features and what each needs (README, "Install")
    extras_require={
        "triton": ["triton>=3.2"],
        "mining": ["faiss-cpu", "pyarrow", "tqdm"],
        "faiss-gpu": ["faiss-gpu", "pyarrow", "tqdm"],
        "bench": ["pytest-benchmark", "matplotlib", "tqdm"],
        "sentence-transformers": ["sentence-transformers>=6.0", "datasets", "accelerate"],
        "pytorch-metric-learning": ["pytorch-metric-learning>=2.0"],
        "open-clip": ["open-clip-torch>=3.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.2", "ruff"],
        "parquet": ["pyarrow"],
        "faiss": ["faiss-cpu"],
    },
)
