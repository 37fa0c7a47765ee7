"""Device helpers every Triton kernel shares: score tiles, positive scores and online logsumexps.

One D chunking per call (:mod:`.config`), so a score is computed with the same bits in the
forward, the backward and the sampler (the loss's kernels also share one tile shape; the
sampler picks its own rows and columns per program). Accumulation is in float32. The loss
kernels keep their logits in log2 units (``x2 = x log2(e)``) so that each exponential is one
``exp2``. Most paths take ``s * scale`` with ``scale = log2(e) / temperature`` computed once per
program (SimANS, Hardness and the guide's Hardness fold their constants likewise), but GCSE's
decayed logits and the backward's per-row offsets and logsumexps are multiplied by ``log2(e)``
element by element (one more multiply each); ``online_lse_add2`` and ``lse_merge2`` work in
those units. A row of all ``-inf`` never makes NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def tile_dot(a_ptr, b_ptr, a_valid, b_valid, D, stride_a, stride_b, BLOCK_A: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, MASK_A: tl.constexpr,
             MASK_B: tl.constexpr, EVEN_D: tl.constexpr):
    """[BLOCK_A, BLOCK_B] fp32 tile of a @ b^T over contiguous rows: ``a_ptr`` and ``b_ptr`` point
    at the tile's first row (64-bit, advanced once per tile by the caller), the offsets inside the
    tile are 32-bit. The same products in the same order as
    ``tile_scores`` (so the same bits). ``MASK_A`` / ``MASK_B``: whether rows past the end are
    masked (``a_valid``/``b_valid``; off on full tiles); ``EVEN_D``: D is a multiple of BLOCK_D
    (no mask on the reduction axis). D >= 1 (the public checks refuse D = 0): told to the
    compiler, so that the loop needs no zero-trip guard (which zeroed the accumulator twice)."""
    tl.assume(D > 0)
    ra = tl.arange(0, BLOCK_A)
    rb = tl.arange(0, BLOCK_B)
    rd = tl.arange(0, BLOCK_D)
    a_rows = ra[:, None] * stride_a
    b_rows = rb[:, None] * stride_b
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + rd
        if EVEN_D:
            if MASK_A:
                a = tl.load(a_ptr + (a_rows + d[None, :]), mask=a_valid[:, None], other=0.0)
            else:
                a = tl.load(a_ptr + (a_rows + d[None, :]))
            if MASK_B:
                b = tl.load(b_ptr + (b_rows + d[None, :]), mask=b_valid[:, None], other=0.0)
            else:
                b = tl.load(b_ptr + (b_rows + d[None, :]))
        else:
            d_valid = d < D
            a_mask = d_valid[None, :]
            b_mask = d_valid[None, :]
            if MASK_A:
                a_mask = a_mask & a_valid[:, None]
            if MASK_B:
                b_mask = b_mask & b_valid[:, None]
            a = tl.load(a_ptr + (a_rows + d[None, :]), mask=a_mask, other=0.0)
            b = tl.load(b_ptr + (b_rows + d[None, :]), mask=b_mask, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def tile_scores(a_ptr, b_ptr, a_rows, b_rows, a_valid, b_valid, D, stride_a, stride_b,
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
def positive_scores(a_ptr, b_ptr, pos_ptr, row_start, rows, row_valid, B, D, stride_a, stride_b,
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
        s = tile_scores(a_ptr, b_ptr, rows, g_cols, row_valid, g_valid, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        out += tl.sum(tl.where(local[:, None] == g_local[None, :], s, 0.0), axis=1)
    return out


@triton.jit
def online_lse_add2(running_max, running_sum, x2):
    """Merge a tile of log2-unit values into a per-row online logsumexp (log2 units: the result
    is ``running_max + log2(running_sum)``)."""
    new_max = tl.maximum(running_max, tl.max(x2, axis=1))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - safe) + tl.sum(tl.exp2(x2 - safe[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def online_lse_add2_scaled(running_max, running_sum, s, scale):
    """``online_lse_add2`` of ``s * scale`` for a positive ``scale``: the tile's maximum is taken
    on ``s`` (one comparison per element) and each term is ``exp2(s * scale - max)``, one fused
    multiply-add and one ``exp2`` per element."""
    new_max = tl.maximum(running_max, tl.max(s, axis=1) * scale)
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - safe) + tl.sum(tl.exp2(s * scale - safe[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def online_lse_add2_columns(running_max, running_sum, x2):
    """``online_lse_add2`` along the tile's first axis: per-column running sums (the symmetric
    loss's column direction, read on the row-major tile)."""
    new_max = tl.maximum(running_max, tl.max(x2, axis=0))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - safe) + tl.sum(tl.exp2(x2 - safe[None, :]), axis=0)
    return new_max, running_sum


@triton.jit
def lse_merge2(max_a, sum_a, max_b, sum_b):
    """Merge two partial logsumexps in log2 units, each (max, sum of exp2(x2 - max))."""
    new_max = tl.maximum(max_a, max_b)
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    return new_max, sum_a * tl.exp2(max_a - safe) + sum_b * tl.exp2(max_b - safe)


@triton.jit
def logaddexp(a, b):
    m = tl.maximum(a, b)
    safe = tl.where(m == float("-inf"), 0.0, m)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))
