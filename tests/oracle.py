"""An independent dense oracle for the property tests: SPEC sections 2-4 and the estimators'
papers, written row by row from their formulas, with no code shared with ``fastneg`` (in
particular not ``fastneg.reference``, which shares the library's reading of the formulas).

Deliberately plain: one query row at a time, explicit index sets, no log-space shifts but one
(the logits used by the tests, at most ~1 / 0.02 plus a bias, never overflow), and the gradient
from autograd through exactly the terms the papers differentiate. The one shift: HCL's terms,
``e^{(1 + beta) l}`` at temperatures down to 0.005, are taken relative to a detached constant
per row (the row's largest logit, and the largest ``beta l`` for the importance weights), which
changes no value and no gradient; DCL's sums and floor carry the same constant. Used in float64
as the truth, and in the inputs' dtype as "plain PyTorch in the same dtype".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Case:
    """Everything one call needs, independent of fastneg's own option classes."""

    query: torch.Tensor  # [B, D]
    keys: torch.Tensor  # [N, D]
    positives: torch.Tensor  # [B] int64
    temperature: float
    learn_temperature: bool = False
    key_labels: Optional[torch.Tensor] = None  # [N] or [N, L]
    query_labels: Optional[torch.Tensor] = None  # [B] or [B, L]; default key_labels[positives]
    margin: Optional[float] = None
    relative_margin: Optional[float] = None
    max_score: Optional[float] = None
    guide_query: Optional[torch.Tensor] = None
    guide_keys: Optional[torch.Tensor] = None
    guide_margin: Optional[float] = None  # None: the guide masks nothing
    guide_relative: bool = False
    weighting: tuple = ("none",)  # ("simans", a, b) | ("hardness", s) | ("guide_hardness", s) | ("hcl", beta) | ("gcse", alpha)
    debias: Optional[float] = None
    soft: Optional[tuple] = None  # (teacher temperature, weight)
    symmetric: bool = False
    negatives: Optional[torch.Tensor] = None  # [B, K], -1 = none
    attract: bool = False  # flagged keys are positives (P_i = {p_i} U flagged) instead of removed
    exclude: Optional[torch.Tensor] = None  # [B], a key removed from row i entirely, -1 = none
    row_weights: torch.Tensor = field(default_factory=lambda: torch.ones(0))


@dataclass
class Out:
    loss: torch.Tensor  # [B]
    lse: torch.Tensor
    positive_logit: torch.Tensor
    num_masked: torch.Tensor
    num_negatives: torch.Tensor
    dq: Optional[torch.Tensor] = None
    dk: Optional[torch.Tensor] = None
    dt: Optional[torch.Tensor] = None
    dscores: Optional[torch.Tensor] = None  # [B, N] dL/ds_ij: the size of each term of the gradients' sums
    clamp_gap: Optional[torch.Tensor] = None  # [B] DCL: |raw - floor| / (raw's terms + floor), inf without debias
    terms: Optional[torch.Tensor] = None  # [B, N] the size of the terms that make up dL_i/ds_ij (unweighted)
    scores: Optional[torch.Tensor] = None


def _labels_match(query_label: torch.Tensor, key_labels: torch.Tensor) -> torch.Tensor:
    """[M] bool: key j shares any label level with the query."""
    if key_labels.dim() == 1:
        return key_labels == query_label
    return (key_labels == query_label[None, :]).any(dim=1)


