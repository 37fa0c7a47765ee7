"""The machine-code cost of the Triton kernels' hot loops, counted without a GPU, and the H200
time it implies.

    python benchmarks/sass_cost.py --out benchmarks/results/sass_cost_<date>
    python benchmarks/sass_cost.py --modes plain "labels+margin+SimANS" --dtypes bfloat16 --dims 768

What it does, per kernel variant (mode x dtype x D, sm_90a unless ``--arch 80``):

1. Compiles the variant exactly as the host code launches it, through the compile tier's stand-in
   driver (``benchmarks/compile_tier.py``; the first autotune config, 8 warps).
2. Finds the key-tile loop in the SASS (``nvdisasm`` on the cubin): loops are backward branches;
   an *MMA loop* is a loop with a tensor-core instruction (HGMMA / HMMA) and no loop inside it
   that has one (the loop over D chunks); the *tile body* is the innermost loop that contains an
   MMA loop (the forward's loop over key tiles) or, for kernels with one program per tile (the
   backward's dS kernel), the whole kernel. The interior-tile variant is the one read: the forward's
   main loop and the dS kernel's loop over its group of key tiles run over full tiles only (the
   ragged last tile is peeled after the loop). The compile is driven at B = 256, N = 2048 with
   the default backward workspace, so that the dS kernel's groups hold several tiles.
3. Counts the tile body's instructions outside its MMA loops, per thread per tile, and divides by
   the score elements a thread holds (``BLOCK_M * BLOCK_N / (32 * warps)``), by class: tensor MMA,
   MUFU, FP32 arithmetic (FADD, FMUL, FFMA, FMNMX, HFMA2...), integer and predicate (ISETP, LOP3,
   PLOP3, SEL, FSEL, FSETP, IADD3, IMAD...), conversions (F2F, F2FP, I2F...), memory (LDG, STG,
   LDS, STS, LDGSTS, SHFL...) and other (moves, barriers, branches, uniform-datapath instructions).
   A conditionally executed block inside the tile body is weighted by how often it runs on an
   interior tile: the blocks a trip-count guard of an MMA loop skips run on every interior tile at
   the D counted (weight 1); any other conditional block is counted at weight 1 too (an upper
   bound) and reported in the ``conditional`` column, so a kernel whose interior path branches is
   visible. The MMA loop's own instructions (address arithmetic, asynchronous copies, barriers) are
   counted per D chunk and charged D / BLOCK_D times per tile in the model.

The model of one tile on one SM of an H200 (sm_90a; an H100 SXM is the same SM):

* tensor clocks ``T_mma = 2 BLOCK_M BLOCK_N D / 4096`` (dense 16-bit HGMMA: 4096 FLOP per clock
  per SM; TF32 half of it);
* element-wise clocks ``T_elem``: the largest of the issue limit (4 warp-instructions per clock:
  one per scheduler), the FP32/FMA pipe (128 lanes per clock: FADD, FMUL, FFMA, IMAD, HFMA2), the
  ALU pipe (64 lanes: integer, logic, compare, select, FMNMX, FSETP), MUFU (16 lanes) and
  conversions (16 lanes) over the tile body's instructions of all the CTA's warps (the CUDA
  programming guide's throughput table for compute capability 9.0);
* the MMA loop's own instructions issue beside the products (``T_loop``, at the issue limit), and
  they share the schedulers with the element-wise code: ``T_issue = T_loop + body / 4``;
* overlap: the tile's element-wise code waits for its products (``WARPGROUP.DEPBAR.LE gsb0,
  0x0`` before it) unless the kernel issues the next tile's products first, so within one CTA the
  phases add up; with ``k`` CTAs resident per SM (registers, shared memory, 64 warps) another
  CTA's products fill the gap: ``T_tile = max(T_mma', T_elem, T_issue, (T_mma' + T_elem) / k)``
  with ``T_mma' = max(T_mma, T_loop)`` (without the wait, the last term drops).

The whole forward+backward at B = N (default 32768) adds the forward's tiles, the dS kernel's
tiles, the two products dq = dS k and dk = dS^T q (per output tile, each MMA-loop iteration the
larger of its tensor clocks and its SASS instructions at the issue limit; or memory-bound on the
dS panel they read, whichever is larger; the grid walks the D blocks of one row block together,
so the panel is read from HBM once per kernel, the repeats coming from L2) and the dS panel's write,
over 132 SMs at 1.83 GHz (989 TFLOP/s dense bf16, the H100/H200 SXM data-sheet figure) and
4.3 TB/s of HBM (H200 STREAM-like copy rate). The bound is the four B x N x D products at
989 TFLOP/s. The dense loss (plain PyTorch: ``S = q k^T / t``, ``cross_entropy``, backward) is
three cuBLAS products at 790 TFLOP/s plus its memory-bound passes over B x N (``DENSE_PASSES``:
bytes per score element read and written by each pass) at 4.3 TB/s.

Limits: a model, not a measurement. It assumes the loads of each D chunk arrive in time (the
pipeline's stages hide HBM/L2 latency), perfect scheduling within each pipe, full waves of
tiles, no instruction-cache misses, and ignores the per-row-block work outside the tile loop
(positive scores, the row epilogue: a few tiles' worth per row block of N / BLOCK_N tiles). Its
clock and bandwidth figures are data-sheet numbers. When a GPU is at hand,
``benchmarks/gpu_check.sh`` measures the same shapes; compare the two before trusting either.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# --- the machine: one H200 (H100 SXM SM), compute capability 9.0 ---------------------------------
SMS = 132
CLOCK_HZ = 1.83e9
MMA_FLOP_PER_CLOCK = {"bfloat16": 4096, "float16": 4096, "tf32": 2048, "float32": 256}  # float32: FFMA
ISSUE_PER_CLOCK = 4  # warp-instructions per clock per SM (one per scheduler)
PIPE_LANES = {"fma": 128, "alu": 64, "mufu": 16, "conv": 16}  # lanes per clock per SM
HBM_BYTES_PER_S = 4.3e12
CUBLAS_FLOP_PER_S = 790e12
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 232448
MAX_WARPS_PER_SM = 64
# the dense loss's passes over B x N (bytes per element, 2-byte scores): the product's output
# (write), the division by the temperature (read, write), log_softmax (two reads, one write),
# the one-hot gradient of the gather (write), log_softmax's backward (read grad, read output,
# write), the division's backward (read, write)
DENSE_PASSES = {"S write": 2, "S / t": 4, "log_softmax": 6, "nll backward": 2, "log_softmax backward": 6,
                "(S / t) backward": 4}

CLASSES = ("mma", "mufu", "fp32", "int+pred", "conv", "memory", "other")
MMA_OPS = ("HGMMA", "HMMA", "IMMA", "DMMA")
FP32_OPS = {"FADD", "FMUL", "FFMA", "FMNMX", "FADD32I", "FMUL32I", "FFMA32I", "FSWZADD", "HADD2", "HMUL2",
            "HFMA2", "HMNMX2", "DADD", "DMUL", "DFMA", "FCHK"}
FMA_PIPE = {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I", "IMAD", "HADD2", "HMUL2", "HFMA2", "FSWZADD"}
INT_OPS = {"ISETP", "LOP3", "PLOP3", "SEL", "FSEL", "FSETP", "IADD3", "IMAD", "LEA", "SHF", "IMNMX", "VIADD",
           "VIMNMX", "P2R", "R2P", "LOP", "IABS", "POPC", "FLO", "BREV", "SGXT", "ISCADD", "IADD", "SHL", "SHR",
           "HSETP2", "HSET2", "DSETP", "BMSK", "IDP", "IMUL", "ICMP", "PRMT", "VABSDIFF"}
CONV_OPS = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"}
MEMORY_OPS = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDC", "LD", "ST", "ATOM", "ATOMS", "RED",
              "SHFL", "LDL", "STL", "ATOMG", "UTMALDG", "UTMASTG", "UBLKCP", "LDGDEPBAR", "DEPBAR", "ULDC"}


def op_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in MMA_OPS:
        return "mma"
    if base == "MUFU":
        return "mufu"
    if base in FP32_OPS:
        return "fp32"
    if base in INT_OPS:
        return "int+pred"
    if base in CONV_OPS:
        return "conv"
    if base in MEMORY_OPS:
        return "memory"
    return "other"


def op_pipe(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base == "MUFU":
        return "mufu"
    if base in CONV_OPS:
        return "conv"
    if base in FMA_PIPE:
        return "fma"
    if base in INT_OPS or base == "FMNMX":
        return "alu"
    return "none"


# --- SASS --------------------------------------------------------------------------------------
@dataclass
class Instr:
    index: int
    address: int
    predicate: str
    opcode: str
    operands: str
    label: Optional[str] = None  # a label that names this instruction

    @property
    def branch_target(self) -> Optional[str]:
        if self.opcode.split(".")[0] != "BRA":
            return None
        m = re.search(r"\(?`?\(?(\.L_x_\d+)\)?", self.operands)
        return m.group(1) if m else None


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;?\s*$")


def parse_sass(text: str) -> list[Instr]:
    """The instructions of one kernel's SASS (``nvdisasm -c`` or ``cuobjdump -sass`` output)."""
    out: list[Instr] = []
    pending: Optional[str] = None
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"^\.L_x_\d+:$", stripped):
            pending = stripped[:-1]
            continue
        m = _LINE.match(line)
        if not m:
            continue
        address, predicate, opcode, operands = m.groups()
        out.append(Instr(len(out), int(address, 16), (predicate or "").strip(), opcode, operands, pending))
        pending = None
    return out


