"""Peak-memory measurement of one region of code, on CUDA or on the CPU.

CUDA: the caching allocator's peak minus what was allocated at entry. CPU: Linux's peak
resident set (VmHWM), reset at entry through ``/proc/self/clear_refs``, minus the resident set
at entry; elsewhere it falls back to ``ru_maxrss`` growth, which undercounts a region whose
peak stays below an earlier one.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

__all__ = ["MatmulWork", "count_matmul_work", "peak_memory"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Filled in when the ``peak_memory`` block exits: ``mib`` is the extra memory at the peak."""

    mib: float = 0.0


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[PeakMemory]:
    """``with peak_memory(device) as m: ...`` then ``m.mib``."""
    result = PeakMemory()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        yield result
        torch.cuda.synchronize(dev)
        result.mib = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        return
    if _reset_peak_rss():
        base = _status_kib("VmRSS")
        yield result
        result.mib = max(0, _status_kib("VmHWM") - base) / 1024
        return
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield result
    result.mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


class MatmulWork:
    """Filled in when the ``count_matmul_work`` block exits: multiply-adds of matrix products.

    ``by_site`` maps (kernel, site, reduction width) to multiply-adds of the ``tl.dot`` calls the
    Triton interpreter executed there; ``site`` is ``"positives"`` for the gathered tiles of the
    positives' scores and ``"tiles"`` for every other product; the width is the ``D`` argument of
    the score-tile helper (so a guide's products, of width DG, are told apart), or the kernel's
    product width elsewhere. ``aten`` counts the aten matrix products (``FlopCounterMode``)."""

    def __init__(self) -> None:
        self.by_site: dict[tuple[str, str, int], int] = {}
        self.aten: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_site.values()) + self.aten

    def sum(self, *, site: Optional[str] = None, width: Optional[int] = None) -> int:
        return sum(v for (_, s, w), v in self.by_site.items()
                   if (site is None or s == site) and (width is None or w == width))


_KERNEL_PREFIXES = ("_info_nce", "_panel", "_sample")


def _dot_site(frame: Any) -> tuple[str, str, int]:
    kernel, site, width = "?", "tiles", -1
    while frame is not None:
        name = frame.f_code.co_name
        if name == "positive_scores":
            site = "positives"
        if name in ("tile_scores", "tile_dot") and width < 0:
            width = int(frame.f_locals.get("D", -1))
        if name.startswith(_KERNEL_PREFIXES):
            kernel = name
            if width < 0:
                width = int(frame.f_locals.get("D", -1))
            break
        frame = frame.f_back
    return kernel, site, width


@contextmanager
def count_matmul_work() -> Iterator[MatmulWork]:
    """Count the multiply-adds of every matrix product run in the block: each ``tl.dot`` the
    Triton interpreter executes (``TRITON_INTERPRET=1``, tensors on the CPU) at its tile's full
    shape (padding included), and each aten product (``torch.utils.flop_counter``). This is how
    the cost of the Triton design is a number without a GPU (tests/backends/test_product_count.py,
    benchmarks/count_products.py)."""
    import sys

    from torch.utils.flop_counter import FlopCounterMode
    from triton.runtime import interpreter

    work = MatmulWork()
    original = interpreter.InterpreterBuilder.create_dot

    def counted(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        batch = 1
        for size in a.data.shape[:-2]:
            batch *= size
        key = _dot_site(sys._getframe(1))
        work.by_site[key] = work.by_site.get(key, 0) + batch * m * k * n
        return original(self, a, b, d, *args)

    interpreter.InterpreterBuilder.create_dot = counted
    try:
        with FlopCounterMode(display=False) as flops:
            yield work
        work.aten = flops.get_total_flops() // 2
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def triton_products(B: int, N: int, D: int, dtype: torch.dtype = torch.float32, *, major: int = 9,
                    seed: int = 0, **options: Any) -> MatmulWork:
    """The matrix-product work of one forward+backward of ``info_nce(..., backend="triton")``
    (gradients to query, keys and a tensor temperature, a float one with ``debias``) with the tile shape of a
    compute-capability ``major`` GPU, counted under the Triton interpreter (``TRITON_INTERPRET=1``
    must be set before fastneg is imported). ``options`` go to ``info_nce``; a guide is made
    when ``guide_width`` is given (an int: its D)."""
    import fastneg

    from ..backends import triton as triton_backend

    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=1).to(dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=1).to(dtype).requires_grad_()
    # a learned temperature, but with debias (which refuses one)
    temperature = 0.05 if options.get("debias") is not None else torch.tensor(0.05, requires_grad=True)
    guide_width = options.pop("guide_width", None)
    if guide_width is not None:
        options["guide_query"] = torch.randn(B, guide_width, generator=gen).to(dtype)
        options["guide_keys"] = torch.randn(N, guide_width, generator=gen).to(dtype)
    if options.get("query_labels") == "random":
        options["query_labels"] = torch.randint(0, max(2, B // 8), (B,), generator=gen)
        options["key_labels"] = torch.randint(0, max(2, B // 8), (N,), generator=gen)
    with triton_backend.cuda_tiles(major), count_matmul_work() as work:
        loss = fastneg.info_nce(q, k, torch.arange(B), temperature=temperature, backend="triton", **options)
        loss.backward()
    return work
