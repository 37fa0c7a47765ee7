"""The dense reference loss: SPEC sections 2-4 written out with a materialised [B, N] matrix.

Obviously correct, memory O(B * N), differentiable through plain autograd. The fused
backends are tested against it (run in float64), and it doubles as the "naive PyTorch
loss with the same rules" in the benchmarks when run in the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..plan import Plan, Weighting
from .rules import false_negative_mask, simans_log_weight


def info_nce_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    plan: Plan,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_keys: Optional[torch.Tensor] = None,
    negatives: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and stats, densely. Returns ``(loss [B], logsumexp [B], positive_logit [B],
    num_masked [B], num_negatives [B])``; only ``loss`` carries gradient. ``negatives`` [B, K]
    (-1 = none) restricts each row's candidates to those keys (SPEC section 5); ``exclude`` [B]
    (-1 = none) removes one key from each row."""
    B, N = query.shape[0], keys.shape[0]
    cols = positives.view(B, 1)
    scores = query @ keys.T
    guide_scores = None
    if guide_query is not None and guide_keys is not None:
        guide_scores = (guide_query.detach() @ guide_keys.detach().T).to(scores.dtype)
    candidates = None
    if negatives is not None:
        candidates = torch.zeros(B, N + 1, dtype=torch.bool, device=query.device)
        candidates.scatter_(1, torch.where(negatives >= 0, negatives, N), True)
        candidates = candidates[:, :N]
    if exclude is not None:
        keep = torch.ones(B, N + 1, dtype=torch.bool, device=query.device)
        keep.scatter_(1, torch.where(exclude >= 0, exclude, N).view(B, 1), False)
        candidates = keep[:, :N] if candidates is None else candidates & keep[:, :N]
    return rows_from_scores(scores, cols, temperature, plan, query_labels,
                            key_labels[None, :] if key_labels is not None else None, guide_scores, candidates)


