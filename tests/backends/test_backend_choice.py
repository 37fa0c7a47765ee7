"""What ``backend="auto"`` picks, how a user sees and overrides it, and the errors around it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import fastneg
import fastneg.backends as backends
from fastneg.backends.portable import MEMORY_ENV, chunk_rows


def stats_backend(**options: object) -> str:
    q, k = torch.randn(6, 4), torch.randn(9, 4)
    return fastneg.info_nce(q, k, return_stats=True, **options)[1].backend  # type: ignore[index]


def test_auto_is_the_cpu_kernels_on_cpu_here() -> None:
    assert stats_backend() == "cpu"
    assert stats_backend(backend="portable") == "portable"
    assert stats_backend(backend="reference") == "reference"


def test_fastneg_backend_replaces_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTNEG_BACKEND", "portable")
    assert stats_backend() == "portable"
    assert stats_backend(backend="cpu") == "cpu"  # an explicit backend is not overridden
    monkeypatch.setenv("FASTNEG_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTNEG_BACKEND"):
        stats_backend()


def test_the_choice_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="fastneg"):
        stats_backend()
        stats_backend()
    lines = [r.getMessage() for r in caplog.records if r.name == "fastneg"]
    assert lines == ["fastneg: backend='auto' runs 'cpu' on cpu tensors"], lines


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="portable"):
        stats_backend(backend="gpu")


def test_the_sampler_runs_on_the_portable_backend_too() -> None:
    q, k = torch.randn(6, 4), torch.randn(9, 4)
    a = fastneg.sample_negatives(q, k, None, 3, strategy="simans", seed=1, backend="portable")
    b = fastneg.sample_negatives(q, k, None, 3, strategy="simans", seed=1, backend="cpu")
    assert torch.equal(a, b)


def test_the_memory_budget_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MEMORY_ENV, "1")
    assert chunk_rows(10_000, 4096, 4) == 2**20 // (4096 * 4 * 12)
    assert chunk_rows(10_000, 10**9, 4) == 1  # at least one row
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(MEMORY_ENV, bad)
        with pytest.raises(ValueError, match=MEMORY_ENV):
            stats_backend(backend="portable")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("FASTNEG_BACKEND", "TRITON_INTERPRET")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_cpu_build_off_uses_the_portable_backend_without_compiling(tmp_path) -> None:  # noqa: ANN001
    """FASTNEG_CPU_BUILD=0 and an empty cache: auto runs the portable backend and compiles nothing;
    backend='cpu' there is refused in one line naming the portable backend."""
    r = run_python("import torch, fastneg; print(fastneg.info_nce(torch.randn(4, 3), torch.randn(5, 3), "
                   "return_stats=True)[1].backend)", FASTNEG_CPU_BUILD="0", FASTNEG_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "portable", r.stderr
    assert "compiling" not in r.stderr and not os.listdir(tmp_path)
    r = run_python("import torch, fastneg; fastneg.info_nce(torch.randn(4, 3), torch.randn(5, 3), backend='cpu')",
                   FASTNEG_CACHE_DIR=str(tmp_path), CXX="no-such-compiler")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: backend='cpu' needs fastneg's C++ kernels") and "portable" in last, last
    assert "no C++ compiler" in last


def test_the_portable_backend_ignores_an_enclosing_autocast() -> None:
    """Under CPU autocast to bfloat16 the portable op still computes in float32 (as the fused kernels
    do): the same loss and gradients as without it (its products once ran in bfloat16 and the
    backward failed on mixed dtypes)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for autocast in (False, True):
        q = torch.randn(12, 8, generator=g).requires_grad_()
        k = torch.randn(20, 8, generator=g).requires_grad_()
        g.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fastneg.info_nce(q, k, margin=0.1, weighting="simans", backend="portable")
        loss.backward()
        out.append((loss.detach(), q.grad, k.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)
