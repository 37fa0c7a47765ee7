"""Benchmarks of the contrastive loss: fastneg side by side with what people use today.

Implementations (all in one process and one run, on the same inputs):

- ``fastneg-cpu`` / ``fastneg-triton``: :func:`fastneg.info_nce` on each backend available on the
  device (the Triton interpreter is not benchmarked: it is a test device, not a fast one);
- ``naive``: the dense PyTorch loss with the same rules (``backend="reference"``);
- ``naive-compile``: the same function under ``torch.compile`` (inductor), compiled afresh for
  each case and timed after the warm-up compiled it (``CompiledPerCase``); a case that ran no
  compiled graph is marked ``not-compiled``;
- ``chunked``: the dense loss computed ``chunk`` query rows at a time, each chunk under
  activation checkpointing, so at most ``chunk x N`` scores live at once (a common
  memory-saving rewrite in plain PyTorch);
- ``st-mnrl``: sentence-transformers' ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``
  (plain rules only; when sentence-transformers is installed);
- ``inf-cl``: Inf-CL's ``cal_inf_loss`` (plain rules only; CUDA and the ``inf-cl`` package);
- ``fastneg-two-calls``: the symmetric loss as two fused calls (query-to-key, then the positive
  keys against the queries), i.e. what the one-pass kernel replaces (``symmetric`` only);
- ``floor``: the bare matrix products the loss cannot avoid: ``q @ k.T`` for the forward,
  ``dS @ k`` and ``dS.T @ q`` for the backward.

Each implementation is measured for the forward alone (no graph), and for forward + backward,
from which the backward alone is the time after the forward returned. Rule sets: ``plain``
InfoNCE, ``masked``: margin 0.1 + SimANS(0.5, 0) + duplicate labels (one key in 16 shares
its label with another), and ``symmetric``: the plain CLIP loss, both directions.
Time: device-synchronised wall clock, best and median of the timed rounds (at least ``rounds``, more
until ``min_time_s`` of them) after
a warm-up round (which covers Triton compilation and autotuning and torch.compile).
Peak memory: :func:`fastneg.profiling.peak_memory`. A call that exceeds the memory budget
(CPU: the address-space limit is set to the budget above current use; CUDA: the allocator's
out-of-memory error) is recorded as ``oom``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import fastneg
from fastneg.profiling import peak_memory
from fastneg.reference import info_nce_reference

from .options import Rules, SimANS

RULE_SETS = ("plain", "masked", "symmetric")
OPS = ("forward", "backward", "forward+backward")
TEMPERATURE = 0.05


@dataclass
class Case:
    """One problem: B = N in-batch keys, positives on the diagonal."""

    B: int
    D: int
    dtype: torch.dtype
    device: torch.device
    rules: str

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        g = torch.Generator().manual_seed(self.B + self.D)
        q = torch.nn.functional.normalize(torch.randn(self.B, self.D, generator=g), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(self.B, self.D, generator=g), dim=-1)
        q = q.to(self.device, self.dtype)
        k = k.to(self.device, self.dtype)
        options: dict = {"temperature": TEMPERATURE}
        if self.rules == "masked":
            labels = torch.arange(self.B)
            labels[1::16] = labels[0::16][: labels[1::16].numel()]  # planted duplicates
            options.update(margin=0.1, weighting=SimANS(0.5, 0.0), key_labels=labels.to(self.device))
        elif self.rules == "symmetric":
            options.update(symmetric=True)
        return q, k, options


LossFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _fastneg(backend: str) -> LossFn:
    return lambda q, k, opts: fastneg.info_nce(q, k, backend=backend, **opts)


def _two_calls(backend: str) -> LossFn:
    def both_ways(q: torch.Tensor, k: torch.Tensor, opts: dict) -> torch.Tensor:
        one_way = {n: v for n, v in opts.items() if n != "symmetric"}
        return (fastneg.info_nce(q, k, backend=backend, **one_way) + fastneg.info_nce(k, q, backend=backend, **one_way)) / 2
    return both_ways


def _naive(q: torch.Tensor, k: torch.Tensor, opts: dict) -> torch.Tensor:
    return fastneg.info_nce(q, k, backend="reference", **opts)


class CompiledPerCase:
    """``naive`` under ``torch.compile``, compiled afresh for each case (shapes, dtype, rules,
    gradient mode): dynamo's caches are reset when the case changes, so a sweep never reaches
    ``recompile_limit``, and ``fail_on_recompile_limit_hit`` turns a silent fallback to eager code
    into an error. The backend counts the graphs it compiles, so ``graphs`` says whether the
    current case ran compiled code (the sweep marks a row without graphs ``not-compiled``)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.graphs = 0
        self._fn: Optional[Callable] = None

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, opts: dict) -> torch.Tensor:
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device, sorted(opts), opts.get("margin"),
               repr(opts.get("weighting")), opts.get("symmetric"))
        if key != self.key:
            torch._dynamo.reset()
            self.key, self.graphs = key, 0
            self._fn = torch.compile(_naive, dynamic=False, backend=self._backend)
        assert self._fn is not None
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            return self._fn(q, k, opts)


