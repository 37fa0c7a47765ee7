"""The false-negative rules and the negative weightings as Triton device functions (SPEC
sections 2-3), written once for every kernel: the forward, the backward and the sampler all
classify and weight through these. ``fastneg/reference/rules.py`` and ``csrc/rules.h`` hold the
same functions under the same names.

The plan reaches the kernels as the flags word (``FLAGS``, :class:`fastneg.plan.Flag` bits, the
weighting or strategy from ``KIND_SHIFT``: one constexpr instead of one per rule) and the scalars
by value; the constants below are :mod:`fastneg.plan`'s, so the encoding is defined once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...plan import KIND_SHIFT, Flag, RowState, Strategy, Weighting
from .tiles import tl_positive_scores

HAS_MARGIN: tl.constexpr = tl.constexpr(int(Flag.HAS_MARGIN))
HAS_RELATIVE_MARGIN: tl.constexpr = tl.constexpr(int(Flag.HAS_RELATIVE_MARGIN))
HAS_MAX_SCORE: tl.constexpr = tl.constexpr(int(Flag.HAS_MAX_SCORE))
GUIDE_RELATIVE: tl.constexpr = tl.constexpr(int(Flag.GUIDE_RELATIVE))
SYMMETRIC: tl.constexpr = tl.constexpr(int(Flag.SYMMETRIC))
DEBIAS: tl.constexpr = tl.constexpr(int(Flag.DEBIAS))
SOFT: tl.constexpr = tl.constexpr(int(Flag.SOFT))
ATTRACT: tl.constexpr = tl.constexpr(int(Flag.ATTRACT))
# FLAGS // KIND is the weighting or strategy (constexpr operators keep the constexpr on the left, or
# floor-divide: the interpreter passes FLAGS as a plain int)
KIND: tl.constexpr = tl.constexpr(1 << KIND_SHIFT)

WEIGHT_NONE: tl.constexpr = tl.constexpr(int(Weighting.NONE))
WEIGHT_SIMANS: tl.constexpr = tl.constexpr(int(Weighting.SIMANS))
WEIGHT_HARDNESS: tl.constexpr = tl.constexpr(int(Weighting.HARDNESS))
WEIGHT_GUIDE_HARDNESS: tl.constexpr = tl.constexpr(int(Weighting.GUIDE_HARDNESS))
WEIGHT_HCL: tl.constexpr = tl.constexpr(int(Weighting.HCL))
WEIGHT_GCSE: tl.constexpr = tl.constexpr(int(Weighting.GCSE))
STRATEGY_TOP: tl.constexpr = tl.constexpr(int(Strategy.TOP))
STRATEGY_SIMANS: tl.constexpr = tl.constexpr(int(Strategy.SIMANS))

# rows of the per-row state tensor [len(RowState), B]
ROW_LOGSUMEXP: tl.constexpr = tl.constexpr(int(RowState.LOGSUMEXP))
ROW_POSITIVE_SCORE: tl.constexpr = tl.constexpr(int(RowState.POSITIVE_SCORE))
ROW_OFFSET: tl.constexpr = tl.constexpr(int(RowState.OFFSET))
ROW_THRESHOLD: tl.constexpr = tl.constexpr(int(RowState.THRESHOLD))
ROW_GUIDE_THRESHOLD: tl.constexpr = tl.constexpr(int(RowState.GUIDE_THRESHOLD))
ROW_COLUMN_LOGSUMEXP: tl.constexpr = tl.constexpr(int(RowState.COLUMN_LOGSUMEXP))
ROW_COLUMN_OFFSET: tl.constexpr = tl.constexpr(int(RowState.COLUMN_OFFSET))
ROW_POSITIVE_COEF: tl.constexpr = tl.constexpr(int(RowState.POSITIVE_COEF))
ROW_HCL_MASS: tl.constexpr = tl.constexpr(int(RowState.HCL_MASS))
ROW_HCL_SHIFT: tl.constexpr = tl.constexpr(int(RowState.HCL_SHIFT))
ROW_TEACHER_LOGSUMEXP: tl.constexpr = tl.constexpr(int(RowState.TEACHER_LOGSUMEXP))
ROW_INV_NUM_POSITIVES: tl.constexpr = tl.constexpr(int(RowState.INV_NUM_POSITIVES))


@triton.jit
def score_threshold(s_pos, margin, relative_margin, max_score, FLAGS: tl.constexpr):
    """The score rules of each row as one threshold (key j is a false negative when s_ij > it):
    margin s+ - m, relative margin s+ - |s+| r, max score; +inf when none is on."""
    threshold = tl.zeros_like(s_pos) + float("inf")
    if HAS_MARGIN & FLAGS:
        threshold = tl.minimum(threshold, s_pos - margin)
    if HAS_RELATIVE_MARGIN & FLAGS:
        threshold = tl.minimum(threshold, s_pos - tl.abs(s_pos) * relative_margin)
    if HAS_MAX_SCORE & FLAGS:
        threshold = tl.minimum(threshold, tl.zeros_like(s_pos) + max_score)
    return threshold


@triton.jit
def guide_threshold(t_pos, guide_margin, FLAGS: tl.constexpr):
    """The guide's rule as a threshold on its scores: t+ - margin, or t+ - |t+| margin (relative)."""
    if GUIDE_RELATIVE & FLAGS:
        return t_pos - tl.abs(t_pos) * guide_margin
    return t_pos - guide_margin


