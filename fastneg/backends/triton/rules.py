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
from .tiles import LOG2E, positive_scores

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
SCORE_RULES: tl.constexpr = tl.constexpr(int(Flag.HAS_MARGIN | Flag.HAS_RELATIVE_MARGIN | Flag.HAS_MAX_SCORE))
TEMPERATURE_GRAD: tl.constexpr = tl.constexpr(int(Flag.TEMPERATURE_GRAD))

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
ROW_HCL_REFERENCE: tl.constexpr = tl.constexpr(int(RowState.HCL_REFERENCE))
ROW_HCL_WEIGHT_REFERENCE: tl.constexpr = tl.constexpr(int(RowState.HCL_WEIGHT_REFERENCE))
ROW_LOG_POSITIVE_SHARE: tl.constexpr = tl.constexpr(int(RowState.LOG_POSITIVE_SHARE))
ROW_NEGATIVE_MAX: tl.constexpr = tl.constexpr(int(RowState.NEGATIVE_MAX))


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
def row_states(q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, sizes, strides, margins,
               HAS_GUIDE: tl.constexpr, FLAGS: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(s_i+, score threshold, guide threshold, the guide's positive score t_i+) of a block of rows.
    ``sizes`` (B, N, D, DG), ``strides`` (query, keys, guide query, guide keys rows) and ``margins``
    (margin, relative_margin, max_score, guide_margin) as the kernels group them."""
    B, N, D, DG = sizes
    stride_q, stride_k, stride_gq, stride_gk = strides
    margin, relative_margin, max_score, guide_margin = margins
    s_pos = positive_scores(q_ptr, k_ptr, pos_ptr, row_start, rows, row_valid, B, D, stride_q, stride_k,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    threshold = score_threshold(s_pos, margin, relative_margin, max_score, FLAGS)
    g_threshold = tl.zeros((BLOCK_M,), tl.float32)
    t_pos = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_GUIDE:
        t_pos = positive_scores(gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, DG, stride_gq,
                                stride_gk, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        g_threshold = guide_threshold(t_pos, guide_margin, FLAGS)
    return s_pos, threshold, g_threshold, t_pos


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
def tile_label_match(rows, row_valid, local_cols, col_valid, qlab_ptr, klab_tile_ptr, B, N,
                     NUM_LABELS: tl.constexpr, MASK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] label rule of the loss kernels' tiles (NUM_LABELS >= 1): query i's and key
    j's labels match at some level. Labels are int32 ranks (``config.label_operands``) and the
    relation is symmetric, so the symmetric loss's column direction reads the same tile."""
    query_label = tl.load(qlab_ptr + rows, mask=row_valid, other=0)
    if MASK_N:
        key_label = tl.load(klab_tile_ptr + local_cols, mask=col_valid, other=0)
    else:
        key_label = tl.load(klab_tile_ptr + local_cols)
    match = key_label[None, :] == query_label[:, None]
    for level in tl.static_range(1, NUM_LABELS):
        query_label = tl.load(qlab_ptr + level * B + rows, mask=row_valid, other=0)
        if MASK_N:
            key_label = tl.load(klab_tile_ptr + level * N + local_cols, mask=col_valid, other=0)
        else:
            key_label = tl.load(klab_tile_ptr + level * N + local_cols)
        match = match | (key_label[None, :] == query_label[:, None])
    return match


@triton.jit
def tile_classes(s, t, local_cols, col_valid, positive_local, threshold, g_threshold, label_match,
                 NUM_LABELS: tl.constexpr, GUIDE_RULE: tl.constexpr, FLAGS: tl.constexpr, MASK_N: tl.constexpr):
    """(is_positive, masked, negative) of one [BLOCK_M, BLOCK_N] tile of the loss kernels: the
    rules of ``false_negative_mask`` with the tile's columns as 32-bit tile-local indices
    (``positive_local`` = p_i - n0; ``label_match`` from ``tile_label_match`` when NUM_LABELS > 0),
    each rule compiled in only when it is on (``FLAGS``' score rules, ``NUM_LABELS``,
    ``GUIDE_RULE``: the guide masks), and the column bounds tested only on the ragged last tile
    (``MASK_N``)."""
    is_pos = local_cols[None, :] == positive_local[:, None]
    if (SCORE_RULES & FLAGS) or (NUM_LABELS > 0) or GUIDE_RULE:
        m = is_pos & False
        if SCORE_RULES & FLAGS:
            m = s > threshold[:, None]
        if NUM_LABELS > 0:
            m = m | label_match
        if GUIDE_RULE:
            m = m | (t > g_threshold[:, None])
        live = ~is_pos
        if MASK_N:
            live = live & col_valid[None, :]
        return is_pos, m & live, (~m) & live
    else:  # no rule: every key but the positive is a negative
        negative = local_cols[None, :] != positive_local[:, None]
        if MASK_N:
            negative = negative & col_valid[None, :]
        return is_pos, is_pos & False, negative


@triton.jit
def column_classes(s, t, row_local, row_valid, owner_local, has_owner, c_threshold, c_g_threshold, label_match,
                   NUM_LABELS: tl.constexpr, GUIDE_RULE: tl.constexpr, FLAGS: tl.constexpr, MASK_M: tl.constexpr):
    """(is_positive, negative) of the symmetric loss's column direction, read on the row-major
    tile (no transpose): key column j, owned by row o_j (``owner_local`` = o_j - the block's
    first row), against the block's queries i, with row o_j's thresholds (``c_threshold``) and
    the same label tile (the relation is symmetric)."""
    is_pos = row_local[:, None] == owner_local[None, :]
    live = has_owner[None, :] & ~is_pos
    if MASK_M:
        live = live & row_valid[:, None]
    if (SCORE_RULES & FLAGS) or (NUM_LABELS > 0) or GUIDE_RULE:
        m = is_pos & False
        if SCORE_RULES & FLAGS:
            m = s > c_threshold[None, :]
        if NUM_LABELS > 0:
            m = m | label_match
        if GUIDE_RULE:
            m = m | (t > c_g_threshold[None, :])
        live = live & ~m
    return is_pos, live


@triton.jit
def biased_logits2(s, t, negative, simans_beta, scale, simans_alpha, inv_temp, weight_a, WEIGHTING: tl.constexpr):
    """The biased logits in log2 units: x2_ij = (l_ij + u_ij) log2(e) over negatives (-inf
    elsewhere) and the log2-weights whose logsumexp normalises the row (SimANS; -inf elsewhere).
    HCL: x2 = l log2(e) alone (``hcl_sums`` and the backward take its weights from it).
    ``scale`` = log2(e) / temperature; SimANS's log2-weight is -(alpha s - beta_i)^2 with alpha =
    sqrt(a log2(e)) and beta_i = alpha (s_i+ + b), one fused multiply-add and one multiply per element.
    ``simans_beta`` is broadcast against the tile: [BLOCK_M, 1] for rows, [1, BLOCK_N] for the
    symmetric loss's columns."""
    neg_inf = float("-inf")
    if WEIGHTING == WEIGHT_SIMANS:
        d = s * simans_alpha - simans_beta
        lw2 = tl.where(negative, -(d * d), neg_inf)
        x2 = s * scale + lw2
    elif WEIGHTING == WEIGHT_HCL:  # the log2-logits alone: hcl_sums and the backward weight them
        x2 = tl.where(negative, s * scale, neg_inf)
        lw2 = x2
    elif WEIGHTING == WEIGHT_GCSE:
        # the tie on the raw scores (s <= t) and the gap (s - t) / temperature, as in every backend
        logit = s * inv_temp
        gap = (s - t) * inv_temp
        decayed = -logit * tl.exp(-gap * gap * (0.5 / (weight_a * weight_a)))
        x2 = tl.where(negative, (logit + tl.where(s > t, 0.0, decayed)) * LOG2E, neg_inf)
        lw2 = x2
    elif WEIGHTING == WEIGHT_HARDNESS:
        x2 = tl.where(negative, s * (scale + weight_a * LOG2E), neg_inf)
        lw2 = x2
    elif WEIGHTING == WEIGHT_GUIDE_HARDNESS:
        x2 = tl.where(negative, s * scale + t * (weight_a * LOG2E), neg_inf)
        lw2 = x2
    else:
        x2 = tl.where(negative, s * scale, neg_inf)
        lw2 = x2
    return x2, lw2


@triton.jit
def hcl_sums(hi, lo, sx, sw, s, negative, scale, beta):
    """HCL's running sums of a tile (log2 units), per row: ``hi`` / ``lo`` the largest / smallest
    negative score so far, ``sx = sum_j 2^{(1 + beta)(s_j - r) scale}`` and ``sw = sum_j 2^{beta (s_j
    - w) scale}`` with the references ``r``, ``w`` the score ``hi`` (``lo`` where the factor is
    negative): each term is <= 1, the reference's exactly 1 (the scores' difference is exact where
    it matters), and no exponent is a difference of two rounded terms of size (1 + beta) |l|."""
    gx = 1.0 + beta
    t_hi = tl.max(tl.where(negative, s, float("-inf")), axis=1)
    t_lo = tl.min(tl.where(negative, s, float("inf")), axis=1)
    new_hi = tl.maximum(hi, t_hi)
    new_lo = tl.minimum(lo, t_lo)
    seen = hi > float("-inf")  # rows with an earlier negative: their sums are carried over
    anyn = new_hi > float("-inf")
    rx = tl.where(anyn, tl.where(gx >= 0.0, new_hi, new_lo), 0.0)
    rw = tl.where(anyn, tl.where(beta >= 0.0, new_hi, new_lo), 0.0)
    old_rx = tl.where(seen, tl.where(gx >= 0.0, hi, lo), rx)
    old_rw = tl.where(seen, tl.where(beta >= 0.0, hi, lo), rw)
    fx = gx * scale
    fw = beta * scale
    ex = tl.where(negative, tl.exp2((s - rx[:, None]) * fx), 0.0)
    ew = tl.where(negative, tl.exp2((s - rw[:, None]) * fw), 0.0)
    sx = sx * tl.exp2((old_rx - rx) * fx) + tl.sum(ex, axis=1)
    sw = sw * tl.exp2((old_rw - rw) * fw) + tl.sum(ew, axis=1)
    return new_hi, new_lo, sx, sw


@triton.jit
def relative_row(d, log_floor, n, tau_plus, DEBIAS: tl.constexpr):
    """A row's logsumexp relative to its negatives' log-mass g (``d = l+ - g``; DCL with
    ``log_floor = log n - 1/t - g``): (lse - g, loss, the negatives' offset shift, c+), each from
    the larger of the positive's and the negatives' terms (``relative_row`` in csrc/common.h)."""
    if DEBIAS:
        c = tl.maximum(tl.maximum(d, 0.0), log_floor)
        pos = tl.exp(d - c)
        raw = (tl.exp(-c) - n * tau_plus * pos) / (1.0 - tau_plus)
        floor = tl.exp(log_floor - c)
        clamped = raw < floor
        neg = tl.where(clamped, floor, raw)
        pos_wins = pos >= neg
        loss_p = tl.log(1.0 + neg / pos)  # log1p: Triton has none; exact where neg / pos is small enough to matter
        rel_n = c + tl.log(neg) + tl.log(1.0 + pos / neg)
        loss = tl.where(pos_wins, loss_p, rel_n - d)
        rel = tl.where(pos_wins, d + loss_p, rel_n)
        shift = tl.where(clamped, float("-inf"), -tl.log(1.0 - tau_plus))
        coef = tl.where(clamped, 1.0, 1.0 - n * tau_plus / (1.0 - tau_plus))
    else:
        e = tl.log(1.0 + tl.exp(-tl.abs(d)))
        loss = tl.where(d >= 0.0, e, e - d)
        rel = tl.where(d >= 0.0, d + e, e)
        shift = tl.zeros_like(d)
        coef = tl.full(d.shape, 1.0, tl.float32)
    return rel, loss, shift, coef


@triton.jit
def simans_constants(s_pos, weight_a, weight_b):
    """(alpha, beta_i) of SimANS's log2-weight -(alpha s - beta_i)^2 (``biased_logits2``)."""
    alpha = tl.sqrt(weight_a * LOG2E)
    return alpha, alpha * (s_pos + weight_b)


@triton.jit
def column_rules_tile(owner_ptr, cstate_ptr, n0, local_cols, col_valid, N, MASK_N: tl.constexpr):
    """The forward's per-column state of one key tile (the first three rows of
    ``column_state_tile``): owner, has owner, s_{o j}, score threshold, guide threshold."""
    if MASK_N:
        owner = tl.load(owner_ptr + n0 + local_cols, mask=col_valid, other=-1)
        c_spos = tl.load(cstate_ptr + n0 + local_cols, mask=col_valid, other=0.0)
        c_thr = tl.load(cstate_ptr + n0 + N + local_cols, mask=col_valid, other=0.0)
        c_gthr = tl.load(cstate_ptr + n0 + 2 * N + local_cols, mask=col_valid, other=0.0)
    else:
        owner = tl.load(owner_ptr + n0 + local_cols)
        c_spos = tl.load(cstate_ptr + n0 + local_cols)
        c_thr = tl.load(cstate_ptr + n0 + N + local_cols)
        c_gthr = tl.load(cstate_ptr + n0 + 2 * N + local_cols)
    return owner, owner >= 0, c_spos, c_thr, c_gthr


@triton.jit
def column_state_tile(owner_ptr, cstate_ptr, n0, local_cols, col_valid, N, MASK_N: tl.constexpr):
    """The backward's per-column state of one key tile, read contiguously: the owner row o_j
    (int32, -1 for nobody's positive) and ``config.column_state``'s rows gathered by the host,
    (s_{o j}, score threshold, guide threshold, column logsumexp, column offset, g_o), 0 where
    the column has no owner."""
    if MASK_N:
        owner = tl.load(owner_ptr + n0 + local_cols, mask=col_valid, other=-1)
    else:
        owner = tl.load(owner_ptr + n0 + local_cols)
    base = cstate_ptr + n0
    c_spos = tl.load(base + local_cols, mask=col_valid, other=0.0)
    c_thr = tl.load(base + N + local_cols, mask=col_valid, other=0.0)
    c_gthr = tl.load(base + 2 * N + local_cols, mask=col_valid, other=0.0)
    c_lse = tl.load(base + 3 * N + local_cols, mask=col_valid, other=0.0)
    c_off = tl.load(base + 4 * N + local_cols, mask=col_valid, other=0.0)
    c_grad = tl.load(base + 5 * N + local_cols, mask=col_valid, other=0.0)
    return owner, owner >= 0, c_spos, c_thr, c_gthr, c_lse, c_off, c_grad
