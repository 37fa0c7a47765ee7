"""pytest-benchmark suite of the loss (``pytest benchmarks/ --benchmark-only``).

Grouped by operation, rule set and size; each timed call is device-synchronised; one warm-up
round covers Triton compilation/autotuning and torch.compile. ``extra_info`` carries the device,
dtype, shapes, peak memory (MiB, measured on a separate call) and TFLOPS (useful FLOPs: forward
``q @ k.T``, backward ``dS @ k`` and ``dS.T @ q``). Results: ``--benchmark-json out.json``,
compared with ``--benchmark-compare``. Sizes: FASTNEG_BENCH_SIZES (default "1024 4096" on CPU,
"8192 32768" on CUDA) and FASTNEG_BENCH_DIM (default 128).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastneg.tools.benchmark import Case, device_name, flops, implementations
from fastneg.tools.profiling import peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [int(s) for s in os.environ.get("FASTNEG_BENCH_SIZES", "8192 32768" if DEVICE.type == "cuda"
                                        else "1024 4096").split()]
DIM = int(os.environ.get("FASTNEG_BENCH_DIM", "128"))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = implementations(DEVICE)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cases():
    for name, (_fn, supported) in IMPLS.items():
        for rules in supported:
            for B in SIZES:
                for op in ("forward", "backward", "forward+backward"):
                    yield pytest.param(name, rules, B, op, id=f"{op}-{rules}-B{B}-{name}")


@pytest.mark.parametrize("impl,rules,B,op", list(cases()))
def test_loss(benchmark, impl: str, rules: str, B: int, op: str) -> None:
    fn = IMPLS[impl][0]
    case = Case(B, DIM, DTYPE, DEVICE, rules)
    q, k, opts = case.inputs()
    benchmark.group = f"{op} | {rules} | B=N={B} D={DIM}"

    def leaves():
        return q.detach().requires_grad_(), k.detach().requires_grad_()

    if op == "forward":
        def setup():
            return (), {}

        def target():
            with torch.no_grad():
                fn(q, k, opts)
            sync()
    elif op == "backward":
        def setup():
            qg, kg = leaves()
            loss = fn(qg, kg, opts)
            sync()
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync()
    else:
        def setup():
            return leaves(), {}

        def target(qg, kg):
            fn(qg, kg, opts).backward()
            sync()

    args, kwargs = setup()
    with peak_memory(DEVICE) as peak:
        target(*args, **kwargs)
    benchmark.pedantic(target, setup=setup, rounds=3 if B <= 4096 else 1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(device=device_name(DEVICE), dtype=str(DTYPE).replace("torch.", ""), B=B, N=B, D=DIM,
                                impl=impl, rules=rules, peak_mib=round(peak.mib, 2),
                                tflops=flops(case, op) / seconds / 1e12)
