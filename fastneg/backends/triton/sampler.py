"""Negative sampling on Triton (SPEC section 5): the kernel and the ``fastneg::sample_negatives_triton`` op.

The loss's tiles, rules and classification; each row keeps a running top-k over its unmasked
negatives, scored by the score (top), SimANS's log-weight plus Gumbel noise (a draw without
replacement, P(j) ~ w_ij), or Gumbel noise alone (uniform). The noise is a pure function of
(seed, i, first_key + j), the same bits as the C++ sampler's; the op returns the drawn indices
and their float32 values (the merge of shards drawn apart compares them).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ...plan import Plan
from .. import MAX_FUSED_NEGATIVES
from .config import Problem, gpu_tiles, kernel_flags, label_operands, precision, rule_scalars
from .rules import KIND, STRATEGY_SIMANS, STRATEGY_TOP, classify, row_states, simans_log_weight
from .tiles import tile_scores

__all__ = ["sample_negatives_triton"]


NEG_INF_KEY: tl.constexpr = tl.constexpr(-2139095041)  # pack_key's high word for -inf (bits 0xFF800000)


@triton.jit
def mix32(x):
    """lowbias32 on int64 values < 2^32 (products wrap; the low 32 bits are the uint32 result)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def gumbel_noise(seed_hash, rows, cols):
    """Standard Gumbel noise of entries (rows x cols): a hash of (seed, i, j), as in the C++ kernel."""
    h = mix32((rows.to(tl.int64) & 0xFFFFFFFF) ^ seed_hash)
    h = mix32(h[:, None] ^ (cols.to(tl.int64)[None, :] & 0xFFFFFFFF))
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def pack_key(value, cols):
    """(value, key index) as one int64 that orders like (value, then smaller index first):
    the float's bits made order-preserving in the high word, the inverted index in the low word."""
    bits = value.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))