@triton.jit
def row_thresholds(q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, D, DG,
                   stride_q, stride_k, stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin,
                   HAS_GUIDE: tl.constexpr, FLAGS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(s_i+, score threshold, guide threshold) of a block of rows."""
    s_pos = tl_positive_scores(q_ptr, k_ptr, pos_ptr, row_start, rows, row_valid, B, D, stride_q, stride_k,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    threshold = score_threshold(s_pos, margin, relative_margin, max_score, FLAGS)
    g_threshold = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_GUIDE:
        t_pos = tl_positive_scores(gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, DG, stride_gq,
                                   stride_gk, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        g_threshold = guide_threshold(t_pos, guide_margin, FLAGS)
    return s_pos, threshold, g_threshold


@triton.jit
def false_negative_mask(s, t, rows, row_valid, cols, col_valid, threshold, g_threshold, qlab_ptr, klab_ptr,
                        B, N, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr):
    """M_ij (SPEC section 2): above the row's score threshold, a matching label (any of the
    NUM_LABELS levels; labels are [NUM_LABELS, B] / [NUM_LABELS, N]), or above the guide threshold.
    The positive's column is not yet taken out."""
    m = s > threshold[:, None]
    for level in tl.static_range(NUM_LABELS):
        query_label = tl.load(qlab_ptr + level * B + rows, mask=row_valid, other=0)
        key_label = tl.load(klab_ptr + level * N + cols, mask=col_valid, other=0)
        m = m | (key_label[None, :] == query_label[:, None])
    if HAS_GUIDE:
        m = m | (t > g_threshold[:, None])
    return m


@triton.jit
def classify(s, t, rows, row_valid, cols, col_valid, positive, threshold, g_threshold, qlab_ptr, klab_ptr,
             B, N, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr):
    """(is_positive, masked, negative) boolean tiles of a block of rows."""
    is_pos = (cols[None, :] == positive[:, None]) & col_valid[None, :]
    m = false_negative_mask(s, t, rows, row_valid, cols, col_valid, threshold, g_threshold, qlab_ptr, klab_ptr,
                            B, N, NUM_LABELS, HAS_GUIDE)
    live = col_valid[None, :] & ~is_pos
    return is_pos, m & live, (~m) & live


@triton.jit
def simans_log_weight(s, positive_score, weight_a, weight_b):
    """SimANS's log w_ij = -a (s_ij - s_i+ - b)^2, before the row's normaliser."""
    d = s - positive_score[:, None] - weight_b
    return -weight_a * d * d