def rows_from_scores(
    scores: torch.Tensor,
    positive_columns: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    plan: Plan,
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_scores: Optional[torch.Tensor],
    candidates: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC sections 2-4 on a [B, M] score matrix whose column ``positive_columns[i]`` is row i's
    positive. ``key_labels`` [1 or B, M]; ``candidates`` [B, M] bool limits the keys a row
    contrasts against (None: all); keys outside it are neither masked nor negatives."""
    t = row_terms(scores, positive_columns, temperature, plan, query_labels, key_labels, guide_scores, candidates)
    logits, x, is_positive, masked, negative, bias = t.logits, t.x, t.is_positive, t.masked, t.negative, t.bias
    temperature = t.temperature
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    positive_logit = logits.gather(1, positive_columns).squeeze(1)
    if plan.attract:
        # the flagged keys are positives: L_i = logsumexp over P_i U N_i - mean over P_i of l_ip (beta = 0 on P_i)
        attracted = masked | is_positive
        x = torch.where(masked, logits, x)
        lse = nan_if_infinite(torch.logsumexp(x, dim=1))
        zero = torch.zeros_like(logits)
        loss = lse - torch.where(attracted, logits, zero).sum(1) / attracted.sum(1).to(scores.dtype)
        return loss, lse.detach(), positive_logit.detach(), masked.sum(1), negative.sum(1)
    if plan.debias is not None:
        lse = _debiased_lse(torch.where(negative, logits + bias, neg_inf), positive_logit, negative.sum(1),
                            plan.debias, temperature)
    else:
        lse = nan_if_infinite(torch.logsumexp(x, dim=1))
    loss = lse - positive_logit
    if plan.soft_temperature is not None:
        assert guide_scores is not None, "soft labels need the teacher's scores"
        loss = (1.0 - plan.soft_weight) * loss + plan.soft_weight * _soft_label_kl(
            x, lse, torch.where(negative | is_positive, guide_scores / plan.soft_temperature, neg_inf))
    # a row without negatives: loss exactly 0 and gradient exactly 0 (SPEC), not autograd's rounding residue
    loss = torch.where(negative.any(1), loss, torch.zeros_like(loss))
    return loss, lse.detach(), positive_logit.detach(), masked.sum(1), negative.sum(1)


def nan_if_infinite(lse: torch.Tensor) -> torch.Tensor:
    """A row's logsumexp, NaN where it is ``+inf``: a ``+inf`` logit in a row's softmax makes the row's
    loss NaN on every backend, as in PyTorch's dense cross-entropy (SPEC section 7, non-finite inputs)."""
    return torch.where(lse == float("inf"), torch.full_like(lse, float("nan")), lse)


class RowTerms(NamedTuple):
    """The pieces of SPEC sections 2-3 on a [B, M] score matrix (see :func:`row_terms`)."""

    logits: torch.Tensor  # l = s / temperature
    x: torch.Tensor  # l + beta on the positive and the negatives, -inf elsewhere
    is_positive: torch.Tensor  # bool, the row's positive column
    masked: torch.Tensor  # bool, flagged by the rules (among the candidates, never the positive)
    negative: torch.Tensor  # bool, the unmasked negatives
    bias: torch.Tensor  # beta_ij on the negatives, 0 elsewhere (HCL's carries gradient)
    temperature: Union[float, torch.Tensor]  # a tensor temperature as a 0-d tensor in the scores' dtype


def row_terms(
    scores: torch.Tensor,
    positive_columns: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    plan: Plan,
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_scores: Optional[torch.Tensor],
    candidates: Optional[torch.Tensor] = None,
) -> RowTerms:
    """The masks, logits and biased logits of :func:`rows_from_scores` (same arguments)."""
    B, M = scores.shape
    if isinstance(temperature, torch.Tensor):  # a scalar of any shape ([], [1], [1, 1]) in the scores' dtype
        temperature = temperature.reshape(()).to(scores.dtype)
    detached = scores.detach()
    positive_score = detached.gather(1, positive_columns)
    is_positive = torch.zeros(B, M, dtype=torch.bool, device=scores.device)
    is_positive.scatter_(1, positive_columns, True)
    considered = ~is_positive if candidates is None else candidates & ~is_positive
    masked = false_negative_mask(detached, positive_columns, plan, query_labels, key_labels, guide_scores) & considered
    negative = considered & ~masked

    logits = scores / temperature
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    bias = torch.zeros_like(detached)
    if plan.weighting == Weighting.SIMANS:
        log_w = simans_log_weight(detached, positive_score, plan.weight_a, plan.weight_b)
        log_w = torch.where(negative, log_w, neg_inf)
        count = negative.sum(1, keepdim=True)
        offset = torch.log(count.to(scores.dtype)) - torch.logsumexp(log_w, 1, keepdim=True)
        bias = torch.where(negative, log_w + offset, torch.zeros_like(log_w))
    elif plan.weighting == Weighting.HARDNESS:
        bias = torch.where(negative, plan.weight_a * detached, torch.zeros_like(detached))
    elif plan.weighting == Weighting.GUIDE_HARDNESS:
        assert guide_scores is not None, "guide-score hardness needs guide scores"
        bias = torch.where(negative, plan.weight_a * guide_scores, torch.zeros_like(detached))
    elif plan.weighting == Weighting.HCL:
        # importance weights e^{beta l}, normalised over the row's negatives, with gradient
        log_w = torch.where(negative, plan.weight_a * logits, neg_inf)
        count = negative.sum(1, keepdim=True)
        offset = torch.log(count.to(scores.dtype)) - torch.logsumexp(log_w, 1, keepdim=True)
        bias = torch.where(negative, log_w + offset, torch.zeros_like(log_w))
    elif plan.weighting == Weighting.GCSE:
        assert guide_scores is not None, "GCSE needs the reference model's scores"
        # the tie l == r is decided on the raw scores (s_ij <= t_ij), and the gap is (s - t) / temperature,
        # so a reference model scoring a key exactly like the student gives gap 0 on every backend
        tau = temperature.detach() if isinstance(temperature, torch.Tensor) else temperature
        gap = (detached - guide_scores) / tau
        decayed = -(detached / tau) * torch.exp(-gap * gap / (2.0 * plan.weight_a ** 2))
        bias = torch.where(negative & ~(detached > guide_scores), decayed, torch.zeros_like(detached))
    x = torch.where(negative | is_positive, logits + bias, neg_inf)
    return RowTerms(logits, x, is_positive, masked, negative, bias, temperature)


def _soft_label_kl(student: torch.Tensor, student_lse: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row over the entries where the teacher is finite
    (the positive and the unmasked negatives; the student is finite there too)."""
    kept = teacher > float("-inf")
    teacher_lse = torch.logsumexp(teacher, dim=1, keepdim=True)
    log_p = torch.where(kept, teacher - teacher_lse, torch.zeros_like(teacher))
    log_q = torch.where(kept, student - student_lse[:, None], torch.zeros_like(student))
    return (log_p.exp() * (log_p - log_q)).sum(1)


def _debiased_lse(negative_logits: torch.Tensor, positive_logit: torch.Tensor, count: torch.Tensor, tau_plus: float,
                  temperature: Union[float, torch.Tensor]) -> torch.Tensor:
    """log(e^{l+} + Ng), DCL's debiased negative term (Chuang et al. 2020, chingyaoc/DCL):
    Ng = max((sum_j e^{l_ij} - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t}), with n the row's
    unmasked negatives; computed with a shift c so that nothing overflows. The clamp passes the
    gradient where Ng >= its floor, as torch.clamp does in the original code."""
    neg_lse = torch.logsumexp(negative_logits, dim=1)
    n = count.to(positive_logit.dtype)
    log_floor = torch.where(count > 0, torch.log(n) - 1.0 / temperature, torch.full_like(n, float("-inf")))
    c = torch.maximum(torch.maximum(neg_lse, positive_logit), log_floor).detach()
    raw = (torch.exp(neg_lse - c) - n * tau_plus * torch.exp(positive_logit - c)) / (1.0 - tau_plus)
    # the floor n e^{-1/t - c} as exp(log_floor - c): a row without negatives has floor 0 (not 0 * inf)
    ng = torch.clamp(raw, min=torch.exp(log_floor - c).detach())
    return c + torch.log(torch.exp(positive_logit - c) + ng)


def info_nce_gathered(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    plan: Plan,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_keys: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same loss with each row restricted to its positive and ``negatives[i]`` (-1 = none),
    computed on the gathered keys: memory O(B K D), never [B, N]. A key listed twice counts once;
    the positive listed among the negatives is ignored. float16/bfloat16 are computed in float32, as
    on the fused backends."""
    B, K = negatives.shape
    listed, _ = negatives.sort(dim=1)
    repeated = torch.zeros_like(listed, dtype=torch.bool)
    repeated[:, 1:] = listed[:, 1:] == listed[:, :-1]
    candidates = (listed >= 0) & ~repeated & (listed != positives[:, None])
    columns = torch.cat([positives[:, None], listed.clamp(min=0)], dim=1)  # [B, 1 + K], positive first
    # like the fused kernels: float16/bfloat16 inputs are computed (and the loss returned) in float32
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    # cast before gathering: the gather's backward then sums a key's gradient over the rows that list it in
    # the accumulation dtype, and rounds it to a 16-bit input's dtype once (not once per listing)
    scores = torch.einsum("bd,bkd->bk", query.to(acc), keys.to(acc)[columns])
    guide_scores = None
    if guide_query is not None and guide_keys is not None:
        guide_scores = torch.einsum("bd,bkd->bk", guide_query.detach().to(acc), guide_keys.detach()[columns].to(acc))
    candidates = torch.cat([candidates.new_zeros(B, 1), candidates], dim=1)
    return rows_from_scores(scores, torch.zeros(B, 1, dtype=torch.long, device=query.device), temperature, plan,
                            query_labels, key_labels[columns] if key_labels is not None else None, guide_scores,
                            candidates)
