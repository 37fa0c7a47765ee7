"""One training step at a very large batch on CPU, within a memory budget.

    python benchmarks/bench_large_batch.py [--batch 65536] [--chunk 4096] [--budget-gib 8] [--out FILE.md]

A small two-tower encoder (2-layer MLP with dropout, 256 -> 512 -> 128 per tower) on synthetic
pairs with 1 hard-negative column (so N = 2 x batch keys), fastneg's fused loss with margin and
SimANS weighting, gradient cache (``fastneg.cached``) with ``--chunk`` rows per encoder call, then
an optimizer step. Each variant runs in its own process under an address-space limit of the budget
(RLIMIT_AS = current + budget), so exceeding it fails instead of swapping; the dense PyTorch loss
is tried under the same limit for comparison (its B x N score matrix alone is B * 2B * 4 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date

import torch


def worker(variant: str, batch: int, chunk: int, budget_gib: float) -> dict:
    import fastneg
    from fastneg.cached import cached_loss
    from fastneg.options import SimANS
    from fastneg.plan import Plan
    from fastneg.reference import info_nce_reference
    from fastneg.tools.profiling import peak_memory

    torch.manual_seed(0)

    def tower() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                   torch.nn.Linear(512, 128))

    q_tower, d_tower = tower(), tower()
    params = list(q_tower.parameters()) + list(d_tower.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 256, generator=g)
    docs = torch.cat([x + 0.5 * torch.randn(batch, 256, generator=g), torch.randn(batch, 256, generator=g)])

    def enc(t: torch.nn.Module):  # noqa: ANN202
        return lambda v: torch.nn.functional.normalize(t(v), dim=-1)

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if variant == "fastneg":
            return fastneg.info_nce(q, d, temperature=0.05, margin=0.1, weighting=fastneg.SimANS())
        rules = Plan.build(0.1, None, None, 0.0, "absolute", SimANS())
        return info_nce_reference(q, d, torch.arange(len(q)), 0.05, rules)[0].mean()

    current = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = current + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        with peak_memory() as peak:
            t0 = time.perf_counter()
            loss = cached_loss([enc(q_tower), enc(d_tower)], [x, docs], loss_fn, chunk_size=chunk)
            loss.backward()
            opt.step()
            seconds = time.perf_counter() - t0
    except (MemoryError, RuntimeError) as exc:
        return {"variant": variant, "status": "out of memory", "error": str(exc)[:200]}
    return {"variant": variant, "status": "ok", "seconds": seconds, "peak_mib": peak.mib, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--variants", nargs="+", default=["fastneg", "dense"])
    parser.add_argument("--out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.chunk, args.budget_gib)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)
    rows = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--chunk",
                              str(args.chunk), "--budget-gib", str(args.budget_gib)], capture_output=True, text=True,
                             env=env)
        lines = out.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if out.returncode == 0 and lines else {
            "variant": variant, "status": f"failed (exit {out.returncode})", "error": out.stderr[-300:]}
        rows.append(row)
        print(row, flush=True)
    from fastneg.tools.benchmark import device_name

    dense_gib = args.batch * 2 * args.batch * 4 / 2**30
    text = "\n".join([
        f"# One training step at batch {args.batch} on CPU within {args.budget_gib:g} GiB", "",
        f"{date.today().isoformat()}, {device_name(torch.device('cpu'))}, torch {torch.__version__}. Two-tower MLP "
        f"(256 -> 512 -> 128, dropout), {args.batch} queries against {2 * args.batch} keys (positives + 1 hard "
        f"negative each), margin 0.1 + SimANS, gradient cache in chunks of {args.chunk}, AdamW step. Command: "
        f"`python benchmarks/bench_large_batch.py --batch {args.batch} --chunk {args.chunk} --budget-gib "
        f"{args.budget_gib:g}`. Each variant in its own process under RLIMIT_AS = current + budget. "
        f"The dense loss's float32 score matrix alone is {dense_gib:.0f} GiB.", "",
        "| loss | status | step time s | peak extra memory MiB |", "|---|---|---|---|",
        *[f"| {r['variant']} | {r['status']} | " + (f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |" if "seconds" in r
                                                  else "- | - |") for r in rows]]) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
