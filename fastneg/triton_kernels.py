"""Triton kernels of the fused contrastive op (SPEC sections 2-4).

The kernels share the ``tl_*`` helpers below, so the score tile, the false-negative mask and
the biased logits are computed by one piece of code with one block configuration:

- ``_info_nce_fwd_kernel``: each program takes blocks of query rows (one block each, or, for
  the symmetric loss, every G-th block); one pass over key tiles with an online logsumexp (and,
  for SimANS, an online logsumexp of the log-weights for the normaliser). Writes O(B) per-row
  results only. Symmetric loss: the same tile is also read by columns (``tl.trans``): each
  positive column j (owned by row o) merges the tile into the program's own partial logsumexp
  of column j, kept in a [G, B] buffer indexed by o (G = programs, a fixed count), and
  ``_info_nce_columns_kernel`` merges the G partials in program order. The thresholds of every
  row come first from ``_info_nce_row_state_kernel``, since column j needs row o's.
- The backward runs over panels of rows (``R`` rows, a multiple of BLOCK_M, as many as the
  workspace holds: ``triton_ops.panel_rows``). Per panel, ``_info_nce_bwd_ds_kernel`` (one
  program per tile) recomputes each score tile once, exactly as the forward saw it (same tile
  shape, same D chunking, so the same bits and the same mask), and writes ``dS`` in the inputs'
  dtype to the panel and the tile's per-row ``sum_j dS_ij (s_ij - s_i+)`` (the temperature
  gradient) to a [key blocks, R] buffer summed after it. ``_panel_dq_kernel`` then computes the
  panel's rows of ``dq = dS @ k`` (complete: a panel holds every key) and ``_panel_dk_kernel``
  adds ``dS^T @ q_panel`` to the key gradient (float32 running sum, in panel order).

Matrix products per forward+backward, in units of B x N x D, for every mode (weightings,
estimators, soft labels, symmetric; fp32, fp16, bf16) and every D: 4 (q k^T in the forward; the
backward's recomputation of q k^T, dS k and dS^T q), plus the positives' scores from gathered
tiles (B x BLOCK_M x D, i.e. BLOCK_M / N of a product), plus, with a guide, 2 products of the
guide's width (forward and recomputation) and its gathered positives. Counted by
``tests/test_product_count.py`` and ``benchmarks/count_products.py`` under the interpreter.
The naive loss does 3 to 4; the floor is 3.

No atomics: every sum has a fixed order, so results are deterministic run to run. With the
symmetric loss each recomputed tile gets the column direction's dS added before it is stored.
Offsets are int64 throughout. ``dS_ij = g_i / tau * (P_ij - [j == p_i])`` with
``P_ij = exp(x_ij + offset_i - lse_i)`` (plus the modes' extra terms, ``tl_score_grad``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
WEIGHT_NONE: tl.constexpr = tl.constexpr(0)
WEIGHT_SIMANS: tl.constexpr = tl.constexpr(1)
WEIGHT_HARDNESS: tl.constexpr = tl.constexpr(2)
WEIGHT_GUIDE_HARDNESS: tl.constexpr = tl.constexpr(3)  # internal: bias from the guide score, guide not masking
WEIGHT_HCL: tl.constexpr = tl.constexpr(4)  # HCL: importance weights e^{beta l}, gradient through them
WEIGHT_GCSE: tl.constexpr = tl.constexpr(5)  # GCSE: Gaussian-decayed offset from the reference (guide) logit


@triton.jit
def tl_tile_scores(a_ptr, b_ptr, a_rows, b_rows, a_valid, b_valid, D, stride_a, stride_b,
                   BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """[BLOCK_A, BLOCK_B] fp32 tile of a[a_rows] @ b[b_rows]^T, summed over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_valid = d < D
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + d[None, :], mask=a_valid[:, None] & d_valid[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + d[None, :], mask=b_valid[:, None] & d_valid[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def tl_positive_scores(a_ptr, b_ptr, pos_ptr, row_start, rows, row_valid, B, D, stride_a, stride_b,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """s_{i, p_i} for the block's rows, from tiles of exactly the main loop's shape: the
    positives' rows of ``b`` are gathered into key tiles and the diagonal is read off. (A product
    may still round an element by its position in the tile, so an exact duplicate of the positive
    key is not guaranteed to score bit-identically to it: docs/reference.md, "Ties at a threshold".)"""
    local = tl.arange(0, BLOCK_M)
    out = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for sub in tl.static_range(0, BLOCK_M, BLOCK_N):
        g_local = sub + tl.arange(0, BLOCK_N)
        g_rows = row_start + g_local
        g_valid = (g_local < BLOCK_M) & (g_rows < B)
        g_cols = tl.load(pos_ptr + g_rows, mask=g_valid, other=0).to(tl.int64)
        s = tl_tile_scores(a_ptr, b_ptr, rows, g_cols, row_valid, g_valid, D, stride_a, stride_b,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        out += tl.sum(tl.where(local[:, None] == g_local[None, :], s, 0.0), axis=1)
    return out


@triton.jit
def tl_classify(s, t, rows, row_valid, cols, col_valid, positive, threshold, guide_threshold, qlab_ptr, klab_ptr,
                B, N, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr):
    """(is_positive, masked, negative) boolean tiles: the false-negative mask of SPEC section 2
    with the per-row score/guide thresholds precomputed from the positive's score. Labels are
    [NUM_LABELS, B] / [NUM_LABELS, N]; a key is masked when any level matches."""
    is_pos = (cols[None, :] == positive[:, None]) & col_valid[None, :]
    m = s > threshold[:, None]
    for level in tl.static_range(NUM_LABELS):
        query_label = tl.load(qlab_ptr + level * B + rows, mask=row_valid, other=0)
        key_label = tl.load(klab_ptr + level * N + cols, mask=col_valid, other=0)
        m = m | (key_label[None, :] == query_label[:, None])
    if HAS_GUIDE:
        m = m | (t > guide_threshold[:, None])
    live = col_valid[None, :] & ~is_pos
    return is_pos, m & live, (~m) & live


@triton.jit
def tl_biased_logits(s, t, negative, positive_score, inv_temp, weight_a, weight_b, WEIGHTING: tl.constexpr):
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
        d = s - positive_score[:, None] - weight_b
        log_w = -weight_a * d * d
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
def tl_online_lse(running_max, running_sum, x):
    """Merge a tile of values into a per-row online logsumexp (exp2 with log2(e) folded in)."""
    new_max = tl.maximum(running_max, tl.max(x, axis=1))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2((running_max - safe) * LOG2E) + tl.sum(
        tl.exp2((x - safe[:, None]) * LOG2E), axis=1)
    return new_max, running_sum


@triton.jit
def tl_merge_lse(max_a, sum_a, max_b, sum_b):
    """Merge two partial logsumexps given as (max, sum of exp(x - max))."""
    new_max = tl.maximum(max_a, max_b)
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, sum_a * tl.exp2((max_a - safe) * LOG2E) + sum_b * tl.exp2((max_b - safe) * LOG2E)


@triton.jit
def tl_logaddexp(a, b):
    m = tl.maximum(a, b)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@triton.jit
def tl_row_state(q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, D, DG,
                 stride_q, stride_k, stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin,
                 HAS_GUIDE: tl.constexpr, GUIDE_RELATIVE: tl.constexpr, HAS_MARGIN: tl.constexpr,
                 HAS_RELATIVE_MARGIN: tl.constexpr, HAS_MAX_SCORE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(s_i+, score threshold, guide threshold) of a block of rows."""
    s_pos = tl_positive_scores(q_ptr, k_ptr, pos_ptr, row_start, rows, row_valid, B, D, stride_q, stride_k,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    threshold = tl.full((BLOCK_M,), float("inf"), tl.float32)
    if HAS_MARGIN:
        threshold = tl.minimum(threshold, s_pos - margin)
    if HAS_RELATIVE_MARGIN:
        threshold = tl.minimum(threshold, s_pos - tl.abs(s_pos) * relative_margin)
    if HAS_MAX_SCORE:
        threshold = tl.minimum(threshold, tl.zeros_like(s_pos) + max_score)
    guide_threshold = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_GUIDE:
        t_pos = tl_positive_scores(gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, DG, stride_gq,
                                   stride_gk, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        if GUIDE_RELATIVE:
            guide_threshold = t_pos - tl.abs(t_pos) * guide_margin
        else:
            guide_threshold = t_pos - guide_margin
    return s_pos, threshold, guide_threshold


@triton.jit
def _info_nce_row_state_kernel(
    q_ptr, k_ptr, pos_ptr, gq_ptr, gk_ptr, spos_ptr, thr_ptr, gthr_ptr,
    B, D, DG, stride_q, stride_k, stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin,
    HAS_GUIDE: tl.constexpr, GUIDE_RELATIVE: tl.constexpr, HAS_MARGIN: tl.constexpr,
    HAS_RELATIVE_MARGIN: tl.constexpr, HAS_MAX_SCORE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    s_pos, threshold, guide_threshold = tl_row_state(
        q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, D, DG, stride_q, stride_k,
        stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin, HAS_GUIDE, GUIDE_RELATIVE,
        HAS_MARGIN, HAS_RELATIVE_MARGIN, HAS_MAX_SCORE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(spos_ptr + rows, s_pos, mask=row_valid)
    tl.store(thr_ptr + rows, threshold, mask=row_valid)
    tl.store(gthr_ptr + rows, guide_threshold, mask=row_valid)


@triton.jit
def tl_column_state(cols, col_valid, owner_ptr, spos_ptr, thr_ptr, gthr_ptr, HAS_GUIDE: tl.constexpr):
    """Owner row o of each key column (-1: nobody's positive) and the column's rules, which are
    row o's: positive score s_{o j}, score threshold, guide threshold."""
    owner = tl.load(owner_ptr + cols, mask=col_valid, other=-1)
    has_owner = owner >= 0
    o = tl.where(has_owner, owner, 0)
    c_spos = tl.load(spos_ptr + o, mask=has_owner, other=0.0)
    c_thr = tl.load(thr_ptr + o, mask=has_owner, other=0.0)
    c_gthr = tl.zeros_like(c_spos)
    if HAS_GUIDE:
        c_gthr = tl.load(gthr_ptr + o, mask=has_owner, other=0.0)
    return owner, has_owner, o, c_spos, c_thr, c_gthr


@triton.jit
def tl_column_logits(s, t, rows, row_valid, cols, col_valid, owner_ptr, spos_ptr, thr_ptr, gthr_ptr,
                     qlab_ptr, klab_ptr, inv_temp, weight_a, weight_b, B, N, NUM_LABELS: tl.constexpr,
                     HAS_GUIDE: tl.constexpr, WEIGHTING: tl.constexpr):
    """The tile read by columns: [BLOCK_N, BLOCK_M] classification and biased logits of each
    owned column j against the block's queries, i.e. tl_classify / tl_biased_logits on the
    transposed tile with queries and keys swapped."""
    owner, has_owner, o, c_spos, c_thr, c_gthr = tl_column_state(cols, col_valid, owner_ptr, spos_ptr, thr_ptr,
                                                                 gthr_ptr, HAS_GUIDE)
    s_t = tl.trans(s)
    t_t = tl.trans(t)
    is_pos, _, negative = tl_classify(s_t, t_t, cols, has_owner, rows, row_valid, owner, c_thr, c_gthr,
                                      klab_ptr, qlab_ptr, N, B, NUM_LABELS, HAS_GUIDE)
    negative = negative & has_owner[:, None]
    x, log_w = tl_biased_logits(s_t, t_t, negative, c_spos, inv_temp, weight_a, weight_b, WEIGHTING)
    return s_t, is_pos, negative, x, log_w, has_owner, o, c_spos


@triton.jit
def _info_nce_fwd_kernel(
    q_ptr, k_ptr, pos_ptr, temp_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, owner_ptr, excl_ptr,
    loss_ptr, lse_ptr, spos_ptr, offset_ptr, thr_ptr, gthr_ptr, nmask_ptr, nneg_ptr,
    cmax_ptr, csum_ptr, cwmax_ptr, cwsum_ptr, cneg_ptr, coef_ptr,
    B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk,
    margin, relative_margin, max_score, guide_margin, weight_a, weight_b, tau_plus, soft_inv, soft_weight,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RELATIVE: tl.constexpr,
    HAS_MARGIN: tl.constexpr, HAS_RELATIVE_MARGIN: tl.constexpr, HAS_MAX_SCORE: tl.constexpr,
    WEIGHTING: tl.constexpr, SYMMETRIC: tl.constexpr, DEBIAS: tl.constexpr, SOFT: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr, ATTRACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    part = tl.program_id(0)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    for rb in range(part, tl.cdiv(B, BLOCK_M), tl.num_programs(0)):
        row_start = tl.cast(rb, tl.int64) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < B
        positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        if SYMMETRIC:  # every row's state was computed first (columns need other blocks' rows)
            s_pos = tl.load(spos_ptr + rows, mask=row_valid, other=0.0)
            threshold = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)
            guide_threshold = tl.load(gthr_ptr + rows, mask=row_valid, other=0.0)
        else:
            s_pos, threshold, guide_threshold = tl_row_state(
                q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, D, DG, stride_q, stride_k,
                stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin, HAS_GUIDE, GUIDE_RELATIVE,
                HAS_MARGIN, HAS_RELATIVE_MARGIN, HAS_MAX_SCORE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)

        x_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        x_sum = tl.zeros((BLOCK_M,), tl.float32)
        w_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        w_sum = tl.zeros((BLOCK_M,), tl.float32)
        n_neg = tl.zeros((BLOCK_M,), tl.int64)
        n_masked = tl.zeros((BLOCK_M,), tl.int64)
        t_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # soft labels: the teacher's online logsumexp
        t_sum = tl.zeros((BLOCK_M,), tl.float32)
        t_gap = tl.zeros((BLOCK_M,), tl.float32)  # sum_j e^{t'_j - t_max} (t'_j - x_j)
        t_pos = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        # SimANS with soft labels: the negatives' log-weights kept apart from t_gap, relative to w_max:
        # t_wgap = sum_neg e^{t'_j - t_max} (u_j - w_max), t_nsum = sum_neg e^{t'_j - t_max}
        t_wgap = tl.zeros((BLOCK_M,), tl.float32)
        t_nsum = tl.zeros((BLOCK_M,), tl.float32)
        # attraction: the flagged keys' online logsumexp and the sum of their logits
        f_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        f_sum = tl.zeros((BLOCK_M,), tl.float32)
        f_logits = tl.zeros((BLOCK_M,), tl.float32)
        exclude = tl.full((BLOCK_M,), -1, tl.int64)
        if HAS_EXCLUDE:
            exclude = tl.load(excl_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_valid = cols < N
            s = tl_tile_scores(q_ptr, k_ptr, rows, cols, row_valid, col_valid, D, stride_q, stride_k,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            t = s  # stands in for the guide tile when there is no guide
            if HAS_GUIDE:
                t = tl_tile_scores(gq_ptr, gk_ptr, rows, cols, row_valid, col_valid, DG, stride_gq, stride_gk,
                                   BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            is_pos, masked, negative = tl_classify(s, t, rows, row_valid, cols, col_valid, positive, threshold,
                                                   guide_threshold, qlab_ptr, klab_ptr, B, N, NUM_LABELS, HAS_GUIDE)
            if HAS_EXCLUDE:  # the row's excluded column is neither masked nor a negative
                kept = cols[None, :] != exclude[:, None]
                masked = masked & kept
                negative = negative & kept
            if ATTRACT:
                f_max, f_sum = tl_online_lse(f_max, f_sum, tl.where(masked, s * inv_temp, float("-inf")))
                f_logits += tl.sum(tl.where(masked, s * inv_temp, 0.0), axis=1)
            n_neg += tl.sum(negative.to(tl.int64), axis=1)
            n_masked += tl.sum(masked.to(tl.int64), axis=1)
            x, log_w = tl_biased_logits(s, t, negative, s_pos, inv_temp, weight_a, weight_b, WEIGHTING)
            x_max, x_sum = tl_online_lse(x_max, x_sum, x)
            w_prev = w_max
            if (WEIGHTING == WEIGHT_SIMANS) or (WEIGHTING == WEIGHT_HCL):
                w_max, w_sum = tl_online_lse(w_max, w_sum, log_w)
            if SOFT:
                tx = tl.where(negative | is_pos, t * soft_inv, float("-inf"))
                if WEIGHTING == WEIGHT_SIMANS:
                    student = s * inv_temp  # the log-weights go to t_wgap
                else:
                    student = tl.where(is_pos, s * inv_temp, x)
                t_pos = tl.maximum(t_pos, tl.max(tl.where(is_pos, tx, float("-inf")), axis=1))
                new_max = tl.maximum(t_max, tl.max(tx, axis=1))
                safe = tl.where(new_max == float("-inf"), 0.0, new_max)
                carried = tl.exp2((t_max - safe) * LOG2E)
                e = tl.exp2((tx - safe[:, None]) * LOG2E)
                t_sum = t_sum * carried + tl.sum(e, axis=1)
                t_gap = t_gap * carried + tl.sum(tl.where(tx > float("-inf"), e * (tx - student), 0.0), axis=1)
                if WEIGHTING == WEIGHT_SIMANS:
                    w_shift = tl.where(w_prev == float("-inf"), 0.0, w_max - w_prev)
                    w_safe = tl.where(w_max == float("-inf"), 0.0, w_max)
                    e_neg = tl.where(negative, e, 0.0)
                    t_wgap = (t_wgap - w_shift * t_nsum) * carried + tl.sum(
                        tl.where(negative, e_neg * (log_w - w_safe[:, None]), 0.0), axis=1)
                    t_nsum = t_nsum * carried + tl.sum(e_neg, axis=1)
                t_max = new_max
            if SYMMETRIC:
                # this program's partial logsumexp of each owned column, slot [part, owner]
                _, _, c_neg, c_x, c_log_w, has_owner, o, _ = tl_column_logits(
                    s, t, rows, row_valid, cols, col_valid, owner_ptr, spos_ptr, thr_ptr, gthr_ptr, qlab_ptr,
                    klab_ptr, inv_temp, weight_a, weight_b, B, N, NUM_LABELS, HAS_GUIDE, WEIGHTING)
                slot = part.to(tl.int64) * B + o
                c_max, c_sum = tl_online_lse(tl.load(cmax_ptr + slot, mask=has_owner, other=float("-inf")),
                                             tl.load(csum_ptr + slot, mask=has_owner, other=0.0), c_x)
                tl.store(cmax_ptr + slot, c_max, mask=has_owner)
                tl.store(csum_ptr + slot, c_sum, mask=has_owner)
                if WEIGHTING == WEIGHT_SIMANS:
                    c_wmax, c_wsum = tl_online_lse(tl.load(cwmax_ptr + slot, mask=has_owner, other=float("-inf")),
                                                   tl.load(cwsum_ptr + slot, mask=has_owner, other=0.0), c_log_w)
                    tl.store(cwmax_ptr + slot, c_wmax, mask=has_owner)
                    tl.store(cwsum_ptr + slot, c_wsum, mask=has_owner)
                c_count = tl.load(cneg_ptr + slot, mask=has_owner, other=0) + tl.sum(c_neg.to(tl.int32), axis=1)
                tl.store(cneg_ptr + slot, c_count, mask=has_owner)
                tl.debug_barrier()  # the next row block of this program reads these slots back

        has_neg = n_neg > 0
        neg_lse = tl.where(has_neg, x_max + tl.log(x_sum), float("-inf"))
        offset = tl.zeros((BLOCK_M,), tl.float32)
        if (WEIGHTING == WEIGHT_SIMANS) or (WEIGHTING == WEIGHT_HCL):
            offset = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - (w_max + tl.log(w_sum)), 0.0)
        weight_offset = offset
        l_pos = s_pos * inv_temp
        coef = tl.full((BLOCK_M,), 1.0, tl.float32)
        if DEBIAS:  # DCL: Ng = max((e^{neg_lse} - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t}), after a shift c
            n = n_neg.to(tl.float32)
            log_floor = tl.where(has_neg, tl.log(n) - inv_temp, float("-inf"))
            c = tl.maximum(tl.maximum(neg_lse + offset, l_pos), log_floor)
            raw = (tl.exp(neg_lse + offset - c) - n * tau_plus * tl.exp(l_pos - c)) / (1.0 - tau_plus)
            floor = n * tl.exp(-inv_temp - c)
            clamped = raw < floor
            lse = c + tl.log(tl.exp(l_pos - c) + tl.where(clamped, floor, raw))
            offset = tl.where(clamped, float("-inf"), offset - tl.log(1.0 - tau_plus))
            coef = tl.where(clamped, 1.0, 1.0 - n * tau_plus / (1.0 - tau_plus))
        else:
            lse = tl_logaddexp(l_pos, neg_lse + offset)
        loss = lse - l_pos
        if ATTRACT:  # P_i = {p_i} U flagged: logsumexp over P_i U N_i - mean over P_i of l_ip
            n_pos = 1.0 + n_masked.to(tl.float32)
            lse = tl_logaddexp(lse, tl.where(n_masked > 0, f_max + tl.log(f_sum), float("-inf")))
            loss = lse - (l_pos + f_logits) / n_pos
            tl.store(coef_ptr + B + rows, 1.0 / n_pos, mask=row_valid)
        if WEIGHTING == WEIGHT_HCL:
            # dL/dl_ij = (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, R = the negatives' share of P
            hcl_mass = tl.where(has_neg, weight_a * tl.exp(neg_lse + offset - lse), 0.0)
            hcl_shift = tl.where(has_neg, weight_offset - tl.log(n_neg.to(tl.float32)), 0.0)
            tl.store(coef_ptr + B + rows, hcl_mass, mask=row_valid)
            tl.store(coef_ptr + 2 * B + rows, hcl_shift, mask=row_valid)
        if SOFT:  # KL(p || q) = lse - T + sum_j p_j (t'_j - x_j) - offset (1 - p+)
            teacher = t_max + tl.log(t_sum)
            p_pos = tl.exp(t_pos - teacher)
            if WEIGHTING == WEIGHT_SIMANS:
                # sum_neg p_j (u_j + offset), offset = log n - w_max - log w_sum: no large terms cancel
                spread = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - tl.log(w_sum), 0.0)
                kl = lse - teacher + (t_gap - t_wgap - spread * t_nsum) / t_sum
            else:
                kl = lse - teacher + t_gap / t_sum - tl.where(offset == 0.0, 0.0, offset * (1.0 - p_pos))
            loss = (1.0 - soft_weight) * loss + soft_weight * kl
            tl.store(coef_ptr + 3 * B + rows, teacher, mask=row_valid)
        tl.store(coef_ptr + rows, coef, mask=row_valid)
        tl.store(loss_ptr + rows, loss, mask=row_valid)
        tl.store(lse_ptr + rows, lse, mask=row_valid)
        tl.store(offset_ptr + rows, offset, mask=row_valid)
        tl.store(nmask_ptr + rows, n_masked, mask=row_valid)
        tl.store(nneg_ptr + rows, n_neg, mask=row_valid)
        if not SYMMETRIC:
            tl.store(spos_ptr + rows, s_pos, mask=row_valid)
            tl.store(thr_ptr + rows, threshold, mask=row_valid)
            tl.store(gthr_ptr + rows, guide_threshold, mask=row_valid)


@triton.jit
def _info_nce_columns_kernel(
    loss_ptr, spos_ptr, temp_ptr, cmax_ptr, csum_ptr, cwmax_ptr, cwsum_ptr, cneg_ptr, clse_ptr, coff_ptr,
    B, PARTS, WEIGHTING: tl.constexpr, BLOCK: tl.constexpr,
):
    """Symmetric loss: merge the PARTS partial logsumexps of each positive column in program
    order (deterministic) and set loss_o = (row o + column p_o) / 2."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < B
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    x_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    x_sum = tl.zeros((BLOCK,), tl.float32)
    w_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    w_sum = tl.zeros((BLOCK,), tl.float32)
    n_neg = tl.zeros((BLOCK,), tl.int32)
    for part in range(0, PARTS):
        slot = part * B + o
        x_max, x_sum = tl_merge_lse(x_max, x_sum, tl.load(cmax_ptr + slot, mask=valid, other=float("-inf")),
                                    tl.load(csum_ptr + slot, mask=valid, other=0.0))
        if WEIGHTING == WEIGHT_SIMANS:
            w_max, w_sum = tl_merge_lse(w_max, w_sum, tl.load(cwmax_ptr + slot, mask=valid, other=float("-inf")),
                                        tl.load(cwsum_ptr + slot, mask=valid, other=0.0))
        n_neg += tl.load(cneg_ptr + slot, mask=valid, other=0)
    has_neg = n_neg > 0
    neg_lse = tl.where(has_neg, x_max + tl.log(x_sum), float("-inf"))
    offset = tl.zeros((BLOCK,), tl.float32)
    if WEIGHTING == WEIGHT_SIMANS:
        offset = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - (w_max + tl.log(w_sum)), 0.0)
    l_pos = tl.load(spos_ptr + o, mask=valid, other=0.0) * inv_temp
    lse = tl_logaddexp(l_pos, neg_lse + offset)
    row_loss = tl.load(loss_ptr + o, mask=valid, other=0.0)
    tl.store(loss_ptr + o, (row_loss + (lse - l_pos)) * 0.5, mask=valid)
    tl.store(clse_ptr + o, lse, mask=valid)
    tl.store(coff_ptr + o, offset, mask=valid)


@triton.jit
def tl_score_grad(q_ptr, k_ptr, gq_ptr, gk_ptr, qlab_ptr, klab_ptr, rows, cols, row_valid, col_valid,
                  positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
                  hcl_mass, hcl_shift, teacher, exclude, inv_p,
                  owner_ptr, spos_ptr, thr_ptr, gthr_ptr, clse_ptr, coff_ptr, grad_ptr,
                  inv_temp, weight_a, weight_b, soft_inv, soft_weight, B, N, D, DG, stride_q, stride_k, stride_gq,
                  stride_gk, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, WEIGHTING: tl.constexpr,
                  SYMMETRIC: tl.constexpr, SOFT: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ATTRACT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dS, tau) tiles: dS_ij = dL/ds_ij, with s recomputed exactly as forward saw it, and
    tau_ij = dS_ij (s_ij - positive score of the direction), whose sum gives the temperature
    gradient (each direction's dS sums to 0 over its row or column, so this equals
    sum dS_ij s_ij without cancelling two large sums)."""
    s = tl_tile_scores(q_ptr, k_ptr, rows, cols, row_valid, col_valid, D, stride_q, stride_k,
                       BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    t = s
    if HAS_GUIDE:
        t = tl_tile_scores(gq_ptr, gk_ptr, rows, cols, row_valid, col_valid, DG, stride_gq, stride_gk,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    is_pos, masked, negative = tl_classify(s, t, rows, row_valid, cols, col_valid, positive, threshold,
                                           guide_threshold, qlab_ptr, klab_ptr, B, N, NUM_LABELS, HAS_GUIDE)
    if HAS_EXCLUDE:
        kept = cols[None, :] != exclude[:, None]
        masked = masked & kept
        negative = negative & kept
    x, log_w = tl_biased_logits(s, t, negative, s_pos, inv_temp, weight_a, weight_b, WEIGHTING)
    p = tl.exp2((x + (offset - lse)[:, None]) * LOG2E)
    if WEIGHTING == WEIGHT_HCL:
        p = p * (1.0 + weight_a) - hcl_mass[:, None] * tl.exp2((log_w + hcl_shift[:, None]) * LOG2E)
    p_pos = coef * tl.exp2((s_pos * inv_temp - lse) * LOG2E) - 1.0  # coef = 1 but with DCL's debias
    if ATTRACT:  # the flagged keys are positives: e^{l_ij - lse} - 1 / |P_i|, the positive's -1 too
        p_pos = tl.exp2((s_pos * inv_temp - lse) * LOG2E) - inv_p
        p = tl.where(masked, tl.exp2((s * inv_temp - lse[:, None]) * LOG2E) - inv_p[:, None], p)
    p = tl.where(is_pos, p_pos[:, None], p)
    if SOFT:  # minus w times the teacher's softmax; the positive's -1 becomes -(1 - w)
        tx = tl.where(negative | is_pos, t * soft_inv, float("-inf"))
        p = tl.where(is_pos, p + soft_weight, p) - soft_weight * tl.exp2((tx - teacher[:, None]) * LOG2E)
    ds = p * grad_scale[:, None]
    ds = tl.where(row_valid[:, None] & col_valid[None, :], ds, 0.0)
    tau = ds * (s - s_pos[:, None])
    if SYMMETRIC:
        # column j (owner o): dS'_{i j} = g_o / (2 tau) (P'_{i j} - [i == o]), built transposed
        s_t, c_is_pos, _, c_x, _, has_owner, o, c_spos = tl_column_logits(
            s, t, rows, row_valid, cols, col_valid, owner_ptr, spos_ptr, thr_ptr, gthr_ptr, qlab_ptr, klab_ptr,
            inv_temp, weight_a, weight_b, B, N, NUM_LABELS, HAS_GUIDE, WEIGHTING)
        c_lse = tl.load(clse_ptr + o, mask=has_owner, other=0.0)
        c_off = tl.load(coff_ptr + o, mask=has_owner, other=0.0)
        c_scale = tl.load(grad_ptr + o, mask=has_owner, other=0.0).to(tl.float32) * (0.5 * inv_temp)
        c_p = tl.exp2((c_x + (c_off - c_lse)[:, None]) * LOG2E)
        c_p_pos = tl.exp2((c_spos * inv_temp - c_lse) * LOG2E) - 1.0
        c_p = tl.where(c_is_pos, c_p_pos[:, None], c_p)
        c_ds = tl.where(has_owner[:, None] & row_valid[None, :], c_p * c_scale[:, None], 0.0)
        ds += tl.trans(c_ds)
        tau += tl.trans(c_ds * (s_t - c_spos[:, None]))
    return ds, tau


@triton.jit
def _load_row_state(rows, row_valid, pos_ptr, spos_ptr, thr_ptr, gthr_ptr, lse_ptr, offset_ptr, coef_ptr,
                    grad_ptr, excl_ptr, inv_temp, B, HAS_GUIDE: tl.constexpr, SYMMETRIC: tl.constexpr,
                    WEIGHTING: tl.constexpr, SOFT: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ATTRACT: tl.constexpr):
    positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    s_pos = tl.load(spos_ptr + rows, mask=row_valid, other=0.0)
    threshold = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)
    guide_threshold = tl.zeros_like(s_pos)
    if HAS_GUIDE:
        guide_threshold = tl.load(gthr_ptr + rows, mask=row_valid, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    offset = tl.load(offset_ptr + rows, mask=row_valid, other=0.0)
    grad_scale = tl.load(grad_ptr + rows, mask=row_valid, other=0.0).to(tl.float32) * inv_temp
    if SYMMETRIC:  # loss_i = (row_i + column_{p_i}) / 2
        grad_scale = grad_scale * 0.5
    coef = tl.load(coef_ptr + rows, mask=row_valid, other=1.0)
    # rows 1-3 of the [4, B] coefficients: read only by the modes that use them
    hcl_mass = tl.zeros_like(s_pos)
    hcl_shift = tl.zeros_like(s_pos)
    teacher = tl.zeros_like(s_pos)
    if WEIGHTING == WEIGHT_HCL:
        hcl_mass = tl.load(coef_ptr + B + rows, mask=row_valid, other=0.0)
        hcl_shift = tl.load(coef_ptr + 2 * B + rows, mask=row_valid, other=0.0)
    if SOFT:
        teacher = tl.load(coef_ptr + 3 * B + rows, mask=row_valid, other=0.0)
    exclude = tl.full((rows.shape[0],), -1, tl.int64)
    if HAS_EXCLUDE:
        exclude = tl.load(excl_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    inv_p = tl.zeros_like(s_pos)
    if ATTRACT:  # row 1 holds 1 / |P_i| with attraction (HCL, which also uses it, is not combined with it)
        inv_p = tl.load(coef_ptr + B + rows, mask=row_valid, other=0.0)
    return (positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
            hcl_mass, hcl_shift, teacher, exclude, inv_p)


@triton.jit
def _info_nce_bwd_ds_kernel(
    grad_ptr, q_ptr, k_ptr, pos_ptr, temp_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr,
    lse_ptr, spos_ptr, offset_ptr, thr_ptr, gthr_ptr, owner_ptr, clse_ptr, coff_ptr, coef_ptr, excl_ptr, ds_ptr,
    part_ptr, row0, R, B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk, stride_ds, weight_a, weight_b, soft_inv,
    soft_weight, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, WEIGHTING: tl.constexpr,
    SYMMETRIC: tl.constexpr, SOFT: tl.constexpr, HAS_EXCLUDE: tl.constexpr, ATTRACT: tl.constexpr,
    PRECISION: tl.constexpr, STORE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (row block, key block) tile of the panel of rows [row0, row0 + R): recomputes the
    score tile once (one product over D), writes dS (in the inputs' dtype) to the panel and the
    tile's per-row sum of tau to ``part[key block, row]``."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_valid = (local < R) & (rows < B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    (positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
     hcl_mass, hcl_shift, teacher, exclude, inv_p) = _load_row_state(
        rows, row_valid, pos_ptr, spos_ptr, thr_ptr, gthr_ptr, lse_ptr, offset_ptr, coef_ptr, grad_ptr, excl_ptr,
        inv_temp, B, HAS_GUIDE, SYMMETRIC, WEIGHTING, SOFT, HAS_EXCLUDE, ATTRACT)
    ds, tau = tl_score_grad(q_ptr, k_ptr, gq_ptr, gk_ptr, qlab_ptr, klab_ptr, rows, cols, row_valid, col_valid,
                            positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
                            hcl_mass, hcl_shift, teacher, exclude, inv_p,
                            owner_ptr, spos_ptr, thr_ptr, gthr_ptr, clse_ptr, coff_ptr, grad_ptr,
                            inv_temp, weight_a, weight_b, soft_inv, soft_weight, B, N, D, DG, stride_q, stride_k,
                            stride_gq, stride_gk, NUM_LABELS, HAS_GUIDE, WEIGHTING, SYMMETRIC, SOFT, HAS_EXCLUDE,
                            ATTRACT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * R + local, tl.sum(tau, axis=1), mask=row_valid)
    if STORE_DS:
        tl.store(ds_ptr + local[:, None] * stride_ds + cols[None, :], ds.to(ds_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _panel_dq_kernel(
    ds_ptr, k_ptr, dq_ptr, row0, R, B, N, D, stride_ds, stride_k, stride_dq,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dq[row0 + r] = dS_panel[r] @ k: the panel's rows of dq, complete (a panel holds every key)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = (local < R) & (row0 + local < B)
    d_out = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_valid = d_out < D
    dq = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_valid = cols < N
        ds = tl.load(ds_ptr + local[:, None] * stride_ds + cols[None, :],
                     mask=row_valid[:, None] & col_valid[None, :], other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_k + d_out[None, :], mask=col_valid[:, None] & d_valid[None, :],
                    other=0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptr + (row0 + local)[:, None] * stride_dq + d_out[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _panel_dk_kernel(
    ds_ptr, q_ptr, acc_ptr, out_ptr, row0, R, B, N, D, stride_ds, stride_q, stride_acc, stride_out,
    LOAD_ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """out = acc + dS_panel^T @ q[panel rows]: dk summed panel by panel, in panel order, in
    float32 (``acc``; the first panel starts from 0), cast to dk's dtype on the last panel."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    d_out = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    d_valid = d_out < D
    dk = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    if LOAD_ACC:
        dk = tl.load(acc_ptr + cols[:, None] * stride_acc + d_out[None, :],
                     mask=col_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
    for m0 in range(0, R, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_valid = (local < R) & (row0 + local < B)
        ds = tl.load(ds_ptr + local[:, None] * stride_ds + cols[None, :],
                     mask=row_valid[:, None] & col_valid[None, :], other=0.0)
        q = tl.load(q_ptr + (row0 + local)[:, None] * stride_q + d_out[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    tl.store(out_ptr + cols[:, None] * stride_out + d_out[None, :], dk.to(out_ptr.dtype.element_ty),
             mask=col_valid[:, None] & d_valid[None, :])


# --- negative sampling (SPEC section 5) ------------------------------------------------------------

STRATEGY_TOP: tl.constexpr = tl.constexpr(0)
STRATEGY_SIMANS: tl.constexpr = tl.constexpr(1)
STRATEGY_UNIFORM: tl.constexpr = tl.constexpr(2)
NEG_INF_KEY: tl.constexpr = tl.constexpr(-2139095041)  # tl_pack's high word for -inf (bits 0xFF800000)


@triton.jit
def tl_mix32(x):
    """lowbias32 on int64 values < 2^32 (products wrap; the low 32 bits are the uint32 result)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def tl_gumbel(seed_hash, rows, cols):
    """Standard Gumbel noise of entries (rows x cols): a hash of (seed, i, j), as in the C++ kernel."""
    h = tl_mix32((rows.to(tl.int64) & 0xFFFFFFFF) ^ seed_hash)
    h = tl_mix32(h[:, None] ^ (cols.to(tl.int64)[None, :] & 0xFFFFFFFF))
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def tl_pack(value, cols):
    """(value, key index) as one int64 that orders like (value, then smaller index first):
    the float's bits made order-preserving in the high word, the inverted index in the low word."""
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _sample_negatives_kernel(
    q_ptr, k_ptr, pos_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, out_ptr,
    B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk,
    margin, relative_margin, max_score, guide_margin, weight_a, weight_b, seed_hash, num_negatives,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RELATIVE: tl.constexpr,
    HAS_MARGIN: tl.constexpr, HAS_RELATIVE_MARGIN: tl.constexpr, HAS_MAX_SCORE: tl.constexpr,
    STRATEGY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """One program per block of rows; a running top-K_PAD of packed (value, index) per row, merged
    with each tile's own top-K_PAD (tl.topk over the joined pair)."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    s_pos, threshold, guide_threshold = tl_row_state(
        q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, B, D, DG, stride_q, stride_k,
        stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin, HAS_GUIDE, GUIDE_RELATIVE,
        HAS_MARGIN, HAS_RELATIVE_MARGIN, HAS_MAX_SCORE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    no_value = tl.full((BLOCK_M, K_PAD), float("-inf"), tl.float32)
    best = tl_pack(no_value, tl.zeros((BLOCK_M, K_PAD), tl.int64) + 0xFFFFFFFF)  # below every real entry
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_valid = cols < N
        s = tl_tile_scores(q_ptr, k_ptr, rows, cols, row_valid, col_valid, D, stride_q, stride_k,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        t = s
        if HAS_GUIDE:
            t = tl_tile_scores(gq_ptr, gk_ptr, rows, cols, row_valid, col_valid, DG, stride_gq, stride_gk,
                               BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        _, _, negative = tl_classify(s, t, rows, row_valid, cols, col_valid, positive, threshold,
                                     guide_threshold, qlab_ptr, klab_ptr, B, N, NUM_LABELS, HAS_GUIDE)
        if STRATEGY == STRATEGY_TOP:
            value = s
        elif STRATEGY == STRATEGY_SIMANS:
            d = s - s_pos[:, None] - weight_b
            value = -weight_a * d * d + tl_gumbel(seed_hash, rows, cols)
        else:
            value = tl_gumbel(seed_hash, rows, cols) + 0.0 * s
        value = tl.where(negative & (s == s), value, float("-inf"))  # NaN scores are never drawn
        tile_best = tl.topk(tl_pack(value, cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), tl.int64)), K_PAD)
        best = tl.topk(tl.reshape(tl.join(best, tile_best), (BLOCK_M, 2 * K_PAD)), K_PAD)
    valid = (best >> 32) > NEG_INF_KEY
    index = tl.where(valid, 0xFFFFFFFF - (best & 0xFFFFFFFF), -1)
    slots = tl.arange(0, K_PAD)
    tl.store(out_ptr + rows[:, None] * num_negatives + slots[None, :], index,
             mask=row_valid[:, None] & (slots[None, :] < num_negatives))
