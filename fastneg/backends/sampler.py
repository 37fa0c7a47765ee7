"""The sampler's dispatch, below the public :func:`fastneg.sample_negatives` and the sharded draw
(:mod:`fastneg.parallel.sharded`): validated, normalized operands to a backend's sampler op, the
excluded keys removed after the draw."""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import Plan, Strategy
from ..reference import sample_negatives_reference
from . import MAX_FUSED_NEGATIVES, sample_op
from .operands import kernel_operands

__all__ = ["draw"]


def draw(backend: str, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, num_negatives: int,
         code: Strategy, plan: Plan, seed: int, query_labels: Optional[torch.Tensor],
         key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor],
         exclude: Optional[torch.Tensor] = None, first_key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler on validated, normalized operands: ``[B, k]`` indices into ``keys`` and their
    values (the score, or the perturbed log-weight; -inf at -1), best first. ``first_key``: the
    global index of ``keys[0]`` when ``keys`` is one shard of a larger set (the noise is keyed by
    the global index, so shards drawn apart and merged by value give the one-process draw)."""
    k = num_negatives + (0 if exclude is None else exclude.shape[1])
    with torch.no_grad():
        if backend == "reference":
            drawn, values = sample_negatives_reference(query, keys, positives, k, code, plan, seed, query_labels,
                                                       key_labels, guide_query, guide_keys, first_key=first_key,
                                                       return_values=True)
        else:
            drawn, values = _fused_sample(backend, query, keys, positives, k, code, plan, seed, query_labels,
                                          key_labels, guide_query, guide_keys, first_key)
    if exclude is not None:
        drawn, values = _drop_excluded(drawn, values, exclude, num_negatives)
    return drawn, values


def _drop_excluded(drawn: torch.Tensor, values: torch.Tensor, exclude: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each row's excluded keys from its ranked list and keep the first k (order kept)."""
    hit = ((drawn[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1) | (drawn < 0)
    # stable sort on the drop flag moves kept entries to the front in their original order
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices[:, :k]
    dropped = hit.gather(1, order)
    kept = torch.where(dropped, -1, drawn.gather(1, order))
    return kept, values.gather(1, order).masked_fill(dropped, float("-inf"))


def _fused_sample(backend: str, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, k: int,
                  code: Strategy, plan: Plan, seed: int, query_labels: Optional[torch.Tensor],
                  key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
                  guide_keys: Optional[torch.Tensor], first_key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton" and k > MAX_FUSED_NEGATIVES:
        # beyond the fused Triton sampler's k: the portable sampler (the dense sampler on chunks of rows,
        # memory O(chunk x N)); the same values and noise, so the same draw
        backend = "portable"
    query, keys, query_labels, key_labels, guide_query, guide_keys = kernel_operands(
        backend, query, keys, query_labels, key_labels, guide_query, guide_keys)
    return sample_op(backend)(query, keys, positives, query_labels, key_labels, guide_query, guide_keys,
                              plan.scalars(), plan.flags(kind=code), k, seed, first_key)
