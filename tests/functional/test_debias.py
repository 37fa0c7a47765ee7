"""DCL's debiased estimator (Chuang et al. 2020), ``info_nce(..., debias=tau_plus)``: against a
transcription of the authors' code, and the fused kernels against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch

import fastneg
from helpers import TRITON_DEVICE, build, check, simclr_negatives, two_views

DEVICES = {"reference": "cpu", "cpu": "cpu", "portable": "cpu", "triton": TRITON_DEVICE}


def _dcl_original(out_1: torch.Tensor, out_2: torch.Tensor, tau_plus: float, temperature: float) -> torch.Tensor:
    """chingyaoc/DCL, main.py `criterion` (the "easy" estimator of joshr17/HCL), transcribed:
    the 2B views against each other, self and the positive pair removed from the negatives."""
    batch_size = out_1.shape[0]
    neg, pos = simclr_negatives(out_1, out_2, temperature)
    N = batch_size * 2 - 2
    Ng = (-tau_plus * N * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * math.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + Ng))).mean()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "portable"])
@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.5])
def test_matches_the_authors_code(backend: str, tau_plus: float) -> None:
    a, b = two_views(12, 16, seed=int(tau_plus * 10))
    t = 0.5
    x1, x2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = _dcl_original(x1, x2, tau_plus, t)
    w1, w2 = torch.autograd.grad(want, (x1, x2))
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = DEVICES[backend]
    y1, y2 = a.to(dev, dtype).requires_grad_(), b.to(dev, dtype).requires_grad_()
    views = torch.cat([y1, y2])
    positives = ((torch.arange(24) + 12) % 24).to(dev)
    ids = torch.arange(24, device=dev)  # a view's own copy is removed from its negatives by label
    got = fastneg.info_nce(views, views, positives, temperature=t, key_labels=ids, query_labels=ids, debias=tau_plus,
                           backend=backend)
    g1, g2 = torch.autograd.grad(got, (y1, y2))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(float(got.detach()) - float(want)) <= tol * max(1.0, abs(float(want)))
    for g, w in ((g1, w1), (g2, w2)):
        assert float((g.double().cpu() - w).abs().max()) <= tol * max(1.0, float(w.abs().max()))


def test_both_branches_of_the_clamp_are_exercised() -> None:
    a, b = two_views(12, 16, seed=5)
    t, tau_plus = 0.5, 0.5
    out = torch.cat([a, b])
    s = out @ out.T / t
    pos = torch.cat([(a * b).sum(-1), (a * b).sum(-1)]) / t
    keep = ~torch.eye(24, dtype=torch.bool)
    keep[torch.arange(24), (torch.arange(24) + 12) % 24] = False
    raw = (torch.where(keep, s.exp(), 0).sum(1) - 22 * tau_plus * pos.exp()) / (1 - tau_plus)
    floor = 22 * math.exp(-1 / t)
    assert bool((raw < floor).any()) and bool((raw >= floor).any())


RULES = ["plain", "labels", "margin", "simans", "hardness", "all_rules_simans"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_matches_reference(rule: str, dtype: torch.dtype) -> None:
    problem, options = build(rule, 130, 300, 24, seed=3, peaked=True)
    check(problem, "cpu", dtype, debias=0.1, **options)


@pytest.mark.parametrize("rule", ["plain", "labels", "all_rules_simans"])
def test_triton_kernel_matches_reference(rule: str) -> None:
    problem, options = build(rule, 37, 70, 19, seed=4, peaked=True)
    check(problem, "triton", torch.float32, debias=0.1, **options)


def test_fully_masked_rows_stay_zero() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_()
    loss = fastneg.info_nce(q, k, key_labels=torch.zeros(8, dtype=torch.long), debias=0.2, reduction="none")
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(8)) and not bool(q.grad.abs().any())


def test_bad_input() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    for value in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="debias"):
            fastneg.info_nce(q, k, debias=value)
    with pytest.raises(ValueError, match="symmetric"):
        fastneg.info_nce(q, k, debias=0.1, symmetric=True)
    with pytest.raises(ValueError, match="learned temperature"):
        fastneg.info_nce(q, k, debias=0.1, temperature=torch.tensor(0.1, requires_grad=True))
