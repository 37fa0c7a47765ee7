"""Compile every Triton kernel variant the host code can launch for Hopper (sm_90a) and Ampere
(sm_80) on a machine without a GPU, and check the machine code.

    python benchmarks/compile_tier.py --out benchmarks/results/compile_tier_<date>
    python benchmarks/compile_tier.py --diff BEFORE/kernels.csv AFTER/kernels.csv   # two trees' tiers, row by row

How: a stand-in driver (a ``CudaDriver`` that loads no CUDA library and reports a
``GPUTarget("cuda", 90 or 80, 32)``) is made active; fastneg's host code then runs on CPU tensors
with the GPU's tile shape (``fastneg.backends.triton.cuda_tiles``), every launch becomes
``JITFunction.run(..., warmup=True)`` (compile, no launch) and every autotuned kernel is compiled
for each of its configs. Each compiled kernel's cubin is read with ``cuobjdump -res-usage``
(registers, local memory, stack) and ``cuobjdump -sass`` (spill instructions LDL/STL;
tensor-core instructions: HGMMA, the warpgroup MMA, on sm_90a; HMMA on sm_80), both shipped in
``triton/backends/nvidia/bin``.

The variants (``cases()``): each weighting (none, SimANS, Hardness on scores and on the guide,
HCL, GCSE), each estimator (DCL, soft labels), symmetric, label levels 0/1/2, each margin rule,
guide absolute and relative, attraction with an excluded key, all in bfloat16 at D = 768; six of them, the two heaviest
included, in float16, float32 (IEEE) and float32 with TF32 products; the tile shapes of D = 16,
64 and a ragged shape (B = N = D = 100, which Triton specialises differently) in every dtype; the
backward with several panels (first and later panels); the sampler's three strategies at k = 8
and 256. Every autotune config of every autotuned kernel for the plain loss and the two heaviest
modes in every dtype, the first config elsewhere (compile time: CI runs this tier).

Checks (exit status 1 when one fails): every variant compiles; no spills (for every kernel with
a local-memory instruction, ``ptxas -v`` on its PTX must report 0 bytes of spill stores and
loads); every kernel with a matrix product uses tensor cores in 16-bit and TF32
(HGMMA on sm_90a, HMMA on sm_80; on sm_90a the sampler's small row blocks and TF32 products with a
transposed operand may use HMMA; none are expected with IEEE float32); the shared memory of at least one autotune config of each
variant fits the target (an autotuner skips configs that do not).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block: H100/H200, A100
ARCH_NAME = {90: "sm_90a", 80: "sm_80"}
MMA = {90: "HGMMA", 80: "HMMA"}
DOT_KERNELS = {"_info_nce_fwd_kernel", "_info_nce_bwd_ds_kernel", "_panel_dq_kernel", "_panel_dk_kernel",
               "_info_nce_row_state_kernel", "_sample_negatives_kernel"}


def modes() -> dict[str, dict[str, Any]]:
    import fastneg

    return {
        "plain": {},
        "labels+margin": dict(labels=1, margin=0.1),
        "labels+margin+SimANS": dict(labels=1, margin=0.1, weighting=fastneg.SimANS()),
        "labels2+relative+max_score": dict(labels=2, relative_margin=0.05, max_score=0.9),
        "guide": dict(guide=True, guide_margin=0.0),
        "guide relative+relative": dict(guide=True, guide_margin=0.1, guide_strategy="relative", relative_margin=0.05),
        "SimANS": dict(weighting=fastneg.SimANS()),
        "Hardness": dict(weighting=fastneg.Hardness(1.0)),
        "Hardness on guide": dict(weighting=fastneg.Hardness(1.0, on="guide"), guide=True, guide_margin=None),
        "DCL": dict(debias=0.1),
        "HCL+DCL": dict(weighting=fastneg.HCL(1.0), debias=0.1),
        "GCSE": dict(weighting=fastneg.GCSE(), guide=True, guide_margin=None),
        "soft labels+SimANS": dict(soft_labels=fastneg.SoftLabels(weight=0.5), weighting=fastneg.SimANS(), guide=True,
                                   guide_margin=None),
        "symmetric": dict(symmetric=True),
        "symmetric labels+SimANS+guide": dict(symmetric=True, labels=1, weighting=fastneg.SimANS(), guide=True,
                                              guide_margin=0.0),
        "attract+exclude labels+margin+SimANS": dict(false_negatives="attract", exclude=True, labels=1, margin=0.1,
                                                     weighting=fastneg.SimANS()),
    }


# (mode, dtype, D, B, every autotune config?). Every autotune config of every kernel for the
# plain loss and the two modes with most live tiles in every dtype; the first config elsewhere:
# every other mode in bfloat16, two in every dtype, the tile shapes of small D and a ragged shape.
DTYPES = ("float16", "bfloat16", "float32", "tf32")
GUIDE_WIDTH = 48  # the guide embeddings' width in the drive
HEAVIEST = ("plain", "symmetric labels+SimANS+guide", "soft labels+SimANS")


def cases() -> list[tuple[str, str, int, int, bool]]:
    out = [(mode, dtype, 768, 256, True) for dtype in DTYPES for mode in HEAVIEST]
    out += [(mode, "bfloat16", 768, 256, False) for mode in modes() if mode not in HEAVIEST]
    out += [(mode, dtype, 768, 256, False) for dtype in DTYPES if dtype != "bfloat16"
            for mode in ("labels2+relative+max_score", "HCL+DCL", "attract+exclude labels+margin+SimANS")]
    out += [("plain", dtype, D, B, False) for dtype in DTYPES for D, B in ((16, 256), (64, 256), (100, 100))]
    return out


SAMPLER_CASES = [(strategy, "float16", 8) for strategy in ("top", "simans", "uniform")] + [
    (strategy, "float32", 256) for strategy in ("top", "simans", "uniform")] + [("top", "bfloat16", 64)]
# (kernel, dtype, k) whose spills are reported but not failures: none today.
KNOWN_SPILLS: set[tuple[str, str, int]] = set()


class _Recorder:
    def __init__(self) -> None:
        self.kernels: dict[int, tuple[str, Any, dict[str, Any]]] = {}
        self.case = ""
        self.every_config = True


def _install(arch: int) -> _Recorder:
    """Make the stand-in driver active and turn launches into compiles."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class StandInDriver(CudaDriver):
        """A CUDA driver that loads no CUDA library: it only names the target."""

        def __init__(self, capability: int) -> None:  # no super().__init__(): it would load libcuda
            self.capability = capability

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", self.capability, 32)

        def get_current_device(self) -> int:
            return self.capability  # one JIT cache per target

        def set_current_device(self, device: int) -> None:
            pass

        def get_current_stream(self, device: Any = None) -> int:
            return 0

        def get_device_capability(self, device: Any = None) -> tuple[int, int]:
            return divmod(self.capability, 10)

        def get_active_torch_device(self) -> Any:
            return torch.device("cpu")

        @staticmethod
        def is_active() -> bool:
            return True

    driver.set_active(StandInDriver(arch))
    recorder = _Recorder()
    compile_only = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = compile_only(self, *args, grid=grid, warmup=True, **kwargs)
        names = {p.name for p in self.params if p.is_constexpr}  # launches pass every argument by keyword
        constexprs = {k: v for k, v in kwargs.items() if k in names}
        recorder.kernels.setdefault(id(kernel), (self.fn.__name__, kernel, dict(case=recorder.case, **constexprs)))
        return kernel

    def run_every_config(self: Any, *args: Any, **kwargs: Any) -> None:
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)  # what the autotuner would try on this call
        for config in configs if recorder.every_config else configs[:1]:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    JITFunction.run = run
    Autotuner.run = run_every_config
    return recorder