def _reference_rows(q: torch.Tensor, k: torch.Tensor, positives: torch.Tensor, query_labels: Optional[torch.Tensor],
                    key_labels: Optional[torch.Tensor], rules: Rules) -> torch.Tensor:
    return info_nce_reference(q, k, positives, TEMPERATURE, rules, query_labels, key_labels)[0].sum()


def make_chunked(chunk: int) -> LossFn:
    def chunked(q: torch.Tensor, k: torch.Tensor, opts: dict) -> torch.Tensor:
        rules = Rules.build(opts.get("margin"), None, None, 0.0, "absolute", opts.get("weighting"))
        key_labels = opts.get("key_labels")
        B = q.shape[0]
        total = q.new_zeros((), dtype=torch.float32)
        for start in range(0, B, chunk):
            rows = torch.arange(start, min(B, start + chunk), device=q.device)
            ql = key_labels[rows] if key_labels is not None else None
            total = total + torch.utils.checkpoint.checkpoint(
                _reference_rows, q[rows], k, rows, ql, key_labels, rules, use_reentrant=False).float()
        return total / B
    return chunked


def _st_mnrl() -> Optional[LossFn]:
    try:
        from sentence_transformers import losses
    except ImportError:
        return None

    class _NoModel(torch.nn.Module):  # compute_loss_from_embeddings never calls the model
        pass

    loss = losses.MultipleNegativesRankingLoss(_NoModel(), scale=1.0 / TEMPERATURE)  # type: ignore[arg-type]
    labels = torch.empty(0)
    return lambda q, k, opts: loss.compute_loss_from_embeddings([q, k], labels)


def _inf_cl() -> Optional[LossFn]:
    if not torch.cuda.is_available():
        return None
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None
    return lambda q, k, opts: cal_inf_loss(q, k, scale=1.0 / TEMPERATURE)


def implementations(device: torch.device, chunk: int = 1024) -> dict[str, tuple[LossFn, tuple[str, ...]]]:
    """name -> (loss function, rule sets it implements)."""
    impls: dict[str, tuple[LossFn, tuple[str, ...]]] = {}
    backend = "triton" if device.type == "cuda" else "cpu"
    impls[f"fastneg-{backend}"] = (_fastneg(backend), RULE_SETS)
    impls["fastneg-two-calls"] = (_two_calls(backend), ("symmetric",))
    impls["naive"] = (_naive, RULE_SETS)
    impls["naive-compile"] = (CompiledPerCase(), RULE_SETS)
    impls["chunked"] = (make_chunked(chunk), ("plain", "masked"))
    for name, fn in (("st-mnrl", _st_mnrl()), ("inf-cl", _inf_cl())):
        if fn is not None:
            impls[name] = (fn, ("plain",))
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


