"""`fastneg bench` end to end on a tiny configuration: files, columns, finite positive values."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

from fastneg.tools.report import fit_exponent

COLUMNS = {"date", "device", "device_name", "torch_version", "triton_version", "fastneg_version", "impl", "op",
           "rules", "dtype", "B", "N", "D", "ms", "peak_mib", "tflops", "status"}


def test_bench_tiny_sweep_writes_csv_markdown_and_plots(tmp_path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "fastneg.tools.cli", "bench", "--sizes", "64", "128", "--dims", "8", "--rules", "plain",
           "masked", "symmetric", "--rounds", "1", "--device", "cpu", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert "bench.csv" in files and "bench.md" in files
    pngs = [f for f in files if f.endswith(".png")]
    assert len(pngs) == 3 and all((out / f).stat().st_size > 10_000 for f in pngs)

    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert COLUMNS <= set(rows[0])
    impls = {r["impl"] for r in rows}
    assert {"fastneg-cpu", "fastneg-portable", "fastneg-two-calls", "naive", "naive-compile", "chunked", "floor"} <= impls
    assert {r["op"] for r in rows} == {"forward", "backward", "forward+backward"}
    for r in rows:
        assert r["status"] == "ok", r
        for col in ("ms", "tflops"):
            v = float(r[col])
            assert math.isfinite(v) and v > 0, (col, r)
        assert math.isfinite(float(r["peak_mib"])) and float(r["peak_mib"]) >= 0
        assert r["device"] == "cpu" and r["fastneg_version"]

    text = (out / "bench.md").read_text()
    assert "## forward+backward, masked rules, float32, D = 8" in text
    assert "## forward+backward, symmetric rules, float32, D = 8" in text
    assert "## Scaling" in text and "Reproduce: `fastneg bench" in text


def test_bench_reports_out_of_memory_under_a_budget(tmp_path) -> None:
    # 256 MiB cannot hold the naive loss's 4096 x 4096 matrices (64 MiB each); fastneg's O(B + N) fits
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "fastneg.tools.cli", "bench", "--sizes", "4096", "--dims", "8", "--rules", "plain",
           "--impls", "fastneg-cpu", "naive", "--rounds", "1", "--device", "cpu", "--memory-budget", "0.25",
           "--no-plots", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "bench.csv") as f:
        status = {(r["impl"], r["op"]): r["status"] for r in csv.DictReader(f)}
    assert status[("naive", "forward+backward")] == "oom"
    assert status[("fastneg-cpu", "forward+backward")] == "ok"


def test_fit_exponent() -> None:
    assert abs(fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) - 2.0) < 1e-12
    assert abs(fit_exponent([10, 100], [5, 50]) - 1.0) < 1e-12
    assert fit_exponent([10], [5]) is None


def test_naive_compile_is_compiled_for_every_case_past_the_recompile_limit() -> None:
    """A shared torch.compile falls back to eager once dynamo's recompile limit is hit (8 by
    default: part-way through a sweep). Here the limit is 4, which one case's graphs fit in (with
    and without gradient) but three cases do not: each must still be compiled."""
    import torch

    from fastneg.tools.benchmark import Case, CompiledPerCase, Measurement, measure

    fn = CompiledPerCase()
    with torch._dynamo.config.patch(recompile_limit=4):
        for B in (8, 12, 16):
            case = Case(B, 4, torch.float32, torch.device("cpu"), "masked")
            m = measure(fn, case, rounds=1, budget_bytes=None)
            assert isinstance(m, Measurement) and m.status == "ok"
            assert fn.graphs > 0, f"B={B} ran no compiled graph"
            q, k, opts = case.inputs()
            want = torch.as_tensor(fastneg_reference(q, k, opts))
            assert torch.allclose(fn(q, k, opts), want, rtol=1e-5, atol=1e-6)


def fastneg_reference(q, k, opts):
    import fastneg

    return fastneg.info_nce(q, k, backend="reference", **opts)


def test_measure_takes_more_rounds_until_min_time_and_records_the_median() -> None:
    import torch

    from fastneg.tools.benchmark import Case, _naive, measure

    case = Case(32, 8, torch.float32, torch.device("cpu"), "plain")
    exact = measure(_naive, case, rounds=3, budget_bytes=None)
    assert exact.rounds == 3
    longer = measure(_naive, case, rounds=2, budget_bytes=None, min_time_s=0.05, max_rounds=40)
    assert 2 < longer.rounds <= 40
    for m in (exact, longer):
        for op in ("forward", "backward", "forward+backward"):
            assert 0 < m.ms[op] <= m.median_ms[op], (op, m)


def test_plots_mark_out_of_memory_and_keep_one_colour_per_implementation(tmp_path) -> None:
    from fastneg.tools.benchmark import Row
    from fastneg.tools.report import impl_color, plot

    meta = dict(date="2026-12-03", device="cpu", device_name="test cpu", torch_version="x", triton_version="x",
                fastneg_version="x", op="forward+backward", rules="masked", dtype="float32", N=0, D=8)

    def row(impl, B, status="ok"):
        ok = status == "ok"
        return Row(**meta, impl=impl, B=B, ms=B / 10 if ok else None, peak_mib=B / 100 if ok else None,
                   tflops=1.0 if ok else None, status=status, median_ms=B / 9 if ok else None, rounds=3)

    rows = [row("fastneg-cpu", 64), row("fastneg-cpu", 128), row("naive", 64), row("naive", 128, "oom"),
            row("floor", 64), row("floor", 128)]
    written = plot(rows, str(tmp_path / "bench"), memory_budget_gib=0.001)
    assert len(written) == 1 and os.path.getsize(written[0]) > 10_000
    colours = {name: impl_color(name) for name in ("fastneg-cpu", "naive", "floor", "naive-compile", "chunked")}
    assert len(set(colours.values())) == len(colours)
    assert impl_color("naive") == colours["naive"]  # stable across calls and plots
