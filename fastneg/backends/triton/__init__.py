"""The Triton backend (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), split by phase:

- :mod:`.rules`: the false-negative rules and weightings as device functions, shared by every kernel;
- :mod:`.tiles`: score tiles, positive scores and online logsumexps;
- :mod:`.forward`, :mod:`.backward`, :mod:`.sampler`: the kernels and their ``triton_op``;
- :mod:`.config`: tile shape, autotuning and the backward's workspace.

Importing it registers ``fastneg::info_nce_{fwd,bwd}_triton`` and ``fastneg::sample_negatives_triton``.

Matrix products per forward+backward, in units of B x N x D, for every mode (weightings,
estimators, soft labels, symmetric; fp32, fp16, bf16) and every D: 4 (q k^T in the forward; the
backward's recomputation of q k^T, dS k and dS^T q), plus the positives' scores from gathered
tiles (B x BLOCK_M x D, i.e. BLOCK_M / N of a product), plus, with a guide, 2 products of the
guide's width (forward and recomputation) and its gathered positives. Counted by
``tests/backends/test_product_count.py`` and ``benchmarks/count_products.py`` under the
interpreter. The naive loss does 3 to 4; the floor is 3.
"""

from __future__ import annotations

import torch

from ..autograd import register_fused_op, register_sample_op
from .backward import info_nce_bwd_triton
from .config import INTERPRET, BlockConfig, block_config, cuda_block_config, cuda_tiles, panel_rows
from .forward import info_nce_fwd_triton
from .sampler import sample_negatives_triton

__all__ = ["INTERPRET", "BlockConfig", "block_config", "cuda_block_config", "cuda_tiles", "panel_rows",
           "info_nce_fwd_triton", "info_nce_bwd_triton", "sample_negatives_triton"]

# the Triton backward returns float32 per-row sums on every device (the interpreter's CPU tensors too)
register_fused_op("triton", info_nce_fwd_triton, info_nce_bwd_triton, rowsum_dtype=lambda query: torch.float32)
register_sample_op("triton", sample_negatives_triton, lambda query: torch.float32)
