"""The time of one small ``fastneg.info_nce`` call on the C++ backend, where the Python layer
(argument checks, the rules, the plan, the dispatch) is most of it: to compare two trees' call
overhead (run with ``PYTHONPATH`` pointing at each, alternately).

    python benchmarks/call_overhead.py [--label NAME] [--threads N] [--trace]

One thread (``--threads``); B = 16 and 512, D = 64; plain InfoNCE and one rule given by keyword
(``relative_margin``); under ``no_grad``. Prints the best of 7 rounds of the mean time per call.
``--trace``: instead, the Python calls made into ``fastneg/validation.py``, ``fastneg/plan.py`` and
``fastneg/rules.py`` by one ``info_nce(relative_margin=0.05)`` call (after a first one) on each
path: fused (``backend="cpu"``), ``negatives=``, and ``process_group=`` (a gloo group of one process).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time

import torch

import fastneg


def trace(label: str) -> None:
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    pos = torch.arange(8)
    with tempfile.NamedTemporaryFile() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous.name}", rank=0, world_size=1)
        try:
            paths = {"fused": dict(backend="cpu"),
                     "negatives": dict(negatives=torch.randint(0, 12, (8, 3), generator=g), backend="cpu"),
                     "process_group": dict(process_group=dist.group.WORLD, backend="cpu")}
            for name, kw in paths.items():
                fastneg.info_nce(q, k, pos, relative_margin=0.05, **kw)
                counts: collections.Counter = collections.Counter()

                def profile(frame, event: str, arg: object, counts: collections.Counter = counts) -> None:  # noqa: ANN001
                    if event == "call":
                        for module in ("validation.py", "plan.py", "rules.py"):
                            if frame.f_code.co_filename.endswith("fastneg/" + module):
                                counts[module] += 1
                                counts[f"{module}:{frame.f_code.co_name}"] += 1

                sys.setprofile(profile)
                fastneg.info_nce(q, k, pos, relative_margin=0.05, **kw)
                sys.setprofile(None)
                named = ("validation.py:validate_inputs", "plan.py:build", "plan.py:check")
                print(f"{label} {name}: " + ", ".join(f"{m} {counts[m]}" for m in ("validation.py", "plan.py", "rules.py"))
                      + " calls; of them " + ", ".join(f"{n} {counts[n]}" for n in named))
        finally:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1)")
    parser.add_argument("--trace", action="store_true", help="count the calls per layer instead of timing")
    args = parser.parse_args()
    if args.trace:
        trace(args.label)
        return
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cells = []
    for B in (16, 512):
        q = torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1)
        pos = torch.arange(B)
        for name, kw in (("plain", {}), ("relative_margin", dict(relative_margin=0.05))):
            def call(q: torch.Tensor = q, k: torch.Tensor = k, pos: torch.Tensor = pos, kw: dict = kw) -> None:
                fastneg.info_nce(q, k, pos, temperature=0.05, backend="cpu", **kw)

            calls = 400 if B == 16 else 100
            best = float("inf")
            with torch.no_grad():
                for _ in range(50):
                    call()
                for _ in range(7):
                    start = time.perf_counter()
                    for _ in range(calls):
                        call()
                    best = min(best, (time.perf_counter() - start) / calls * 1e6)
            cells.append(f"B={B} {name}: {best:.1f} us")
    print(f"{args.label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
