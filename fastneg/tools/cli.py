"""The ``fastneg`` command. ``fastneg bench --help`` for the benchmark sweep, ``fastneg mine --help``
for hard-negative mining on files."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .progress import progress_bar

# quick: at least 3 timed rounds, more until 0.5 s of them per measurement (small cases are noisy)
QUICK = dict(sizes=[512, 1024, 2048], dims=[64], dtypes=["float32"], rules=["plain", "masked"], rounds=3, min_time_s=0.5)
FULL = dict(sizes=[2048, 8192, 32768], dims=[128], dtypes=["float32"], rules=["plain", "masked"], rounds=3,
            min_time_s=1.0)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="sweep batch size, key count, D and dtype; write CSV, markdown and plots",
                       description="Benchmark fastneg against the naive, compiled, chunked and peer losses on the "
                                   "current device. Writes <out>/bench.csv, <out>/bench.md and <out>/bench_*.png.")
    p.add_argument("--quick", action="store_true", help="a small sweep (under 2 minutes on a 2-core CPU)")
    p.add_argument("--sizes", type=int, nargs="+", help="batch sizes B (N = B)")
    p.add_argument("--dims", type=int, nargs="+", help="embedding dims D")
    p.add_argument("--dtypes", nargs="+", help="float32 float16 bfloat16 (float64 on CPU)")
    p.add_argument("--rules", nargs="+", choices=["plain", "masked", "symmetric"], help="rule sets")
    p.add_argument("--impls", nargs="+", help="only these implementations (default: every one available)")
    p.add_argument("--rounds", type=int, help="timed rounds per measurement, exactly (after one warm-up; "
                   "default: at least 3, more until 0.5 s (--quick) or 1 s of timed rounds)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--memory-budget", type=float, default=8.0,
                   help="GiB an implementation may use beyond the inputs; over it counts as oom (default 8)")
    p.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the chunked PyTorch loss")
    p.add_argument("--out", default="bench_results", help="output folder (default ./bench_results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


class UsageError(Exception):
    """A bad command-line argument or a missing optional package: one line on stderr, exit status 2."""


def _checked_bench_device(args: argparse.Namespace) -> str:
    """Checks everything about the arguments that can be checked before the sweep starts (so that no
    run is lost to it); returns the device."""
    import torch

    for flag, values in (("--sizes", args.sizes), ("--dims", args.dims)):
        for v in values or []:
            if v < 1:
                raise UsageError(f"{flag} must be >= 1, got {v}")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    if args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    allowed = ["float32", "float16", "bfloat16"] + (["float64"] if device == "cpu" else [])
    for d in args.dtypes or []:
        if d not in allowed:
            raise UsageError(f"--dtypes: {d!r} is not one of {', '.join(allowed)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out} exists and is not a folder")
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError("the plots need matplotlib: pip install matplotlib (the 'bench' extra: "
                             "pip install --no-build-isolation '.[bench]' from a clone), or pass --no-plots") from exc
    return device


def bench(args: argparse.Namespace) -> int:
    from . import benchmark, report

    device = _checked_bench_device(args)
    preset = QUICK if args.quick else FULL
    cfg = benchmark.SweepConfig(
        sizes=args.sizes or preset["sizes"], dims=args.dims or preset["dims"], dtypes=args.dtypes or preset["dtypes"],
        rules=args.rules or preset["rules"], device=device, rounds=args.rounds or preset["rounds"],
        min_time_s=0.0 if args.rounds else preset["min_time_s"],
        memory_budget_gib=args.memory_budget if args.memory_budget > 0 else None, chunk=args.chunk, impls=args.impls)
    try:
        impls = benchmark.selected_implementations(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    step, close = progress_bar(benchmark.planned_runs(cfg, impls))
    try:
        rows = benchmark.sweep(cfg, progress=step, impls=impls)
    finally:
        close()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench.csv")
    md_path = os.path.join(args.out, "bench.md")
    report.write_csv(rows, csv_path)
    text = report.markdown(rows, cfg.memory_budget_gib)
    text += f"\nReproduce: `fastneg bench {' '.join(args.argv)}`\n"
    with open(md_path, "w") as f:
        f.write(text)
    written = [csv_path, md_path]
    if not args.no_plots:
        written += report.plot(rows, os.path.join(args.out, "bench"), cfg.memory_budget_gib)
    print(text)
    print("wrote " + ", ".join(written))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # large buffers straight from mmap and back to the system on free, so that the peak-memory
    # readings (resident-set peak) see every buffer a call allocates
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv[:1] == ["bench"]:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, "-m", "fastneg.tools.cli", *argv], env)
    from ..version import __version__

    parser = argparse.ArgumentParser(prog="fastneg", description="fastneg command-line tools")
    parser.add_argument("--version", action="version", version=f"fastneg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    from ..mining import cli as mine_cli
    mine_cli.add_parser(sub)
    if argv[:1] == ["quality"]:  # its own parser (fastneg.tools.quality)
        from . import quality
        return quality.main(argv[1:])
    sub.add_parser("quality", help="training-quality benchmark with planted false negatives (fastneg quality --help)")
    sub.add_parser("build-cpu", help="compile the C++ CPU kernels into the cache now (otherwise the first CPU call does)",
                   description="Compile fastneg's C++ CPU kernels for the installed torch into the cache "
                               "(FASTNEG_CACHE_DIR, default ~/.cache/fastneg) and print where they are. Needs a "
                               "C++20 compiler with OpenMP and ninja; without them fastneg runs its portable backend.")
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    if args.command == "bench":
        try:
            return bench(args)
        except UsageError as exc:
            print(f"fastneg bench: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "mine":
        return mine_cli.run(args)
    if args.command == "build-cpu":
        return build_cpu()
    return 2


def build_cpu() -> int:
    """``fastneg build-cpu``: compile (or find) the C++ kernels; one line of error, exit status 2, if it cannot."""
    import time

    from ..backends import cpu

    start = time.perf_counter()
    try:
        cpu.load()
    except (cpu.CpuBuildError, ImportError) as exc:
        print(f"fastneg build-cpu: error: {exc}", file=sys.stderr)
        return 2
    print(f"fastneg: C++ CPU kernels ready in {cpu.build_directory()} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
