"""The false-negative rules and the SimANS weight written densely (SPEC sections 2-3), once for
every Python path: the dense reference loss, the reference sampler and the corpus miner call
these. ``csrc/rules.h`` and ``fastneg/backends/triton/rules.py`` hold the same functions under
the same names."""

from __future__ import annotations

from typing import Optional

import torch

from ..plan import Plan

__all__ = ["score_threshold", "guide_threshold", "label_match", "false_negative_mask", "simans_log_weight"]


def score_threshold(positive_score: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The score rules of each row as one threshold (key j is a false negative when s_ij > it):
    margin ``s+ - m``, relative margin ``s+ - |s+| r``, ``max_score``; +inf when none is on."""
    threshold = torch.full_like(positive_score, float("inf"))
    if plan.margin is not None:
        threshold = torch.minimum(threshold, positive_score - plan.margin)
    if plan.relative_margin is not None:
        threshold = torch.minimum(threshold, positive_score - positive_score.abs() * plan.relative_margin)
    if plan.max_score is not None:
        threshold = torch.minimum(threshold, torch.full_like(positive_score, plan.max_score))
    return threshold


def guide_threshold(guide_positive: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The guide's rule as a threshold on its scores: ``t+ - margin``, or ``t+ - |t+| margin`` (relative)."""
    if plan.guide_relative:
        return guide_positive - guide_positive.abs() * plan.guide_margin
    return guide_positive - plan.guide_margin


def label_match(query_labels: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """[B, M] bool, a label shared with the row's query: ``key_labels`` [1 or B, M] against
    ``query_labels`` [B], or [1 or B, M, levels] against [B, levels] (any level)."""
    if key_labels.dim() == 3:  # several label levels, OR-ed
        return (query_labels[:, None, :] == key_labels).any(-1)
    return query_labels[:, None] == key_labels


def false_negative_mask(
    scores: torch.Tensor,
    positive_columns: torch.Tensor,
    plan: Plan,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    guide_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """M_ij of SPEC section 2 (True = key j leaves query i's denominator), positive column
    not yet excluded. ``scores`` [B, M] raw scores; ``positive_columns`` [B, 1]; ``key_labels``
    [1 or B, M] (the labels of each row's columns), or [1 or B, M, levels] with ``query_labels``
    [B, levels] (any matching level masks)."""
    mask = scores > score_threshold(scores.gather(1, positive_columns), plan)
    if key_labels is not None and query_labels is not None:
        mask |= label_match(query_labels, key_labels)
    if guide_scores is not None:
        mask |= guide_scores > guide_threshold(guide_scores.gather(1, positive_columns), plan)
    return mask


def simans_log_weight(scores: torch.Tensor, positive_score: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """SimANS's ``log w_ij = -a (s_ij - s_i+ - b)^2`` before the row's normaliser (``positive_score``
    broadcast against ``scores``, e.g. [B, 1])."""
    d = scores - positive_score - b
    return -a * d * d
