"""The backends of the fused op and how a call picks one.

- ``triton``: the Triton kernels (:mod:`fastneg.backends.triton`; CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``), imported on first use.
- ``cpu``: the C++ kernels in ``csrc/`` (:mod:`fastneg.backends.cpu`), compiled on first use.
- ``portable``: plain PyTorch over chunks of rows, on any device (:mod:`fastneg.backends.portable`).
- ``reference``: the dense reference (:mod:`fastneg.reference`), materialising [B, N].

The fused backends register the same op schemas (:mod:`fastneg.backends.autograd`).

``backend="auto"`` is ``triton`` on CUDA when Triton is installed, ``cpu`` on CPU tensors when the
C++ kernels are compiled or can be (a C++ compiler and ninja; see :mod:`fastneg.backends.cpu`),
and ``portable`` otherwise: on MPS, XPU or any other device, CUDA without Triton, CPU without a
compiler. ``FASTNEG_BACKEND`` (one of the backends' names) replaces what ``auto`` picks. The
choice is logged once per device type and backend on the ``fastneg`` logger (DEBUG), and
``InfoNCEStats.backend`` names it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

import torch

from ..validation import BACKENDS, check_backend
from . import portable  # noqa: F401  (registers the portable ops)
from .autograd import FORWARD_OPS, SAMPLE_OPS

__all__ = ["resolve_backend", "forward_op", "sample_op", "triton_available", "cpu_available", "MAX_FUSED_NEGATIVES"]

# the fused Triton sampler keeps a [rows, K_PAD] running top-k in registers; beyond this many
# negatives the portable sampler draws them (the dense sampler on chunks of rows: the same values and noise)
MAX_FUSED_NEGATIVES = 512

logger = logging.getLogger("fastneg")
_logged: set[tuple[str, str]] = set()
_cpu_failure: Optional[str] = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_available(build: bool = True) -> bool:
    """Whether the C++ kernels are loaded, or can be loaded now (compiling them if ``build`` and
    needed). A failed build is reported once (a warning naming the cause) and not retried."""
    global _cpu_failure
    if "cpu" in FORWARD_OPS:
        return True
    if _cpu_failure is not None:
        return False
    from . import cpu

    if not cpu.cached() and (not build or cpu.buildable() is not None):
        return False
    try:
        cpu.load()
    except (cpu.CpuBuildError, ImportError) as exc:
        _cpu_failure = str(exc)
        warnings.warn(f"{exc}; using the portable backend on CPU", RuntimeWarning, stacklevel=3)
        return False
    return True


def _auto(device: torch.device) -> str:
    forced = os.environ.get("FASTNEG_BACKEND", "auto")
    if forced not in BACKENDS:
        raise ValueError(f"FASTNEG_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if forced != "auto":
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and cpu_available(build=os.environ.get("FASTNEG_CPU_BUILD", "1") != "0"):
        return "cpu"
    return "portable"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on (module docstring); an explicit one is checked against the device."""
    check_backend(backend)
    chosen = _auto(device) if backend == "auto" else backend
    if chosen == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got query on {device}")
        if not cpu_available(build=True):
            from . import cpu

            reason = _cpu_failure or cpu.buildable() or "unknown"
            raise ValueError(f"backend='cpu' needs fastneg's C++ kernels, which cannot be compiled here: {reason}; "
                             "backend='portable' runs without them")
    if chosen == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing fastneg")
    if (device.type, chosen) not in _logged:
        _logged.add((device.type, chosen))
        logger.debug("fastneg: backend=%r runs %r on %s tensors", backend, chosen, device.type)
    return chosen


def _load(backend: str) -> None:
    if backend == "triton" and "triton" not in FORWARD_OPS:
        from . import triton  # noqa: F401  (registers the Triton ops)
    if backend == "cpu" and "cpu" not in FORWARD_OPS:
        from . import cpu

        cpu.load()


def forward_op(backend: str) -> Any:
    """The fused forward op of a fused backend (``cpu``, ``triton`` or ``portable``)."""
    _load(backend)
    return FORWARD_OPS[backend]


def sample_op(backend: str) -> Any:
    """The fused sampler op of a fused backend."""
    _load(backend)
    return SAMPLE_OPS[backend]
