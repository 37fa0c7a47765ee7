"""The C++ CPU backend (``csrc/``): loads ``fastneg._C``, checks that its encoding of the plan is
Python's (:func:`fastneg.plan.layout`), and registers its ops' fake kernels and autograd."""

from __future__ import annotations

import torch

from ..plan import layout
from .autograd import register_fused_op, register_sample_op

try:
    from .. import _C  # registers torch.ops.fastneg.*_cpu
except ImportError as exc:  # pragma: no cover - an install problem, explained
    raise ImportError(
        "fastneg's C++ kernels (fastneg._C) are missing or were built against another torch: "
        "reinstall with `pip install --no-build-isolation .` in the environment that runs fastneg"
    ) from exc


def check_layout(cpp: dict[str, int]) -> None:
    """Raise ``ImportError`` unless the C++ encoding (``csrc/plan.h``) equals Python's."""
    python = layout()
    if cpp != python:
        differ = sorted(k for k in set(cpp) | set(python) if cpp.get(k) != python.get(k))
        raise ImportError(f"fastneg._C was built from another csrc/plan.h than fastneg/plan.py: {differ} differ; "
                          "rebuild with `pip install --no-build-isolation .`")


check_layout(dict(_C.layout()))
register_fused_op("cpu", torch.ops.fastneg.info_nce_fwd_cpu.default, torch.ops.fastneg.info_nce_bwd_cpu.default)
register_sample_op("cpu", torch.ops.fastneg.sample_negatives_cpu.default)