def _direction(s_row: torch.Tensor, t_row: Optional[torch.Tensor], pos: int, members: list[int], c: Case,
               q_label: Optional[torch.Tensor], k_labels: Optional[torch.Tensor], tau: torch.Tensor):
    """One anchor against its candidate keys ``members`` (positive excluded), scores ``s_row`` [M]
    over all columns. Returns (loss, lse, l+, masked count, negative count)."""
    s_pos = s_row[pos].detach()
    cand = torch.tensor(members, dtype=torch.long)
    sd = s_row.detach()[cand] if len(members) else s_row.new_zeros(0)
    flagged = torch.zeros(len(members), dtype=torch.bool)
    if len(members):
        if k_labels is not None:
            flagged |= _labels_match(q_label, k_labels[cand])
        if c.margin is not None:
            flagged |= sd > s_pos - c.margin
        if c.relative_margin is not None:
            flagged |= sd > s_pos - abs(s_pos) * c.relative_margin
        if c.max_score is not None:
            flagged |= sd > c.max_score
        if t_row is not None and c.guide_margin is not None:
            t_pos = t_row[pos]
            bound = t_pos - abs(t_pos) * c.guide_margin if c.guide_relative else t_pos - c.guide_margin
            flagged |= t_row[cand] > bound
    neg = cand[~flagged]
    n = len(neg)
    l_row = s_row / tau
    l_pos = l_row[pos]
    l_neg = l_row[neg]
    kind = c.weighting[0]
    # beta: constant biases (detached), except HCL's weights which carry gradient
    if kind == "simans":
        a, b = c.weighting[1], c.weighting[2]
        w = torch.exp(-a * (s_row.detach()[neg] - s_pos - b) ** 2)
        beta = torch.log(n * w / w.sum()) if n else w
        # a weight that underflowed, or became subnormal (too few bits to be the truth): the log-space form
        if n and not (bool(torch.isfinite(beta).all()) and bool((w >= torch.finfo(w.dtype).tiny).all())):
            logw = -a * (s_row.detach()[neg] - s_pos - b) ** 2
            beta = logw + torch.log(torch.tensor(float(n), dtype=logw.dtype)) - torch.logsumexp(logw, 0)
        x_neg = l_neg + beta
    elif kind == "hardness":
        x_neg = l_neg + c.weighting[1] * s_row.detach()[neg]
    elif kind == "guide_hardness":
        x_neg = l_neg + c.weighting[1] * t_row[neg]
    elif kind == "gcse":
        alpha = c.weighting[1]
        taud = tau.detach()
        ls, rs = s_row.detach()[neg] / taud, t_row[neg] / taud
        offset = -ls * torch.exp(-((ls - rs) ** 2) / (2 * alpha * alpha))
        x_neg = l_neg + torch.where(ls <= rs, offset, torch.zeros_like(offset))
    elif kind == "hcl":
        x_neg = l_neg  # reweighted below, in the exponentiated form of the paper
    else:
        x_neg = l_neg

    if c.attract:  # L_i = log(sum over P_i U N_i of e^{l + beta}) - mean over P_i of l (beta = 0 on P_i)
        att = cand[flagged]
        l_att = l_row[att]
        neg_sum = torch.exp(x_neg).sum() if n else l_row.new_zeros(())
        lse = torch.log(torch.exp(l_pos) + torch.exp(l_att).sum() + neg_sum)
        loss = lse - (l_pos + l_att.sum()) / (1 + len(att))
        with torch.no_grad():
            probs = torch.exp(torch.cat([l_pos.reshape(1), l_att, x_neg]).detach() - lse.detach())
            probs[:1 + len(att)] += 1.0 / (1 + len(att))
            terms = torch.zeros_like(s_row.detach())
            terms[torch.cat([torch.tensor([pos]), att, neg])] = probs / tau.detach()
        return loss, lse, l_pos, int(flagged.sum()), n, float("inf"), terms
    # every sum below is e^{-m} times the paper's (m = 0 but with HCL: see the module docstring)
    m = l_row.new_zeros(())
    if kind == "hcl":
        beta_h = c.weighting[1]
        m = l_pos.detach()
        if n:
            m = torch.maximum(l_pos, l_neg.max()).detach()
            wl = beta_h * l_neg
            imp = torch.exp(wl - wl.max().detach())  # the importance weights over a constant: their ratio is unchanged
            # Robinson et al.: (imp * neg).sum() / imp.mean()
            neg_sum = (imp * torch.exp(l_neg - m)).sum() / imp.mean()
        else:
            neg_sum = l_row.new_zeros(())
    else:
        neg_sum = torch.exp(x_neg).sum() if n else l_row.new_zeros(())
    e_pos = torch.exp(l_pos - m)
    if c.debias is not None:  # Chuang et al. 2020: Ng = max((S - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t})
        tp = c.debias
        raw = (neg_sum - n * tp * e_pos) / (1 - tp)
        floor = (n * torch.exp(-1.0 / tau - m)).detach()
        ng = torch.clamp(raw, min=floor)
        lse = m + torch.log(e_pos + ng)
        # relative to the terms raw subtracts, not to raw: raw is itself a cancellation when n tau+ e^{l+}
        # nearly equals the negatives' sum, and then which side of the floor it lands on is the rounding's
        terms = (neg_sum + n * tp * e_pos) / (1 - tp)
        gap = float(((raw - floor).abs() / (terms + floor)).detach()) if n else float("inf")
    else:
        lse = m + torch.log(e_pos + neg_sum)
        gap = float("inf")
    loss = lse - l_pos
    if c.soft is not None:
        T, wgt = c.soft
        teacher = torch.cat([t_row[pos].reshape(1), t_row[neg]]) / T
        student = torch.cat([l_pos.reshape(1), x_neg])
        p = torch.softmax(teacher, 0)
        log_q = torch.log_softmax(student, 0)
        kl = (p * (torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) - log_q)).sum()
        loss = (1 - wgt) * loss + wgt * kl
    # the size of the terms of dL/dl_ij (for the error criterion, never differentiated): the student's
    # softmax P, HCL's second softmax term, DCL's 1 / (1 - tau+) and the soft labels' teacher softmax
    with torch.no_grad():
        if kind == "hcl" and n:
            b_h = c.weighting[1]
            x_eff = (1 + b_h) * l_neg + math.log(n) - torch.logsumexp(b_h * l_neg, 0)
        else:
            x_eff = x_neg
        probs = torch.softmax(torch.cat([l_pos.reshape(1), x_eff]).detach(), 0)
        size = probs.clone()
        if kind == "hcl" and n:
            b_h = c.weighting[1]
            size[1:] = (1 + b_h) * probs[1:] + b_h * probs[1:].sum() * torch.softmax(b_h * l_neg.detach(), 0)
        if c.debias is not None:
            size = size * (1 + n * c.debias) / (1 - c.debias)
        if c.soft is not None:
            size = size + torch.softmax(torch.cat([t_row[pos].reshape(1), t_row[neg]]) / c.soft[0], 0)
        terms = torch.zeros_like(s_row.detach())
        terms[torch.cat([torch.tensor([pos]), neg])] = size / tau.detach()
    return loss, lse, l_pos, int(flagged.sum()), n, gap, terms