@contextlib.contextmanager
def memory_budget(device: torch.device, budget_bytes: Optional[int]) -> Iterator[None]:
    """On CPU, cap the address space at current use + budget while the block runs, so that an
    implementation needing more fails with an allocation error instead of exhausting the machine."""
    if device.type != "cpu" or budget_bytes is None or not os.path.exists("/proc/self/status"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size_bytes() + budget_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


@dataclass
class Measurement:
    ms: dict[str, Optional[float]] = field(default_factory=dict)  # op -> best ms (None: not run)
    median_ms: dict[str, Optional[float]] = field(default_factory=dict)  # op -> median of the timed rounds
    rounds: int = 0  # timed rounds per op
    peak_mib: dict[str, Optional[float]] = field(default_factory=dict)
    status: str = "ok"


def measure(fn: LossFn, case: Case, rounds: int, budget_bytes: Optional[int], floor: bool = False,
            min_time_s: float = 0.0, max_rounds: int = 50) -> Measurement:
    """Time forward, backward and forward+backward of one implementation on one case.

    After one warm-up call per op, at least ``rounds`` timed rounds, and more (up to ``max_rounds``)
    until the timed rounds of the op add up to ``min_time_s``: a small case gets enough rounds for a
    stable best and median on a loaded machine, a large one is not repeated needlessly. Records the
    best and the median round of each op."""
    q, k, opts = case.inputs()
    out = Measurement()
    device = case.device

    def forward_only() -> None:
        with torch.no_grad():
            if floor:
                q @ k.T
            else:
                fn(q, k, opts)

    def forward_backward() -> tuple[float, float]:
        qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
        _sync(device)
        start = time.perf_counter()
        if floor:
            with torch.no_grad():
                s = qg @ kg.T
            _sync(device)
            mid = time.perf_counter()
            with torch.no_grad():
                s @ kg
                s.T @ qg
        else:
            loss = fn(qg, kg, opts)
            _sync(device)
            mid = time.perf_counter()
            loss.backward()
        _sync(device)
        end = time.perf_counter()
        return mid - start, end - start

    try:
        with memory_budget(device, budget_bytes):
            for op, call in (("forward", forward_only), ("forward+backward", forward_backward)):
                call()  # warm-up: compilation, autotuning, first-touch allocations
                totals: list[float] = []
                bwds: list[float] = []
                out.peak_mib[op] = 0.0
                while len(totals) < rounds or (sum(totals) < min_time_s and len(totals) < max_rounds):
                    _sync(device)
                    with peak_memory(device) as peak:
                        start = time.perf_counter()
                        res = call()
                        _sync(device)
                    elapsed = time.perf_counter() - start
                    out.peak_mib[op] = max(out.peak_mib[op] or 0.0, peak.mib)
                    if op == "forward":
                        totals.append(elapsed)
                    else:
                        assert res is not None
                        fwd_t, total = res
                        totals.append(total)
                        bwds.append(total - fwd_t)
                out.rounds = len(totals)
                out.ms[op], out.median_ms[op] = 1e3 * min(totals), 1e3 * statistics.median(totals)
                if op == "forward+backward":
                    out.ms["backward"], out.median_ms["backward"] = 1e3 * min(bwds), 1e3 * statistics.median(bwds)
                    out.peak_mib["backward"] = out.peak_mib[op]
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        out.status = "oom"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def flops(case: Case, op: str) -> float:
    """The products the loss needs, whoever computes them: forward q @ k.T; backward dS @ k and
    dS.T @ q. (A recomputing implementation does one more in backward; TFLOPS here are "useful"
    FLOPs per second, comparable across implementations.)"""
    mm = 2.0 * case.B * case.B * case.D
    return {"forward": mm, "backward": 2 * mm, "forward+backward": 3 * mm}[op]


@dataclass
class Row:
    date: str
    device: str
    device_name: str
    torch_version: str
    triton_version: str
    fastneg_version: str
    impl: str
    op: str
    rules: str
    dtype: str
    B: int
    N: int
    D: int
    ms: Optional[float]
    peak_mib: Optional[float]
    tflops: Optional[float]
    status: str
    median_ms: Optional[float] = None
    rounds: int = 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "n/a"
    return triton.__version__


@dataclass
class SweepConfig:
    sizes: list[int]
    dims: list[int]
    dtypes: list[str]
    rules: list[str]
    device: str
    rounds: int = 2
    min_time_s: float = 0.0
    memory_budget_gib: Optional[float] = 8.0
    chunk: int = 1024
    impls: Optional[list[str]] = None


def selected_implementations(cfg: SweepConfig) -> dict[str, tuple[LossFn, tuple[str, ...]]]:
    """The implementations the sweep runs: ``cfg.impls``, if given, names them (the floor always runs);
    a name not available here is a ``ValueError``."""
    impls = implementations(torch.device(cfg.device), cfg.chunk)
    if cfg.impls:
        unknown = [name for name in cfg.impls if name not in impls and name != "floor"]
        if unknown:
            raise ValueError(f"--impls: unknown {', '.join(unknown)} (available here: {', '.join(impls)}; "
                             "the floor always runs)")
        impls = {k: v for k, v in impls.items() if k in cfg.impls}
    return impls


def planned_runs(cfg: SweepConfig, impls: dict[str, tuple[LossFn, tuple[str, ...]]]) -> int:
    """How many measurements the sweep makes: per (dtype, rules, D, B), every implementation that has
    those rules, plus the floor."""
    per_rules = {r: 1 + sum(r in supported for _, supported in impls.values()) for r in cfg.rules}
    return len(cfg.dtypes) * len(cfg.dims) * len(cfg.sizes) * sum(per_rules.values())


def sweep(cfg: SweepConfig, progress: Optional[Callable[[str], None]] = None,
          impls: Optional[dict[str, tuple[LossFn, tuple[str, ...]]]] = None) -> list[Row]:
    device = torch.device(cfg.device)
    impls = selected_implementations(cfg) if impls is None else impls
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=device.type, device_name=device_name(device), torch_version=torch.__version__,
                triton_version=triton_version(), fastneg_version=fastneg.__version__)
    budget = int(cfg.memory_budget_gib * 2**30) if cfg.memory_budget_gib else None
    rows: list[Row] = []
    failed_at: dict[tuple[str, str, str, int], int] = {}  # no use trying larger B after an OOM
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        for rules in cfg.rules:
            for D in cfg.dims:
                for B in sorted(cfg.sizes):
                    case = Case(B, D, dtype, device, rules)
                    entries = [(name, fn, False) for name, (fn, supported) in impls.items() if rules in supported]
                    entries.append(("floor", _naive, True))
                    for name, fn, is_floor in entries:
                        if progress:
                            progress(f"{name} {rules} {dtype_name} B={B} D={D}")
                        key = (name, rules, dtype_name, D)
                        if key in failed_at and B > failed_at[key]:
                            m = Measurement(status="oom")
                        else:
                            m = measure(fn, case, cfg.rounds, budget, floor=is_floor, min_time_s=cfg.min_time_s)
                            if m.status == "oom":
                                failed_at[key] = B
                            elif isinstance(fn, CompiledPerCase) and fn.graphs == 0:
                                m.status = "not-compiled"  # timed, but eager code: not what the column says
                        for op in OPS:
                            ms = m.ms.get(op)
                            rows.append(Row(**meta, impl=name, op=op, rules=rules, dtype=dtype_name, B=B, N=B, D=D,
                                            ms=ms, peak_mib=m.peak_mib.get(op),
                                            tflops=flops(case, op) / (ms * 1e-3) / 1e12 if ms else None,
                                            status=m.status, median_ms=m.median_ms.get(op), rounds=m.rounds))
    return rows


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
              "fastneg-two-calls", "floor")
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
