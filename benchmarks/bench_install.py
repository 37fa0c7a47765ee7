"""How long installing fastneg takes on a clean machine: the wheel and the sdist built with
``python -m build`` (isolated), installed into a fresh virtual environment whose dependencies
(torch, numpy, ninja) were installed first and are timed apart; then the first CPU call (the
just-in-time build of the C++ kernels into an empty cache) and a second process (loads them).

    python benchmarks/bench_install.py --out benchmarks/results/install_<date>.md

Needs ``build`` and pip access to torch (the pinned CPU build) and setuptools (the isolated build).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_CALL = ("import time, torch, fastneg; start = time.perf_counter(); "
              "loss, stats = fastneg.info_nce(torch.randn(64, 32), torch.randn(64, 32), return_stats=True); "
              "print(stats.backend, round(time.perf_counter() - start, 1))")


def timed(label: str, argv: list[str], rows: list[tuple[str, float, str]], **kw: object) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{label} failed: {r.stderr[-2000:]}")
    rows.append((label, seconds, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""))
    print(f"{label}: {seconds:.1f} s", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement of the fresh environment")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dist = os.path.join(tmp, "dist")
        timed("python -m build (sdist + wheel, isolated)", [sys.executable, "-m", "build", "--outdir", dist, REPO], rows)
        wheel = glob.glob(os.path.join(dist, "*.whl"))[0]
        sdist = glob.glob(os.path.join(dist, "*.tar.gz"))[0]
        venv = os.path.join(tmp, "venv")
        timed("python -m venv", [sys.executable, "-m", "venv", venv], rows)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet"]
        timed(f"dependencies: pip install {args.torch} numpy ninja (cached)", pip + [args.torch, "numpy", "ninja"], rows)
        timed(f"pip install {os.path.basename(wheel)}", pip + [wheel], rows)
        timed("pip uninstall fastneg", [os.path.join(venv, "bin", "python"), "-m", "pip", "uninstall", "-y", "fastneg"],
              rows)
        timed(f"pip install {os.path.basename(sdist)} (builds the wheel, isolated)", pip + [sdist], rows)
        env = dict(os.environ, FASTNEG_CACHE_DIR=os.path.join(tmp, "cache"),
                   PATH=os.path.join(venv, "bin") + os.pathsep + os.environ.get("PATH", ""))
        env.pop("PYTHONPATH", None)
        env.pop("TRITON_INTERPRET", None)
        python = os.path.join(venv, "bin", "python")
        timed("first CPU call: compiles the C++ kernels (empty cache)", [python, "-c", FIRST_CALL], rows, env=env, cwd=tmp)
        timed("second process: loads them", [python, "-c", FIRST_CALL], rows, env=env, cwd=tmp)
        no_compiler = dict(env, PATH=os.path.join(venv, "bin"), FASTNEG_CACHE_DIR=os.path.join(tmp, "empty"))
        timed("first CPU call without a compiler (portable backend)", [python, "-c", FIRST_CALL], rows,
              env=no_compiler, cwd=tmp)
        shutil.rmtree(venv)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Installing fastneg ({when})", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}.", "",
             f"Command: `python benchmarks/bench_install.py {' '.join(sys.argv[1:])}`", "",
             "| step | seconds | last line printed |", "|---|---|---|"]
    lines += [f"| {label} | {seconds:.1f} | {out} |" for label, seconds, out in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
