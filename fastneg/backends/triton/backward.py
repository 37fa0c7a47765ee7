"""The fused backward on Triton: kernels and the ``fastneg::info_nce_bwd_triton`` op.

The backward runs over panels of rows (``R`` rows, a multiple of BLOCK_M, as many as the
workspace holds: ``config.panel_rows``). Per panel, ``_info_nce_bwd_ds_kernel`` (one program per
tile) recomputes each score tile once, exactly as the forward saw it (same tile shape, same D
chunking, so the same bits and the same mask), and writes ``dS`` in the inputs' dtype to the
panel and the tile's per-row ``sum_j dS_ij (s_ij - s_i+)`` (the temperature gradient) to a
[key blocks, R] buffer summed after it. ``_panel_dq_kernel`` then computes the panel's rows of
``dq = dS @ k`` (complete: a panel holds every key) and ``_panel_dk_kernel`` adds
``dS^T @ q_panel`` to the key gradient (float32 running sum, in panel order).

``dS_ij = g_i / tau * (P_ij - [j == p_i])`` with ``P_ij = exp(x_ij + offset_i - lse_i)`` (plus
the modes' extra terms, ``tl_score_grad``). With the symmetric loss each recomputed tile gets the
column direction's dS added before it is stored. No atomics; int64 offsets.
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
    column_owners,
    exclude_operand,
    kernel_flags,
    label_operands,
    panel_rows,
    panel_stride,
    precision,
    soft_scalars,
    tuned,
)
from .rules import (
    ATTRACT,
    KIND,
    ROW_COLUMN_LOGSUMEXP,
    ROW_COLUMN_OFFSET,
    ROW_GUIDE_THRESHOLD,
    ROW_HCL_MASS,
    ROW_HCL_SHIFT,
    ROW_INV_NUM_POSITIVES,
    ROW_LOGSUMEXP,
    ROW_OFFSET,
    ROW_POSITIVE_COEF,
    ROW_POSITIVE_SCORE,
    ROW_TEACHER_LOGSUMEXP,
    ROW_THRESHOLD,
    SOFT,
    SYMMETRIC,
    WEIGHT_HCL,
    biased_logits,
    classify,
    column_logits,
)
from .tiles import LOG2E, tl_tile_scores

__all__ = ["info_nce_bwd_triton"]


@triton.jit
def tl_score_grad(q_ptr, k_ptr, gq_ptr, gk_ptr, qlab_ptr, klab_ptr, rows, cols, row_valid, col_valid,
                  positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
                  hcl_mass, hcl_shift, teacher, exclude, inv_p, owner_ptr, state_ptr, grad_ptr,
                  inv_temp, weight_a, weight_b, soft_inv, soft_weight, B, N, D, DG, stride_q, stride_k, stride_gq,
                  stride_gk, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                  FLAGS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """(dS, tau) tiles: dS_ij = dL/ds_ij, with s recomputed exactly as forward saw it, and
    tau_ij = dS_ij (s_ij - positive score of the direction), whose sum gives the temperature
    gradient (each direction's dS sums to 0 over its row or column, so this equals
    sum dS_ij s_ij without cancelling two large sums)."""
    WEIGHTING: tl.constexpr = FLAGS // KIND
    s = tl_tile_scores(q_ptr, k_ptr, rows, cols, row_valid, col_valid, D, stride_q, stride_k,
                       BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    t = s
    if HAS_GUIDE:
        t = tl_tile_scores(gq_ptr, gk_ptr, rows, cols, row_valid, col_valid, DG, stride_gq, stride_gk,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    is_pos, masked, negative = classify(s, t, rows, row_valid, cols, col_valid, positive, threshold,
                                        guide_threshold, qlab_ptr, klab_ptr, B, N, NUM_LABELS, HAS_GUIDE)
    if HAS_EXCLUDE:
        kept = cols[None, :] != exclude[:, None]
        masked = masked & kept
        negative = negative & kept
    x, log_w = biased_logits(s, t, negative, s_pos, inv_temp, weight_a, weight_b, WEIGHTING)
    p = tl.exp2((x + (offset - lse)[:, None]) * LOG2E)
    if WEIGHTING == WEIGHT_HCL:
        p = p * (1.0 + weight_a) - hcl_mass[:, None] * tl.exp2((log_w + hcl_shift[:, None]) * LOG2E)
    p_pos = coef * tl.exp2((s_pos * inv_temp - lse) * LOG2E) - 1.0  # coef = 1 but with DCL's debias
    if ATTRACT & FLAGS:  # the flagged keys are positives: e^{l_ij - lse} - 1 / |P_i|, the positive's -1 too
        p_pos = tl.exp2((s_pos * inv_temp - lse) * LOG2E) - inv_p
        p = tl.where(masked, tl.exp2((s * inv_temp - lse[:, None]) * LOG2E) - inv_p[:, None], p)
    p = tl.where(is_pos, p_pos[:, None], p)
    if SOFT & FLAGS:  # minus w times the teacher's softmax; the positive's -1 becomes -(1 - w)
        tx = tl.where(negative | is_pos, t * soft_inv, float("-inf"))
        p = tl.where(is_pos, p + soft_weight, p) - soft_weight * tl.exp2((tx - teacher[:, None]) * LOG2E)
    ds = p * grad_scale[:, None]
    ds = tl.where(row_valid[:, None] & col_valid[None, :], ds, 0.0)
    tau = ds * (s - s_pos[:, None])
    if SYMMETRIC & FLAGS:
        # column j (owner o): dS'_{i j} = g_o / (2 tau) (P'_{i j} - [i == o]), built transposed
        s_t, c_is_pos, _, c_x, _, has_owner, o, c_spos = column_logits(
            s, t, rows, row_valid, cols, col_valid, owner_ptr, state_ptr, qlab_ptr, klab_ptr, inv_temp, weight_a,
            weight_b, B, N, NUM_LABELS, HAS_GUIDE, WEIGHTING)
        c_lse = tl.load(state_ptr + (ROW_COLUMN_LOGSUMEXP * B + o), mask=has_owner, other=0.0)
        c_off = tl.load(state_ptr + (ROW_COLUMN_OFFSET * B + o), mask=has_owner, other=0.0)
        c_scale = tl.load(grad_ptr + o, mask=has_owner, other=0.0).to(tl.float32) * (0.5 * inv_temp)
        c_p = tl.exp2((c_x + (c_off - c_lse)[:, None]) * LOG2E)
        c_p_pos = tl.exp2((c_spos * inv_temp - c_lse) * LOG2E) - 1.0
        c_p = tl.where(c_is_pos, c_p_pos[:, None], c_p)
        c_ds = tl.where(has_owner[:, None] & row_valid[None, :], c_p * c_scale[:, None], 0.0)
        ds += tl.trans(c_ds)
        tau += tl.trans(c_ds * (s_t - c_spos[:, None]))
    return ds, tau


@triton.jit
def _load_row_state(rows, row_valid, pos_ptr, state_ptr, grad_ptr, excl_ptr, inv_temp, B, HAS_GUIDE: tl.constexpr,
                    HAS_EXCLUDE: tl.constexpr, FLAGS: tl.constexpr):
    """The forward's per-row state of a block of rows (each quantity read only by the modes that use it)."""
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
    hcl_mass = tl.zeros_like(s_pos)
    hcl_shift = tl.zeros_like(s_pos)
    teacher = tl.zeros_like(s_pos)
    if WEIGHTING == WEIGHT_HCL:
        hcl_mass = tl.load(state_ptr + (ROW_HCL_MASS * B + rows), mask=row_valid, other=0.0)
        hcl_shift = tl.load(state_ptr + (ROW_HCL_SHIFT * B + rows), mask=row_valid, other=0.0)
    if SOFT & FLAGS:
        teacher = tl.load(state_ptr + (ROW_TEACHER_LOGSUMEXP * B + rows), mask=row_valid, other=0.0)
    exclude = tl.full((rows.shape[0],), -1, tl.int64)
    if HAS_EXCLUDE:
        exclude = tl.load(excl_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    inv_p = tl.zeros_like(s_pos)
    if ATTRACT & FLAGS:
        inv_p = tl.load(state_ptr + (ROW_INV_NUM_POSITIVES * B + rows), mask=row_valid, other=0.0)
    return (positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
            hcl_mass, hcl_shift, teacher, exclude, inv_p)


@triton.jit
def _info_nce_bwd_ds_kernel(
    grad_ptr, q_ptr, k_ptr, pos_ptr, temp_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, state_ptr, owner_ptr, excl_ptr,
    ds_ptr, part_ptr, row0, R, B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk, stride_ds, weight_a, weight_b,
    soft_inv, soft_weight, NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    FLAGS: tl.constexpr, PRECISION: tl.constexpr, STORE_DS: tl.constexpr,
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
        rows, row_valid, pos_ptr, state_ptr, grad_ptr, excl_ptr, inv_temp, B, HAS_GUIDE, HAS_EXCLUDE, FLAGS)
    ds, tau = tl_score_grad(q_ptr, k_ptr, gq_ptr, gk_ptr, qlab_ptr, klab_ptr, rows, cols, row_valid, col_valid,
                            positive, s_pos, threshold, guide_threshold, lse, offset, grad_scale, coef,
                            hcl_mass, hcl_shift, teacher, exclude, inv_p, owner_ptr, state_ptr, grad_ptr,
                            inv_temp, weight_a, weight_b, soft_inv, soft_weight, B, N, D, DG, stride_q, stride_k,
                            stride_gq, stride_gk, NUM_LABELS, HAS_GUIDE, HAS_EXCLUDE, FLAGS, PRECISION,
                            BLOCK_M, BLOCK_N, BLOCK_D)
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

_bwd_ds_kernel = tuned(_info_nce_bwd_ds_kernel)
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
    p = Problem.of(query, keys, guide_query, guide_keys, symmetric or plan.soft_temperature is not None)
    q, k, gq, gk, B, N, D, DG, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.DG, p.cfg
    grad = grad_loss.contiguous()
    qlab, klab, levels = label_operands(query_labels, key_labels, positives)
    owner = column_owners(positives, N) if symmetric else positives
    soft = soft_scalars(plan.soft_temperature, plan.soft_weight)
    common_in = (grad, q, k, positives, temperature, qlab, klab, gq, gk, row_state.float().contiguous(), owner,
                 exclude_operand(exclude, positives))
    tiles = dict(NUM_LABELS=levels, HAS_GUIDE=guide_query is not None, HAS_EXCLUDE=exclude is not None, FLAGS=kernel_flags(flags),
                 PRECISION=precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    dq = torch.empty_like(q) if query_grad else q.new_empty(0)
    dk = torch.empty_like(k) if keys_grad else k.new_empty(0)
    store = query_grad or keys_grad
    R = panel_rows(B, N, q.element_size(), cfg)
    col_blocks = triton.cdiv(N, cfg.block_n)
    # the panel: dS of R rows x N keys, in the inputs' dtype (what the products read)
    panel = q.new_empty(R, panel_stride(N)) if store else q.new_empty(1)
    part = torch.empty(max(col_blocks, 1), R, dtype=torch.float32, device=q.device)
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
        if col_blocks == 0:
            sums.append(torch.zeros(r, dtype=torch.float32, device=q.device))
        else:
            wrap_triton(_bwd_ds_kernel)[(triton.cdiv(r, cfg.block_m), col_blocks)](
                *common_in, panel, part, row0, r, B, N, D, DG, *p.strides, panel.stride(0), plan.weight_a,
                plan.weight_b, *soft, STORE_DS=store, **tiles)
            sums.append(part.view(-1)[:col_blocks * r].view(col_blocks, r).sum(0))  # written [key blocks, r]
        if query_grad and D > 0:
            wrap_triton(_dq_kernel)[(triton.cdiv(r, mm["BLOCK_M"]), d_blocks)](
                panel, k, dq, row0, r, B, N, D, panel.stride(0), k.stride(0), dq.stride(0), **mm)
        if keys_grad and N > 0 and D > 0:
            out = dk if i == len(starts) - 1 else acc
            wrap_triton(_dk_kernel)[(triton.cdiv(N, mm["BLOCK_N"]), d_blocks)](
                panel, q, acc, out, row0, r, B, N, D, panel.stride(0), q.stride(0), acc.stride(0), out.stride(0),
                LOAD_ACC=i > 0, **mm)
    if keys_grad and not starts:
        dk.zero_()
    rowsum = torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float32, device=q.device)
    return dq, dk, rowsum
