"""The validated inputs in the form the backends take."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["normalized_operands", "kernel_operands"]


def normalized_operands(
    query: torch.Tensor,
    positives: Optional[torch.Tensor],
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Validated inputs in the form every backend takes: positives int64 (default ``arange(B)``),
    labels int64 with ``query_labels`` defaulting to ``key_labels[positives]``, guide embeddings
    detached in ``query``'s dtype."""
    positives = torch.arange(query.shape[0], device=query.device) if positives is None else positives.long()
    if key_labels is not None:
        key_labels = key_labels.long()
        query_labels = key_labels[positives] if query_labels is None else query_labels.long()
    if guide_query is not None and guide_keys is not None:
        guide_query, guide_keys = guide_query.detach().to(query.dtype), guide_keys.detach().to(query.dtype)
    return positives, query_labels, key_labels, guide_query, guide_keys


def kernel_operands(
    backend: str,
    query: torch.Tensor,
    keys: torch.Tensor,
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """The fused ops' layout: float16/bfloat16 computed in float32 on the cpu backend, several
    label levels as [levels, rows]."""
    if backend == "cpu" and query.dtype in (torch.float16, torch.bfloat16):
        query, keys = query.float(), keys.float()
        if guide_query is not None and guide_keys is not None:
            guide_query, guide_keys = guide_query.float(), guide_keys.float()
    if key_labels is not None and query_labels is not None and key_labels.dim() == 2:
        query_labels, key_labels = query_labels.T.contiguous(), key_labels.T.contiguous()
    return query, keys, query_labels, key_labels, guide_query, guide_keys
