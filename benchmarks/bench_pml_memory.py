"""pytorch-metric-learning's NTXentLoss and SupConLoss against fastneg's drop-ins: peak memory and
time of one forward+backward at large batches, on CPU.

    python benchmarks/bench_pml_memory.py [--sizes 8192 65536] [--dim 64] [--budget-gib 16] [--out FILE.md]

Embeddings ``[B, D]`` float32 with two views per class (SimCLR's layout: labels ``arange(B) // 2``),
the losses' defaults. Each measurement runs in a fresh process under an address-space limit of
``--budget-gib`` above its starting size; one that exceeds it is reported as over the budget. Peak
memory is the process's resident-set peak above its level before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date

import torch

IMPLS = ("pytorch-metric-learning", "fastneg")
LOSSES = ("NTXentLoss", "SupConLoss")


def worker(impl: str, loss_name: str, B: int, dim: int, budget_gib: float) -> dict:
    import resource

    from fastneg.tools.profiling import _status_kib, peak_memory

    if impl == "fastneg":
        from fastneg.integrations import pytorch_metric_learning as module
    else:
        from pytorch_metric_learning import losses as module
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, dim, generator=g).requires_grad_()
    labels = torch.arange(B) // 2
    loss_fn = getattr(module, loss_name)()
    loss_fn(emb[:64], labels[:64]).backward()  # warm-up
    emb.grad = None
    limit = _status_kib("VmSize") * 1024 + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    try:
        with peak_memory("cpu") as peak:
            t0 = time.perf_counter()
            loss_fn(emb, labels).backward()
            seconds = time.perf_counter() - t0
        return {"impl": impl, "loss": loss_name, "B": B, "seconds": seconds, "peak_mib": peak.mib, "status": "ok"}
    except (RuntimeError, MemoryError) as exc:
        import re

        asked = re.search(r"allocate (\d+) bytes", str(exc))
        what = f"an allocation of {int(asked.group(1)) / 2**30:.1f} GiB refused" if asked else str(exc).splitlines()[0][:80]
        return {"impl": impl, "loss": loss_name, "B": B, "seconds": None, "peak_mib": None,
                "status": f"over budget ({what})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--budget-gib", type=float, default=16.0)
    parser.add_argument("--out", help="markdown file to write")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, loss_name, B = json.loads(args.worker)
        print(json.dumps(worker(impl, loss_name, B, args.dim, args.budget_gib)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)
    rows = []
    for loss_name in LOSSES:
        for B in args.sizes:
            for impl in IMPLS:
                out = subprocess.run([sys.executable, __file__, "--dim", str(args.dim), "--budget-gib",
                                      str(args.budget_gib), "--worker", json.dumps([impl, loss_name, B])],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    row = {"impl": impl, "loss": loss_name, "B": B, "seconds": None, "peak_mib": None,
                           "status": f"process failed ({out.returncode}): " + (out.stderr.strip().splitlines() or [""])[-1][:120]}
                else:
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    from fastneg.tools.benchmark import device_name

    lines = [f"# pytorch-metric-learning losses at large batches ({date.today().isoformat()})", "",
             f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"float32 [B, {args.dim}] embeddings, two views per class, the losses' defaults, forward+backward; "
             f"address-space budget {args.budget_gib:g} GiB. Command: `python benchmarks/bench_pml_memory.py --sizes "
             f"{' '.join(map(str, args.sizes))} --dim {args.dim} --budget-gib {args.budget_gib:g}`.", "",
             "| loss | B | implementation | seconds | peak extra MiB | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        mib = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['loss']} | {r['B']} | {r['impl']} | {sec} | {mib} | {r['status']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
