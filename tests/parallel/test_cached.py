"""fastneg.cached: the gradient-cached step equals the uncached one, with less memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import fastneg
from fastneg.parallel.cached import RandState, cached_loss


def encoder(seed: int = 0, hidden: int = 256) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(hidden, 64))


def normalized(module: torch.nn.Module):  # noqa: ANN201
    return lambda x: torch.nn.functional.normalize(module(x), dim=-1)


def batch(B: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 32, generator=g)
    return x, x + 0.3 * torch.randn(B, 32, generator=g)


def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return fastneg.info_nce(q, d, temperature=0.05, margin=0.1, weighting=fastneg.SimANS())


def step(cached: bool, chunk: int = 32, replay: bool = True) -> list[torch.Tensor]:
    """One optimizer step of a two-tower model with dropout, at batch 512.

    The uncached step embeds the same chunks (so dropout draws the same masks in the same order)
    but keeps every chunk's graph and back-propagates the loss through all of them at once."""
    q_enc, d_enc = encoder(0), encoder(1)
    params = list(q_enc.parameters()) + list(d_enc.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    x, y = batch()
    torch.manual_seed(123)
    if cached:
        loss = cached_loss([normalized(q_enc), normalized(d_enc)], [x, y], loss_fn, chunk_size=chunk)
        if not replay:
            RandState.__enter__ = lambda self: None  # type: ignore[method-assign]
            RandState.__exit__ = lambda self, *exc: None  # type: ignore[method-assign]
    else:
        q = torch.cat([normalized(q_enc)(x[b:b + chunk]) for b in range(0, len(x), chunk)])
        d = torch.cat([normalized(d_enc)(y[b:b + chunk]) for b in range(0, len(y), chunk)])
        loss = loss_fn(q, d)
    loss.backward()
    opt.step()
    return [p.detach().clone() for p in params] + [loss.detach()]


def test_cached_step_equals_uncached_step() -> None:
    plain, cached = step(False), step(True)
    assert float((plain[-1] - cached[-1]).abs()) < 1e-6  # the loss
    worst = max(float((a - b).abs().max()) for a, b in zip(plain[:-1], cached[:-1]))
    initial = [p.detach() for p in list(encoder(0).parameters()) + list(encoder(1).parameters())]
    moved = max(float((a - b).abs().max()) for a, b in zip(plain[:-1], initial))
    assert moved > 1e-3, "the step did not move the parameters"
    assert worst < 1e-5 * max(1.0, moved), f"parameters differ by {worst:.3g} after the step"


def test_without_random_state_replay_the_step_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: dropout masks drawn afresh in the second pass change the result."""
    monkeypatch.setattr(RandState, "__enter__", RandState.__enter__)
    monkeypatch.setattr(RandState, "__exit__", RandState.__exit__)
    plain, broken = step(False), step(True, replay=False)
    worst = max(float((a - b).abs().max()) for a, b in zip(plain[:-1], broken[:-1]))
    assert worst > 1e-4


def test_no_grad_returns_the_plain_loss() -> None:
    q_enc, d_enc = encoder(0).eval(), encoder(1).eval()
    x, y = batch(100)
    with torch.no_grad():
        got = cached_loss([normalized(q_enc), normalized(d_enc)], [x, y], loss_fn, chunk_size=7)
        want = loss_fn(normalized(q_enc)(x), normalized(d_enc)(y))
    assert not got.requires_grad
    assert float((got - want).abs()) < 1e-6


def test_bad_arguments() -> None:
    x, y = batch(8)
    enc = encoder(0)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_loss(enc, [x, y], loss_fn, chunk_size=0)
    with pytest.raises(ValueError, match="encoders"):
        cached_loss([enc], [x, y], loss_fn, chunk_size=4)
    with pytest.raises(ValueError, match="scalar"):
        cached_loss(enc, [x, y], lambda q, d: (q * d).sum(1), chunk_size=4)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch, fastneg
    from fastneg.cached import cached_loss
    from fastneg.tools.profiling import peak_memory
    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                                                torch.nn.Dropout(0.1))])
    fn = lambda q, d: fastneg.info_nce(torch.nn.functional.normalize(q, dim=-1),
                                       torch.nn.functional.normalize(d, dim=-1))
    def run(B):
        x, y = torch.randn(B, 1024), torch.randn(B, 1024)
        enc.zero_grad(set_to_none=False)
        with peak_memory() as m:
            if sys.argv[1] == "cached":
                cached_loss(enc, [x, y], fn, chunk_size=32).backward()
            else:
                fn(enc(x), enc(y)).backward()
        return m.mib
    run(64)  # warm-up: gradients allocated, libraries loaded
    print(run(512))
""")


def test_cached_step_uses_less_memory() -> None:
    """Peak resident memory of one step (separate processes): 4 x 1024-wide layers with dropout,
    batch 512 in chunks of 32 against the plain step."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    import os

    env = {**os.environ, **env}
    peaks = {}
    for mode in ("plain", "cached"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True, env=env,
                             check=True)
        peaks[mode] = float(out.stdout.split()[-1])
    assert peaks["cached"] < 0.5 * peaks["plain"], peaks
    print(f"peak memory of one step, batch 512: plain {peaks['plain']:.1f} MiB, cached {peaks['cached']:.1f} MiB")
