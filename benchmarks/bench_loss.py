"""Side-by-side benchmark of the fused loss: fastneg vs the naive dense PyTorch loss (same rules)
vs the bare matrix-product floor, in one run, with peak memory. Writes a markdown table.

    python benchmarks/bench_loss.py                       # CPU, fp32, B = N = 8192, D = 256
    python benchmarks/bench_loss.py --device cuda --sizes 8192 32768 131072 --dims 256 768 \
        --dtypes bfloat16 float32

Rules in every measured call: margin = 0.1 false-negative mask + SimANS(a=0.5, b=0) weighting,
temperature 0.05, positives on the diagonal, L2-normalised random embeddings.

- ``fastneg``: ``fastneg.info_nce`` (backend "auto"), forward + backward to query and keys.
- ``naive``: the same loss written densely in PyTorch (``backend="reference"``: the [B, N]
  score matrix, its masks and its softmax are materialised, autograd does the backward).
- ``floor``: the matrix products any recompute-based implementation needs: forward one
  ``q @ k.T``; forward + backward four (``q @ k.T`` twice, ``dS @ k``, ``dS.T @ q``) on CPU,
  where the issue's floor counts the recompute; three on CUDA (the "three-GEMM cuBLAS floor").

Timing: CPU, best of ``--repeats`` wall-clock runs after a warm-up, interleaved across
implementations; CUDA, ``triton.testing.do_bench`` (median, ms). Peak memory: CUDA, allocator
peak minus the memory held before the call; CPU, peak resident-set growth of a fresh process
running that one call (so allocator caching cannot hide a [B, N] buffer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

import fastneg
from fastneg.tools.benchmark import device_name, triton_version
from fastneg.tools.profiling import peak_memory

OPTIONS = dict(temperature=0.05, margin=0.1, weighting=fastneg.SimANS(0.5, 0.0))
HERE = os.path.dirname(os.path.abspath(__file__))


def make_inputs(B: int, D: int, dtype: torch.dtype, device: str, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).to(device=device, dtype=dtype)
    return q.requires_grad_(grad), k.requires_grad_(grad)


def loss_call(impl: str, q: torch.Tensor, k: torch.Tensor, backward: bool) -> None:
    backend = "reference" if impl == "naive" else "auto"
    if backward:
        q.grad = k.grad = None
        fastneg.info_nce(q, k, backend=backend, **OPTIONS).backward()
    else:
        with torch.no_grad():
            fastneg.info_nce(q, k, backend=backend, **OPTIONS)


def floor_call(q: torch.Tensor, k: torch.Tensor, backward: bool, products: int) -> None:
    with torch.no_grad():
        s = q @ k.T
        if backward:
            for _ in range(products - 3):
                s = q @ k.T
            s @ k
            s.T @ q


def time_cpu(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e3 * t for name, t in best.items()}


def time_cuda(fns: dict[str, Callable[[], None]]) -> dict[str, float]:
    from triton.testing import do_bench

    return {name: float(do_bench(fn, warmup=25, rep=100)) for name, fn in fns.items()}


MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
from bench_loss import floor_call, loss_call, make_inputs
from fastneg.tools.profiling import peak_memory
impl, B, D, backward, products = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
q, k = make_inputs(B, D, torch.float32, "cpu", grad=backward)
if backward:
    q.grad, k.grad = torch.zeros_like(q), torch.zeros_like(k)
small_q, small_k = make_inputs(64, D, torch.float32, "cpu", grad=backward)
(floor_call(small_q, small_k, backward, products) if impl == "floor" else loss_call(impl, small_q, small_k, backward))
with peak_memory("cpu") as peak:
    (floor_call(q, k, backward, products) if impl == "floor" else loss_call(impl, q, k, backward))
print(peak.mib)
"""


def peak_mib_cpu(impl: str, B: int, D: int, backward: bool, products: int) -> Optional[float]:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(here=HERE), impl, str(B), str(D),
                          "1" if backward else "0", str(products)], capture_output=True, text=True)
    if out.returncode != 0:
        return None  # killed (out of memory) or failed
    return float(out.stdout.strip().splitlines()[-1])


def peak_mib_cuda(fn: Callable[[], None]) -> float:
    with peak_memory("cuda") as peak:
        fn()
    return peak.mib