@triton.jit
def _sample_negatives_kernel(
    q_ptr, k_ptr, pos_ptr, qlab_ptr, klab_ptr, gq_ptr, gk_ptr, out_ptr, value_ptr,
    B, N, D, DG, stride_q, stride_k, stride_gq, stride_gk,
    margin, relative_margin, max_score, guide_margin, weight_a, weight_b, seed_hash, first_key, num_negatives,
    NUM_LABELS: tl.constexpr, HAS_GUIDE: tl.constexpr, FLAGS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """One program per block of rows; a running top-K_PAD of packed (value, index) per row, merged
    with each tile's own top-K_PAD (tl.topk over the joined pair). The strategy sits in FLAGS'
    kind bits."""
    STRATEGY: tl.constexpr = FLAGS // KIND
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    row_valid = rows < B
    positive = tl.load(pos_ptr + rows, mask=row_valid, other=-1).to(tl.int64)
    s_pos, threshold, guide_threshold, guide_pos = row_states(
        q_ptr, k_ptr, gq_ptr, gk_ptr, pos_ptr, row_start, rows, row_valid, (B, N, D, DG),
        (stride_q, stride_k, stride_gq, stride_gk), (margin, relative_margin, max_score, guide_margin), HAS_GUIDE, FLAGS,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    no_value = tl.full((BLOCK_M, K_PAD), float("-inf"), tl.float32)
    best = pack_key(no_value, tl.zeros((BLOCK_M, K_PAD), tl.int64) + 0xFFFFFFFF)  # below every real entry
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_valid = cols < N
        s = tile_scores(q_ptr, k_ptr, rows, cols, row_valid, col_valid, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        t = s
        if HAS_GUIDE:
            t = tile_scores(gq_ptr, gk_ptr, rows, cols, row_valid, col_valid, DG, stride_gq, stride_gk,
                            BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        _, _, negative = classify(s, t, rows, row_valid, cols, col_valid, positive, threshold,
                                  guide_threshold, qlab_ptr, klab_ptr, B, N, NUM_LABELS, HAS_GUIDE)
        if STRATEGY == STRATEGY_TOP:
            value = s
        elif STRATEGY == STRATEGY_SIMANS:
            value = simans_log_weight(s, s_pos, weight_a, weight_b) + gumbel_noise(seed_hash, rows, first_key + cols)
        else:
            value = gumbel_noise(seed_hash, rows, first_key + cols)
        # NaN and -inf scores are never drawn, nor a NaN value (SimANS where s_i+ is infinite): a NaN
        # would pack as the highest key
        value = tl.where(negative & (s > float("-inf")) & (value > float("-inf")), value, float("-inf"))
        tile_best = tl.topk(pack_key(value, cols[None, :] + tl.zeros((BLOCK_M, BLOCK_N), tl.int64)), K_PAD)
        best = tl.topk(tl.reshape(tl.join(best, tile_best), (BLOCK_M, 2 * K_PAD)), K_PAD)
    valid = (best >> 32) > NEG_INF_KEY
    index = tl.where(valid, 0xFFFFFFFF - (best & 0xFFFFFFFF), -1)
    slots = tl.arange(0, K_PAD)
    high = (best >> 32).to(tl.int32)  # pack_key's high word back to the float's bits
    drawn = tl.where(valid, tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True),
                     float("-inf"))
    out_mask = row_valid[:, None] & (slots[None, :] < num_negatives)
    tl.store(out_ptr + rows[:, None] * num_negatives + slots[None, :], index, mask=out_mask)
    tl.store(value_ptr + rows[:, None] * num_negatives + slots[None, :], drawn, mask=out_mask)


def _host_mix32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _sampler_tiles(k_pad: int, dtype: torch.dtype) -> tuple[int, int]:
    """(rows per program, warps) of the sampler on a GPU: the running top-k lives in registers,
    so fewer rows for a larger k (and for float32 tiles); chosen with the compile tier."""
    if k_pad <= 32:
        return (64 if dtype != torch.float32 else 32), 8
    return 16, 8


@triton_op("fastneg::sample_negatives_triton", mutates_args={})
def sample_negatives_triton(
    query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor],
    scalars: list[float], flags: int, num_negatives: int, seed: int, first_key: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = Plan.decode(scalars, flags, sampler=True)
    p = Problem.of(query, keys, guide_query, guide_keys)
    q, k, gq, gk, B, cfg = p.q, p.k, p.gq, p.gk, p.B, p.cfg
    k_pad = triton.next_power_of_2(num_negatives)
    if k_pad > MAX_FUSED_NEGATIVES:
        raise ValueError(f"num_negatives: the fused Triton sampler takes at most {MAX_FUSED_NEGATIVES}, got {num_negatives}")
    # the running top-k lives in registers: fewer rows per program for a larger k
    block_m, warps = _sampler_tiles(k_pad, q.dtype) if gpu_tiles(q.device) else (cfg.block_m, 4)
    block_n = max(cfg.block_n, k_pad)
    out = torch.empty(B, num_negatives, dtype=torch.int64, device=q.device)
    values = torch.empty(B, num_negatives, dtype=torch.float32, device=q.device)
    qlab, klab, levels = label_operands(query_labels, key_labels, positives)
    wrap_triton(_sample_negatives_kernel)[(triton.cdiv(B, block_m),)](
        q_ptr=q, k_ptr=k, pos_ptr=positives, qlab_ptr=qlab, klab_ptr=klab, gq_ptr=gq, gk_ptr=gk, out_ptr=out,
        value_ptr=values, **p.shape_args(), **rule_scalars(plan), weight_a=plan.weight_a, weight_b=plan.weight_b,
        seed_hash=_host_mix32(seed), first_key=first_key, num_negatives=num_negatives, NUM_LABELS=levels,
        HAS_GUIDE=guide_query is not None, FLAGS=kernel_flags(flags), PRECISION=precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg.block_d, K_PAD=k_pad, num_warps=warps,
    )
    return out, values
