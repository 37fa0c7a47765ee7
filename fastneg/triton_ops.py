"""Host side of the Triton backend: block configuration, launches, and the
``fastneg::info_nce_{fwd,bwd}_triton`` operators (``torch.library.triton_op``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import ops
from .triton_kernels import (
    _info_nce_bwd_ds_kernel,
    _info_nce_columns_kernel,
    _info_nce_fwd_kernel,
    _info_nce_row_state_kernel,
    _panel_dk_kernel,
    _panel_dq_kernel,
    _sample_negatives_kernel,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tuned(kernel, restore_value: Optional[list[str]] = None,  # noqa: ANN001, ANN202
           float32_stages: tuple[int, ...] = (2, 3, 4)):
    """Autotune warps and pipeline stages per (D, DG, dtype) on a GPU. The tile shape is not
    tuned here: it decides the bits of every score and must be identical in forward and both
    backward kernels, so the host picks it (``block_config``). The kernels only write their
    outputs, except the forward's column partials (symmetric loss), which the autotuner
    restores between its trial runs. 8 warps for every kernel: with 4, the modes with most live
    tiles, float32 tiles and products with masked edges spill (compile tier).
    ``float32_stages``: the pipeline depths tried with float32 inputs (the others spill on
    sm_90a in the compile tier)."""
    if INTERPRET:
        return kernel
    configs = [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3, 4)]
    key = [name for name in ("D", "DG", "SYMMETRIC") if name in kernel.arg_names]
    first = kernel.arg_names[0]

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        if getattr(named_args.get(first), "dtype", None) != torch.float32:
            return configs
        return [c for c in configs if c.num_stages in float32_stages]

    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by={"early_config_prune": prune})(kernel)


_COLUMN_PARTIALS = ["cmax_ptr", "csum_ptr", "cwmax_ptr", "cwsum_ptr", "cneg_ptr"]
_fwd_kernel = _tuned(_info_nce_fwd_kernel, _COLUMN_PARTIALS, float32_stages=(2, 3))
_bwd_ds_kernel = _tuned(_info_nce_bwd_ds_kernel)
_dq_kernel = _tuned(_panel_dq_kernel)
# dk reads and writes the float32 sum of earlier panels: restored between trial runs
_dk_kernel = _tuned(_panel_dk_kernel, ["out_ptr"], float32_stages=(3, 4))


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape shared by forward and both backward kernels (it decides the bits of every
    score, so it must not differ between passes). Warps and stages are autotuned per kernel."""

    block_m: int
    block_n: int
    block_d: int
    block_do: int