def _drive(arch: int, recorder: _Recorder, loss_cases: Optional[list[tuple[str, str, int, int, bool]]] = None,
           sampler_cases: Optional[list[tuple[str, str, int]]] = None, keys: Optional[int] = None,
           workspace_mb: str = "0") -> list[str]:
    """Run the host code of every case (forward+backward, and the sampler) on CPU tensors
    (``cases()`` and ``SAMPLER_CASES`` unless given; ``keys``: N, B unless given;
    ``workspace_mb``: the backward's panel budget, 0 for one row block per panel)."""
    import torch

    import fastneg
    from fastneg import functional, sampling
    from fastneg.backends import triton as triton_ops

    # CPU tensors, compiled not interpreted
    functional.resolve_backend = sampling.resolve_backend = lambda backend, device: "triton"
    os.environ["FASTNEG_TRITON_WORKSPACE_MB"] = workspace_mb  # 0: one row block per backward panel: every panel variant
    errors = []
    table = modes()
    for mode, dtype_name, D, B, every_config in (cases() if loss_cases is None else loss_cases):
        recorder.case = f"{mode} | {dtype_name} | D={D} B=N={B}"
        recorder.every_config = every_config
        options = dict(table[mode])
        dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
        torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
        gen = torch.Generator().manual_seed(0)
        N = keys or B
        q = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
        k = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
        levels = options.pop("labels", 0)
        if levels:
            options["query_labels"] = torch.randint(0, 9, (B,) if levels == 1 else (B, levels), generator=gen)
            options["key_labels"] = torch.randint(0, 9, (N,) if levels == 1 else (N, levels), generator=gen)
        if options.pop("exclude", False):  # the next key: never the row's own positive (arange)
            options["exclude"] = (torch.arange(B) + 1) % B
        if options.pop("guide", False):
            options["guide_query"] = torch.randn(B, GUIDE_WIDTH, generator=gen).to(dtype)
            options["guide_keys"] = torch.randn(N, GUIDE_WIDTH, generator=gen).to(dtype)
        try:
            with triton_ops.cuda_tiles(arch // 10):
                temperature = 0.05 if "debias" in options else torch.tensor(0.05, requires_grad=True)
                loss = fastneg.info_nce(q, k, temperature=temperature, backend="triton", **options)
                loss.backward()
        except Exception as exc:  # noqa: BLE001 - reported, and the tier fails
            errors.append(f"{recorder.case}: {type(exc).__name__}: {exc}")
    recorder.every_config = True
    for strategy, dtype_name, num in (SAMPLER_CASES if sampler_cases is None else sampler_cases):
        recorder.case = f"sampler {strategy} k={num} | {dtype_name} | D=768 B=N=512"
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(512, 768, generator=gen).to(getattr(torch, dtype_name))
        try:
            with triton_ops.cuda_tiles(arch // 10):
                fastneg.sample_negatives(q, q, None, num, strategy=strategy, relative_margin=0.05, backend="triton",
                                         seed=0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{recorder.case}: {type(exc).__name__}: {exc}")
    torch.set_float32_matmul_precision("highest")
    return errors


def _inspect(arch: int, recorder: _Recorder) -> list[dict[str, Any]]:
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, kernel, info) in enumerate(recorder.kernels.values()):
            path = os.path.join(tmp, f"{index}.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
            fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
            local_ops = len(re.findall(r"\b(?:LDL|STL)\b", sass))
            spill_bytes = 0
            if local_ops or int(fields.get("LOCAL", 0)):
                # local-memory instructions: register spills, or a local array? ptxas -v counts spills
                ptx = os.path.join(tmp, f"{index}.ptx")
                with open(ptx, "w") as f:
                    f.write(kernel.asm["ptx"])
                report = subprocess.run([os.path.join(tools, "ptxas"), "-v", "--regAllocOptLevel", "2", "--gpu-name",
                                         ARCH_NAME[arch], ptx, "-o", os.devnull], capture_output=True, text=True,
                                        check=True).stderr
                spill_bytes = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
            case = info.pop("case")
            mode, dtype, shape = (part.strip() for part in case.split("|"))
            rows.append(dict(
                arch=ARCH_NAME[arch], kernel=name, mode=mode, dtype=dtype, shape=shape,
                num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                registers=int(fields.get("REG", -1)), local=int(fields.get("LOCAL", -1)),
                stack=int(fields.get("STACK", -1)), shared=int(kernel.metadata.shared),
                spill_instructions=local_ops, spill_bytes=spill_bytes,
                hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
                ffma=len(re.findall(r"\bFFMA\b", sass)),
                constexprs=";".join(f"{k}={v}" for k, v in sorted(info.items())),
            ))
    return rows


def check(rows: list[dict[str, Any]]) -> list[str]:
    """The tier's assertions over the inspected kernels; a list of failures."""
    failures = []
    fits: dict[tuple, bool] = {}
    for r in rows:
        arch = 90 if r["arch"] == "sm_90a" else 80
        where = f'{r["arch"]} {r["kernel"]} [{r["mode"]} | {r["dtype"]} | {r["shape"]}] w{r["num_warps"]}s{r["num_stages"]}'
        k = int(r["mode"].split("k=")[1].split()[0]) if "k=" in r["mode"] else 0
        known = (r["kernel"], r["dtype"], k) in KNOWN_SPILLS
        if r["spill_bytes"] and not known:
            failures.append(f"{where}: spills {r['spill_bytes']} B (ptxas), local memory {r['local']} B, "
                            f"stack {r['stack']} B, {r['spill_instructions']} LDL/STL")
        if r["kernel"] in DOT_KERNELS and r["dtype"] != "float32":
            # the loss kernels' 128-row tiles take the warpgroup MMA on sm_90a; the sampler's
            # row blocks (16 to 64 rows for a register top-k) may take the warp-level one
            # likewise TF32 products with a transposed operand (dk = dS^T q), which the warpgroup
            # MMA takes only K-major
            mma = r["hgmma"] if arch == 90 else r["hmma"]
            if arch == 90 and (r["kernel"] == "_sample_negatives_kernel" or r["dtype"] == "tf32"):
                mma += r["hmma"]
            if mma == 0:
                failures.append(f"{where}: no {MMA[arch]} (tensor-core) instruction")
        key = (r["arch"], r["kernel"], r["constexprs"], r["mode"], r["dtype"], r["shape"])
        fits[key] = fits.get(key, False) or r["shared"] <= SHARED_LIMIT[arch]
    failures += [f"{k[0]} {k[1]} [{k[3]} | {k[4]} | {k[5]}]: no autotune config fits the shared memory"
                 for k, ok in fits.items() if not ok]
    return failures


def one_arch(arch: int, out_json: str) -> None:
    start = time.time()
    recorder = _install(arch)
    errors = _drive(arch, recorder)
    rows = _inspect(arch, recorder)
    with open(out_json, "w") as f:
        json.dump(dict(arch=arch, rows=rows, errors=errors, seconds=time.time() - start), f)


def summary(results: list[dict[str, Any]]) -> str:
    import torch
    import triton

    lines = [f"# Compile tier ({time.strftime('%Y-%m-%d')}): every Triton kernel variant, compiled without a GPU", "",
             f"`python benchmarks/compile_tier.py`, triton {triton.__version__}, torch {torch.__version__}. "
             "One row per kernel, over all its compiled variants (mode x dtype x shape x autotune config); "
             "the full list is `kernels.csv` beside this file.", "",
             "| target | kernel | variants | registers (min / median / max) | at 255 | shared KiB (max) | "
             "over the target's shared memory | spill bytes (ptxas) / LDL+STL (max) | tensor-core instr. per variant (min; "
             "16-bit, and tf32 counting HGMMA + HMMA) | "
             "compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        arch, rows = res["arch"], res["rows"]
        for name in sorted({r["kernel"] for r in rows}):
            mine = [r for r in rows if r["kernel"] == name]
            regs = sorted(r["registers"] for r in mine)
            mma_key = "hgmma" if arch == 90 else "hmma"
            mma16 = [r[mma_key] for r in mine if r["dtype"] in ("float16", "bfloat16")]
            tf32 = [r["hgmma"] + r["hmma"] for r in mine if r["dtype"] == "tf32"]
            lines.append(
                f"| {ARCH_NAME[arch]} | `{name}` | {len(mine)} | {regs[0]} / {regs[len(regs) // 2]} / {regs[-1]} | "
                f"{sum(r == 255 for r in regs)} | {max(r['shared'] for r in mine) / 1024:.0f} | "
                f"{sum(r['shared'] > SHARED_LIMIT[arch] for r in mine)} | "
                f"{max(r['spill_bytes'] for r in mine)} / {max(r['spill_instructions'] for r in mine)} | "
                f"{MMA[arch]} {min(mma16) if mma16 else '-'}; tf32 {min(tf32) if tf32 else '-'} | |")
        lines.append(f"| {ARCH_NAME[arch]} | all | {len(rows)} | | {sum(r['registers'] == 255 for r in rows)} | | | | | "
                     f"{res['seconds']:.0f} |")
    known = [r for res in results for r in res["rows"] if r["spill_bytes"]]
    lines += ["", "float32 rows with IEEE products use FFMA (no tensor cores, by design); `tf32` rows are float32 "
              "inputs with `torch.set_float32_matmul_precision('high')`. Spills are what ptxas -v reports as spill stores "
              "and loads, for every kernel with a local-memory instruction (LDL/STL); the others have none by "
              "construction. A kernel can use local memory without spilling (a small local array: the stack "
              "column).", ""]
    if known:
        lines += ["Known spills (reported, not failures):", ""] + [f"- {r['arch']} `{r['kernel']}` {r['mode']} {r['dtype']}: "
                                      f"{r['spill_bytes']} B of spill stores and loads" for r in known] + [""]
    return "\n".join(lines)


KEY = ("arch", "kernel", "mode", "dtype", "shape", "num_warps", "num_stages", "constexprs")
MEASURES = ("registers", "local", "stack", "shared", "spill_instructions", "spill_bytes", "hgmma", "hmma", "ffma")


def diff(before: list[dict[str, str]], after: list[dict[str, str]]) -> tuple[list[str], int]:
    """Compare two ``kernels.csv`` (of two trees, one Triton): the variants (the compile inputs:
    target, kernel, mode, dtype, shape, autotune config and constexprs) present in only one, and
    every measure of the variants in both. Lines to print, and how many of them are differences."""

    def index(rows: list[dict[str, str]]) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
        out: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for r in rows:
            out.setdefault(tuple(r[c] for c in KEY), []).append(tuple(r[m] for m in MEASURES))
        return {k: sorted(v) for k, v in out.items()}

    a, b = index(before), index(after)
    lines, differ = [], 0
    for name, only in (("before", sorted(set(a) - set(b))), ("after", sorted(set(b) - set(a)))):
        differ += len(only)
        lines += [f"only {name}: {' '.join(k[:7])} [{k[7]}]" for k in only]
    both = sorted(set(a) & set(b))
    for k in both:
        if a[k] != b[k]:
            differ += 1
            changed = [f"{m} {x}->{y}" for m, x, y in zip(MEASURES, a[k][0], b[k][0]) if x != y]
            lines.append(f"differs: {' '.join(k[:7])} [{k[7]}]: {', '.join(changed) or 'repeats'}")
    lines.append(f"{len(before)} rows before, {len(after)} after; {len(both)} variants in both "
                 f"({sum(len(a[k]) for k in both)} rows), {len(set(a) ^ set(b))} in one only; "
                 f"{differ} differ in {', '.join(MEASURES)}")
    return lines, differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[90, 80])
    parser.add_argument("--out", default=None, help="folder for summary.md, kernels.csv and failures.txt")
    parser.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="compare two kernels.csv row by row (no compiling); exit 1 when any differs")
    parser.add_argument("--one-arch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.diff is not None:
        tables = []
        for path in args.diff:
            with open(path, newline="") as f:
                tables.append(list(csv.DictReader(f)))
        lines, differ = diff(*tables)
        print("\n".join(lines))
        return 1 if differ else 0
    if args.one_arch is not None:
        one_arch(args.one_arch, args.json)
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [(arch, os.path.join(tmp, f"{arch}.json")) for arch in args.arch]
        running = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one-arch", str(arch), "--json", path],
                                    env=env) for arch, path in procs]
        codes = [p.wait() for p in running]
        if any(codes):
            print(f"compile tier: a worker failed (exit statuses {codes})", file=sys.stderr)
            return 1
        results = []
        for _, path in procs:
            with open(path) as f:
                results.append(json.load(f))
    rows = [r for res in results for r in res["rows"]]
    failures = [e for res in results for e in res["errors"]] + check(rows)
    text = summary(results)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(args.out, "failures.txt"), "w") as f:
            f.write("\n".join(failures) + ("\n" if failures else ""))
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(rows)} kernels compiled, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
