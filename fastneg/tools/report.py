"""The benchmark's report: the CSV, the markdown tables (ratios, scaling exponents) and the plots,
written from the rows of :func:`fastneg.tools.benchmark.sweep`."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from typing import Optional

from .benchmark import OPS, Row

__all__ = ["write_csv", "fit_exponent", "markdown", "scaling_table", "plot", "impl_color", "IMPL_ORDER"]


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def fit_exponent(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of log y against log x (None with fewer than two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _rounds_text(rows: list[Row]) -> str:
    counts = [r.rounds for r in rows if r.rounds]
    if not counts:
        return "no timed rounds"
    lo, hi = min(counts), max(counts)
    return f"{lo} timed rounds" if lo == hi else f"{lo} to {hi} timed rounds"


def _time_cell(r: Row) -> str:
    if r.ms is None:
        return "-"
    if r.median_ms is None or r.rounds < 2:
        return _fmt(r.ms)
    return f"{_fmt(r.ms)} (+{100 * (r.median_ms / r.ms - 1):.0f}%)"


def _ratio_cell(mine: Row, other: Row) -> str:
    assert mine.ms and other.ms
    text = f"{mine.ms / other.ms:.2f}"
    if mine.median_ms and other.median_ms and min(mine.rounds, other.rounds) >= 2:
        text += f" ({mine.median_ms / other.median_ms:.2f})"
    return text


def markdown(rows: list[Row], memory_budget_gib: Optional[float]) -> str:
    first = rows[0]
    out = [f"# fastneg benchmark: {first.device_name}", "",
           f"{first.date}; torch {first.torch_version}, triton {first.triton_version}, fastneg {first.fastneg_version}. "
           f"Times in ms: the best timed round, and in brackets how much slower the median round was "
           f"({_rounds_text(rows)} after a warm-up); peak = extra memory of the call in MiB, "
           "`oom` = over the memory budget. Ratios are fastneg's time over the other's: of the best rounds, "
           "and in brackets of the medians (two numbers far apart: a noisy measurement).", ""]
    fast = "fastneg-triton" if first.device == "cuda" else "fastneg-cpu"
    impl_names = list(dict.fromkeys(r.impl for r in rows))
    by = {(r.impl, r.op, r.rules, r.dtype, r.B, r.D): r for r in rows}
    groups = sorted({(r.rules, r.dtype, r.D, r.op) for r in rows}, key=lambda g: (g[0], g[1], g[2], OPS.index(g[3])))
    for rules, dtype, D, op in groups:
        out += [f"## {op}, {rules} rules, {dtype}, D = {D}", "",
                "| B = N | " + " | ".join(f"{n} ms" for n in impl_names) + " | " + fast + " peak MiB | naive peak MiB | "
                + " | ".join(f"{fast} / {n}" for n in impl_names if n != fast) + " |",
                "|---" * (2 * len(impl_names) + 2) + "|"]
        for B in sorted({r.B for r in rows}):
            cells = []
            for n in impl_names:
                r = by.get((n, op, rules, dtype, B, D))
                cells.append("n/a" if r is None else ("oom" if r.status == "oom" else _time_cell(r)
                                                      + (" (not compiled)" if r.status == "not-compiled" else "")))
            mine = by.get((fast, op, rules, dtype, B, D))
            naive = by.get(("naive", op, rules, dtype, B, D))
            ratios = []
            for n in impl_names:
                if n == fast:
                    continue
                other = by.get((n, op, rules, dtype, B, D))
                if other is None:
                    ratios.append("n/a")
                elif other.status == "oom":
                    ratios.append("other oom")
                elif mine and mine.ms and other.ms:
                    ratios.append(_ratio_cell(mine, other) + (" eager" if other.status == "not-compiled" else ""))
                else:
                    ratios.append("-")
            out.append(f"| {B} | " + " | ".join(cells) + f" | {_fmt(mine.peak_mib if mine else None)} | "
                       f"{'oom' if naive and naive.status == 'oom' else _fmt(naive.peak_mib if naive else None)} | "
                       + " | ".join(ratios) + " |")
        out.append("")
    out += scaling_table(rows, memory_budget_gib)
    return "\n".join(out) + "\n"


def scaling_table(rows: list[Row], memory_budget_gib: Optional[float]) -> list[str]:
    budget = f"{memory_budget_gib:g} GiB" if memory_budget_gib else "no budget"
    out = [f"## Scaling (forward+backward; memory budget {budget})", "",
           "Largest B that ran within the budget, and the fitted exponents e in time ~ B^e and "
           "peak memory ~ B^e over the sizes that ran (N = B, so a dense B x N matrix gives e = 2).", "",
           "| implementation | rules | dtype | D | largest B | time exponent | memory exponent |",
           "|---|---|---|---|---|---|---|"]
    keys = sorted({(r.impl, r.rules, r.dtype, r.D) for r in rows if r.op == "forward+backward"})
    for impl, rules, dtype, D in keys:
        sel = sorted((r for r in rows if (r.impl, r.rules, r.dtype, r.D, r.op) == (impl, rules, dtype, D, "forward+backward")),
                     key=lambda r: r.B)
        ok = [r for r in sel if r.status == "ok"]
        largest = max((r.B for r in ok), default=None)
        t_exp = fit_exponent([r.B for r in ok], [r.ms for r in ok])  # type: ignore[misc]
        m_exp = fit_exponent([r.B for r in ok], [r.peak_mib for r in ok])  # type: ignore[misc]
        out.append(f"| {impl} | {rules} | {dtype} | {D} | {largest if largest else 'none'} | {_fmt(t_exp, '.2f')} | "
                   f"{_fmt(m_exp, '.2f')} |")
    return out + [""]


# one colour per implementation in every plot (matplotlib's tab10, in this order)
IMPL_ORDER = ("fastneg-triton", "fastneg-cpu", "naive", "naive-compile", "chunked", "st-mnrl", "inf-cl",
              "fastneg-two-calls", "floor", "fastneg-portable")
RULE_TEXT = {
    "plain": "plain rules: InfoNCE, positives on the diagonal, every other key a negative",
    "masked": "masked rules: margin 0.1 (keys scoring above the positive - 0.1 masked) + SimANS(a=0.5, b=0) "
              "weights + duplicate labels (1 key in 16 shares a label; masked)",
    "symmetric": "symmetric rules: the CLIP loss, query-to-key and key-to-query, plain",
}


def impl_color(name: str) -> str:
    """The implementation's colour, the same in every plot."""
    palette = [f"C{i}" for i in range(10)]
    if name in IMPL_ORDER:
        return palette[IMPL_ORDER.index(name) % 10]
    return palette[(len(IMPL_ORDER) + sum(map(ord, name))) % 10]


