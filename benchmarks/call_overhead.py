"""The time of one small ``fastneg.info_nce`` call on the C++ backend, where the Python layer
(argument checks, the rules, the plan, the dispatch) is most of it: to compare two trees' call
overhead (run with ``PYTHONPATH`` pointing at each, alternately).

    python benchmarks/call_overhead.py [--label NAME]

One thread; B = 16 and 512, D = 64; plain InfoNCE and one rule given by keyword
(``relative_margin``); under ``no_grad``. Prints the best of 7 rounds of the mean time per call.
"""

from __future__ import annotations

import argparse
import time

import torch

import fastneg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="this tree")
    args = parser.parse_args()
    torch.set_num_threads(1)
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
