"""The fused backward on Triton: kernels and the ``fastneg::info_nce_bwd_triton`` op.

The backward runs over panels of rows (``R`` rows, a multiple of BLOCK_M, as many as the
workspace holds: ``config.panel_rows``). Per panel, ``_info_nce_bwd_ds_kernel`` (one program per
row block and group of consecutive key tiles, ``config.key_groups``) recomputes each score tile
once, exactly as the forward saw it (same tile shape, same D chunking, so the same bits and the
same mask), and writes ``dS`` in the inputs' dtype to the panel and, when the temperature needs
its gradient, the group's per-row ``sum_j dS_ij (s_ij - s_i+)`` to a [groups, R] buffer summed
after it. ``_panel_positive_kernel`` then writes each row's dS at its positive column (one element
per row instead of a test per element, ``POSITIVE_LATER``). ``_panel_dq_kernel`` computes the
panel's rows of ``dq = dS @ k`` (complete: a panel holds every key) and ``_panel_dk_kernel`` adds
``dS^T @ q_panel`` to the key gradient (float32 running sum, in panel order); both walk the D
blocks of one row (key) block together, so the panel's repeats come from L2.

``dS_ij = g_i / t * (P_ij - [j == p_i])`` with ``P_ij = exp2(x2_ij + (offset_i - lse_i) log2 e)``
in the forward's log2 units (plus the modes' extra terms, ``score_grad``); the full key tiles
run without bounds tests, the ragged last one is peeled. With the symmetric loss each recomputed
tile gets the column direction's dS added before it is stored, read on the same row-major tile.
No atomics; int64 offsets where they can exceed 2^31.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...plan import Flag, Plan
from .config import (
    Problem,
    column_state,
    exclude_operand,
    kernel_flags,
    key_groups,
    label_operands,
    panel_rows,
    panel_stride,
    plain_rows,
    positive_later,
    precision,
    soft_scalars,
    tuned,
)
from .rules import (
    ATTRACT,
    DEBIAS,
    KIND,
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
    SOFT,
    SYMMETRIC,
    TEMPERATURE_GRAD,
    WEIGHT_HCL,
    biased_logits2,
    column_classes,
    column_state_tile,
    simans_constants,
    tile_classes,
    tile_label_match,
)
from .tiles import LOG2E, tile_dot

__all__ = ["info_nce_bwd_triton"]


@triton.jit
def score_grad(q_row_ptr, k_tile_ptr, gq_row_ptr, gk_tile_ptr, qlab_ptr, klab_tile_ptr, row_start, rows, n0, row_valid,
               row, owner_ptr, cstate_ptr, coeffs, sizes, strides, NUM_LABELS: tl.constexpr,
               HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr,
               HAS_EXCLUDE: tl.constexpr, FLAGS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
               MASK_N: tl.constexpr, PLAIN: tl.constexpr, POSITIVE_LATER: tl.constexpr):
    """(dS, tgrad) tiles: dS_ij = dL/ds_ij, with s recomputed exactly as forward saw it, and
    tau_ij = dS_ij (s_ij - positive score of the direction), whose sum gives the temperature
    gradient (each direction's dS sums to 0 over its row or column, so this equals
    sum dS_ij s_ij without cancelling two large sums). Exponentials in log2 units: P_ij =
    exp2(x2_ij + k_i) with k_i = (offset_i - lse_i) log2(e), one fused multiply-add before the
    ``exp2`` in the plain loss. ``MASK_N``: the ragged last key tile; rows past B have a zero
    ``grad_scale`` (their dS is 0 with no per-element test). ``POSITIVE_LATER``: the positive's
    column is left as its class made it and ``_panel_positive_kernel`` writes its dS afterwards
    (one element per row instead of a test per element); its tgrad term, dS (s_ij - s_i+) with
    s_ij the positive's own score, is zero up to the rounding of the two products.

    Groups: ``row`` the block's row state (``_load_row_state``), ``coeffs`` the call's scalars
    (1 / temperature, weight_a, weight_b, 1 / teacher temperature, soft weight), ``sizes``
    (B, N, D, DG), ``strides`` (the row strides of query, keys, guide query, guide keys)."""
    WEIGHTING: tl.constexpr = FLAGS // KIND
    (positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
     hcl_mass, hcl_shift, hcl_ref, hcl_wref, log_share, neg_max, teacher, exclude, inv_p) = row
    inv_temp, weight_a, weight_b, soft_inv, soft_weight = coeffs
    B, N, D, DG = sizes
    stride_q, stride_k, stride_gq, stride_gk = strides
    local = tl.arange(0, BLOCK_N)
    col_valid = local < N - n0
    scale = inv_temp * LOG2E
    s = tile_dot(q_row_ptr, k_tile_ptr, row_valid, col_valid, D, stride_q, stride_k, BLOCK_M, BLOCK_N, BLOCK_D,
                 PRECISION, not EVEN_M, MASK_N, EVEN_D)
    positive_local = (positive - n0).to(tl.int32)
    is_pos = local[None, :] == positive_local[:, None]
    k_row = (offset - lse) * LOG2E
    p_pos = coef * tl.exp2(log_share * LOG2E) - 1.0  # coef = 1 but with DCL's debias; log_share = l+ - lse
    t = s
    if HAS_GUIDE:
        t = tile_dot(gq_row_ptr, gk_tile_ptr, row_valid, col_valid, DG, stride_gq, stride_gk, BLOCK_M, BLOCK_N,
                     BLOCK_D, PRECISION, not EVEN_M, MASK_N, False)
    label_match = s > 0  # not read without labels
    if NUM_LABELS > 0:
        label_match = tile_label_match(rows, row_valid, local, col_valid, qlab_ptr, klab_tile_ptr, B, N, NUM_LABELS,
                                       MASK_N)
    if PLAIN:  # every key is in the denominator
        p = tl.exp2(s * scale + k_row[:, None])
        negative = is_pos  # not read
    else:
        _, masked, negative = tile_classes(s, t, local, col_valid, positive_local, threshold, guide_threshold,
                                           label_match, NUM_LABELS, GUIDE_RULE, FLAGS, MASK_N)
        if HAS_EXCLUDE:
            kept = local[None, :] != (exclude - n0).to(tl.int32)[:, None]
            masked = masked & kept
            negative = negative & kept
        alpha, beta = simans_constants(s_pos, weight_a, weight_b)
        x2, lw2 = biased_logits2(s, t, negative, beta[:, None], scale, alpha, inv_temp, weight_a, WEIGHTING)
        if WEIGHTING == WEIGHT_HCL:
            # (1 + beta) P_ij - beta R softmax_k(beta l_ik)_j, each exponent relative to a reference negative's
            # score as the forward's sums (RowState.HCL_REFERENCE, hcl_sums)
            px = tl.exp2((s - hcl_ref[:, None]) * ((1.0 + weight_a) * scale) + (offset * LOG2E)[:, None])
            pw = tl.exp2((s - hcl_wref[:, None]) * (weight_a * scale) + (hcl_shift * LOG2E)[:, None])
            p = tl.where(negative, px * (1.0 + weight_a) - hcl_mass[:, None] * pw, 0.0)
        elif DEBIAS & FLAGS:  # relative to the row's largest negative x2 (RowState.NEGATIVE_MAX), offset log2(e) after it
            p = tl.exp2((x2 - neg_max[:, None]) + (offset * LOG2E)[:, None])
        else:
            p = tl.exp2(x2 + k_row[:, None])
        if ATTRACT & FLAGS:  # the flagged keys are positives: e^{l_ij - lse} - 1 / |P_i|, the positive's -1 too
            p_pos = tl.exp2(log_share * LOG2E) - inv_p
            p = tl.where(masked, tl.exp2(s * scale - (lse * LOG2E)[:, None]) - inv_p[:, None], p)
    if not POSITIVE_LATER:
        p = tl.where(is_pos, p_pos[:, None], p)
    if SOFT & FLAGS:  # minus w times the teacher's softmax; the positive's -1 becomes -(1 - w)
        tx = tl.where(negative | is_pos, t * soft_inv, float("-inf"))
        p = tl.where(is_pos, p + soft_weight, p) - soft_weight * tl.exp2((tx - teacher[:, None]) * LOG2E)
    ds = p * grad_scale[:, None]
    if MASK_N:
        ds = tl.where(col_valid[None, :], ds, 0.0)
    tgrad = ds  # not read without the temperature's gradient
    if TEMPERATURE_GRAD & FLAGS:
        tgrad = ds * (s - s_pos[:, None])
    if SYMMETRIC & FLAGS:
        # column j (owner o): dS'_{i j} = g_o / (2 t) (P'_{i j} - [i == o]), on the row-major tile
        owner, has_owner, c_spos, c_thr, c_gthr, c_lse, c_off, c_grad = column_state_tile(
            owner_ptr, cstate_ptr, n0, local, col_valid, N, MASK_N)
        if PLAIN:  # every query is in the column's denominator
            c_is_pos = tl.arange(0, BLOCK_M)[:, None] == (owner - row_start).to(tl.int32)[None, :]
            c_x2 = s * scale
        else:
            c_is_pos, c_neg = column_classes(s, t, tl.arange(0, BLOCK_M), row_valid, (owner - row_start).to(tl.int32),
                                             has_owner, c_thr, c_gthr, label_match, NUM_LABELS, GUIDE_RULE, FLAGS,
                                             not EVEN_M)
            c_alpha, c_beta = simans_constants(c_spos, weight_a, weight_b)
            c_x2, _ = biased_logits2(s, t, c_neg, c_beta[None, :], scale, c_alpha, inv_temp, weight_a, WEIGHTING)
        c_scale = c_grad * (0.5 * inv_temp)
        c_p = tl.exp2(c_x2 + ((c_off - c_lse) * LOG2E)[None, :])
        c_p_pos = tl.exp2((c_spos * inv_temp - c_lse) * LOG2E) - 1.0
        c_p = tl.where(c_is_pos, c_p_pos[None, :], c_p)
        c_ds = c_p * c_scale[None, :]  # 0 in columns without an owner (c_scale 0, c_p finite)
        if not EVEN_M:
            c_ds = tl.where(row_valid[:, None], c_ds, 0.0)
        ds += c_ds
        if TEMPERATURE_GRAD & FLAGS:
            tgrad += c_ds * (s - c_spos[None, :])
    return ds, tgrad


@triton.jit
def _load_row_state(rows, row_valid, pos_ptr, state_ptr, grad_ptr, excl_ptr, inv_temp, B, HAS_GUIDE: tl.constexpr,
                    HAS_EXCLUDE: tl.constexpr, FLAGS: tl.constexpr):
    """The forward's per-row state of a block of rows (each quantity read only by the modes that
    use it). Rows past B read a zero ``grad_scale``, so their dS is 0."""
    WEIGHTING: tl.constexpr = FLAGS // KIND
    positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    s_pos = tl.load(state_ptr + (ROW_POSITIVE_SCORE * B + rows), mask=row_valid, other=0.0)
    threshold = tl.load(state_ptr + (ROW_THRESHOLD * B + rows), mask=row_valid, other=0.0)
    guide_threshold = tl.zeros_like(s_pos)
    if HAS_GUIDE:
        guide_threshold = tl.load(state_ptr + (ROW_GUIDE_THRESHOLD * B + rows), mask=row_valid, other=0.0)
    lse = tl.load(state_ptr + (ROW_LOGSUMEXP * B + rows), mask=row_valid, other=0.0)
    offset = tl.load(state_ptr + (ROW_OFFSET * B + rows), mask=row_valid, other=0.0)
    grad_scale = tl.load(grad_ptr + rows, mask=row_valid, other=0.0).to(tl.float32) * inv_temp
    if SYMMETRIC & FLAGS:  # loss_i = (row_i + column_{p_i}) / 2
        grad_scale = grad_scale * 0.5
    coef = tl.load(state_ptr + (ROW_POSITIVE_COEF * B + rows), mask=row_valid, other=1.0)
    log_share = tl.load(state_ptr + (ROW_LOG_POSITIVE_SHARE * B + rows), mask=row_valid, other=0.0)
    neg_max = tl.zeros_like(s_pos)
    if DEBIAS & FLAGS:
        neg_max = tl.load(state_ptr + (ROW_NEGATIVE_MAX * B + rows), mask=row_valid, other=0.0)
    hcl_mass = tl.zeros_like(s_pos)
    hcl_shift = tl.zeros_like(s_pos)
    hcl_ref = tl.zeros_like(s_pos)
    hcl_wref = tl.zeros_like(s_pos)
    teacher = tl.zeros_like(s_pos)
    if WEIGHTING == WEIGHT_HCL:
        hcl_mass = tl.load(state_ptr + (ROW_HCL_MASS * B + rows), mask=row_valid, other=0.0)
        hcl_shift = tl.load(state_ptr + (ROW_HCL_SHIFT * B + rows), mask=row_valid, other=0.0)
        hcl_ref = tl.load(state_ptr + (ROW_HCL_REFERENCE * B + rows), mask=row_valid, other=0.0)
        hcl_wref = tl.load(state_ptr + (ROW_HCL_WEIGHT_REFERENCE * B + rows), mask=row_valid, other=0.0)
    if SOFT & FLAGS:
        teacher = tl.load(state_ptr + (ROW_TEACHER_LOGSUMEXP * B + rows), mask=row_valid, other=0.0)
    exclude = tl.full((rows.shape[0],), -1, tl.int64)
    if HAS_EXCLUDE:
        exclude = tl.load(excl_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    inv_p = tl.zeros_like(s_pos)
    if ATTRACT & FLAGS:
        inv_p = tl.load(state_ptr + (ROW_INV_NUM_POSITIVES * B + rows), mask=row_valid, other=0.0)
    return (positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
            hcl_mass, hcl_shift, hcl_ref, hcl_wref, log_share, neg_max, teacher, exclude, inv_p)


@triton.jit
def _ds_tile(q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, ds_row_ptr, row_start, rows, local, n0, row_valid,
             tgrad_sum, row, owner_ptr, cstate_ptr, coeffs, sizes, strides, stride_ds, NUM_LABELS: tl.constexpr,
             HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, FLAGS: tl.constexpr,
             PRECISION: tl.constexpr, STORE_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr,
             PLAIN: tl.constexpr, POSITIVE_LATER: tl.constexpr):
    """One key tile of a row block: dS written to the panel, the tile's tgrad added to the rows' sums."""
    N = sizes[1]
    stride_k, stride_gk = strides[1], strides[3]
    gk_tile_ptr = gk_ptr  # None without a guide
    if HAS_GUIDE:
        gk_tile_ptr = gk_ptr + n0 * stride_gk
    klab_tile_ptr = klab_ptr  # None without labels
    if NUM_LABELS > 0:
        klab_tile_ptr = klab_ptr + n0
    ds, tgrad = score_grad(q_row_ptr, k_ptr + n0 * stride_k, gq_row_ptr, gk_tile_ptr, qlab_ptr,
                           klab_tile_ptr, row_start, rows, n0, row_valid, row, owner_ptr, cstate_ptr, coeffs, sizes,
                           strides, NUM_LABELS, HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS, PRECISION, BLOCK_M,
                           BLOCK_N, BLOCK_D, EVEN_M, EVEN_D, MASK_N, PLAIN, POSITIVE_LATER)
    if TEMPERATURE_GRAD & FLAGS:
        tgrad_sum += tl.sum(tgrad, axis=1)
    if STORE_DS:
        cols = tl.arange(0, BLOCK_N)
        ds_ptrs = ds_row_ptr + n0 + (local[:, None] * stride_ds + cols[None, :])
        ds_out = ds.to(ds_row_ptr.dtype.element_ty)
        if MASK_N:
            tl.store(ds_ptrs, ds_out, mask=row_valid[:, None] & (cols < N - n0)[None, :])
        elif EVEN_M:
            tl.store(ds_ptrs, ds_out)
        else:
            tl.store(ds_ptrs, ds_out, mask=row_valid[:, None])
    return tgrad_sum


@triton.jit
def _info_nce_bwd_ds_kernel(
    grad_ptr, q_ptr, k_ptr, pos_ptr, temp_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, state_ptr, owner_ptr, cstate_ptr,
    excl_ptr,
    ds_ptr, tgrad_partials_ptr, row0, R, B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk,
    stride_ds, weight_a, weight_b, soft_inv, soft_weight, tiles_per_group, tgrad_partials_row0,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, GUIDE_RULE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    FLAGS: tl.constexpr, PRECISION: tl.constexpr, STORE_DS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, RAGGED: tl.constexpr,
    PLAIN: tl.constexpr, POSITIVE_LATER: tl.constexpr,
):
    """One row block of the panel of rows [row0, row0 + R) against one group of
    ``tiles_per_group`` full key tiles (no column bounds test), or, with ``RAGGED``, against the
    ragged last key tile alone (a launch of its own, so that neither variant carries the other's
    code): recomputes each score tile once (one product over D), writes dS (in the inputs' dtype)
    to the panel, and the per-row sum of tgrad to ``tgrad_partials[tgrad_partials_row0 + group, row]``. ``PLAIN`` and
    ``POSITIVE_LATER`` come from the host (``config.plain_rows``, ``config.positive_later``), which
    also decides from them what to launch around this kernel."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_valid = (local < R) & (rows < B)
    group = tl.program_id(1)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    row = _load_row_state(rows, row_valid, pos_ptr, state_ptr, grad_ptr, excl_ptr, inv_temp, B, HAS_GUIDE,
                          HAS_EXCLUDE, FLAGS)
    coeffs = (inv_temp, weight_a, weight_b, soft_inv, soft_weight)
    sizes = (B, N, D, DG)
    strides = (stride_q, stride_k, stride_gq, stride_gk)
    row_start = row0 + tl.program_id(0).to(tl.int64) * BLOCK_M
    q_row_ptr = q_ptr + row_start * stride_q
    gq_row_ptr = gq_ptr  # None without a guide
    if HAS_GUIDE:
        gq_row_ptr = gq_ptr + row_start * stride_gq
    tgrad_sum = tl.zeros((BLOCK_M,), tl.float32)
    full = N // BLOCK_N
    if RAGGED:
        tgrad_sum = _ds_tile(q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, ds_ptr, row_start, rows, local,
                             tl.cast(full, tl.int64) * BLOCK_N, row_valid, tgrad_sum, row, owner_ptr, cstate_ptr, coeffs,
                             sizes, strides, stride_ds, NUM_LABELS, HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS, PRECISION,
                             STORE_DS, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D, True, PLAIN, POSITIVE_LATER)
    else:
        first = group * tiles_per_group
        for tile in range(first, tl.minimum(first + tiles_per_group, full)):
            tgrad_sum = _ds_tile(q_row_ptr, k_ptr, gq_row_ptr, gk_ptr, qlab_ptr, klab_ptr, ds_ptr, row_start, rows,
                                 local, tl.cast(tile, tl.int64) * BLOCK_N, row_valid, tgrad_sum, row, owner_ptr, cstate_ptr,
                                 coeffs, sizes, strides, stride_ds, NUM_LABELS, HAS_GUIDE, GUIDE_RULE, HAS_EXCLUDE, FLAGS,
                                 PRECISION, STORE_DS, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_M, EVEN_D, False, PLAIN,
                                 POSITIVE_LATER)
    if TEMPERATURE_GRAD & FLAGS:
        tl.store(tgrad_partials_ptr + (tgrad_partials_row0 + group).to(tl.int64) * R + local, tgrad_sum, mask=row_valid)


@triton.jit
def _panel_positive_kernel(grad_ptr, pos_ptr, temp_ptr, state_ptr, ds_ptr, row0, R, B, stride_ds,
                           BLOCK: tl.constexpr):
    """dS at each panel row's positive column, dS_ip = g_i / t (coef_i e^{l_i+ - lse_i} - 1), the
    exponent the forward's RowState.LOG_POSITIVE_SHARE:
    written once per row after ``_info_nce_bwd_ds_kernel`` (``POSITIVE_LATER``), with the same
    float32 operations that kernel used for it."""
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows = row0 + local
    valid = (local < R) & (rows < B)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    positive = tl.load(pos_ptr + rows, mask=valid, other=0).to(tl.int64)
    log_share = tl.load(state_ptr + (ROW_LOG_POSITIVE_SHARE * B + rows), mask=valid, other=0.0)  # l+ - lse
    coef = tl.load(state_ptr + (ROW_POSITIVE_COEF * B + rows), mask=valid, other=1.0)
    grad_scale = tl.load(grad_ptr + rows, mask=valid, other=0.0).to(tl.float32) * inv_temp
    p_pos = coef * tl.exp2(log_share * LOG2E) - 1.0
    tl.store(ds_ptr + local * stride_ds + positive, (p_pos * grad_scale).to(ds_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _panel_dq_kernel(
    ds_ptr, k_ptr, dq_ptr, row0, R, B, N, D, stride_ds, stride_k, stride_dq,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dq[row0 + r] = dS_panel[r] @ k: the panel's rows of dq, complete (a panel holds every key).
    The grid's first axis is the D block, so the programs that read the same rows of dS run
    together (the repeats come from L2, not HBM)."""
    local = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = (local < R) & (row0 + local < B)
    d_out = tl.program_id(0).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
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
    float32 (``acc``; the first panel starts from 0), cast to dk's dtype on the last panel. The
    grid's first axis is the D block (the programs that read the same columns of dS run together)."""
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < N
    d_out = tl.program_id(0).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
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

_bwd_ds_kernel = tuned(_info_nce_bwd_ds_kernel, maxnreg=255)
_dq_kernel = tuned(_panel_dq_kernel)
# dk reads and writes the float32 sum of earlier panels: restored between trial runs
_dk_kernel = tuned(_panel_dk_kernel, ["out_ptr"], float32_stages=(3, 4))


@triton_op("fastneg::info_nce_bwd_triton", mutates_args={})
def info_nce_bwd_triton(
    grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
    temperature: torch.Tensor, query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
    row_state: torch.Tensor, scalars: list[float], flags: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = Plan.decode(scalars, flags)
    symmetric = bool(flags & Flag.SYMMETRIC)
    query_grad, keys_grad = bool(flags & Flag.QUERY_GRAD), bool(flags & Flag.KEYS_GRAD)
    p = Problem.of(query, keys, guide_query, guide_keys, 2 if symmetric else int(plan.soft_temperature is not None))
    q, k, gq, gk, B, N, D, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.cfg
    grad = grad_loss.contiguous()
    qlab, klab, levels = label_operands(query_labels, key_labels, positives)
    owner, cstate = column_state(positives, row_state, grad, N) if symmetric else (None, None)  # read if symmetric
    soft = soft_scalars(plan.soft_temperature, plan.soft_weight)
    state = row_state.float().contiguous()
    operands = dict(grad_ptr=grad, q_ptr=q, k_ptr=k, pos_ptr=positives, temp_ptr=temperature, qlab_ptr=qlab,
                    klab_ptr=klab, gq_ptr=gq, gk_ptr=gk, state_ptr=state, owner_ptr=owner, cstate_ptr=cstate,
                    excl_ptr=exclude_operand(exclude), **p.shape_args())
    tiles = dict(NUM_LABELS=levels, HAS_GUIDE=guide_query is not None, HAS_EXCLUDE=exclude is not None, FLAGS=kernel_flags(flags),
                 PRECISION=precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                 GUIDE_RULE=guide_query is not None and plan.guide_margin != float("-inf"), EVEN_M=B % cfg.block_m == 0,
                 EVEN_D=D % cfg.block_d == 0)
    need_rowsum = bool(flags & Flag.TEMPERATURE_GRAD)
    tiles.update(PLAIN=plain_rows(flags, levels, guide_query is not None, exclude is not None))
    dq = torch.empty_like(q) if query_grad else q.new_empty(0)
    dk = torch.empty_like(k) if keys_grad else k.new_empty(0)
    store = query_grad or keys_grad
    later = positive_later(flags, store)  # the positive's dS by _panel_positive_kernel, after the tiles
    R = panel_rows(B, N, q.element_size(), cfg)
    col_blocks = triton.cdiv(N, cfg.block_n)
    # the panel: dS of R rows x N keys, in the inputs' dtype (what the products read)
    panel = q.new_empty(R, panel_stride(N)) if store else q.new_empty(1)
    full_blocks = N // cfg.block_n  # key tiles without a ragged edge; the ragged one has a launch of its own
    groups, per_group = key_groups(triton.cdiv(R, cfg.block_m), full_blocks, q.device)
    groups = groups if full_blocks else 0
    ragged = int(full_blocks < col_blocks)
    tgrad_partials = torch.empty(groups + ragged, R, dtype=torch.float32, device=q.device) if need_rowsum else q.new_empty(
        1, dtype=torch.float32)
    starts = list(range(0, B, R))
    acc = dk  # float32 inputs: dk itself holds the running sum over panels
    if keys_grad and dk.dtype != torch.float32 and len(starts) > 1:
        acc = torch.empty(N, D, dtype=torch.float32, device=q.device)
    sums = []
    # the two products read dS from memory: their tiles need not be the score tiles'
    fp32 = q.dtype == torch.float32  # smaller float32 tiles, which do not spill
    mm = dict(PRECISION=tiles["PRECISION"], BLOCK_M=min(cfg.block_m, 64 if fp32 else 128), BLOCK_N=32 if fp32 else 64,
              BLOCK_DO=cfg.block_do)
    d_blocks = triton.cdiv(D, cfg.block_do)
    for i, row0 in enumerate(starts):
        r = min(R, B - row0)
        if col_blocks == 0 or not need_rowsum:
            sums.append(torch.zeros(r, dtype=torch.float32, device=q.device))
        if col_blocks > 0 and (store or need_rowsum):
            for count, is_ragged in ((groups, False), (ragged, True)):
                if count:
                    wrap_triton(_bwd_ds_kernel)[(triton.cdiv(r, cfg.block_m), count)](
                        **operands, ds_ptr=panel, tgrad_partials_ptr=tgrad_partials, row0=row0, R=r, stride_ds=panel.stride(0),
                        weight_a=plan.weight_a, weight_b=plan.weight_b, soft_inv=soft[0], soft_weight=soft[1],
                        tiles_per_group=per_group, tgrad_partials_row0=groups if is_ragged else 0, STORE_DS=store,
                        RAGGED=is_ragged, POSITIVE_LATER=later, **tiles)
            if need_rowsum:
                rows_of_partials = groups + ragged  # written [groups, r]
                sums.append(tgrad_partials.view(-1)[:rows_of_partials * r].view(rows_of_partials, r).sum(0))
            if later:
                wrap_triton(_panel_positive_kernel)[(triton.cdiv(r, 256),)](
                    grad_ptr=grad, pos_ptr=positives, temp_ptr=temperature, state_ptr=state, ds_ptr=panel, row0=row0,
                    R=r, B=B, stride_ds=panel.stride(0), BLOCK=256)
        if query_grad and D > 0:
            wrap_triton(_dq_kernel)[(d_blocks, triton.cdiv(r, mm["BLOCK_M"]))](
                ds_ptr=panel, k_ptr=k, dq_ptr=dq, row0=row0, R=r, B=B, N=N, D=D, stride_ds=panel.stride(0),
                stride_k=k.stride(0), stride_dq=dq.stride(0), **mm)
        if keys_grad and N > 0 and D > 0:
            out = dk if i == len(starts) - 1 else acc
            wrap_triton(_dk_kernel)[(d_blocks, triton.cdiv(N, mm["BLOCK_N"]))](
                ds_ptr=panel, q_ptr=q, acc_ptr=acc, out_ptr=out, row0=row0, R=r, B=B, N=N, D=D,
                stride_ds=panel.stride(0), stride_q=q.stride(0), stride_acc=acc.stride(0), stride_out=out.stride(0),
                LOAD_ACC=i > 0, **mm)
    if keys_grad and not starts:
        dk.zero_()
    rowsum = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float32, device=q.device)
    return dq, dk, rowsum
