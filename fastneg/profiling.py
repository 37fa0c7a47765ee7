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

import torch

__all__ = ["peak_memory"]


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
