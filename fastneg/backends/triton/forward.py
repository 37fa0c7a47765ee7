"""The fused forward on Triton (SPEC sections 2-4): kernels and the ``fastneg::info_nce_fwd_triton`` op.

``_info_nce_fwd_kernel``: each program takes one block of query rows (for the symmetric loss,
every G-th block); one pass over key tiles with an online logsumexp per row. Its hot loop
(``_fwd_pass`` / ``_fwd_tile``) is written for the least element-wise work per score
(``benchmarks/sass_cost.py`` counts it in the SASS, ``tests/backends/test_sass_budget.py``
holds the budget):

- the full key tiles run without any bounds test; the ragged last tile is peeled after the loop
  (``MASK_N``); rows past B are masked only where B is not a multiple of the row block;
- logits are kept in log2 units, log2(e) / temperature is one scale, so each term is one fused
  multiply-add and one ``exp2``; with no rule, weighting or estimator (``PLAIN``) every key is
  in the denominator (the positive's column included) and the tile's work is that alone;
- each rule, weighting and estimator is compiled in only when it is on; labels are int32 ranks
  compared once per element; counts of negatives are taken only when a rule can mask a key;
- SimANS's log-weights are <= 0, so their normaliser is summed against the fixed reference 0
  (``FIXED_W``), with no running maximum; a row whose weights all but underflow there is summed
  again exactly by a second launch (``REDO``, the rare path).

Writes O(B) per-row results only: the loss, the counts and the per-row state the backward reads
([len(RowState), B]). Symmetric loss: the same row-major tile is read by columns (reductions
over its first axis, no transpose): each positive column j (owned by row o) merges the tile into
the program's own partial logsumexp of column j, kept in a [G, N] buffer indexed by column
(G = programs, a fixed count), and ``_info_nce_columns_kernel`` merges the G partials in program
order. The thresholds of every row come first from ``_info_nce_row_state_kernel``, since column j
needs row o's; the host gathers them by column once per call (``config.column_state``).

No atomics: every sum has a fixed order, so results are deterministic run to run. Offsets are
int64 where they can exceed 2^31 (row and key bases), 32-bit inside a tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...plan import Flag, Plan, RowState, Weighting
from .config import (
    Problem,
    column_programs,
    column_state,
    exclude_operand,
    kernel_flags,
    label_operands,
    plain_rows,
    precision,
    rule_scalars,
    soft_scalars,
    tuned,
)
from .rules import (
    ATTRACT,
    DEBIAS,
    KIND,
    ROW_COLUMN_LOGSUMEXP,
    ROW_COLUMN_OFFSET,
    ROW_GUIDE_THRESHOLD,
    ROW_HCL_MASS,
    ROW_HCL_REFERENCE,
    ROW_HCL_SHIFT,
    ROW_HCL_WEIGHT_REFERENCE,
    ROW_INV_NUM_POSITIVES,
    ROW_LOG_POSITIVE_SHARE,
    ROW_LOGSUMEXP,
    ROW_NEGATIVE_MAX,
    ROW_OFFSET,
    ROW_POSITIVE_COEF,
    ROW_POSITIVE_SCORE,
    ROW_TEACHER_LOGSUMEXP,
    ROW_THRESHOLD,
    SCORE_RULES,
    SOFT,
    SYMMETRIC,
    WEIGHT_HCL,
    WEIGHT_SIMANS,
    biased_logits2,
    column_classes,
    column_rules_tile,
    hcl_sums,
    relative_row,
    row_states,
    simans_constants,
    tile_classes,
    tile_label_match,
)
from .tiles import (
    LN2,
    LOG2E,
    logaddexp,
    lse_merge2,
    online_lse_add2,
    online_lse_add2_columns,
    online_lse_add2_scaled,
    tile_dot,
)

__all__ = ["info_nce_fwd_triton"]


@triton.jit
def _info_nce_row_state_kernel(
    q_ptr, k_ptr, pos_ptr, gq_ptr, gk_ptr, state_ptr,
    B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk, margin, relative_margin, max_score, guide_margin,
    HAS_GUIDE: tl.constexpr, FLAGS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Symmetric loss: every row's positive score and thresholds first (columns need other blocks' rows)."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    s_pos, threshold, g_threshold, _ = row_states(
        q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, (B, N, D, DG),
        (stride_q, stride_k, stride_gq, stride_gk), (margin, relative_margin, max_score, guide_margin), HAS_GUIDE, FLAGS,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(state_ptr + (ROW_POSITIVE_SCORE * B + rows), s_pos, mask=row_valid)
    tl.store(state_ptr + (ROW_THRESHOLD * B + rows), threshold, mask=row_valid)
    tl.store(state_ptr + (ROW_GUIDE_THRESHOLD * B + rows), g_threshold, mask=row_valid)


@triton.jit
def _fwd_tile(
    q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, owner_ptr, cstate_ptr, col_partials_ptr, cneg_ptr, n0, program,
    row_start, rows, row_valid, row, acc, coeffs, sizes, strides,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    FLAGS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr, PLAIN: tl.constexpr,
    FIXED_W: tl.constexpr,
):
    """One key tile [n0, n0 + BLOCK_N) of a block of rows merged into the rows' running sums
    (log2 units). ``MASK_N``: the ragged last tile (the only one whose columns are bounds-tested);
    ``PLAIN``: no rule, weighting, estimator or exclusion, so every key is in the denominator and
    the tile's work is the online logsumexp alone (the positive's column included: it is in the
    denominator anyway). ``FIXED_W``: SimANS's log2-weights are <= 0, so their sum is taken
    against the fixed reference 0 (no running maximum: one ``exp2`` and one add per element);
    ``w_max`` stays 0.

    Groups (``_fwd_pass``): ``row`` the block's row state, ``acc`` its 13 running sums (returned
    updated), ``coeffs`` the call's scalars, ``sizes`` (B, N, D, DG) and ``strides``."""
    WEIGHTING: tl.constexpr = FLAGS // KIND
    positive, exclude, s_pos, threshold, guide_threshold, simans_alpha, simans_beta = row
    x_max, x_sum, w_max, w_sum, n_neg, t_max, t_sum, t_gap, t_wgap, t_nsum, f_max, f_sum, f_logits = acc
    scale, inv_temp, weight_a, weight_b, soft_inv = coeffs
    B, N, D, DG = sizes
    stride_q, stride_k, stride_gq, stride_gk = strides
    RULES: tl.constexpr = (SCORE_RULES & FLAGS) or (NUM_LABELS > 0) or GUIDE_RULE
    local = tl.arange(0, BLOCK_N)
    col_valid = local < N - n0
    k_tile_ptr = k_ptr + n0 * stride_k
    s = tile_dot(q_row_ptr, k_tile_ptr, row_valid, col_valid, D, stride_q, stride_k, BLOCK_M, BLOCK_N, BLOCK_D,
                 PRECISION, not EVEN_M, MASK_N, EVEN_D)
    t = s  # stands in for the guide tile when there is no guide
    if HAS_GUIDE:
        t = tile_dot(gq_row_ptr, gk_ptr + n0 * stride_gk, row_valid, col_valid, DG, stride_gq, stride_gk,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, not EVEN_M, MASK_N, False)
    label_match = s > 0  # not read without labels
    if NUM_LABELS > 0:
        label_match = tile_label_match(rows, row_valid, local, col_valid, qlab_ptr, klab_ptr + n0, B, N, NUM_LABELS,
                                       MASK_N)
    if PLAIN:
        if MASK_N:
            x_max, x_sum = online_lse_add2(x_max, x_sum, tl.where(col_valid[None, :], s * scale, float("-inf")))
        else:
            x_max, x_sum = online_lse_add2_scaled(x_max, x_sum, s, scale)
    else:
        positive_local = (positive - n0).to(tl.int32)
        is_pos, masked, negative = tile_classes(s, t, local, col_valid, positive_local, threshold, guide_threshold,
                                                label_match, NUM_LABELS, GUIDE_RULE, FLAGS, MASK_N)
        if HAS_EXCLUDE:  # the row's excluded column is neither masked nor a negative
            kept = local[None, :] != (exclude - n0).to(tl.int32)[:, None]
            masked = masked & kept
            negative = negative & kept
        if ATTRACT & FLAGS:
            f_max, f_sum = online_lse_add2(f_max, f_sum, tl.where(masked, s * scale, float("-inf")))
            f_logits += tl.sum(tl.where(masked, s, 0.0), axis=1)  # scores; times 1/t once per row
        if RULES or HAS_EXCLUDE:  # without them every key but the positive is a negative (counted per row)
            n_neg += tl.sum(negative.to(tl.int32), axis=1)
        x2, lw2 = biased_logits2(s, t, negative, simans_beta[:, None], scale, simans_alpha, inv_temp, weight_a,
                                 WEIGHTING)
        if WEIGHTING == WEIGHT_HCL:  # x_max / w_max: the largest / smallest negative score; x_sum / w_sum: the sums
            x_max, w_max, x_sum, w_sum = hcl_sums(x_max, w_max, x_sum, w_sum, s, negative, scale, weight_a)
        else:
            x_max, x_sum = online_lse_add2(x_max, x_sum, x2)
        w_prev = w_max
        if FIXED_W:
            w_sum += tl.sum(tl.exp2(lw2), axis=1)
        elif WEIGHTING == WEIGHT_SIMANS:
            w_max, w_sum = online_lse_add2(w_max, w_sum, lw2)
        if SOFT & FLAGS:  # the teacher's logits t'_j = t_j / teacher temperature, in log2 units like x2
            tk = t * (soft_inv * LOG2E)  # finite everywhere: the products below never meet an infinity
            tx2 = tl.where(negative | is_pos, tk, float("-inf"))
            new_max = tl.maximum(t_max, tl.max(tx2, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            carried = tl.exp2(t_max - safe)
            e = tl.exp2(tx2 - safe[:, None])  # 0 off the teacher's support
            t_sum = t_sum * carried + tl.sum(e, axis=1)
            # sum_j e_j (t'_j - x_j) in log2 units (times ln 2 at the end); SimANS's log-weights go to t_wgap
            if WEIGHTING == WEIGHT_SIMANS:
                t_gap = t_gap * carried + tl.sum(e * (tk - s * scale), axis=1)
                e_neg = tl.where(negative, e, 0.0)
                d = s * simans_alpha - simans_beta[:, None]
                lw_raw = -(d * d)  # finite: e_neg is 0 where lw2 is -inf
                if FIXED_W:  # the log2-weights against the fixed reference 0
                    t_wgap = t_wgap * carried + tl.sum(e_neg * lw_raw, axis=1)
                else:
                    w_shift = tl.where(w_prev == float("-inf"), 0.0, w_max - w_prev)
                    w_safe = tl.where(w_max == float("-inf"), 0.0, w_max)
                    t_wgap = (t_wgap - w_shift * t_nsum) * carried + tl.sum(e_neg * (lw_raw - w_safe[:, None]), axis=1)
                t_nsum = t_nsum * carried + tl.sum(e_neg, axis=1)
            else:
                student2 = tl.where(is_pos, s * scale, x2)
                t_gap = t_gap * carried + tl.sum(tl.where(tx2 > float("-inf"), e * (tx2 - student2), 0.0), axis=1)
            t_max = new_max
    if SYMMETRIC & FLAGS:
        # the column direction, read on the same row-major tile: this program's partial logsumexp
        # (log2 units) of each owned column j, slot [program, owner]
        per_program = tl.num_programs(0).to(tl.int64) * N
        owner, has_owner, c_spos, c_thr, c_gthr = column_rules_tile(owner_ptr, cstate_ptr, n0, local, col_valid, N,
                                                                    MASK_N)
        slot = program.to(tl.int64) * N + n0 + local  # the partials are indexed by column
        if PLAIN:  # every query is in the column's denominator, its owner included: no test per element
            c_x2 = s * scale
            if not EVEN_M:
                c_x2 = tl.where(row_valid[:, None], c_x2, float("-inf"))
        else:
            _, c_neg = column_classes(s, t, tl.arange(0, BLOCK_M), row_valid, (owner - row_start).to(tl.int32),
                                      has_owner, c_thr, c_gthr, label_match, NUM_LABELS, GUIDE_RULE, FLAGS,
                                      not EVEN_M)
            c_alpha, c_beta = simans_constants(c_spos, weight_a, weight_b)
            c_x2, c_lw2 = biased_logits2(s, t, c_neg, c_beta[None, :], scale, c_alpha, inv_temp, weight_a,
                                         WEIGHTING)
        c_max, c_sum = online_lse_add2_columns(tl.load(col_partials_ptr + slot, mask=has_owner, other=float("-inf")),
                                               tl.load(col_partials_ptr + per_program + slot, mask=has_owner, other=0.0),
                                               c_x2)
        tl.store(col_partials_ptr + slot, c_max, mask=has_owner)
        tl.store(col_partials_ptr + per_program + slot, c_sum, mask=has_owner)
        if not PLAIN:
            if WEIGHTING == WEIGHT_SIMANS:
                c_wmax, c_wsum = online_lse_add2_columns(
                    tl.load(col_partials_ptr + 2 * per_program + slot, mask=has_owner, other=float("-inf")),
                    tl.load(col_partials_ptr + 3 * per_program + slot, mask=has_owner, other=0.0), c_lw2)
                tl.store(col_partials_ptr + 2 * per_program + slot, c_wmax, mask=has_owner)
                tl.store(col_partials_ptr + 3 * per_program + slot, c_wsum, mask=has_owner)
            c_count = tl.load(cneg_ptr + slot, mask=has_owner, other=0) + tl.sum(c_neg.to(tl.int32), axis=0)
            tl.store(cneg_ptr + slot, c_count, mask=has_owner)
        tl.debug_barrier()  # the next row block of this program reads these slots back
    return x_max, x_sum, w_max, w_sum, n_neg, t_max, t_sum, t_gap, t_wgap, t_nsum, f_max, f_sum, f_logits


@triton.jit
def _fwd_pass(
    q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, owner_ptr, cstate_ptr, col_partials_ptr, cneg_ptr, program,
    row_start, rows, row_valid, row, acc, coeffs, sizes, strides,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    FLAGS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, PLAIN: tl.constexpr, FIXED_W: tl.constexpr,
):
    """Every key tile of a block of rows: the full tiles (no bounds tests), then the ragged last one.
    Returns the running sums (``acc``) after the last tile."""
    N = sizes[1]
    n_full = (N // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        acc = _fwd_tile(
            q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, owner_ptr, cstate_ptr, col_partials_ptr, cneg_ptr,
            tl.cast(n0, tl.int64), program, row_start, rows, row_valid, row, acc, coeffs, sizes, strides, NUM_LABELS,
            HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D, False, PLAIN,
            FIXED_W)
    if n_full < N:  # the ragged last tile
        acc = _fwd_tile(
            q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, owner_ptr, cstate_ptr, col_partials_ptr, cneg_ptr,
            tl.cast(n_full, tl.int64), program, row_start, rows, row_valid, row, acc, coeffs, sizes, strides, NUM_LABELS,
            HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D, True, PLAIN,
            FIXED_W)
    return acc


@triton.jit
def _info_nce_fwd_kernel(
    q_ptr, k_ptr, pos_ptr, temp_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, owner_ptr, cstate_ptr, excl_ptr,
    loss_ptr, state_ptr, nmask_ptr, nneg_ptr, col_partials_ptr, cneg_ptr, redo_ptr,
    B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk,
    margin, relative_margin, max_score, guide_margin, weight_a, weight_b, tau_plus, soft_inv, soft_weight,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    FLAGS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, REDO: tl.constexpr, PLAIN: tl.constexpr,
):
    """Each program takes blocks of query rows (one block each, or, for the symmetric loss,
    every G-th block); one pass over key tiles with an online logsumexp per row: the full tiles
    first (no bounds tests), then the ragged last tile. Writes the loss, the counts and the
    per-row state (``state_ptr``, [len(RowState), B]).

    SimANS's weights are summed against the fixed reference 0 (``FIXED_W``); a row whose weights
    all but underflow there (sum < 2^-40: every weight below about 2^-40 / n) is flagged in
    ``redo_ptr``, and a second launch with ``REDO`` recomputes the row blocks that hold a flagged
    row with a running maximum (the rare path; its other programs return at once).
    ``PLAIN`` (``config.plain_rows``, decided once on the host, which the columns kernel reads too):
    no rule, weighting, estimator or exclusion, so every key is in each row's denominator and,
    with the symmetric loss, every query in each column's."""
    WEIGHTING: tl.constexpr = FLAGS // KIND
    # PLAIN (``config.plain_rows``, from the host): no rule, weighting, estimator or exclusion
    # SimANS's weights summed against the fixed reference 0 (``_fwd_tile``); a row whose weights
    # all but underflow there (sum < 2^-40: every weight below about 2^-40 / n) is summed again
    # with a running maximum, in a second pass over its row block (the rare path)
    FIXED_W: tl.constexpr = (WEIGHTING == WEIGHT_SIMANS) and not ((SYMMETRIC & FLAGS) or REDO)
    program = tl.program_id(0)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    scale = inv_temp * LOG2E
    # the symmetric loss's programs take every G-th row block; otherwise one row block each (a loop of
    # one iteration, which the compiler removes: nothing is hoisted and kept live across row blocks)
    if SYMMETRIC & FLAGS:
        rb_end = tl.cdiv(B, BLOCK_M)
        rb_step = tl.num_programs(0)
    elif REDO:  # only a row block with a flagged row
        flagged = tl.load(redo_ptr + program * BLOCK_M + tl.arange(0, BLOCK_M),
                          mask=program * BLOCK_M + tl.arange(0, BLOCK_M) < B, other=0)
        rb_end = program + (tl.max(flagged, axis=0) > 0).to(tl.int32)
        rb_step = 1
    else:
        rb_end = program + 1
        rb_step = 1
    for rb in range(program, rb_end, rb_step):
        row_start = tl.cast(rb, tl.int64) * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        row_valid = rows < B
        positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        if SYMMETRIC & FLAGS:  # every row's state was computed first (columns need other blocks' rows)
            s_pos = tl.load(state_ptr + (ROW_POSITIVE_SCORE * B + rows), mask=row_valid, other=0.0)
            threshold = tl.load(state_ptr + (ROW_THRESHOLD * B + rows), mask=row_valid, other=0.0)
            guide_threshold = tl.load(state_ptr + (ROW_GUIDE_THRESHOLD * B + rows), mask=row_valid, other=0.0)
            guide_pos = tl.zeros((BLOCK_M,), tl.float32)  # not read: soft labels are not symmetric
        else:
            s_pos, threshold, guide_threshold, guide_pos = row_states(
                q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, (B, N, D, DG),
                (stride_q, stride_k, stride_gq, stride_gk), (margin, relative_margin, max_score, guide_margin),
                HAS_GUIDE, FLAGS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        simans_alpha, simans_beta = simans_constants(s_pos, weight_a, weight_b)
        x_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        x_sum = tl.zeros((BLOCK_M,), tl.float32)
        w_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        if FIXED_W:  # the fixed reference
            w_max = tl.zeros((BLOCK_M,), tl.float32)
        if WEIGHTING == WEIGHT_HCL:  # the smallest negative score so far (hcl_sums)
            w_max = tl.full((BLOCK_M,), float("inf"), tl.float32)
        w_sum = tl.zeros((BLOCK_M,), tl.float32)
        n_neg = tl.zeros((BLOCK_M,), tl.int32)
        t_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # soft labels: the teacher's online logsumexp
        t_sum = tl.zeros((BLOCK_M,), tl.float32)
        t_gap = tl.zeros((BLOCK_M,), tl.float32)  # sum_j e^{t'_j - t_max} (t'_j - x_j) / ln 2
        # SimANS with soft labels: the negatives' log2-weights kept apart from t_gap, relative to w_max (0 with
        # FIXED_W): t_wgap = sum_neg e^{t'_j - t_max} (u_j - w_max) / ln 2, t_nsum = sum_neg e^{t'_j - t_max}
        t_wgap = tl.zeros((BLOCK_M,), tl.float32)
        t_nsum = tl.zeros((BLOCK_M,), tl.float32)
        # attraction: the flagged keys' online logsumexp (log2 units) and the sum of their scores
        f_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        f_sum = tl.zeros((BLOCK_M,), tl.float32)
        f_logits = tl.zeros((BLOCK_M,), tl.float32)
        exclude = tl.full((BLOCK_M,), -1, tl.int64)
        if HAS_EXCLUDE:
            exclude = tl.load(excl_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
        q_row_ptr = q_ptr + row_start * stride_q
        gq_row_ptr = gq_ptr  # None without a guide
        if HAS_GUIDE:
            gq_row_ptr = gq_ptr + row_start * stride_gq
        (x_max, x_sum, w_max, w_sum, n_neg, t_max, t_sum, t_gap, t_wgap, t_nsum, f_max, f_sum,
             f_logits) = _fwd_pass(
                q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, owner_ptr, cstate_ptr, col_partials_ptr, cneg_ptr,
                program, row_start, rows, row_valid,
                (positive, exclude, s_pos, threshold, guide_threshold, simans_alpha, simans_beta),
                (x_max, x_sum, w_max, w_sum, n_neg, t_max, t_sum, t_gap, t_wgap, t_nsum, f_max, f_sum, f_logits),
                (scale, inv_temp, weight_a, weight_b, soft_inv), (B, N, D, DG), (stride_q, stride_k, stride_gq, stride_gk),
                NUM_LABELS, HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D,
                PLAIN, FIXED_W)
        # every column is the positive, an excluded key, masked or a negative: masked keys are counted
        # by subtraction (the tiles count negatives only, and only when a rule or an exclusion is on)
        others = N - 1
        if HAS_EXCLUDE:
            others -= ((exclude >= 0) & (exclude != positive)).to(tl.int32)
        if not ((SCORE_RULES & FLAGS) or (NUM_LABELS > 0) or GUIDE_RULE or HAS_EXCLUDE):
            n_neg = tl.zeros((BLOCK_M,), tl.int32) + others
        if FIXED_W:
            underflow = (n_neg > 0) & (w_sum < 9.094947017729282e-13) & row_valid  # 2^-40
            tl.store(redo_ptr + rows, underflow.to(tl.int32), mask=row_valid)

        l_pos = s_pos * inv_temp
        n_masked = others - n_neg
        has_neg = n_neg > 0
        offset = tl.zeros((BLOCK_M,), tl.float32)
        if PLAIN:  # the tiles summed every key, the positive included
            neg_lse = tl.zeros((BLOCK_M,), tl.float32)
            lse = (x_max + tl.log2(x_sum)) * LN2
        else:
            neg_lse = tl.where(has_neg, (x_max + tl.log2(x_sum)) * LN2, float("-inf"))
            if WEIGHTING == WEIGHT_SIMANS:
                offset = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - (w_max + tl.log2(w_sum)) * LN2, 0.0)
            lse = logaddexp(l_pos, neg_lse + offset)
        coef = tl.full((BLOCK_M,), 1.0, tl.float32)
        log_share = l_pos - lse  # l+ - lse, what the backward's positive reads
        if PLAIN:  # from the log2 terms, not through lse's round trip: 0 exactly where the positive alone counts
            log_share = ((s_pos * scale - x_max) - tl.log2(x_sum)) * LN2
        if WEIGHTING == WEIGHT_HCL:
            # g = log(n sum_j e^{(1 + beta) l_j} / sum_j e^{beta l_j}) = r + small (log2 units below), and
            # everything the backward needs relative to g (csrc/forward.cpp does the same): no term of size
            # (1 + beta) |l| is rounded and then cancelled
            gx = 1.0 + weight_a
            hi = tl.where(has_neg, x_max, 0.0)
            lo = tl.where(has_neg, w_max, 0.0)
            rs = tl.where(gx >= 0.0, hi, lo)  # the references' scores
            ws = tl.where(weight_a >= 0.0, hi, lo)
            log2_sx = tl.log2(tl.where(has_neg, x_sum, 1.0))
            log2_sw = tl.log2(tl.where(has_neg, w_sum, 1.0))
            n_f = tl.maximum(n_neg, 1).to(tl.float32)
            small2 = weight_a * (rs - ws) * scale + (tl.log2(n_f) + log2_sx - log2_sw)
            d = ((s_pos - rs) * scale - small2) * LN2  # l+ - g, the scores' difference exact
            log_floor = tl.log(n_f) - inv_temp - (rs * scale + small2) * LN2
            rel, h_loss, shift, h_coef = relative_row(d, log_floor, n_f, tau_plus, DEBIAS & FLAGS)
            h_loss = tl.where(has_neg, h_loss, 0.0)
            lse = tl.where(has_neg, l_pos + h_loss, l_pos)
            coef = tl.where(has_neg, h_coef, 1.0)
            log_share = -h_loss
            offset = tl.where(has_neg, shift - rel - log2_sx * LN2, 0.0)  # P_ij = e^{(1 + beta)(s_ij - r) / t + offset}
            # dL/dl_ij = (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, R = the negatives' share of P
            tl.store(state_ptr + (ROW_HCL_MASS * B + rows), tl.where(has_neg, weight_a * tl.exp(shift - rel), 0.0),
                     mask=row_valid)
            tl.store(state_ptr + (ROW_HCL_SHIFT * B + rows), -log2_sw * LN2, mask=row_valid)
            tl.store(state_ptr + (ROW_HCL_REFERENCE * B + rows), rs, mask=row_valid)
            tl.store(state_ptr + (ROW_HCL_WEIGHT_REFERENCE * B + rows), ws, mask=row_valid)
        elif DEBIAS & FLAGS:
            # DCL: Ng = max((e^g - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t}), g = neg_lse + offset the negatives'
            # log-mass; the loss and the positive's share relative to g (relative_row), as for HCL
            n_f = tl.maximum(n_neg, 1).to(tl.float32)
            g_small = tl.log2(tl.where(has_neg, x_sum, 1.0)) * LN2 + offset
            x_top = tl.where(has_neg, x_max, 0.0)
            g = x_top * LN2 + g_small
            d = (s_pos * scale - x_top) * LN2 - g_small  # l+ - g from l+ - max, exact where the two are close
            rel, d_loss, shift, d_coef = relative_row(d, tl.log(n_f) - inv_temp - g, n_f, tau_plus, True)
            log_share = tl.where(has_neg, -d_loss, 0.0)
            lse = l_pos - log_share
            # P_ij = 2^{(x2_ij - x_max) + offset log2(e)}: the dominant negative's exponent exact (RowState.NEGATIVE_MAX)
            offset = tl.where(has_neg, shift - rel - tl.log2(tl.where(has_neg, x_sum, 1.0)) * LN2, 0.0)
            tl.store(state_ptr + (ROW_NEGATIVE_MAX * B + rows), tl.where(has_neg, x_max, 0.0), mask=row_valid)
            coef = tl.where(has_neg, d_coef, 1.0)
        loss = lse - l_pos
        if (WEIGHTING == WEIGHT_HCL) or (DEBIAS & FLAGS) or PLAIN:
            loss = -log_share
        if ATTRACT & FLAGS:  # P_i = {p_i} U flagged: logsumexp over P_i U N_i - mean over P_i of l_ip
            n_pos = 1.0 + n_masked.to(tl.float32)
            lse = logaddexp(lse, tl.where(n_masked > 0, (f_max + tl.log2(f_sum)) * LN2, float("-inf")))
            loss = lse - (l_pos + f_logits * inv_temp) / n_pos
            log_share = l_pos - lse
            tl.store(state_ptr + (ROW_INV_NUM_POSITIVES * B + rows), 1.0 / n_pos, mask=row_valid)
        if SOFT & FLAGS:  # KL(p || q) = lse - T + sum_j p_j (t'_j - x_j) - offset (1 - p+)
            teacher = (t_max + tl.log2(t_sum)) * LN2
            p_pos = tl.exp(guide_pos * soft_inv - teacher)  # the positive's teacher probability
            if WEIGHTING == WEIGHT_SIMANS:
                # sum_neg p_j (u_j + offset), offset = log n - w_max - log w_sum: no large terms cancel
                spread = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - tl.log(w_sum), 0.0)
                kl = lse - teacher + ((t_gap - t_wgap) * LN2 - spread * t_nsum) / t_sum
            else:
                kl = lse - teacher + t_gap * LN2 / t_sum - tl.where(offset == 0.0, 0.0, offset * (1.0 - p_pos))
            loss = (1.0 - soft_weight) * loss + soft_weight * kl
            tl.store(state_ptr + (ROW_TEACHER_LOGSUMEXP * B + rows), teacher, mask=row_valid)
        tl.store(state_ptr + (ROW_POSITIVE_COEF * B + rows), coef, mask=row_valid)
        tl.store(loss_ptr + rows, loss, mask=row_valid)
        tl.store(state_ptr + (ROW_LOGSUMEXP * B + rows), lse, mask=row_valid)
        tl.store(state_ptr + (ROW_LOG_POSITIVE_SHARE * B + rows), log_share, mask=row_valid)
        tl.store(state_ptr + (ROW_OFFSET * B + rows), offset, mask=row_valid)
        tl.store(nmask_ptr + rows, n_masked.to(tl.int64), mask=row_valid)
        tl.store(nneg_ptr + rows, n_neg.to(tl.int64), mask=row_valid)
        if not (SYMMETRIC & FLAGS):
            tl.store(state_ptr + (ROW_POSITIVE_SCORE * B + rows), s_pos, mask=row_valid)
            tl.store(state_ptr + (ROW_THRESHOLD * B + rows), threshold, mask=row_valid)
            tl.store(state_ptr + (ROW_GUIDE_THRESHOLD * B + rows), guide_threshold, mask=row_valid)


@triton.jit
def _info_nce_columns_kernel(
    loss_ptr, state_ptr, temp_ptr, pos_ptr, col_partials_ptr, cneg_ptr, B, N, NUM_PROGRAMS, WEIGHTING: tl.constexpr,
    PLAIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Symmetric loss: merge the NUM_PROGRAMS partial logsumexps (log2 units) of each positive column in program
    order (deterministic) and set loss_o = (row o + column p_o) / 2. ``PLAIN``: the partials summed
    every query, the owner included (no rule, no weighting): they are the column's whole logsumexp."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < B
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    per_program = tl.cast(NUM_PROGRAMS, tl.int64) * N
    column = tl.load(pos_ptr + o, mask=valid, other=0).to(tl.int64)  # row o's positive column: the partials' index
    cmax_ptr = col_partials_ptr
    csum_ptr = col_partials_ptr + per_program
    cwmax_ptr = col_partials_ptr + 2 * per_program
    cwsum_ptr = col_partials_ptr + 3 * per_program
    x_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    x_sum = tl.zeros((BLOCK,), tl.float32)
    w_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    w_sum = tl.zeros((BLOCK,), tl.float32)
    n_neg = tl.zeros((BLOCK,), tl.int32)
    for program in range(0, NUM_PROGRAMS):
        slot = program * N + column
        x_max, x_sum = lse_merge2(x_max, x_sum, tl.load(cmax_ptr + slot, mask=valid, other=float("-inf")),
                                  tl.load(csum_ptr + slot, mask=valid, other=0.0))
        if WEIGHTING == WEIGHT_SIMANS:
            w_max, w_sum = lse_merge2(w_max, w_sum, tl.load(cwmax_ptr + slot, mask=valid, other=float("-inf")),
                                      tl.load(cwsum_ptr + slot, mask=valid, other=0.0))
        n_neg += tl.load(cneg_ptr + slot, mask=valid, other=0)
    has_neg = n_neg > 0
    neg_lse = tl.where(has_neg, (x_max + tl.log2(x_sum)) * LN2, float("-inf"))
    offset = tl.zeros((BLOCK,), tl.float32)
    if WEIGHTING == WEIGHT_SIMANS:
        offset = tl.where(has_neg, tl.log(n_neg.to(tl.float32)) - (w_max + tl.log2(w_sum)) * LN2, 0.0)
    l_pos = tl.load(state_ptr + (ROW_POSITIVE_SCORE * B + o), mask=valid, other=0.0) * inv_temp
    if PLAIN:
        lse = (x_max + tl.log2(x_sum)) * LN2
    else:
        lse = logaddexp(l_pos, neg_lse + offset)
    row_loss = tl.load(loss_ptr + o, mask=valid, other=0.0)
    tl.store(loss_ptr + o, (row_loss + (lse - l_pos)) * 0.5, mask=valid)
    tl.store(state_ptr + (ROW_COLUMN_LOGSUMEXP * B + o), lse, mask=valid)
    tl.store(state_ptr + (ROW_COLUMN_OFFSET * B + o), offset, mask=valid)


_fwd_kernel = tuned(_info_nce_fwd_kernel, ["col_partials_ptr", "cneg_ptr"], float32_stages=(2, 3), guide_stages=(2,),
                    maxnreg=255)


@triton_op("fastneg::info_nce_fwd_triton", mutates_args={})
def info_nce_fwd_triton(
    query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
    query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor], exclude: Optional[torch.Tensor], scalars: list[float], flags: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = Plan.decode(scalars, flags)
    symmetric = bool(flags & Flag.SYMMETRIC)
    p = Problem.of(query, keys, guide_query, guide_keys, 2 if symmetric else int(plan.soft_temperature is not None))
    q, k, gq, gk, B, N, D, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.cfg
    f32 = dict(dtype=torch.float32, device=q.device)
    loss = torch.empty(B, **f32)
    state = torch.zeros(len(RowState), B, **f32)
    n_masked = torch.empty(B, dtype=torch.int64, device=q.device)
    n_neg = torch.empty(B, dtype=torch.int64, device=q.device)
    qlab, klab, levels = label_operands(query_labels, key_labels, positives)
    rules = rule_scalars(plan)
    tiles = dict(HAS_GUIDE=guide_query is not None, FLAGS=kernel_flags(flags), PRECISION=precision(q.dtype), BLOCK_M=cfg.block_m,
                 BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    plain = plain_rows(flags, levels, guide_query is not None, exclude is not None)
    shape = dict(GUIDE_RULE=guide_query is not None and plan.guide_margin != float("-inf"), EVEN_M=B % cfg.block_m == 0,
                 EVEN_D=D % cfg.block_d == 0, PLAIN=plain)
    row_blocks = triton.cdiv(B, cfg.block_m)
    programs = row_blocks
    owner = cstate = None  # read only by the symmetric loss (Triton's absent argument otherwise)
    # the autotuner restores these two between its trials, so they stay tensors (never read unless symmetric)
    col_partials = cneg = positives
    if symmetric:
        wrap_triton(_info_nce_row_state_kernel)[(row_blocks,)](
            q_ptr=q, k_ptr=k, pos_ptr=positives, gq_ptr=gq, gk_ptr=gk, state_ptr=state, **p.shape_args(), **rules,
            **tiles)
        owner, cstate = column_state(positives, state, None, N)
        programs = column_programs(row_blocks, q.device)
        # per program: the running max and sum of each owned column's logits and log-weights
        col_partials = torch.zeros(4, programs, N, **f32)
        col_partials[0].fill_(float("-inf"))
        col_partials[2].fill_(float("-inf"))
        cneg = torch.zeros(programs, N, dtype=torch.int32, device=q.device)
    # SimANS outside the symmetric loss: rows whose weights underflow against the fixed reference are
    # flagged by the first launch and recomputed exactly by a second (REDO; a no-op without a flag)
    fixed = plan.weighting == Weighting.SIMANS and not symmetric
    redo = torch.empty(B, dtype=torch.int32, device=q.device) if fixed else None
    for again in ((False, True) if fixed else (False,)):
        soft_inv, soft_weight = soft_scalars(plan.soft_temperature, plan.soft_weight)
        wrap_triton(_fwd_kernel)[(programs,)](
            q_ptr=q, k_ptr=k, pos_ptr=positives, temp_ptr=temperature, qlab_ptr=qlab, klab_ptr=klab, gq_ptr=gq,
            gk_ptr=gk, owner_ptr=owner, cstate_ptr=cstate, excl_ptr=exclude_operand(exclude),
            loss_ptr=loss, state_ptr=state, nmask_ptr=n_masked, nneg_ptr=n_neg, col_partials_ptr=col_partials, cneg_ptr=cneg,
            redo_ptr=redo, **p.shape_args(), **rules, weight_a=plan.weight_a, weight_b=plan.weight_b,
            tau_plus=plan.debias or 0.0, soft_inv=soft_inv, soft_weight=soft_weight, NUM_LABELS=levels,
            HAS_EXCLUDE=exclude is not None, REDO=again, **tiles, **shape,
        )
    if symmetric:
        wrap_triton(_info_nce_columns_kernel)[(triton.cdiv(B, 256),)](
            loss_ptr=loss, state_ptr=state, temp_ptr=temperature, pos_ptr=positives, col_partials_ptr=col_partials, cneg_ptr=cneg,
            B=B, N=N, NUM_PROGRAMS=programs, WEIGHTING=int(plan.weighting), PLAIN=plain, BLOCK=256)
    return loss, state, n_masked, n_neg