def plot(rows: list[Row], path_prefix: str, memory_budget_gib: Optional[float] = None) -> list[str]:
    """PNG plots of time and peak memory against B (log axes, one line per implementation, one colour
    per implementation in every plot), for each (rules, dtype, D) at forward+backward. Returns the files
    written.

    An implementation that ran out of the memory budget ends in an ``x`` at the first B it failed at
    (on the memory panel at the budget line, on the time panel at the top edge); a row that ran eager
    code under ``naive-compile`` is drawn hollow. The floor (bare matrix products) is on the time panel
    only: it materialises S, so its memory is no floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    budget_mib = memory_budget_gib * 1024 if memory_budget_gib else None
    written = []
    impls = sorted(dict.fromkeys(r.impl for r in rows), key=lambda n: (IMPL_ORDER.index(n) if n in IMPL_ORDER else 99, n))
    for rules, dtype, D in sorted({(r.rules, r.dtype, r.D) for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        handles: dict[str, Line2D] = {}
        any_oom = any_eager = False
        for ax, metric, label in ((axes[0], "ms", "time (ms), best round"), (axes[1], "peak_mib", "peak extra memory (MiB)")):
            for impl in impls:
                if metric == "peak_mib" and impl == "floor":
                    continue
                sel = sorted((r for r in rows
                              if (r.impl, r.rules, r.dtype, r.D, r.op) == (impl, rules, dtype, D, "forward+backward")),
                             key=lambda r: r.B)
                color = impl_color(impl)
                ran = [r for r in sel if r.status in ("ok", "not-compiled") and getattr(r, metric)]
                if ran:
                    (line,) = ax.plot([r.B for r in ran], [getattr(r, metric) for r in ran], color=color, marker="o",
                                      label="floor (bare q k^T, dS k, dS^T q)" if impl == "floor" else impl)
                    handles.setdefault(impl, line)
                    eager = [r for r in ran if r.status == "not-compiled"]
                    if eager:
                        any_eager = True
                        ax.plot([r.B for r in eager], [getattr(r, metric) for r in eager], linestyle="none", marker="o",
                                markerfacecolor="white", markeredgecolor=color, markersize=8)
                oom = [r for r in sel if r.status == "oom"]
                if oom:
                    any_oom = True
                    first = oom[0].B
                    if metric == "peak_mib" and budget_mib:
                        ax.plot([first], [budget_mib], linestyle="none", marker="x", color=color, markersize=10,
                                markeredgewidth=2.5)
                    else:
                        ax.plot([first], [1.0], linestyle="none", marker="x", color=color, markersize=10,
                                markeredgewidth=2.5, transform=ax.get_xaxis_transform(), clip_on=False)
                    handles.setdefault(impl, Line2D([], [], color=color, marker="x", label=impl))
            if metric == "peak_mib" and budget_mib and any_oom:
                ax.axhline(budget_mib, color="0.3", linestyle="--", linewidth=1)
                ax.annotate(f"memory budget {memory_budget_gib:g} GiB", (0.02, budget_mib), xycoords=("axes fraction", "data"),
                            xytext=(0, 3), textcoords="offset points", fontsize=8, color="0.3")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B = N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        notes = [RULE_TEXT.get(rules, f"{rules} rules")]
        if any_oom:
            notes.append("x: out of the memory budget at that B (and every larger B)")
        if any_eager:
            notes.append("hollow: naive-compile ran eager code (not compiled)")
        notes.append("memory panel: the floor is left off (it materialises S)")
        axes[1].legend(handles=[handles[n] for n in impls if n in handles], fontsize=8, loc="upper left")
        first_row = rows[0]
        fig.suptitle(f"forward+backward, {rules} rules, {dtype}, D={D}: {first_row.device_name}, {first_row.date}",
                     fontsize=9)
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7.5, va="bottom")
        fig.tight_layout(rect=(0, 0.03 + 0.035 * len(notes), 1, 0.96))
        path = f"{path_prefix}_{rules}_{dtype}_D{D}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