@dataclass
class Row:
    device: str
    dtype: str
    B: int
    D: int
    op: str
    impl: str
    ms: Optional[float]
    peak_mib: Optional[float]
    tflops: Optional[float]


def run(args: argparse.Namespace) -> list[Row]:
    device = args.device
    cuda = device == "cuda"
    products = 3 if cuda else 4
    rows: list[Row] = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for B in args.sizes:
            for D in args.dims:
                q, k = make_inputs(B, D, dtype, device)
                for op, backward in (("forward", False), ("forward+backward", True)):
                    fns: dict[str, Callable[[], None]] = {
                        "fastneg": lambda q=q, k=k, b=backward: loss_call("fastneg", q, k, b),
                        "floor": lambda q=q, k=k, b=backward: floor_call(q, k, b, products),
                    }
                    if B <= args.naive_max:
                        fns["naive"] = lambda q=q, k=k, b=backward: loss_call("naive", q, k, b)
                    if cuda:
                        times, peaks = {}, {}
                        for name, fn in list(fns.items()):
                            try:
                                peaks[name] = peak_mib_cuda(fn)
                                times.update(time_cuda({name: fn}))
                            except torch.cuda.OutOfMemoryError:
                                times[name], peaks[name] = None, None
                                torch.cuda.empty_cache()
                    else:
                        times = time_cpu(fns, args.repeats)
                        peaks = {name: peak_mib_cpu(name, B, D, backward, products) for name in fns}
                    flops = 2.0 * B * B * D * (1 if not backward else products)
                    for name in ("fastneg", "naive", "floor"):
                        ms = times.get(name)
                        rows.append(Row(device, dtype_name, B, D, op, name, ms, peaks.get(name),
                                        flops / (ms * 1e-3) / 1e12 if ms else None))
                        print(json.dumps(rows[-1].__dict__), flush=True)
    return rows


def describe_machine(device: str) -> str:
    cuda = f"; CUDA {torch.version.cuda}" if device == "cuda" else ""
    return f"{device_name(torch.device(device))}{cuda}; torch {torch.__version__}; triton {triton_version()}"


def fmt(v: Optional[float], spec: str) -> str:
    return "OOM/skipped" if v is None else format(v, spec)


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# fastneg loss benchmark ({args.device})", "",
             f"Measured {when} on {describe_machine(args.device)}; fastneg {fastneg.__version__}.", "",
             f"Command: `python benchmarks/bench_loss.py {' '.join(sys.argv[1:])}`", "",
             "Rules: margin 0.1 + SimANS(0.5, 0), temperature 0.05, B = N. Time in ms "
             + (f"(CPU: best of {args.repeats})" if args.device == "cpu" else "(do_bench median)")
             + "; peak = extra memory of the call in MiB; floor = bare matrix products "
             + ("(4 for forward+backward)." if args.device == "cpu" else "(3 for forward+backward)."), "",
             "| dtype | B = N | D | op | fastneg ms | naive ms | floor ms | fastneg / naive | fastneg / floor "
             "| fastneg TFLOPS | fastneg peak MiB | naive peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r.dtype, r.B, r.D, r.op, r.impl): r for r in rows}
    for (dtype, B, D, op, impl), r in keyed.items():
        if impl != "fastneg":
            continue
        naive, floor = keyed[(dtype, B, D, op, "naive")], keyed[(dtype, B, D, op, "floor")]
        vs_naive = fmt(r.ms / naive.ms, ".2f") if r.ms and naive.ms else "naive n/a"
        vs_floor = fmt(r.ms / floor.ms, ".2f") if r.ms and floor.ms else "n/a"
        lines.append(f"| {dtype} | {B} | {D} | {op} | {fmt(r.ms, '.1f')} | {fmt(naive.ms, '.1f')} | "
                     f"{fmt(floor.ms, '.1f')} | {vs_naive} | {vs_floor} | {fmt(r.tflops, '.3f')} | "
                     f"{fmt(r.peak_mib, '.1f')} | {fmt(naive.peak_mib, '.1f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192])
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max", type=int, default=1 << 30, help="skip the naive loss above this B")
    parser.add_argument("--out", default=None, help="markdown file (default: benchmarks/results/<device>_<date>.md)")
    args = parser.parse_args()
    rows = run(args)
    text = markdown(rows, args)
    out = args.out or os.path.join(HERE, "results", f"{args.device}_{datetime.date.today().isoformat()}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
