"""The portable backend: the fused op in plain PyTorch, on every device PyTorch runs on.

It is what ``backend="auto"`` runs where no kernel does: Apple MPS, Intel XPU, CUDA without
Triton, and CPU when the C++ kernels are neither built nor buildable (no compiler). It computes the
same op as the fused kernels (every rule, weighting, estimator, attraction, the symmetric loss,
``exclude``, the stats; the same schema, fake kernels and autograd), over chunks of rows:

- forward: for each chunk of ``c`` query rows, the ``[c, N]`` scores ``q k^T`` (in float32 for
  float16/bfloat16 inputs, as the kernels accumulate), SPEC sections 2-4 applied, and the per-row
  loss and state kept; the chunk's matrices are then dropped. The losses with a constant beta
  (plain, the rules, SimANS, Hardness) are assembled here from the Python rules
  (:mod:`fastneg.reference.rules`) in as few passes as they need; the others (HCL, DCL, GCSE, soft
  labels, attraction) through the dense reference's own terms
  (:func:`fastneg.reference.loss.row_terms`, :func:`~fastneg.reference.loss.rows_from_scores`).
- backward: each chunk's scores are recomputed from the inputs, ``dL/dS`` of the chunk is formed in
  closed form (below), and ``dq = dS k``, ``dk += dS^T q``. Four products of ``B x N x D`` per
  forward+backward, as the fused kernels; nothing of size ``B x N`` is ever held.

Memory is ``O(c x N + (B + N) x D)``: ``c`` is chosen so that a chunk's matrices (about 12
``[c, N]`` temporaries, 28 for the losses computed through the reference's terms: HCL, DCL, GCSE,
soft labels, attraction) fit in ``FASTNEG_PORTABLE_MEMORY_MB`` (default 256 MiB), at least one row.

The gradients in closed form, with ``q = softmax(x)`` the row's softmax over its positive and
unmasked negatives (``x = l + beta``, beta constant for SimANS, Hardness and GCSE):

- cross-entropy: ``dL/dl = q - 1[positive]``;
- attraction: ``x`` over ``P_i U N_i``, ``dL/dl = q - 1[P_i] / |P_i|``;
- soft labels (teacher softmax ``p`` over the same entries, weight ``w``): ``q - (1 - w) 1[positive] - w p``;
- DCL: with ``Z = e^{l+} + Ng``, where the clamp passes the gradient ``dL/dx_j = e^{x_j} / ((1 - tau+) Z)``
  on the negatives and ``dL/dl+ = e^{l+} (1 - n tau+ / (1 - tau+)) / Z - 1``; where it is active,
  ``dL/dx_j = 0`` and ``dL/dl+ = e^{l+} / Z - 1``;
- HCL: its bias ``beta l_ij - logsumexp_k(beta l_ik) + log n`` carries gradient: with ``G_j = dL/dx_j``
  on the negatives and ``w = softmax(beta l)`` over them, ``dL/dl_j = (1 + beta) G_j - beta w_j sum_k G_k``.

A row without negatives has loss 0 and gradient 0 (SPEC). The symmetric loss is the row direction
plus the column direction computed the same way on the transposed problem (key ``p_i`` against
every query). Its tests run it against the float64 oracle like the other backends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch

from ..plan import Flag, Plan, RowState, Strategy, Weighting, kind
from ..reference.loss import nan_if_infinite, row_terms, rows_from_scores
from ..reference.rules import false_negative_mask, simans_log_weight
from ..reference.sampling import sample_negatives_reference
from .autograd import register_fused_op, register_sample_op

__all__ = ["info_nce_fwd_portable", "info_nce_bwd_portable", "sample_negatives_portable", "chunk_rows",
           "MEMORY_ENV", "DEFAULT_MEMORY_MB"]

MEMORY_ENV = "FASTNEG_PORTABLE_MEMORY_MB"
DEFAULT_MEMORY_MB = 256
# [c, N] matrices alive at once in a chunk (scores, guide scores, logits, biased logits, masks,
# softmax, dS, ...), counted generously: the lean losses, and those through the reference's terms
_TEMPORARIES = 12
_REFERENCE_TEMPORARIES = 28


def chunk_rows(rows: int, cols: int, element_size: int, temporaries: int = _TEMPORARIES) -> int:
    """Rows per chunk: as many as keep ``temporaries`` ``[rows, cols]`` matrices of ``element_size``
    bytes within ``FASTNEG_PORTABLE_MEMORY_MB`` (default 256), at least 1."""
    raw = os.environ.get(MEMORY_ENV)
    try:
        budget = float(raw) if raw else float(DEFAULT_MEMORY_MB)
    except ValueError:
        raise ValueError(f"{MEMORY_ENV} must be a number of MiB, got {raw!r}") from None
    if not budget > 0:
        raise ValueError(f"{MEMORY_ENV} must be positive, got {raw!r}")
    per_row = max(1, cols) * element_size * temporaries
    return max(1, min(rows, int(budget * 2**20 // per_row)))


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside the op: it computes in its own accumulation dtype (an enclosing autocast
    would run its products in bfloat16, as the fused kernels never do)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _Direction:
    """One direction of the loss: ``rows`` [R, D] against ``cols`` [C, D], row i's positive in
    column ``positives[i]``, with the labels, guide and excluded columns of that direction."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
                 plan: Plan, row_labels: Optional[torch.Tensor], col_labels: Optional[torch.Tensor],
                 guide_rows: Optional[torch.Tensor], guide_cols: Optional[torch.Tensor],
                 exclude: Optional[torch.Tensor]) -> None:
        self.acc = _accumulation(rows.dtype)
        # contiguous, so that the scores and a guide's scores of equal embeddings round alike (GCSE decides
        # s <= t on them: a strided or column-major operand takes another BLAS path)
        self.rows, self.cols = rows.contiguous(), cols.to(self.acc).contiguous()
        self.positives, self.plan, self.exclude = positives, plan, exclude
        self.temperature = temperature.reshape(()).to(device=rows.device, dtype=self.acc)
        self.row_labels = row_labels
        # the reference's label layout: [1, C] or [1, C, levels]
        self.col_labels = col_labels[None] if col_labels is not None else None
        self.guide_rows = guide_rows.contiguous() if guide_rows is not None else None
        self.guide_cols = guide_cols.to(self.acc).contiguous() if guide_cols is not None else None
        self.rules = (plan.margin is not None or plan.relative_margin is not None or plan.max_score is not None
                      or col_labels is not None or (guide_rows is not None and plan.guide_margin != float("-inf")))
        # the losses whose beta is a constant and whose gradient is the softmax minus the positive: computed
        # here with as few passes as the rules need; the others through the reference's row terms
        self.lean = (plan.weighting in (Weighting.NONE, Weighting.SIMANS, Weighting.HARDNESS, Weighting.GUIDE_HARDNESS)
                     and plan.debias is None and plan.soft_temperature is None and not plan.attract)

    def chunks(self) -> Iterator[slice]:
        R, C = self.rows.shape[0], self.cols.shape[0]
        step = chunk_rows(R, C, torch.finfo(self.acc).bits // 8, _TEMPORARIES if self.lean else _REFERENCE_TEMPORARIES)
        for start in range(0, R, step):
            yield slice(start, min(R, start + step))

    def scores(self, r: slice) -> torch.Tensor:
        return self.rows[r].to(self.acc) @ self.cols.T

    def terms(self, r: slice, scores: torch.Tensor) -> tuple:
        """(positive columns [c, 1], row labels, guide scores, candidates) of a chunk."""
        cols = self.positives[r].view(-1, 1)
        guide = None
        if self.guide_rows is not None and self.guide_cols is not None:
            guide = self.guide_rows[r].to(self.acc) @ self.guide_cols.T
        candidates = None
        if self.exclude is not None:
            ex = self.exclude[r]
            keep = torch.ones(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
            keep.scatter_(1, torch.where(ex >= 0, ex, scores.shape[1]).view(-1, 1), False)
            candidates = keep[:, :-1]
        labels = self.row_labels[r] if self.row_labels is not None else None
        return cols, labels, guide, candidates

    def lean_logits(self, s: torch.Tensor, cols: torch.Tensor, labels: Optional[torch.Tensor],
                    guide: Optional[torch.Tensor], candidates: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [c, N]: l + beta on the positive and the negatives, -inf elsewhere; masked count [c];
        negative count [c]) for the lean losses, with the rules of :mod:`fastneg.reference.rules`."""
        plan = self.plan
        # off: every column that is not a negative (flagged, the positive, excluded)
        if self.rules:
            off = false_negative_mask(s, cols, plan, labels, self.col_labels, guide)
            flagged = off if candidates is None else off & candidates
            # the positive is never counted as masked
            n_masked = torch.count_nonzero(flagged, dim=1) - flagged.gather(1, cols).squeeze(1).long()
            if candidates is not None:
                off |= ~candidates
        else:
            off = torch.zeros_like(s, dtype=torch.bool) if candidates is None else ~candidates
            n_masked = torch.zeros(s.shape[0], dtype=torch.int64, device=s.device)
        off.scatter_(1, cols, True)
        n_neg = s.shape[1] - torch.count_nonzero(off, dim=1)
        x = s / self.temperature
        positive_logit = x.gather(1, cols)
        if plan.weighting == Weighting.SIMANS:
            u = simans_log_weight(s, s.gather(1, cols), plan.weight_a, plan.weight_b).masked_fill_(off, float("-inf"))
            offset = torch.log(n_neg.to(s.dtype))[:, None] - torch.logsumexp(u, dim=1, keepdim=True)
            x += u.add_(torch.where(n_neg[:, None] > 0, offset, 0.0))  # -inf off the negatives
        else:
            if plan.weighting == Weighting.HARDNESS:
                x.add_(s, alpha=plan.weight_a)
            elif plan.weighting == Weighting.GUIDE_HARDNESS:
                assert guide is not None, "guide-score hardness needs guide scores"
                x.add_(guide, alpha=plan.weight_a)
            if self.rules or candidates is not None:
                x.masked_fill_(off, float("-inf"))
        x.scatter_(1, cols, positive_logit)
        return x, n_masked, n_neg

    def forward(self) -> tuple[torch.Tensor, ...]:
        R = self.rows.shape[0]
        out = dict(dtype=self.acc, device=self.rows.device)
        loss, lse, pos_score = torch.empty(R, **out), torch.empty(R, **out), torch.empty(R, **out)
        n_masked = torch.zeros(R, dtype=torch.int64, device=self.rows.device)
        n_neg = torch.zeros(R, dtype=torch.int64, device=self.rows.device)
        for r in self.chunks():
            s = self.scores(r)
            cols, labels, guide, candidates = self.terms(r, s)
            pos_score[r] = s.gather(1, cols).squeeze(1)
            if self.lean:
                x, n_masked[r], n_neg[r] = self.lean_logits(s, cols, labels, guide, candidates)
                lse[r] = nan_if_infinite(torch.logsumexp(x, dim=1))
                row_loss = lse[r] - pos_score[r] / self.temperature
                loss[r] = torch.where(n_neg[r] > 0, row_loss, 0.0)  # a row without negatives: exactly 0 (SPEC)
                continue
            row_loss, row_lse, _, masked, negatives = rows_from_scores(
                s, cols, self.temperature, self.plan, labels, self.col_labels, guide, candidates)
            loss[r], lse[r], n_masked[r], n_neg[r] = row_loss, row_lse, masked, negatives
        return loss, lse, pos_score, n_masked, n_neg

    def score_grad(self, r: slice, s: torch.Tensor, grad: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """dL/dS of a chunk's rows (``grad`` [c]: the upstream gradient of each row's loss; ``lse``
        [c]: the forward's logsumexp of each row)."""
        plan, t = self.plan, self.temperature
        cols, labels, guide, candidates = self.terms(r, s)
        if self.lean:
            x, _, n_neg = self.lean_logits(s, cols, labels, guide, candidates)
            dl = x.sub_(lse[:, None]).exp_()  # the softmax, from the forward's logsumexp
            dl.scatter_add_(1, cols, torch.full_like(cols, -1.0, dtype=dl.dtype))
            return dl.mul_((grad * (n_neg > 0)).div(t)[:, None])
        terms = row_terms(s, cols, t, plan, labels, self.col_labels, guide, candidates)
        logits, x, is_pos, masked, negative = terms.logits, terms.x, terms.is_positive, terms.masked, terms.negative
        zero = torch.zeros_like(s)
        if plan.attract:
            attracted = masked | is_pos
            xa = torch.where(masked, logits, x)
            dl = torch.softmax(xa, dim=1) - attracted.to(s.dtype) / attracted.sum(1, keepdim=True).to(s.dtype)
            return dl * (grad[:, None] / t)
        if plan.debias is not None:
            dl = self._debiased_grad(logits, x, is_pos, negative, cols)
        else:
            q = torch.softmax(x, dim=1)
            onehot = is_pos.to(s.dtype)
            if plan.soft_temperature is not None:
                assert guide is not None, "soft labels need the teacher's scores"
                teacher = torch.softmax(torch.where(negative | is_pos, guide / plan.soft_temperature, float("-inf")), dim=1)
                dl = q - (1.0 - plan.soft_weight) * onehot - plan.soft_weight * teacher
            else:
                dl = q - onehot
        if plan.weighting == Weighting.HCL:
            # the importance weights' own gradient: dL/dl_j = (1 + beta) G_j - beta w_j sum_k G_k
            beta = plan.weight_a
            g_neg = torch.where(negative, dl, zero)
            w = torch.softmax(torch.where(negative, beta * logits, float("-inf")), dim=1).nan_to_num(0.0)
            dl = dl + beta * (g_neg - w * g_neg.sum(1, keepdim=True))
        dl = torch.where(negative.any(1, keepdim=True), dl, zero)
        return dl * (grad[:, None] / t)

    def _debiased_grad(self, logits: torch.Tensor, x: torch.Tensor, is_pos: torch.Tensor, negative: torch.Tensor,
                       cols: torch.Tensor) -> torch.Tensor:
        """dL/dx of DCL's ``log(e^{l+} + Ng) - l+`` (the gradient through the clamp as torch.clamp passes it)."""
        tau_plus = float(self.plan.debias)  # type: ignore[arg-type]
        xn = torch.where(negative, x, float("-inf"))
        neg_lse = torch.logsumexp(xn, dim=1, keepdim=True)
        lp = logits.gather(1, cols)
        count = negative.sum(1, keepdim=True)
        n = count.to(x.dtype)
        log_floor = torch.where(count > 0, torch.log(n) - 1.0 / self.temperature, float("-inf"))
        c = torch.maximum(torch.maximum(neg_lse, lp), log_floor)
        P = torch.exp(lp - c)
        raw = (torch.exp(neg_lse - c) - n * tau_plus * P) / (1.0 - tau_plus)
        floor = torch.exp(log_floor - c)
        passes = raw >= floor
        Z = P + torch.where(passes, raw, floor)
        # the negatives' share as their softmax times the row's mass on them: the softmax sums to one
        # whatever the rounding of neg_lse, so sum_j dL/dl_j = 0 holds as the dense loss's autograd keeps it
        # (exp(xn - c) / Z would carry neg_lse's rounding at the logits' magnitude into every entry)
        mass = torch.exp(neg_lse - c) / ((1.0 - tau_plus) * Z)
        d_neg = torch.where(passes & negative, torch.softmax(xn, dim=1).nan_to_num(0.0) * mass, 0.0)
        # dL/dl+ = P c+ / Z - 1 written as -(P (1 - c+) + Ng) / Z (c+ = 1 - n tau+ / (1 - tau+), or 1 where the
        # clamp is active): no cancellation where the positive dominates its row (Z close to P)
        d_pos = -torch.where(passes, P * (n * tau_plus / (1.0 - tau_plus)) + raw, floor) / Z
        return torch.where(is_pos, d_pos, d_neg)

    def backward(self, grad: torch.Tensor, lse: torch.Tensor, need_rows: bool, need_cols: bool, need_rowsum: bool
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """(dL/drows [R, D], dL/dcols [C, D], in the accumulation dtype, and the per-row
        ``sum_j dS_ij s_ij`` when ``need_rowsum``, else zeros), recomputing each chunk's scores."""
        R = self.rows.shape[0]
        d_rows = torch.zeros(self.rows.shape, dtype=self.acc, device=self.rows.device) if need_rows else None
        d_cols = torch.zeros(self.cols.shape, dtype=self.acc, device=self.rows.device) if need_cols else None
        rowsum = torch.zeros(R, dtype=self.acc, device=self.rows.device)
        grad, lse = grad.to(self.acc), lse.to(self.acc)
        for r in self.chunks():
            s = self.scores(r)
            ds = self.score_grad(r, s, grad[r], lse[r])
            if need_rowsum:
                rowsum[r] = (ds * s).sum(1)
            if d_rows is not None:
                d_rows[r] = ds @ self.cols
            if d_cols is not None:
                d_cols.addmm_(ds.T, self.rows[r].to(self.acc))
        return d_rows, d_cols, rowsum


def _labels(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The fused ops' layout ([levels, rows] for several label sets) back to [rows, levels]."""
    return labels.T if labels is not None and labels.dim() == 2 else labels


def _directions(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
                query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
                guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
                scalars: list[float], flags: int) -> tuple[_Direction, Optional[_Direction]]:
    plan = Plan.decode(scalars, flags)
    ql, kl = _labels(query_labels), _labels(key_labels)
    rows = _Direction(query, keys, positives, temperature, plan, ql, kl, guide_query, guide_keys, exclude)
    columns = None
    if flags & Flag.SYMMETRIC:  # key p_i against every query: the transposed problem on the positive columns
        columns = _Direction(keys[positives], query, torch.arange(query.shape[0], device=query.device), temperature,
                             plan, kl[positives] if kl is not None else None, ql,
                             guide_keys[positives] if guide_keys is not None else None, guide_query, None)
    return rows, columns


def _forward(
    query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
    query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor], exclude: Optional[torch.Tensor], scalars: list[float], flags: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _exact(query.device):
        rows, columns = _directions(query, keys, positives, temperature, query_labels, key_labels, guide_query,
                                    guide_keys, exclude, scalars, flags)
        loss, lse, pos_score, n_masked, n_neg = rows.forward()
        state = torch.zeros(len(RowState), query.shape[0], dtype=rows.acc, device=query.device)
        state[RowState.LOGSUMEXP], state[RowState.POSITIVE_SCORE] = lse, pos_score
        if columns is not None:
            col_loss, col_lse = columns.forward()[:2]
            state[RowState.COLUMN_LOGSUMEXP] = col_lse
            loss = (loss + col_loss) / 2
        return loss, state, n_masked, n_neg


def _backward(
    grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
    temperature: torch.Tensor, query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
    row_state: torch.Tensor, scalars: list[float], flags: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _exact(query.device):
        rows, columns = _directions(query, keys, positives, temperature, query_labels, key_labels, guide_query,
                                    guide_keys, exclude, scalars, flags)
        need_q, need_k = bool(flags & Flag.QUERY_GRAD), bool(flags & Flag.KEYS_GRAD)
        need_t = bool(flags & Flag.TEMPERATURE_GRAD)
        if not (need_q or need_k or need_t):
            return query.new_empty(0), keys.new_empty(0), torch.zeros(query.shape[0], dtype=rows.acc, device=query.device)
        grad = grad_loss if columns is None else grad_loss / 2
        dq, dk, rowsum = rows.backward(grad, row_state[RowState.LOGSUMEXP], need_q, need_k, need_t)
        if columns is not None:
            d_pos_keys, d_query, col_rowsum = columns.backward(grad, row_state[RowState.COLUMN_LOGSUMEXP], need_k, need_q,
                                                               need_t)
            rowsum = rowsum + col_rowsum
            if dq is not None and d_query is not None:
                dq = dq + d_query
            if dk is not None and d_pos_keys is not None:
                dk = dk.index_add(0, positives, d_pos_keys)
        return (dq.to(query.dtype) if dq is not None else query.new_empty(0),
                dk.to(keys.dtype) if dk is not None else keys.new_empty(0), rowsum)


def _sample(
    query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor],
    scalars: list[float], flags: int, num_negatives: int, seed: int, first_key: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler on chunks of rows: the dense sampler's values, noise and order per chunk (the
    noise is keyed by the global row and key), so the draw is the one of every other sampler.
    Returns the indices and their values (the accumulation dtype)."""
    with _exact(query.device):
        plan = Plan.decode(scalars, flags, sampler=True)
        strategy = Strategy(kind(flags))
        acc = _accumulation(query.dtype)
        ql, kl = _labels(query_labels), _labels(key_labels)
        k, gk = keys.to(acc), guide_keys.to(acc) if guide_keys is not None else None
        step = chunk_rows(query.shape[0], keys.shape[0], torch.finfo(acc).bits // 8)
        parts = []
        for start in range(0, query.shape[0], step):
            r = slice(start, start + step)
            parts.append(sample_negatives_reference(
                query[r].to(acc), k, positives[r], num_negatives, strategy, plan, seed,
                ql[r] if ql is not None else None, kl, guide_query[r].to(acc) if guide_query is not None else None, gk,
                first_row=start, first_key=first_key, return_values=True))
        if not parts:
            return (torch.empty(0, num_negatives, dtype=torch.int64, device=query.device),
                    torch.empty(0, num_negatives, dtype=acc, device=query.device))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# Defined with the fused schema and implemented once for every device (CompositeExplicitAutograd).
# A plain Library definition rather than torch.library.custom_op: the latter wraps each call in a
# dynamo guard whose first use imports torch._dynamo (about 1 s and 170 MiB, once per process).
_LIB = torch.library.Library("fastneg", "FRAGMENT")
_LIB.define("info_nce_fwd_portable(Tensor query, Tensor keys, Tensor positives, Tensor temperature, "
            "Tensor? query_labels, Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, Tensor? exclude, "
            "float[] scalars, int flags) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("info_nce_bwd_portable(Tensor grad_loss, Tensor query, Tensor keys, Tensor positives, Tensor temperature, "
            "Tensor? query_labels, Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, Tensor? exclude, "
            "Tensor row_state, float[] scalars, int flags) -> (Tensor, Tensor, Tensor)")
_LIB.define("sample_negatives_portable(Tensor query, Tensor keys, Tensor positives, Tensor? query_labels, "
            "Tensor? key_labels, Tensor? guide_query, Tensor? guide_keys, float[] scalars, int flags, "
            "int num_negatives, int seed, int first_key=0) -> (Tensor, Tensor)")
_LIB.impl("info_nce_fwd_portable", _forward, "CompositeExplicitAutograd")
_LIB.impl("info_nce_bwd_portable", _backward, "CompositeExplicitAutograd")
_LIB.impl("sample_negatives_portable", _sample, "CompositeExplicitAutograd")
info_nce_fwd_portable = torch.ops.fastneg.info_nce_fwd_portable.default
info_nce_bwd_portable = torch.ops.fastneg.info_nce_bwd_portable.default
sample_negatives_portable = torch.ops.fastneg.sample_negatives_portable.default
register_fused_op("portable", info_nce_fwd_portable, info_nce_bwd_portable,
                  rowsum_dtype=lambda query: _accumulation(query.dtype))
register_sample_op("portable", sample_negatives_portable, lambda query: _accumulation(query.dtype))
