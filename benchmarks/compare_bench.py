"""Compare `fastneg bench` runs of two builds made in one session (before, after, before, after...).

    python benchmarks/compare_bench.py --before A1/bench.csv A2/bench.csv --after B1/bench.csv B2/bench.csv \
        [--out compare.md]

For every fastneg row: the time of each run, after / before on the best run of each, and peak
memory; then the median and range of those ratios, beside the same ratio for the naive PyTorch
loss, whose code is the same in both builds (the machine's noise).
"""

from __future__ import annotations

import argparse
import csv
import statistics


def load(path: str) -> dict[tuple[str, ...], dict[str, str]]:
    with open(path) as f:
        return {(r["impl"], r["rules"], r["dtype"], r["D"], r["B"], r["op"]): r for r in csv.DictReader(f)}


def ratios(before: list[dict], after: list[dict], impls: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    out = {}
    for key, row in before[0].items():
        if key[0] in impls and row["status"] == "ok" and all(key in run for run in after):
            out[key] = min(float(r[key]["ms"]) for r in after) / min(float(r[key]["ms"]) for r in before)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    before, after = [load(p) for p in args.before], [load(p) for p in args.after]
    ours, naive = ratios(before, after, ("fastneg-cpu", "fastneg-triton")), ratios(before, after, ("naive",))
    lines = ["| impl | rules | dtype | D | B | op | before ms (each run) | after ms (each run) | after / before (best) "
             "| peak MiB before / after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(ours):
        tb = ", ".join(f"{float(r[key]['ms']):.2f}" for r in before)
        ta = ", ".join(f"{float(r[key]['ms']):.2f}" for r in after)
        mem = f"{float(before[0][key]['peak_mib']):.2f} / {float(after[0][key]['peak_mib']):.2f}"
        lines.append(f"| {' | '.join(key)} | {tb} | {ta} | {ours[key]:.2f} | {mem} |")
    for name, r in (("fastneg rows", ours), ("the naive PyTorch loss (the same code in both builds)", naive)):
        values = list(r.values())
        lines.append(f"\n{name}: after / before, best run each: median {statistics.median(values):.3f}, range "
                     f"{min(values):.2f} to {max(values):.2f} over {len(values)} rows.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