@dataclass
class Loop:
    start: int  # instruction index of the loop head
    end: int  # instruction index of the backward branch
    mma: bool = False
    children: list[Loop] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and (self.start, self.end) != (other.start, other.end)


def find_loops(instrs: list[Instr]) -> list[Loop]:
    labels = {i.label: i.index for i in instrs if i.label}
    loops = []
    for ins in instrs:
        target = ins.branch_target
        if target in labels and labels[target] <= ins.index and not (target == ins.label and ins.predicate == ""):
            loops.append(Loop(labels[target], ins.index))
    for loop in loops:
        loop.mma = any(op_class(instrs[i].opcode) == "mma" for i in range(loop.start, loop.end + 1))
    return loops


@dataclass
class TileCount:
    """Instructions of one kernel's tile body, per thread per tile (weighted), by class and pipe."""

    kernel: str
    elements_per_thread: float
    body: dict[str, float]  # by class, outside the MMA loops
    pipes: dict[str, float]
    loop_per_chunk: float  # instructions of the MMA loop(s), per thread per D chunk
    mma_loops: int
    conditional: int  # instructions in conditionally executed blocks other than MMA-loop guards
    waits_for_products: bool  # element-wise code after a full wait on the products (no overlap)
    opcodes: dict[str, float] = field(default_factory=dict)  # the body's instructions by opcode

    @property
    def per_element(self) -> float:
        return sum(self.body.values()) / self.elements_per_thread

    def class_per_element(self, name: str) -> float:
        return self.body.get(name, 0.0) / self.elements_per_thread


