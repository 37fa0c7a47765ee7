"""Host side of the Triton backend shared by its ops: the tile shape (the loss's forward and
backward use one; its D chunking decides the bits of every score, so the sampler, which picks its
own rows and columns per program, keeps it), autotuning of pipeline stages and register caps (the
warps are fixed at 8), the backward's workspace, and the contiguous operands of one call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ...plan import Flag

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def tuned(kernel, restore_value: Optional[list[str]] = None,  # noqa: ANN001, ANN202
           float32_stages: tuple[int, ...] = (2, 3, 4), guide_stages: tuple[int, ...] = (2, 3, 4),
           maxnreg: Optional[int] = None):
    """Autotune pipeline stages (and the register cap) per (D, DG, flags) on a GPU; the warps are
    fixed at 8 (below). The tile shape is not
    tuned here: it decides the bits of every score and must be identical in forward and both
    backward kernels, so the host picks it (``block_config``). The kernels only write their
    outputs, except the forward's column partials (symmetric loss), which the autotuner
    restores between its trial runs. 8 warps for every kernel: with 4, the modes with most live
    tiles, float32 tiles and products with masked edges spill (compile tier).
    ``float32_stages``: the pipeline depths tried with float32 inputs (the others spill on
    sm_90a in the compile tier); ``guide_stages``: likewise with a guide (two score tiles);
    ``maxnreg``: with float32 inputs or 64-row tiles, 255 lets the fused kernels use the whole
    register file of 8 warps (ptxas otherwise caps some of those variants at 128 registers and
    spills; the 128-row 16-bit variants compile without it, where ptxas allocates better on its
    own)."""
    if INTERPRET:
        return kernel
    configs = [triton.Config({}, num_warps=8, num_stages=s, maxnreg=r) for s in (2, 3, 4)
               for r in dict.fromkeys((None, maxnreg))]
    key = [name for name in ("D", "DG", "FLAGS") if name in kernel.arg_names]
    first = kernel.arg_names[0]

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        if kwargs.get("HAS_GUIDE"):
            configs = [c for c in configs if c.num_stages in guide_stages]
        whole = kwargs.get("BLOCK_M") == 64  # 64-row tiles (Ampere): ptxas may cap them at 128 registers too
        # the launches pass every argument by keyword: the autotuner's named_args hold the positional ones only
        operand = named_args.get(first, kwargs.get(first))
        if getattr(operand, "dtype", None) != torch.float32:
            return [c for c in configs if c.maxnreg == (maxnreg if whole else None)]
        return [c for c in configs if c.num_stages in float32_stages and c.maxnreg == maxnreg]

    return triton.autotune(configs=configs, key=key, restore_value=restore_value,
                           prune_configs_by={"early_config_prune": prune})(kernel)


@dataclass(frozen=True)
class BlockConfig:
    """Tile shape shared by forward and both backward kernels (it decides the bits of every
    score, so it must not differ between passes). The sampler keeps ``block_d`` (the D chunking)
    and picks its own rows and columns per program. Warps are 8; stages are autotuned per kernel."""

    block_m: int
    block_n: int
    block_d: int
    block_do: int


def cuda_block_config(D: int, dtype: torch.dtype, major: int, heavy: int = 0, guide: bool = False) -> BlockConfig:
    """The tile shape on a GPU of compute capability ``major``.x (also what the compile tier and
    the product count in the tests use, the latter under the interpreter). ``heavy``: 1 soft
    labels, 2 the symmetric loss. On Hopper, 16-bit inputs: 128 x 64 for every mode (a 64 x 32
    tile at 8 warps spends most of its element-wise work on per-tile overhead:
    ``benchmarks/sass_cost.py``), but 128 x 32 for soft labels (their guide beside the teacher's
    sums) and 64 x 32 for a symmetric loss with a guide. On Ampere, 64 x 64, and 64 x 32 for the
    heavy modes and a guide (Triton 3.6 spills there with 64 x 64). float32 takes 64 x 32 with
    16-wide D chunks; a D that is not a multiple of 16 takes half-width output tiles in the
    backward's products. Chosen so that no variant spills at 8 warps (benchmarks/compile_tier.py)."""
    wide = dtype in (torch.float16, torch.bfloat16)
    block_d = max(16, min(64 if wide else 16, triton.next_power_of_2(D)))  # no padded products at small D
    block_do = max(16, min((128 if wide else 64) // (1 if D % 16 == 0 else 2), triton.next_power_of_2(D)))
    hopper = major >= 9 and wide  # 128-row tiles on Hopper (64 for a symmetric loss with a guide)
    block_m = 128 if hopper and not (heavy == 2 and guide) else 64
    # 64 columns, but 32 for the heavy modes with a guide on Hopper (soft labels, a symmetric guide:
    # 128 x 64 spills) and for the heavy modes and a guide on Ampere
    block_n = 32 if (not wide) or (heavy and guide) or ((heavy or guide) and not hopper) else 64
    return BlockConfig(block_m, block_n, block_d, block_do)


_FORCED_MAJOR: Optional[int] = None  # set by ``cuda_tiles``


def block_config(D: int, dtype: torch.dtype, device: torch.device, heavy: int = 0,
                 guide: bool = False) -> BlockConfig:
    if _FORCED_MAJOR is not None:
        return cuda_block_config(D, dtype, _FORCED_MAJOR, heavy, guide)
    if device.type != "cuda":  # the interpreter: small tiles so that small tests cross tile edges
        return BlockConfig(16, 16, 16, max(16, min(64, triton.next_power_of_2(D))))
    return cuda_block_config(D, dtype, torch.cuda.get_device_capability(device)[0], heavy, guide)


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` take a GPU's tile shape (on a GPU, or within ``cuda_tiles``)."""
    return device.type == "cuda" or _FORCED_MAJOR is not None


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
    per_row = panel_stride(N) * element_size + triton.cdiv(N, cfg.block_n) * 4
    rows = budget // per_row // cfg.block_m * cfg.block_m
    return min(whole, max(cfg.block_m, rows))


def key_groups(row_blocks: int, col_blocks: int, device: torch.device) -> tuple[int, int]:
    """(groups, key tiles per group) of the dS kernel: each program takes one row block and one
    group of consecutive key tiles, so its per-program work (row state, addresses, the MMA
    pipeline's prologue) is paid once per group, not per tile. On a GPU, about 4 programs per SM
    and at least 4 tiles per group where there are that many; under the interpreter, groups of
    two tiles (so that small tests cross group edges)."""
    if col_blocks == 0:
        return 1, 1
    if device.type != "cuda" and _FORCED_MAJOR is None:
        per_group = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        groups = max(1, min(triton.cdiv(4 * sms, max(1, row_blocks)), triton.cdiv(col_blocks, 4)))
        per_group = triton.cdiv(col_blocks, groups)
    return triton.cdiv(col_blocks, per_group), per_group


def panel_stride(N: int) -> int:
    return triton.cdiv(max(N, 1), 16) * 16  # 16-element aligned rows of the dS panel


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def optional_operand(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An optional input as the kernels take it: contiguous, or ``None`` (Triton's absent argument;
    the kernels read it only under the constexpr that says it is there)."""
    return t.contiguous() if t is not None else None


def label_operands(query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
                   like: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Labels as contiguous [levels, B] / [levels, N] int32 (the op takes [B]/[N] or 2-D, int64).

    Only equality between a query's and a key's label matters, so each level's labels are
    replaced by their rank among that level's query and key labels (a sort, on the device, with
    no host synchronisation): ranks are below B + N, so they fit 32 bits and the kernels compare
    them with one instruction instead of two."""
    if key_labels is None or query_labels is None:
        return None, None, 0  # absent: read only when NUM_LABELS > 0
    ql = query_labels.long().reshape(-1, query_labels.shape[-1])
    kl = key_labels.long().reshape(-1, key_labels.shape[-1])
    B = ql.shape[1]
    both = torch.cat([ql, kl], dim=1)
    if both.shape[1] == 0:
        return ql.int().contiguous(), kl.int().contiguous(), kl.shape[0]
    ordered, order = both.sort(dim=1)
    step = torch.ones_like(ordered, dtype=torch.int32)
    step[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).int()
    ranks = torch.empty_like(step).scatter_(1, order, step.cumsum(1, dtype=torch.int32))
    return ranks[:, :B].contiguous(), ranks[:, B:].contiguous(), kl.shape[0]


@dataclass(frozen=True)
class Problem:
    """Contiguous inputs, sizes, row strides and the tile shape of one call."""

    q: torch.Tensor
    k: torch.Tensor
    gq: Optional[torch.Tensor]  # None without a guide
    gk: Optional[torch.Tensor]
    B: int
    N: int
    D: int
    DG: int
    cfg: BlockConfig

    @staticmethod
    def of(query: torch.Tensor, keys: torch.Tensor, guide_query: Optional[torch.Tensor],
           guide_keys: Optional[torch.Tensor], heavy: int = 0) -> Problem:
        """``heavy``: 1 for soft labels, 2 for the symmetric loss, 0 otherwise (with a guide they
        take narrower tiles); the forward and the backward of one call must pass the same value
        (it decides the tile shape)."""
        q, k = query.contiguous(), keys.contiguous()
        gq, gk = optional_operand(guide_query), optional_operand(guide_keys)
        DG = guide_query.shape[1] if guide_query is not None else 1
        cfg = block_config(q.shape[1], q.dtype, q.device, heavy, guide_query is not None)
        return Problem(q, k, gq, gk, q.shape[0], k.shape[0], q.shape[1], DG, cfg)

    @property
    def strides(self) -> tuple[int, int, int, int]:
        return (self.q.stride(0), self.k.stride(0), self.gq.stride(0) if self.gq is not None else 0,
                self.gk.stride(0) if self.gk is not None else 0)

    def shape_args(self) -> dict[str, int]:
        """The kernels' size and row-stride arguments by name (every kernel that reads the inputs
        takes them under these names)."""
        sq, sk, sgq, sgk = self.strides
        return dict(B=self.B, N=self.N, D=self.D, DG=self.DG, stride_q=sq, stride_k=sk, stride_gq=sgq, stride_gk=sgk)


def column_owners(positives: torch.Tensor, N: int) -> torch.Tensor:
    """owner[j] = the row whose positive is key j, -1 for keys that are nobody's positive."""
    owner = torch.full((N,), -1, dtype=torch.int64, device=positives.device)
    return owner.scatter_(0, positives.long(), torch.arange(positives.shape[0], device=positives.device))


def column_state(positives: torch.Tensor, row_state: torch.Tensor, grad: Optional[torch.Tensor],
                 N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric loss's per-column operands, gathered once per call (O(N), no host
    synchronisation): the owner row of each key column as int32 (-1: nobody's positive) and a
    float32 [6, N] block of row o_j's positive score, score threshold, guide threshold, column
    logsumexp and offset, and gradient g_o (0 where there is no owner; the forward passes no
    gradient and reads the first three), so that the kernels read them contiguously by column."""
    from ...plan import RowState

    owner = column_owners(positives, N)
    has = (owner >= 0)[None, :]
    idx = owner.clamp(min=0)
    rows = [int(RowState.POSITIVE_SCORE), int(RowState.THRESHOLD), int(RowState.GUIDE_THRESHOLD),
            int(RowState.COLUMN_LOGSUMEXP), int(RowState.COLUMN_OFFSET)]
    g = grad.float()[idx][None, :] if grad is not None else row_state.new_zeros(1, N, dtype=torch.float32)
    block = torch.cat([row_state.float()[rows][:, idx], g])
    return owner.int().contiguous(), torch.where(has, block, torch.zeros((), device=block.device)).contiguous()


def column_programs(row_blocks: int, device: torch.device) -> int:
    """Programs of the symmetric forward, each with its own [B] partial logsumexp per quantity:
    one per SM on a GPU (so 20 * SMs * N bytes of partials, indexed by key column), two in the interpreter (so that
    small tests merge partials of several programs, each over several row blocks)."""
    if device.type != "cuda":
        return min(row_blocks, 2)
    return min(row_blocks, torch.cuda.get_device_properties(device).multi_processor_count)


def rule_scalars(plan: object) -> dict[str, float]:
    """The score rules' scalars by the kernels' argument names (0 where a rule is off: ``FLAGS`` says
    which are on; ``guide_margin`` -inf when the guide does not mask)."""
    return dict(margin=plan.margin or 0.0, relative_margin=plan.relative_margin or 0.0,  # type: ignore[attr-defined]
                max_score=plan.max_score or 0.0, guide_margin=plan.guide_margin)  # type: ignore[attr-defined]


def soft_scalars(soft_temperature: Optional[float], soft_weight: float) -> tuple[float, float]:
    """(1 / teacher temperature, weight) of the soft labels; (0, 0) when off."""
    return (0.0, 0.0) if soft_temperature is None else (1.0 / soft_temperature, soft_weight)


def kernel_flags(flags: int) -> int:
    """The flags word as the kernels' ``FLAGS`` constexpr: without the backward's QUERY_GRAD / KEYS_GRAD
    bits, which the host reads, so that they do not compile kernel variants of their own."""
    return int(flags) & ~int(Flag.QUERY_GRAD | Flag.KEYS_GRAD)


def plain_rows(flags: int, levels: int, has_guide: bool, has_exclude: bool) -> bool:
    """The kernels' ``PLAIN``: no rule, weighting, estimator or exclusion (the symmetric loss and
    the backward's gradient bits aside), so every key is in each row's denominator and, with the
    symmetric loss, every query in each column's. Decided here once for the forward, the columns
    kernel and the backward."""
    ignored = Flag.SYMMETRIC | Flag.QUERY_GRAD | Flag.KEYS_GRAD | Flag.TEMPERATURE_GRAD
    return (int(flags) & ~int(ignored)) == 0 and levels == 0 and not has_guide and not has_exclude


def positive_later(flags: int, store: bool) -> bool:
    """The dS kernel's ``POSITIVE_LATER``: the positive's dS is written once per row afterwards
    (``_panel_positive_kernel``) unless soft labels, attraction or the symmetric loss add terms of
    their own to the positive's entry."""
    return store and not (int(flags) & int(Flag.SOFT | Flag.ATTRACT | Flag.SYMMETRIC))


def exclude_operand(exclude: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels' [B] int64 ``exclude`` pointer; ``None`` without exclusions (Triton's absent
    argument: the kernels read it only under ``HAS_EXCLUDE``)."""
    return None if exclude is None else exclude.reshape(-1).long().contiguous()