def cuda_block_config(D: int, dtype: torch.dtype, major: int, heavy: bool = False) -> BlockConfig:
    """The tile shape on a GPU of compute capability ``major``.x (also what the compile tier and
    the product count in the tests use, the latter under the interpreter). 128 x 64 tiles on
    Hopper for 16-bit inputs, 64 x 64 on Ampere; the ``heavy`` modes, which hold more tiles live
    (a guide, soft labels, the symmetric loss's column direction), take 64 x 32 (on Ampere too:
    Triton 3.6 spills there with 64 x 64), and float32 takes 64 x 32 with 16-wide D chunks; a D that is not a multiple of 16 takes
    half-width output tiles in the backward's products. Chosen so that no variant spills at
    8 warps (benchmarks/compile_tier.py)."""
    wide = dtype in (torch.float16, torch.bfloat16)
    block_d = max(16, min(64 if wide else 16, triton.next_power_of_2(D)))  # no padded products at small D
    block_do = max(16, min((128 if wide else 64) // (1 if D % 16 == 0 else 2), triton.next_power_of_2(D)))
    block_m = 128 if major >= 9 and wide and not heavy else 64
    block_n = 32 if not wide or heavy else 64
    return BlockConfig(block_m, block_n, block_d, block_do)


_FORCED_MAJOR: Optional[int] = None  # set by ``cuda_tiles``


def block_config(D: int, dtype: torch.dtype, device: torch.device, heavy: bool = False) -> BlockConfig:
    if _FORCED_MAJOR is not None:
        return cuda_block_config(D, dtype, _FORCED_MAJOR, heavy)
    if device.type != "cuda":  # the interpreter: small tiles so that small tests cross tile edges
        return BlockConfig(16, 16, 16, max(16, min(64, triton.next_power_of_2(D))))
    return cuda_block_config(D, dtype, torch.cuda.get_device_capability(device)[0], heavy)


@contextmanager
def cuda_tiles(major: int = 9) -> Iterator[None]:
    """Within the block every launch uses the tile shape of a compute-capability ``major`` GPU,
    also under the interpreter (how the tests count the work of the GPU's tile shape)."""
    global _FORCED_MAJOR
    previous, _FORCED_MAJOR = _FORCED_MAJOR, major
    try:
        yield
    finally:
        _FORCED_MAJOR = previous


#: Bytes of the backward's dS panel (plus its [key blocks, rows] partial sums) on a GPU; the
#: environment variable ``FASTNEG_TRITON_WORKSPACE_MB`` overrides it. A panel holds at least one
#: row block (BLOCK_M x N), so the bound is max(this, BLOCK_M x N x element size): it does not
#: grow with B.
DEFAULT_WORKSPACE_BYTES = 512 << 20


def workspace_bytes() -> int:
    value = os.environ.get("FASTNEG_TRITON_WORKSPACE_MB")
    if value is not None:
        try:
            return max(0, int(float(value) * (1 << 20)))
        except ValueError:
            raise ValueError(f"FASTNEG_TRITON_WORKSPACE_MB must be a number of MiB, got {value!r}") from None
    return DEFAULT_WORKSPACE_BYTES


def panel_rows(B: int, N: int, element_size: int, cfg: BlockConfig, budget: Optional[int] = None,
               interpret: bool = INTERPRET) -> int:
    """Rows of one backward panel: a multiple of the row block (so the panel's tiles are the
    forward's tiles), as many as the workspace budget holds, at least one block, at most B
    rounded up. Under the interpreter without an explicit budget: two row blocks, so that
    small tests cross panel boundaries."""
    whole = triton.cdiv(max(B, 1), cfg.block_m) * cfg.block_m
    if budget is None and interpret and "FASTNEG_TRITON_WORKSPACE_MB" not in os.environ:
        return min(whole, 2 * cfg.block_m)
    budget = workspace_bytes() if budget is None else budget
    per_row = _panel_stride(N) * element_size + triton.cdiv(N, cfg.block_n) * 4
    rows = budget // per_row // cfg.block_m * cfg.block_m
    return min(whole, max(cfg.block_m, rows))


def _panel_stride(N: int) -> int:
    return triton.cdiv(max(N, 1), 16) * 16  # 16-element aligned rows of the dS panel


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _optional(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # the kernels never read a disabled input; a 1-element tensor stands in for the pointer
    return t.contiguous() if t is not None else like.new_zeros(1)


def _labels(query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
            like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels as contiguous [levels, B] / [levels, N] int64 (the op takes [B]/[N] or 2-D)."""
    if key_labels is None or query_labels is None:
        return like.new_zeros(1), like.new_zeros(1), 0
    ql = query_labels.long().reshape(-1, query_labels.shape[-1]).contiguous()
    kl = key_labels.long().reshape(-1, key_labels.shape[-1]).contiguous()
    return ql, kl, kl.shape[0]


@dataclass(frozen=True)
class _Problem:
    """Contiguous inputs, sizes, row strides and the tile shape of one call."""

    q: torch.Tensor
    k: torch.Tensor
    gq: torch.Tensor
    gk: torch.Tensor
    B: int
    N: int
    D: int
    DG: int
    cfg: BlockConfig

    @staticmethod
    def of(query: torch.Tensor, keys: torch.Tensor, guide_query: Optional[torch.Tensor],
           guide_keys: Optional[torch.Tensor], heavy: bool = False) -> _Problem:
        """``heavy``: symmetric or soft labels (a guide makes it heavy too); the forward and
        the backward of one call must pass the same value (it decides the tile shape)."""
        q, k = query.contiguous(), keys.contiguous()
        gq, gk = _optional(guide_query, q), _optional(guide_keys, q)
        DG = guide_query.shape[1] if guide_query is not None else 1
        cfg = block_config(q.shape[1], q.dtype, q.device, heavy or guide_query is not None)
        return _Problem(q, k, gq, gk, q.shape[0], k.shape[0], q.shape[1], DG, cfg)

    @property
    def strides(self) -> tuple[int, int, int, int]:
        return (self.q.stride(0), self.k.stride(0), self.gq.stride(0) if self.gq.dim() == 2 else 0,
                self.gk.stride(0) if self.gk.dim() == 2 else 0)


def _owners(positives: torch.Tensor, N: int) -> torch.Tensor:
    """owner[j] = the row whose positive is key j, -1 for keys that are nobody's positive."""
    owner = torch.full((N,), -1, dtype=torch.int64, device=positives.device)
    return owner.scatter_(0, positives.long(), torch.arange(positives.shape[0], device=positives.device))


def _column_parts(row_blocks: int, device: torch.device) -> int:
    """Programs of the symmetric forward, each with its own [B] partial logsumexp per quantity:
    one per SM on a GPU (so 20 * SMs * B bytes of partials), two in the interpreter (so that
    small tests merge partials of several programs, each over several row blocks)."""
    if device.type != "cuda":
        return min(row_blocks, 2)
    return min(row_blocks, torch.cuda.get_device_properties(device).multi_processor_count)


def _soft_scalars(soft_temperature: Optional[float], soft_weight: float) -> tuple[float, float]:
    """(1 / teacher temperature, weight) of the soft labels; (0, 0) when off."""
    return (0.0, 0.0) if soft_temperature is None else (1.0 / soft_temperature, soft_weight)


def _exclude_operand(exclude: Optional[torch.Tensor], positives: torch.Tensor) -> torch.Tensor:
    """The kernels' [B] int64 ``exclude`` pointer; without exclusions any [B] tensor (never read)."""
    return positives if exclude is None else exclude.reshape(-1).long().contiguous()


@triton_op("fastneg::info_nce_fwd_triton", mutates_args={})
def info_nce_fwd_triton(
    query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
    query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor],
    margin: Optional[float], relative_margin: Optional[float], max_score: Optional[float],
    guide_margin: float, guide_relative: bool, weighting: int, weight_a: float, weight_b: float, symmetric: bool,
    debias: Optional[float], soft_temperature: Optional[float], soft_weight: float, exclude: Optional[torch.Tensor],
    attract: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Problem.of(query, keys, guide_query, guide_keys, symmetric or soft_temperature is not None)
    q, k, gq, gk, B, N, D, DG, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.DG, p.cfg
    f32 = dict(dtype=torch.float32, device=q.device)
    loss, lse, s_pos, offset, thr, gthr = (torch.empty(B, **f32) for _ in range(6))
    col_lse, col_offset = torch.zeros(B, **f32), torch.zeros(B, **f32)
    pos_coef = torch.zeros(4, B, **f32)
    n_masked = torch.empty(B, dtype=torch.int64, device=q.device)
    n_neg = torch.empty(B, dtype=torch.int64, device=q.device)
    qlab, klab, levels = _labels(query_labels, key_labels, positives)
    scalars = (0.0 if margin is None else margin, 0.0 if relative_margin is None else relative_margin,
               0.0 if max_score is None else max_score, guide_margin)
    rules = dict(HAS_GUIDE=guide_query is not None, GUIDE_RELATIVE=guide_relative, HAS_MARGIN=margin is not None,
                 HAS_RELATIVE_MARGIN=relative_margin is not None, HAS_MAX_SCORE=max_score is not None,
                 PRECISION=_precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    row_blocks = triton.cdiv(B, cfg.block_m)
    parts = row_blocks
    owner = cmax = csum = cwmax = cwsum = cneg = positives  # not read unless symmetric
    if symmetric:
        wrap_triton(_info_nce_row_state_kernel)[(row_blocks,)](
            q, k, positives, gq, gk, s_pos, thr, gthr, B, D, DG, *p.strides, *scalars, **rules)
        owner = _owners(positives, N)
        parts = _column_parts(row_blocks, q.device)
        cmax, cwmax = torch.full((parts, B), float("-inf"), **f32), torch.full((parts, B), float("-inf"), **f32)
        csum, cwsum = torch.zeros(parts, B, **f32), torch.zeros(parts, B, **f32)
        cneg = torch.zeros(parts, B, dtype=torch.int32, device=q.device)
    wrap_triton(_fwd_kernel)[(parts,)](
        q, k, positives, temperature, qlab, klab, gq, gk, owner, _exclude_operand(exclude, positives),
        loss, lse, s_pos, offset, thr, gthr, n_masked, n_neg, cmax, csum, cwmax, cwsum, cneg, pos_coef,
        B, N, D, DG, *p.strides, *scalars, weight_a, weight_b, 0.0 if debias is None else debias,
        *_soft_scalars(soft_temperature, soft_weight), NUM_LABELS=levels, WEIGHTING=weighting, SYMMETRIC=symmetric,
        DEBIAS=debias is not None, SOFT=soft_temperature is not None, HAS_EXCLUDE=exclude is not None,
        ATTRACT=attract, **rules,
    )
    if symmetric:
        wrap_triton(_info_nce_columns_kernel)[(triton.cdiv(B, 256),)](
            loss, s_pos, temperature, cmax, csum, cwmax, cwsum, cneg, col_lse, col_offset, B, parts,
            WEIGHTING=weighting, BLOCK=256)
    return loss, lse, s_pos, offset, thr, gthr, n_masked, n_neg, col_lse, col_offset, pos_coef


@triton_op("fastneg::info_nce_bwd_triton", mutates_args={})
def info_nce_bwd_triton(
    grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
    temperature: torch.Tensor, query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor], lse: torch.Tensor,
    positive_score: torch.Tensor, row_offset: torch.Tensor, threshold: torch.Tensor,
    guide_threshold: torch.Tensor, col_lse: torch.Tensor, col_offset: torch.Tensor, positive_coef: torch.Tensor,
    weighting: int, weight_a: float, weight_b: float, symmetric: bool, soft_temperature: Optional[float],
    soft_weight: float, exclude: Optional[torch.Tensor], attract: bool, query_grad: bool, keys_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _Problem.of(query, keys, guide_query, guide_keys, symmetric or soft_temperature is not None)
    q, k, gq, gk, B, N, D, DG, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.DG, p.cfg
    grad = grad_loss.contiguous()
    qlab, klab, levels = _labels(query_labels, key_labels, positives)
    owner = _owners(positives, N) if symmetric else positives
    soft = _soft_scalars(soft_temperature, soft_weight)
    common_in = (grad, q, k, positives, temperature, qlab, klab, gq, gk, lse, positive_score, row_offset, threshold,
                 guide_threshold, owner, col_lse.float().contiguous(), col_offset.float().contiguous(),
                 positive_coef.float().contiguous(), _exclude_operand(exclude, positives))
    flags = dict(NUM_LABELS=levels, HAS_GUIDE=guide_query is not None, WEIGHTING=weighting, SYMMETRIC=symmetric,
                 SOFT=soft_temperature is not None, HAS_EXCLUDE=exclude is not None, ATTRACT=attract,
                 PRECISION=_precision(q.dtype), BLOCK_M=cfg.block_m,
                 BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d)
    dq = torch.empty_like(q) if query_grad else q.new_empty(0)
    dk = torch.empty_like(k) if keys_grad else k.new_empty(0)
    store = query_grad or keys_grad
    R = panel_rows(B, N, q.element_size(), cfg)
    col_blocks = triton.cdiv(N, cfg.block_n)
    # the panel: dS of R rows x N keys, in the inputs' dtype (what the products read)
    panel = q.new_empty(R, _panel_stride(N)) if store else q.new_empty(1)
    part = torch.empty(max(col_blocks, 1), R, dtype=torch.float32, device=q.device)
    starts = list(range(0, B, R))
    acc = dk  # float32 inputs: dk itself holds the running sum over panels
    if keys_grad and dk.dtype != torch.float32 and len(starts) > 1:
        acc = torch.empty(N, D, dtype=torch.float32, device=q.device)
    sums = []
    # the two products read dS from memory: their tiles need not be the score tiles'
    fp32 = q.dtype == torch.float32  # smaller float32 tiles, which do not spill
    mm = dict(PRECISION=flags["PRECISION"], BLOCK_M=min(cfg.block_m, 64 if fp32 else 128), BLOCK_N=32 if fp32 else 64,
              BLOCK_DO=cfg.block_do)
    d_blocks = triton.cdiv(D, cfg.block_do)
    for i, row0 in enumerate(starts):
        r = min(R, B - row0)
        if col_blocks == 0:
            sums.append(torch.zeros(r, dtype=torch.float32, device=q.device))
        else:
            wrap_triton(_bwd_ds_kernel)[(triton.cdiv(r, cfg.block_m), col_blocks)](
                *common_in, panel, part, row0, r, B, N, D, DG, *p.strides, panel.stride(0), weight_a, weight_b,
                *soft, STORE_DS=store, **flags)
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


ops.register_fused_op("triton", info_nce_fwd_triton, info_nce_bwd_triton)

# The fused sampler keeps a [rows, K_PAD] running top-k in registers; beyond this the Python
# layer samples row chunks densely instead (fastneg.sampling).
MAX_FUSED_NEGATIVES = 512


def _mix32(x: int) -> int:
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
    margin: Optional[float], relative_margin: Optional[float], max_score: Optional[float], guide_margin: float,
    guide_relative: bool, strategy: int, weight_a: float, weight_b: float, num_negatives: int, seed: int,
) -> torch.Tensor:
    p = _Problem.of(query, keys, guide_query, guide_keys)
    q, k, gq, gk, B, N, D, DG, cfg = p.q, p.k, p.gq, p.gk, p.B, p.N, p.D, p.DG, p.cfg
    k_pad = triton.next_power_of_2(num_negatives)
    if k_pad > MAX_FUSED_NEGATIVES:
        raise ValueError(f"num_negatives: the fused Triton sampler takes at most {MAX_FUSED_NEGATIVES}, got {num_negatives}")
    # the running top-k lives in registers: fewer rows per program for a larger k
    gpu_tiles = q.device.type == "cuda" or _FORCED_MAJOR is not None
    block_m, warps = _sampler_tiles(k_pad, q.dtype) if gpu_tiles else (cfg.block_m, 4)
    block_n = max(cfg.block_n, k_pad)
    out = torch.empty(B, num_negatives, dtype=torch.int64, device=q.device)
    qlab, klab, levels = _labels(query_labels, key_labels, positives)
    wrap_triton(_sample_negatives_kernel)[(triton.cdiv(B, block_m),)](
        q, k, positives, qlab, klab, gq, gk, out, B, N, D, DG, *p.strides,
        0.0 if margin is None else margin, 0.0 if relative_margin is None else relative_margin,
        0.0 if max_score is None else max_score, guide_margin, weight_a, weight_b, _mix32(seed), num_negatives,
        NUM_LABELS=levels, HAS_GUIDE=guide_query is not None, GUIDE_RELATIVE=guide_relative,
        HAS_MARGIN=margin is not None, HAS_RELATIVE_MARGIN=relative_margin is not None,
        HAS_MAX_SCORE=max_score is not None, STRATEGY=strategy, PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg.block_d, K_PAD=k_pad, num_warps=warps,
    )
    return out


ops.register_sample_op("triton", sample_negatives_triton)
