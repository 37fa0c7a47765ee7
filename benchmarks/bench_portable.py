"""The portable backend on CPU, side by side with the dense loss, the C++ kernels and the matrix
products, in one run: time of forward+backward and peak memory. Writes a markdown table.

    python benchmarks/bench_portable.py --out benchmarks/results/portable_<date>.md
    python benchmarks/bench_portable.py --sizes 4096 --dims 128 --rules plain   # a quick look

Implementations (float32, temperature 0.05, B = N, positives on the diagonal, L2-normalised
random embeddings; forward + backward to query and keys):

- ``dense CE``: ``F.cross_entropy(q @ k.T / t, arange(B))`` (plain rows only: what a user writes);
- ``dense``: the same rules written densely (``backend="reference"``: the [B, N] scores, masks and
  softmax materialised, autograd for the backward);
- ``cpu``: the C++ kernels; ``portable``: the plain-PyTorch backend over chunks of rows (memory
  budget ``FASTNEG_PORTABLE_MEMORY_MB``, default 256);
- ``floor``: the four B x N x D products of a recomputing backward (``q k^T`` twice, ``dS k``, ``dS^T q``).

Rules: ``plain`` (no rule) and ``masked`` (margin 0.1 + SimANS(0.5, 0)). Time: best of
``--repeats`` wall-clock runs after a warm-up, interleaved across implementations. Peak memory: the
resident-set growth of a fresh process running that one call after a small warm-up call (so the
allocator's cache cannot hide a [B, N] buffer; ``MALLOC_MMAP_THRESHOLD_=65536`` returns large
buffers to the system on free).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Optional

import torch

import fastneg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import time_cpu  # noqa: E402

RULES = {"plain": {}, "masked": dict(margin=0.1, weighting=fastneg.SimANS(0.5, 0.0))}
IMPLS = ("dense CE", "dense", "cpu", "portable", "floor")
HERE = os.path.dirname(os.path.abspath(__file__))


def make_inputs(B: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    return q.requires_grad_(), k.requires_grad_()


def call(impl: str, rule: str, q: torch.Tensor, k: torch.Tensor) -> None:
    q.grad = k.grad = None
    if impl == "floor":
        with torch.no_grad():
            s = q @ k.T
            s = q @ k.T
            s @ k
            s.T @ q
        return
    if impl == "dense CE":
        logits = (q @ k.T) / 0.05
        torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0])).backward()
        return
    backend = "reference" if impl == "dense" else impl
    fastneg.info_nce(q, k, temperature=0.05, backend=backend, **RULES[rule]).backward()


MEMORY_CHILD = """
import sys
sys.path.insert(0, {here!r})
from bench_portable import call, make_inputs
from fastneg.tools.profiling import peak_memory
impl, rule, B, D = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
call(impl, rule, *make_inputs(64, D))
q, k = make_inputs(B, D)
with peak_memory("cpu") as peak:
    call(impl, rule, q, k)
print(peak.mib)
"""


def peak_mib(impl: str, rule: str, B: int, D: int) -> Optional[float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(here=HERE), impl, rule, str(B), str(D)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return None  # killed (out of memory) or failed
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 768])
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-max", type=int, default=16384, help="largest B for the dense losses")
    parser.add_argument("--scaling-sizes", type=int, nargs="*", default=[4096, 8192, 16384, 32768, 65536],
                        help="B = N of the memory series (portable and cpu, plain, D = 128; none: skip it)")
    parser.add_argument("--out", default=None, help="markdown file (default: print only)")
    args = parser.parse_args()
    scaling = []
    for B in args.scaling_sizes:
        point = dict(B=B, peak_mib={i: peak_mib(i, "plain", B, 128) for i in ("portable", "cpu")})
        scaling.append(point)
        print(json.dumps(point), flush=True)
    rows = []
    for B in args.sizes:
        for D in args.dims:
            q, k = make_inputs(B, D)
            for rule in args.rules:
                impls = [i for i in IMPLS if (i != "dense CE" or rule == "plain")
                         and (not i.startswith("dense") or B <= args.dense_max)]
                fns = {i: (lambda i=i, rule=rule, q=q, k=k: call(i, rule, q, k)) for i in impls}
                times = time_cpu(fns, args.repeats)
                peaks = {i: peak_mib(i, rule, B, D) for i in impls}
                row = dict(B=B, D=D, rule=rule, ms=times, peak_mib=peaks)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(markdown(rows, scaling, args))
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(dict(rows=rows, scaling=scaling), f, indent=1)


def markdown(rows: list[dict], scaling: list[dict], args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    lines = [f"# The portable backend on CPU ({when})", "",
             f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; fastneg {fastneg.__version__}; "
             f"FASTNEG_PORTABLE_MEMORY_MB={os.environ.get('FASTNEG_PORTABLE_MEMORY_MB', '256 (default)')}.", "",
             f"Command: `python benchmarks/bench_portable.py {' '.join(sys.argv[1:])}`", "",
             "float32, forward + backward, temperature 0.05, B = N. Time: best of "
             f"{args.repeats} after a warm-up, ms. Peak: resident-set growth of a fresh process, MiB "
             "(the [B, D] inputs are allocated before it, their gradients inside). masked = margin 0.1 + SimANS(0.5, 0).", "",
             "| B = N | D | rules | dense CE ms | dense ms | cpu ms | portable ms | floor ms | portable / dense "
             "| portable / cpu | portable / floor | dense peak | cpu peak | portable peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: Optional[float], spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        ms, pk = r["ms"], r["peak_mib"]
        dense = ms.get("dense")
        def ratio(a: str, b: str, ms: dict = ms) -> str:
            return f(ms[a] / ms[b], ".2f") if ms.get(a) and ms.get(b) else "-"

        lines.append(f"| {r['B']} | {r['D']} | {r['rule']} | {f(ms.get('dense CE'))} | {f(dense)} | {f(ms.get('cpu'))} "
                     f"| {f(ms.get('portable'))} | {f(ms.get('floor'))} | {ratio('portable', 'dense')} "
                     f"| {ratio('portable', 'cpu')} | {ratio('portable', 'floor')} | {f(pk.get('dense'))} "
                     f"| {f(pk.get('cpu'))} | {f(pk.get('portable'))} |")
    if scaling:
        lines += ["", "Memory as the batch grows (plain, D = 128, forward + backward; peak MiB of a fresh process; "
                  "the inputs are allocated before the measure, their gradients (2 x B x 128 x 4 bytes) inside it):", "",
                  "| B = N | portable peak | cpu peak | one [B, N] float32 matrix |", "|---|---|---|---|"]
        for p in scaling:
            lines.append(f"| {p['B']} | {f(p['peak_mib'].get('portable'))} | {f(p['peak_mib'].get('cpu'))} "
                         f"| {p['B'] * p['B'] * 4 / 2**20:.0f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
