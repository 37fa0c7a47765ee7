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
Peak memory: :func:`fastneg.tools.profiling.peak_memory`. A call that exceeds the memory budget
(CPU: the address-space limit is set to the budget above current use; CUDA: the allocator's
out-of-memory error) is recorded as ``oom``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

import fastneg
from fastneg.reference import info_nce_reference
from fastneg.tools.profiling import peak_memory

from ..options import SimANS
from ..plan import Plan
from ..rules import Rules

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
                    key_labels: Optional[torch.Tensor], rules: Plan) -> torch.Tensor:
    return info_nce_reference(q, k, positives, TEMPERATURE, rules, query_labels, key_labels)[0].sum()


def make_chunked(chunk: int) -> LossFn:
    def chunked(q: torch.Tensor, k: torch.Tensor, opts: dict) -> torch.Tensor:
        rules = Rules(margin=opts.get("margin"), weighting=opts.get("weighting")).plan(TEMPERATURE)
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
    impls["fastneg-portable"] = (_fastneg("portable"), RULE_SETS)  # what auto runs on other devices
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