@triton.jit
def biased_logits(s, t, negative, positive_score, inv_temp, weight_a, weight_b, WEIGHTING: tl.constexpr):
    """x_ij = l_ij + u_ij over negatives (-inf elsewhere) and the log-weights whose logsumexp
    normalises the row (SimANS log w_ij, HCL beta l_ij; -inf elsewhere)."""
    if WEIGHTING == WEIGHT_HCL:
        log_w = weight_a * s * inv_temp
        x = s * inv_temp + log_w
    elif WEIGHTING == WEIGHT_GCSE:
        # the tie on the raw scores (s <= t) and the gap (s - t) / temperature, as in every backend
        logit = s * inv_temp
        gap = (s - t) * inv_temp
        decayed = -logit * tl.exp(-gap * gap * (0.5 / (weight_a * weight_a)))
        log_w = s
        x = logit + tl.where(s > t, 0.0, decayed)
    elif WEIGHTING == WEIGHT_SIMANS:
        log_w = simans_log_weight(s, positive_score, weight_a, weight_b)
        x = s * inv_temp + log_w
    elif WEIGHTING == WEIGHT_HARDNESS:
        log_w = s
        x = s * inv_temp + weight_a * s
    elif WEIGHTING == WEIGHT_GUIDE_HARDNESS:
        log_w = s
        x = s * inv_temp + weight_a * t
    else:
        log_w = s
        x = s * inv_temp
    neg_inf = float("-inf")
    return tl.where(negative, x, neg_inf), tl.where(negative, log_w, neg_inf)


@triton.jit
def column_state(cols, col_valid, owner_ptr, state_ptr, B, HAS_GUIDE: tl.constexpr):
    """Owner row o of each key column (-1: nobody's positive) and the column's rules, which are
    row o's: positive score s_{o j}, score threshold, guide threshold."""
    owner = tl.load(owner_ptr + cols, mask=col_valid, other=-1)
    has_owner = owner >= 0
    o = tl.where(has_owner, owner, 0)
    c_spos = tl.load(state_ptr + (ROW_POSITIVE_SCORE * B + o), mask=has_owner, other=0.0)
    c_thr = tl.load(state_ptr + (ROW_THRESHOLD * B + o), mask=has_owner, other=0.0)
    c_gthr = tl.zeros_like(c_spos)
    if HAS_GUIDE:
        c_gthr = tl.load(state_ptr + (ROW_GUIDE_THRESHOLD * B + o), mask=has_owner, other=0.0)
    return owner, has_owner, o, c_spos, c_thr, c_gthr


@triton.jit
def column_logits(s, t, rows, row_valid, cols, col_valid, owner_ptr, state_ptr, qlab_ptr, klab_ptr, inv_temp,
                  weight_a, weight_b, B, N, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr,
                  WEIGHTING: tl.constexpr):
    """The tile read by columns (symmetric loss): [BLOCK_N, BLOCK_M] classification and biased
    logits of each owned column j against the block's queries, i.e. classify / biased_logits
    on the transposed tile with queries and keys swapped."""
    owner, has_owner, o, c_spos, c_thr, c_gthr = column_state(cols, col_valid, owner_ptr, state_ptr, B, HAS_GUIDE)
    s_t = tl.trans(s)
    t_t = tl.trans(t)
    is_pos, _, negative = classify(s_t, t_t, cols, has_owner, rows, row_valid, owner, c_thr, c_gthr,
                                   klab_ptr, qlab_ptr, N, B, NUM_LABELS, HAS_GUIDE)
    negative = negative & has_owner[:, None]
    x, log_w = biased_logits(s_t, t_t, negative, c_spos, inv_temp, weight_a, weight_b, WEIGHTING)
    return s_t, is_pos, negative, x, log_w, has_owner, o, c_spos