def evaluate(c: Case, dtype: torch.dtype, grads: bool = True) -> Out:
    """Per-row loss, stats and (with ``grads``) the gradient of ``sum_i w_i L_i`` in ``dtype``."""
    q = c.query.to(dtype).detach().requires_grad_(grads)
    k = c.keys.to(dtype).detach().requires_grad_(grads)
    tau = torch.tensor(c.temperature, dtype=dtype, requires_grad=grads and c.learn_temperature)
    B, N = q.shape[0], k.shape[0]
    s = q @ k.T
    if grads:
        s.retain_grad()
    t = None
    if c.guide_query is not None:
        t = (c.guide_query.to(dtype) @ c.guide_keys.to(dtype).T).detach()
    kl = c.key_labels
    ql = c.query_labels if c.query_labels is not None else (kl[c.positives] if kl is not None else None)
    losses, lses, lpos, nm, nn, gaps = [], [], [], [], [], []
    terms = torch.zeros(B, N, dtype=dtype)
    for i in range(B):
        p = int(c.positives[i])
        if c.negatives is not None:
            members = sorted({int(j) for j in c.negatives[i].tolist() if j >= 0 and j != p})
        else:
            members = [j for j in range(N) if j != p]
        if c.exclude is not None:
            members = [j for j in members if j != int(c.exclude[i])]
        out = _direction(s[i], None if t is None else t[i], p, members, c,
                         None if ql is None else ql[i], kl, tau)
        loss = out[0]
        terms[i] += out[6]
        if c.symmetric:  # key p against every query; its positive is query i (SPEC: CLIP-style loss)
            col_members = [r for r in range(B) if r != i]
            col = _direction(s[:, p], None if t is None else t[:, p], i, col_members, c,
                             None if kl is None else kl[p], ql, tau)
            loss = (loss + col[0]) / 2
            terms[:, p] += col[6]
        losses.append(loss)
        lses.append(out[1].detach())
        lpos.append(out[2].detach())
        nm.append(out[3])
        nn.append(out[4])
        gaps.append(out[5])
    loss = torch.stack(losses)
    res = Out(loss.detach(), torch.stack(lses), torch.stack(lpos), torch.tensor(nm), torch.tensor(nn),
              clamp_gap=torch.tensor(gaps, dtype=torch.float64), terms=terms)
    if grads:
        (loss * c.row_weights.to(dtype)).sum().backward()
        res.dq, res.dk = q.grad, k.grad
        res.dt = tau.grad if c.learn_temperature else None
        res.dscores, res.scores = s.grad, s.detach()
    return res
