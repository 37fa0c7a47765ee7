"""The backends of the fused op and how a call picks one.

- ``cpu``: the C++ kernels in ``csrc/`` (:mod:`fastneg.backends.cpu`).
- ``triton``: the Triton kernels (:mod:`fastneg.backends.triton`; CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``), imported on first use.
- ``reference``: the dense reference (:mod:`fastneg.reference`), materialising [B, N].

Both fused backends register the same op schemas (:mod:`fastneg.backends.autograd`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..validation import check_backend
from . import cpu  # noqa: F401  (registers the C++ ops)
from .autograd import FORWARD_OPS, SAMPLE_OPS

__all__ = ["resolve_backend", "forward_op", "sample_op", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on: ``auto`` is ``triton`` on CUDA and ``cpu`` on CPU tensors."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got query on {device}")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing fastneg")
    return backend


def _load(backend: str) -> None:
    if backend == "triton" and "triton" not in FORWARD_OPS:
        from . import triton  # noqa: F401  (registers the Triton ops)


def forward_op(backend: str) -> Any:
    """The fused forward op of a fused backend (``cpu`` or ``triton``)."""
    _load(backend)
    return FORWARD_OPS[backend]


def sample_op(backend: str) -> Any:
    """The fused sampler op of a fused backend."""
    _load(backend)
    return SAMPLE_OPS[backend]