def count_tile(name: str, instrs: list[Instr], elements_per_thread: float) -> TileCount:
    loops = find_loops(instrs)
    mma_loops = [lp for lp in loops if lp.mma and not any(o.mma and lp.contains(o) for o in loops)]
    outer = [lp for lp in loops if any(lp.contains(m) for m in mma_loops)]
    # the innermost loop around an MMA loop, the first such in the code (the main key-tile loop)
    inner_outer = [lp for lp in outer if not any(lp.contains(o) for o in outer)]
    if inner_outer:
        body = min(inner_outer, key=lambda lp: lp.start)
        lo, hi = body.start, body.end
    else:
        lo, hi = 0, len(instrs) - 1
        for i, ins in enumerate(instrs):  # a kernel without a tile loop: up to its first EXIT that ends it
            if ins.opcode == "EXIT" and ins.predicate == "":
                hi = i
                break
    inside = [m for m in mma_loops if lo <= m.start and m.end <= hi]
    in_mma = set()
    for m in inside:
        in_mma.update(range(m.start, m.end + 1))
    labels = {i.label: i.index for i in instrs if i.label}
    # conditional blocks: ranges skipped by a forward conditional branch inside the body
    conditional = set()
    for i in range(lo, hi + 1):
        ins = instrs[i]
        target = ins.branch_target
        if target is None or target not in labels or ins.predicate in ("", "@PT"):
            continue
        t = labels[target]
        if t <= i or t > hi + 1:
            continue
        skipped = set(range(i + 1, t))
        if any(m.start in skipped for m in inside):
            continue  # an MMA loop's trip-count guard: the loop runs on an interior tile
        conditional |= skipped - in_mma
    body_counts: dict[str, float] = defaultdict(float)
    pipes: dict[str, float] = defaultdict(float)
    opcodes: dict[str, float] = defaultdict(float)
    for i in range(lo, hi + 1):
        if i in in_mma:
            continue
        op = instrs[i].opcode
        if op == "NOP":
            continue
        body_counts[op_class(op)] += 1.0
        pipes[op_pipe(op)] += 1.0
        opcodes[op] += 1.0
    loop_instrs = sum(1 for i in in_mma if instrs[i].opcode != "NOP")
    # the element-wise code waits for every product (no overlap) when a full wait follows the last MMA loop
    waits = False
    if inside:
        last = max(m.end for m in inside)
        waits = any(instrs[i].opcode.startswith("WARPGROUP.DEPBAR") and "0x0" in instrs[i].operands
                    for i in range(last, min(hi + 1, last + 40)))
    return TileCount(name, elements_per_thread, dict(body_counts), dict(pipes),
                     loop_instrs / max(1, len(inside)) if inside else 0.0, len(inside), len(conditional), waits,
                     dict(opcodes))


