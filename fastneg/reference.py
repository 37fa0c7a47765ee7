"""The dense reference: SPEC sections 2-4 written out with a materialised [B, N] matrix.

Obviously correct, memory O(B * N), differentiable through plain autograd. The fused
backends are tested against it (run in float64), and it doubles as the "naive PyTorch
loss with the same rules" in the benchmarks when run in the input dtype.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .options import WEIGHTING_HARDNESS, WEIGHTING_SIMANS, Rules


def false_negative_mask(
    scores: torch.Tensor,
    positive_columns: torch.Tensor,
    rules: Rules,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    guide_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """M_ij of SPEC section 2 (True = key j leaves query i's denominator), positive column
    not yet excluded. ``scores`` [B, N] raw scores; ``positive_columns`` [B, 1]."""
    positive_score = scores.gather(1, positive_columns)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if key_labels is not None and query_labels is not None:
        mask |= query_labels[:, None] == key_labels[None, :]
    if rules.margin is not None:
        mask |= scores > positive_score - rules.margin
    if rules.relative_margin is not None:
        mask |= scores > positive_score - positive_score.abs() * rules.relative_margin
    if rules.max_score is not None:
        mask |= scores > rules.max_score
    if guide_scores is not None:
        guide_positive = guide_scores.gather(1, positive_columns)
        if rules.guide_relative:
            mask |= guide_scores > guide_positive - guide_positive.abs() * rules.guide_margin
        else:
            mask |= guide_scores > guide_positive - rules.guide_margin
    return mask


def info_nce_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    rules: Rules,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_keys: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and stats, densely. Returns ``(loss [B], logsumexp [B], positive_logit [B],
    num_masked [B], num_negatives [B])``; only ``loss`` carries gradient."""
    B, N = query.shape[0], keys.shape[0]
    cols = positives.view(B, 1)
    scores = query @ keys.T
    detached = scores.detach()
    positive_score = detached.gather(1, cols)
    guide_scores = None
    if guide_query is not None and guide_keys is not None:
        guide_scores = (guide_query.detach() @ guide_keys.detach().T).to(scores.dtype)
    is_positive = torch.zeros(B, N, dtype=torch.bool, device=query.device)
    is_positive.scatter_(1, cols, True)
    masked = false_negative_mask(detached, cols, rules, query_labels, key_labels, guide_scores) & ~is_positive
    negative = ~masked & ~is_positive

    logits = scores / temperature
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    bias = torch.zeros_like(detached)
    if rules.weighting == WEIGHTING_SIMANS:
        log_w = -rules.weight_a * (detached - positive_score - rules.weight_b) ** 2
        log_w = torch.where(negative, log_w, neg_inf)
        count = negative.sum(1, keepdim=True)
        offset = torch.log(count.to(scores.dtype)) - torch.logsumexp(log_w, 1, keepdim=True)
        bias = torch.where(negative, log_w + offset, torch.zeros_like(log_w))
    elif rules.weighting == WEIGHTING_HARDNESS:
        bias = torch.where(negative, rules.weight_a * detached, torch.zeros_like(detached))
    x = torch.where(masked, neg_inf, logits + bias)
    lse = torch.logsumexp(x, dim=1)
    positive_logit = logits.gather(1, cols).squeeze(1)
    loss = lse - positive_logit
    num_masked = masked.sum(1)
    return loss, lse.detach(), positive_logit.detach(), num_masked, negative.sum(1)
