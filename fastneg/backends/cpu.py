"""The C++ CPU backend (``csrc/``), compiled just in time on first use.

fastneg installs as pure Python; its C++ kernels are compiled by the first call that needs them
(``torch.utils.cpp_extension.load`` with ninja, the five files in parallel) into a cache folder
keyed by the torch version, the Python version and a hash of the sources (their folder and
contents) and flags, and loaded from there by every later process (a file lock makes concurrent
first calls build once). It
prints one line when it starts compiling and one with the time it took. ``fastneg build-cpu``
(or :func:`load`) builds ahead of time, e.g. in a container image.

- ``FASTNEG_CACHE_DIR``: the cache folder (default ``~/.cache/fastneg``);
- ``FASTNEG_CPU_BUILD=0``: ``backend="auto"`` never compiles (it uses kernels already in the
  cache, else the portable backend); ``backend="cpu"`` still does.

Loading checks that the C++ encoding of the plan is Python's (:func:`fastneg.plan.layout`) and
registers the ops' fake kernels and autograd.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import time
from types import ModuleType
from typing import Optional

import torch

from ..plan import layout
from .autograd import register_fused_op, register_sample_op

__all__ = ["load", "buildable", "cached", "sources", "build_directory", "check_layout", "CpuBuildError"]

NAME = "fastneg_cpu"
_FLAGS = ("-O3", "-std=c++20", "-fopenmp")  # tuples: torch extends the lists it is given
_LINK = ("-fopenmp",)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CpuBuildError(RuntimeError):
    """The C++ kernels cannot be compiled or loaded here (the message says why, in one line)."""


def sources() -> tuple[str, list[str]]:
    """(folder, sorted .cpp files) of the C++ sources: shipped in the package (``fastneg/_csrc``)
    or, in a source checkout, the repository's ``csrc/``."""
    for folder in (os.path.join(_PACKAGE, "_csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc")):
        if os.path.isfile(os.path.join(folder, "register.cpp")):
            return folder, sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".cpp"))
    raise CpuBuildError("fastneg's C++ sources are missing from the installation (fastneg/_csrc): reinstall fastneg")


def build_directory() -> str:
    """The cache folder of this torch, this Python and these sources (their folder and contents)."""
    folder, files = sources()
    # the folder too: torch's build files name the sources by path, and would rebuild in place for another one
    digest = hashlib.sha256((os.path.realpath(folder) + "\0" + " ".join(_FLAGS + _LINK)).encode())
    for name in sorted(os.listdir(folder)):
        if name.endswith((".cpp", ".h")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    root = os.environ.get("FASTNEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastneg")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:16]}"
    return os.path.join(root, "cpu", tag.replace("+", "_"))


def _library(directory: str) -> str:
    return os.path.join(directory, NAME + (".pyd" if sys.platform == "win32" else ".so"))


def cached() -> bool:
    """Whether the kernels of this torch and these sources are already compiled in the cache."""
    try:
        return os.path.isfile(_library(build_directory()))
    except CpuBuildError:
        return False


def _ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found is None:  # the ninja wheel's binary beside this interpreter (a virtual environment not activated)
        beside = os.path.join(os.path.dirname(sys.executable), "ninja")
        found = beside if os.access(beside, os.X_OK) else None
    return found


def buildable() -> Optional[str]:
    """None if the kernels can be compiled here, else the reason (one line)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if _ninja() is None:
        return "ninja is not installed (pip install ninja)"
    try:
        sources()
    except CpuBuildError as exc:
        return str(exc)
    return None


def check_layout(cpp: dict[str, int]) -> None:
    """Raise ``ImportError`` unless the C++ encoding (``csrc/plan.h``) equals Python's."""
    python = layout()
    if cpp != python:
        differ = sorted(k for k in set(cpp) | set(python) if cpp.get(k) != python.get(k))
        raise ImportError(f"the C++ kernels were built from another csrc/plan.h than fastneg/plan.py: {differ} differ; "
                          f"remove {build_directory()} to rebuild")


@functools.lru_cache(maxsize=1)
def load(verbose: bool = False) -> ModuleType:
    """Compile (first time) or load the C++ kernels and register their ops; the extension module.
    Raises :class:`CpuBuildError` with the reason when they cannot be built or loaded."""
    reason = buildable() if not cached() else None
    if reason is not None:
        raise CpuBuildError(f"fastneg's C++ CPU kernels cannot be compiled: {reason}")
    from torch.utils import cpp_extension

    folder, files = sources()
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    building = not os.path.isfile(_library(directory))
    ninja = _ninja()
    if ninja is not None and shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
    if building:
        print(f"fastneg: compiling the C++ CPU kernels for torch {torch.__version__} (once; 1.5 min on 2 cores) "
              f"into {directory}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=NAME, sources=files, extra_cflags=list(_FLAGS), extra_ldflags=list(_LINK),
                                    extra_include_paths=[folder], build_directory=directory, verbose=verbose)
    except Exception as exc:  # noqa: BLE001  (a compiler's or loader's failure of any kind: reported in one line)
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CpuBuildError(f"fastneg's C++ CPU kernels failed to {'compile' if building else 'load'} in {directory}: "
                            f"{first[:300]}") from exc
    if building:
        print(f"fastneg: compiled the C++ CPU kernels in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    check_layout(dict(module.layout()))
    register_fused_op("cpu", torch.ops.fastneg.info_nce_fwd_cpu.default, torch.ops.fastneg.info_nce_bwd_cpu.default)
    register_sample_op("cpu", torch.ops.fastneg.sample_negatives_cpu.default,
                       lambda query: torch.float64 if query.dtype == torch.float64 else torch.float32)
    return module
