"""The sampler written densely (SPEC section 5), and the Gumbel noise every sampler shares.

``G_ij`` is standard Gumbel noise from a hash of ``(seed, i, j)``: the C++ and Triton samplers,
this reference and the corpus miner compute the same integers, so a draw is a pure function of
the inputs and the seed.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..plan import Plan, Strategy
from .rules import false_negative_mask, simans_log_weight

__all__ = ["sample_negatives_reference", "gumbel_noise"]


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (the kernels' integer hash)."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise G[i, j] under ``seed`` for broadcastable index tensors ``rows`` and
    ``cols`` (e.g. [R, 1] and [1, C]), float32, bit for bit the kernels' integers (the final logs
    may differ in the last ulp)."""
    m = 0xFFFFFFFF
    h = _mix32(torch.tensor(seed & m, dtype=torch.int64, device=rows.device))
    h = _mix32(h ^ (rows.long() & m))
    h = _mix32(h ^ (cols.long() & m))
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def sample_negatives_reference(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, k: int,
                               strategy: Strategy, plan: Plan, seed: int, query_labels: Optional[torch.Tensor] = None,
                               key_labels: Optional[torch.Tensor] = None, guide_query: Optional[torch.Tensor] = None,
                               guide_keys: Optional[torch.Tensor] = None, first_row: int = 0,
                               first_key: int = 0, return_values: bool = False) -> Any:
    """The sampler written densely: masked [B, N] values, a stable descending sort (ties: the
    smaller key index first), the first k, -1 where the values ran out. ``first_row``,
    ``first_key``: the global indices of ``query``'s first row and ``keys``' first key (the noise
    depends on them). ``return_values``: also return the drawn values ``[B, k]`` (-inf at -1)."""
    B, N = query.shape[0], keys.shape[0]
    cols = positives.view(B, 1)
    scores = query @ keys.T
    guide_scores = None
    if guide_query is not None and guide_keys is not None:
        guide_scores = (guide_query @ guide_keys.T).to(scores.dtype)
    labels = None
    if key_labels is not None:
        labels = key_labels[None, :] if key_labels.dim() == 1 else key_labels[None, :, :]
    masked = false_negative_mask(scores, cols, plan, query_labels, labels, guide_scores)
    masked.scatter_(1, cols, True)
    masked |= ~(scores > float("-inf"))  # NaN and -inf scores are never drawn (every sampler)
    if strategy == Strategy.TOP:
        values = scores
    else:
        noise = gumbel_noise(seed, torch.arange(first_row, first_row + B, device=query.device)[:, None],
                             torch.arange(first_key, first_key + N, device=query.device)[None, :])
        if strategy == Strategy.UNIFORM:
            values = noise.to(scores.dtype)
        else:
            values = simans_log_weight(scores, scores.gather(1, cols), plan.weight_a, plan.weight_b) + noise.to(scores.dtype)
    values = values.masked_fill(masked | torch.isnan(values), float("-inf"))  # SimANS: NaN where s_i+ is infinite
    order = torch.sort(values, dim=1, descending=True, stable=True)
    idx = order.indices[:, :k]
    vals = order.values[:, :k]
    idx = torch.where(vals > float("-inf"), idx, torch.full_like(idx, -1))
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((B, k - idx.shape[1]), -1)], dim=1)
        vals = torch.cat([vals, vals.new_full((B, k - vals.shape[1]), float("-inf"))], dim=1)
    return (idx, vals) if return_values else idx