# --- the model ---------------------------------------------------------------------------------
@dataclass
class TileModel:
    mma: float
    loop: float
    elem: float
    resident: int
    tile: float


def resident_ctas(registers: int, warps: int, shared: int) -> int:
    regs = max(1, math.ceil(registers / 8) * 8) * 32 * warps
    by_regs = REGISTERS_PER_SM // regs
    by_shared = SHARED_PER_SM // max(1, shared) if shared else 32
    return max(1, min(by_regs, by_shared, MAX_WARPS_PER_SM // warps, 32))


def model_tile(tc: TileCount, block_m: int, block_n: int, block_d: int, D: int, dtype: str, warps: int,
               registers: int, shared: int, guide_width: int = 0) -> TileModel:
    """One tile on one SM; ``guide_width``: a guide's second product per tile (its D chunks are
    not in the counted MMA loop's trip count: at the drive's width it is a single chunk)."""
    t_mma = 2.0 * block_m * block_n * (D + guide_width) / MMA_FLOP_PER_CLOCK[dtype]
    chunks = math.ceil(D / block_d)
    t_loop = tc.loop_per_chunk * chunks * warps / ISSUE_PER_CLOCK
    total = sum(tc.body.values())
    t_elem = max(total * warps / ISSUE_PER_CLOCK,
                 *(tc.pipes.get(p, 0.0) * warps * 32 / lanes for p, lanes in PIPE_LANES.items()))
    k = resident_ctas(registers, warps, shared)
    phase = max(t_mma, t_loop)
    t_issue = t_loop + total * warps / ISSUE_PER_CLOCK  # the loop and the body share the schedulers
    t_tile = max(phase, t_elem, t_issue)
    if tc.waits_for_products:
        t_tile = max(t_tile, (phase + t_elem) / k)
    return TileModel(t_mma, t_loop, t_elem, k, t_tile)


def product_seconds(rows: int, inner: int, D: int, dtype: str, block_rows: int, block_inner: int, block_do: int,
                    element_size: int, loop_per_chunk: float = 0.0, warps: int = 8) -> float:
    """One of the backward's products over the dS panel (dq: rows = B, inner = N; dk: rows = N,
    inner = B): per output tile [block_rows, block_do], one MMA-loop iteration per block_inner
    chunk, each the larger of its tensor clocks and its instructions at the issue limit; or the
    HBM time of reading dS once and the operands, whichever is larger."""
    chunk = max(2.0 * block_rows * block_do * block_inner / MMA_FLOP_PER_CLOCK[dtype],
                loop_per_chunk * warps / ISSUE_PER_CLOCK)
    tiles = math.ceil(rows / block_rows) * math.ceil(D / block_do)
    compute = tiles * math.ceil(inner / block_inner) * chunk / (SMS * CLOCK_HZ)
    memory = (rows * inner * element_size + (rows + inner) * D * element_size * 2) / HBM_BYTES_PER_S
    return max(compute, memory)


def dense_seconds(B: int, N: int, D: int, element_size: int) -> float:
    products = 3 * 2.0 * B * N * D / CUBLAS_FLOP_PER_S
    passes = sum(DENSE_PASSES.values()) * (element_size / 2) * B * N / HBM_BYTES_PER_S
    return products + passes


def bound_seconds(B: int, N: int, D: int, dtype: str) -> float:
    return 4 * 2.0 * B * N * D / (MMA_FLOP_PER_CLOCK[dtype] * SMS * CLOCK_HZ)


# --- driving the compile ------------------------------------------------------------------------
def compile_variants(arch: int, cases: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Compile each (mode, dtype, D) and return, per case, its kernels: name -> (SASS, metadata)."""
    import compile_tier
    import triton

    recorder = compile_tier._install(arch)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, dtype, D in cases:
            recorder.kernels.clear()
            # B = 256, N = 2048 with the default workspace: the dS kernel's programs take groups of
            # several key tiles, as at the large shapes this models
            errors = compile_tier._drive(arch, recorder, loss_cases=[(mode, dtype, D, 256, False)], sampler_cases=[],
                                         keys=DRIVE_KEYS, workspace_mb="512")
            if errors:
                raise RuntimeError("; ".join(errors))
            kernels: dict[str, Any] = {}
            for name, kernel, info in recorder.kernels.values():
                info = dict(info)
                info.pop("case", None)
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(kernel.asm["cubin"])
                sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", path], capture_output=True, text=True,
                                      check=True).stdout
                usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                                       text=True, check=True).stdout
                regs = int(dict(re.findall(r"\b(REG):(\d+)", usage)).get("REG", 0))
                kernels.setdefault(name, []).append(dict(sass=sass, warps=kernel.metadata.num_warps,
                                                         stages=kernel.metadata.num_stages, registers=regs,
                                                         shared=int(kernel.metadata.shared), constexprs=info))
            out[(mode, dtype, D)] = kernels
    return out


def pick(variants: list[dict[str, Any]], **want: Any) -> Optional[dict[str, Any]]:
    for v in variants:
        if all(v["constexprs"].get(k) == val for k, val in want.items()):
            return v
    return None


TILE_KERNELS = ("_info_nce_fwd_kernel", "_info_nce_bwd_ds_kernel")
DRIVE_KEYS = 2048


def analyse(kernels: dict[str, Any], mode: str, dtype: str, D: int) -> dict[str, Any]:
    """Tile counts of the forward and dS kernels of one case, and their tile model."""
    import compile_tier

    result: dict[str, Any] = {}
    for name in ("_panel_dq_kernel", "_panel_dk_kernel"):
        variants = kernels.get(name, [])
        if variants:
            v = variants[0]
            c = v["constexprs"]
            tc = count_tile(name, parse_sass(v["sass"]), 1.0)
            result[name] = dict(count=tc, block=(c["BLOCK_M"], c["BLOCK_N"], 0, c["BLOCK_DO"]), warps=v["warps"],
                                registers=v["registers"], shared=v["shared"])
    for name in TILE_KERNELS:
        variants = kernels.get(name, [])
        v = pick(variants, RAGGED=False) or (variants[0] if variants else None)  # the full tiles
        if v is None:
            continue
        c = v["constexprs"]
        epl = c["BLOCK_M"] * c["BLOCK_N"] / (32 * v["warps"])
        tc = count_tile(name, parse_sass(v["sass"]), epl)
        guide_width = compile_tier.GUIDE_WIDTH if c.get("HAS_GUIDE") else 0
        model = model_tile(tc, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], D, dtype, v["warps"], v["registers"],
                           v["shared"], guide_width)
        result[name] = dict(count=tc, model=model, block=(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"],
                                                          c.get("BLOCK_DO", 0)),
                            warps=v["warps"], registers=v["registers"], shared=v["shared"], guide_width=guide_width)
    return result


def whole_seconds(res: dict[str, Any], B: int, N: int, D: int, dtype: str) -> dict[str, float]:
    """Modelled forward+backward at B x N x D from the per-tile models of one D (the element-wise
    work does not depend on D; the tensor and loop parts are rescaled)."""
    element_size = 4 if dtype in ("float32", "tf32") else 2
    out = {}
    total = 0.0
    for name, seconds_key in (("_info_nce_fwd_kernel", "forward"), ("_info_nce_bwd_ds_kernel", "dS")):
        r = res[name]
        bm, bn, bd, _ = r["block"]
        m = model_tile(r["count"], bm, bn, bd, D, dtype, r["warps"], r["registers"], r["shared"], r["guide_width"])
        tiles = math.ceil(B / bm) * math.ceil(N / bn)
        waves = math.ceil(tiles / (SMS * m.resident)) * m.resident
        secs = waves * m.tile / CLOCK_HZ
        if name == "_info_nce_bwd_ds_kernel":  # the dS panel is written once
            secs = max(secs, B * N * element_size / HBM_BYTES_PER_S)
        out[seconds_key] = secs
        total += secs
    for key, name, rows, inner in (("dq", "_panel_dq_kernel", B, N), ("dk", "_panel_dk_kernel", N, B)):
        r = res.get(name)
        if r is None:
            out[key] = product_seconds(rows, inner, D, dtype, 128, 64, 128, element_size)
        else:
            bm, bn, _, bdo = r["block"]
            block_rows, block_inner = (bm, bn) if key == "dq" else (bn, bm)
            out[key] = product_seconds(rows, inner, D, dtype, block_rows, block_inner, bdo, element_size,
                                       r["count"].loop_per_chunk, r["warps"])
        total += out[key]
    out["total"] = total
    out["bound"] = bound_seconds(B, N, D, dtype)
    out["dense"] = dense_seconds(B, N, D, element_size)
    return out


# --- the report ----------------------------------------------------------------------------------
def default_modes() -> list[str]:
    import compile_tier

    return list(compile_tier.modes())


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| kernel | mode | dtype | D | instr. / element | MUFU | FP32 | int+pred | conv | memory | other | "
             "MMA-loop instr. / D chunk | conditional | waits for products | regs | CTAs/SM | T_mma | T_elem | "
             "tile clocks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tc, m = r["count"], r["model"]
        lines.append(
            f"| `{r['kernel']}` | {r['mode']} | {r['dtype']} | {r['D']} | **{tc.per_element:.1f}** | "
            f"{tc.class_per_element('mufu'):.2f} | {tc.class_per_element('fp32'):.1f} | "
            f"{tc.class_per_element('int+pred'):.1f} | {tc.class_per_element('conv'):.2f} | "
            f"{tc.class_per_element('memory'):.2f} | {tc.class_per_element('other'):.1f} | {tc.loop_per_chunk:.0f} | "
            f"{tc.conditional} | {'yes' if tc.waits_for_products else 'no'} | {r['registers']} | {m.resident} | "
            f"{m.mma:.0f} | {m.elem:.0f} | {m.tile:.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=[90, 80])
    parser.add_argument("--modes", nargs="+", default=None, help="compile-tier mode names (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "tf32"],
                        help="IEEE float32 products run on FFMA, with no tensor-core loop to find: not counted")
    parser.add_argument("--dims", nargs="+", type=int, default=[768])
    parser.add_argument("--model-dims", nargs="+", type=int, default=[128, 384, 768, 1024, 4096])
    parser.add_argument("--model-size", type=int, default=32768, help="B = N of the modelled forward+backward")
    parser.add_argument("--model-modes", nargs="+", default=["plain", "labels+margin+SimANS"])
    parser.add_argument("--out", default=None, help="folder for sass_cost.md")
    parser.add_argument("--opcodes", action="store_true", help="print each tile body's instructions by opcode")
    parser.add_argument("--json", default=None, help="also write the counts and the model as JSON to this file")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.time()
    modes = args.modes or default_modes()
    cases = [(m, d, D) for m in modes for d in args.dtypes for D in args.dims]
    compiled = compile_variants(args.arch, cases)
    rows = []
    analysed: dict[tuple[str, str, int], dict[str, Any]] = {}
    for (mode, dtype, D), kernels in compiled.items():
        res = analyse(kernels, mode, dtype, D)
        analysed[(mode, dtype, D)] = res
        for name, r in res.items():
            if name not in TILE_KERNELS:
                continue
            rows.append(dict(kernel=name, mode=mode, dtype=dtype, D=D, **r))
            if args.opcodes:
                tc = r["count"]
                top = sorted(tc.opcodes.items(), key=lambda kv: -kv[1])
                print(f"{name} | {mode} | {dtype} | D={D}: " + ", ".join(
                    f"{op} {n / tc.elements_per_thread:.2f}" for op, n in top), file=sys.stderr)
    import torch
    import triton

    lines = [f"# SASS cost of the tile loops ({time.strftime('%Y-%m-%d')})", "",
             f"`python benchmarks/sass_cost.py {' '.join(sys.argv[1:])}`: triton {triton.__version__}, "
             f"torch {torch.__version__}, sm_{args.arch}{'a' if args.arch == 90 else ''}, first autotune config. "
             "Per interior tile, outside the MMA loop, per thread, divided by the score elements a thread holds "
             "(the model and its limits: the module docstring).", ""]
    lines += table(rows)
    model_rows = []
    for mode in args.model_modes:
        for dtype in ("bfloat16",):
            key = next((k for k in analysed if k[0] == mode and k[1] == dtype), None)
            if key is None or not all(n in analysed[key] for n in TILE_KERNELS):
                continue
            for D in args.model_dims:
                s = whole_seconds(analysed[key], args.model_size, args.model_size, D, dtype)
                model_rows.append((mode, dtype, D, s))
    if model_rows:
        n = args.model_size
        lines += ["", f"## Modelled forward+backward, B = N = {n}, H200", "",
                  "| mode | dtype | D | forward ms | dS ms | dq + dk ms | fastneg ms | 4-product bound ms | "
                  "fastneg / bound | dense loss ms | fastneg / dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode, dtype, D, s in model_rows:
            lines.append(f"| {mode} | {dtype} | {D} | {s['forward'] * 1e3:.2f} | {s['dS'] * 1e3:.2f} | "
                         f"{(s['dq'] + s['dk']) * 1e3:.2f} | {s['total'] * 1e3:.2f} | {s['bound'] * 1e3:.2f} | "
                         f"**{s['total'] / s['bound']:.2f}** | {s['dense'] * 1e3:.2f} | {s['total'] / s['dense']:.2f} |")
    lines += ["", f"{len(rows)} kernels counted in {time.time() - start:.0f} s."]
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(dict(
                kernels=[dict(kernel=r["kernel"], mode=r["mode"], dtype=r["dtype"], D=r["D"],
                              per_element=r["count"].per_element, mma_loops=r["count"].mma_loops,
                              conditional=r["count"].conditional, registers=r["registers"],
                              by_class={c: r["count"].class_per_element(c) for c in CLASSES}) for r in rows],
                model=[dict(mode=m, dtype=d, D=D, **s) for m, d, D, s in model_rows]), f, indent=1)
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sass_cost.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
