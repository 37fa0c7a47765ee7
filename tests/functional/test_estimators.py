"""HCL's hard-negative reweighting, GCSE's Gaussian-decayed offset and soft-label distillation in
the fused op: each against a transcription of the authors' code on the same inputs (loss and
gradients), and the fused kernels against the dense float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastneg
from helpers import TRITON_DEVICE, build, check, simclr_negatives, two_views

DEVICES = {"reference": "cpu", "cpu": "cpu", "portable": "cpu", "triton": TRITON_DEVICE}


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 3e-5


def _assert_matches(got: torch.Tensor, want: torch.Tensor, grads: tuple, wants: tuple, dtype: torch.dtype) -> None:
    tol = _tolerance(dtype)
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)
    for g, w in zip(grads, wants):
        err = float((g.double().cpu() - w).abs().max())
        assert err <= tol * max(1.0, float(w.abs().max())), err


# --- HCL (Robinson et al. 2021) -------------------------------------------------------------------

def _hcl_original(out_1: torch.Tensor, out_2: torch.Tensor, tau_plus: float, beta: float,
                  temperature: float) -> torch.Tensor:
    """joshr17/HCL, image/main.py `criterion` with estimator='hard', transcribed: the 2B views
    against each other, self and the positive pair removed from the negatives."""
    batch_size = out_1.shape[0]
    neg, pos = simclr_negatives(out_1, out_2, temperature)
    N = batch_size * 2 - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * np.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + Ng))).mean()


def _fastnegtwo_views(a: torch.Tensor, b: torch.Tensor, backend: str, **options) -> tuple:
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = DEVICES[backend]
    y1, y2 = a.to(dev, dtype).requires_grad_(), b.to(dev, dtype).requires_grad_()
    views = torch.cat([y1, y2])
    B2 = views.shape[0]
    positives = ((torch.arange(B2) + B2 // 2) % B2).to(dev)
    ids = torch.arange(B2, device=dev)  # a view's own copy leaves its negatives by label
    got = fastneg.info_nce(views, views, positives, key_labels=ids, query_labels=ids, backend=backend, **options)
    return got, torch.autograd.grad(got, (y1, y2)), dtype


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "portable"])
@pytest.mark.parametrize("tau_plus,beta", [(0.0, 1.0), (0.1, 1.0), (0.1, 0.5), (0.5, 2.0)])
def test_hcl_matches_the_authors_code(backend: str, tau_plus: float, beta: float) -> None:
    a, b = two_views(12, 16, seed=int(beta * 10))
    t = 0.5
    x1, x2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = _hcl_original(x1, x2, tau_plus, beta, t)
    wants = torch.autograd.grad(want, (x1, x2))
    got, grads, dtype = _fastnegtwo_views(a, b, backend, temperature=t, weighting=fastneg.HCL(beta), debias=tau_plus)
    _assert_matches(got, want, grads, wants, dtype)


def test_hcl_without_debias_is_the_reweighted_sum_with_gradient_through_the_weights() -> None:
    """debias=None: no clamp, L = log(e^{l+} + n sum e^{(1+b) l} / sum e^{b l}) - l+, and the
    gradient differs from detached weights (SPEC's Hardness-style constant biases)."""
    a, b = two_views(10, 8, seed=1)
    t, beta = 0.2, 1.5
    x = torch.cat([a, b]).requires_grad_()
    s = x @ x.T / t
    B2 = x.shape[0]
    positives = (torch.arange(B2) + B2 // 2) % B2
    keep = ~torch.eye(B2, dtype=torch.bool)
    keep[torch.arange(B2), positives] = False
    neg = torch.where(keep, s, float("-inf"))
    n = keep.sum(1).double()
    reweighted = torch.log(n) + torch.logsumexp((1 + beta) * neg, 1) - torch.logsumexp(beta * neg, 1)
    l_pos = s[torch.arange(B2), positives]
    want = (torch.logaddexp(l_pos, reweighted) - l_pos).mean()
    (want_grad,) = torch.autograd.grad(want, x, retain_graph=True)
    ids = torch.arange(B2)
    for backend in ("cpu", "reference"):
        y = torch.cat([a, b]).requires_grad_()
        got = fastneg.info_nce(y, y, positives, temperature=t, key_labels=ids, query_labels=ids,
                               weighting=fastneg.HCL(beta), backend=backend)
        (grad,) = torch.autograd.grad(got, y)
        assert abs(float(got.detach()) - float(want.detach())) < 1e-12
        assert float((grad - want_grad).abs().max()) < 1e-12
    # detaching the weights changes the gradient: the test above can tell the two apart
    detached_neg = torch.where(keep, s.detach(), float("-inf"))
    bias = beta * detached_neg + torch.log(n)[:, None] - torch.logsumexp(beta * detached_neg, 1, keepdim=True)
    wrong = (torch.logaddexp(l_pos, torch.logsumexp(neg + bias, 1)) - l_pos).mean()
    (wrong_grad,) = torch.autograd.grad(wrong, x)
    assert float((wrong_grad - want_grad).abs().max()) > 1e-3


HCL_RULES = ["plain", "labels", "margin", "guide_absolute", "all_rules_simans"]


def _hcl_options(rule: str, B: int, N: int, D: int, seed: int) -> tuple:
    problem, options = build(rule, B, N, D, seed=seed, peaked=True)
    options["weighting"] = fastneg.HCL(1.0)  # replaces SimANS in the all-rules set
    return problem, options


@pytest.mark.parametrize("rule", HCL_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hcl_cpu_kernel_matches_reference(rule: str, dtype: torch.dtype) -> None:
    problem, options = _hcl_options(rule, 130, 300, 24, seed=5)
    check(problem, "cpu", dtype, **options)  # with a learned temperature
    check(problem, "cpu", dtype, debias=0.1, **options)


@pytest.mark.parametrize("rule", ["plain", "all_rules_simans"])
def test_hcl_triton_kernel_matches_reference(rule: str) -> None:
    problem, options = _hcl_options(rule, 37, 70, 19, seed=6)
    check(problem, "triton", torch.float32, **options)
    check(problem, "triton", torch.float32, debias=0.1, **options)


# --- GCSE (aleversn/GCSE) -------------------------------------------------------------------------

def _gcse_original(z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor, base_cos_sim: torch.Tensor, temp: float,
                   alpha: float) -> torch.Tensor:
    """aleversn/GCSE, main/models/gcse.py `cl_forward` (num_sent == 3), transcribed: in-batch
    positives z2 and one hard negative z3 per sentence; the hard negative's logit gets the detached
    offset -l exp(-(l - r)^2 / (2 alpha^2)) where l <= r (r: the base model's logit)."""
    sim = lambda x, y: F.cosine_similarity(x, y, dim=-1) / temp  # noqa: E731 (their Similarity module)
    z1_z2_cos = sim(z1.unsqueeze(1), z2.unsqueeze(0))
    z1_z3_cos = sim(z1.unsqueeze(1), z3.unsqueeze(0))
    cos_sim = torch.cat([z1_z2_cos, z1_z3_cos], 1)
    labels = torch.arange(cos_sim.size(0)).long()
    z3_weight = torch.diag(z1_z3_cos).detach()
    neg_labels = torch.diag(base_cos_sim[:, -z1_z3_cos.size(-1):]).detach()
    diff = z3_weight - neg_labels
    z3_weight = torch.where(diff > 0, 0, -z3_weight * torch.exp(-(diff ** 2) / (2 * alpha ** 2)))
    weights = torch.tensor(
        [[0.0] * (cos_sim.size(-1) - z1_z3_cos.size(-1)) + [0.0] * i + [z3_weight[i]]
         + [0.0] * (z1_z3_cos.size(-1) - i - 1) for i in range(z1_z3_cos.size(-1))], dtype=cos_sim.dtype)
    return F.cross_entropy(cos_sim + weights, labels)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "portable"])
def test_gcse_matches_the_authors_code(backend: str) -> None:
    """The original offsets each sentence's own hard negative only: the guide built here gives the
    base model's logit on that column and a logit far above the student's on every other column
    (where the offset is then 0), so fastneg's every-negative offset computes the same loss."""
    B, D, temp, alpha = 10, 12, 0.05, 0.17 * 20
    g = torch.Generator().manual_seed(3)
    z1, z2, z3 = (F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    z3 = F.normalize(z1 + 0.7 * z3, dim=-1)  # hard negatives: close to their sentence
    base_q = F.normalize(z1 + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    base_k = F.normalize(torch.cat([z2, z3]) + 0.3 * torch.randn(2 * B, D, generator=g, dtype=torch.float64), dim=-1)
    half = B // 2  # the base model scores these hard negatives above the student: offset active
    base_k[B:B + half] = F.normalize(base_q[:half] + 0.05 * base_k[B:B + half], dim=-1)
    base_cos_sim = base_q @ base_k.T / temp  # the base (reference) model's logits
    x1, x2, x3 = (z.clone().requires_grad_() for z in (z1, z2, z3))
    want = _gcse_original(x1, x2, x3, base_cos_sim, temp, alpha)
    wants = torch.autograd.grad(want, (x1, x2, x3))
    # guide scores t_ij = gq_i . gk_j: the base model's cosine on column B + i, about -30 elsewhere
    # (a reference logit far below the student's: offset exactly 0)
    big, f64 = 30.0, dict(dtype=torch.float64)  # t = base - 30: logit -580, far below any student logit
    guide_query = torch.cat([base_q, torch.ones(B, 1, **f64), torch.eye(B, **f64)], 1)
    guide_keys = torch.cat([
        torch.cat([torch.zeros(B, D, **f64), -big * torch.ones(B, 1, **f64), torch.zeros(B, B, **f64)], 1),
        torch.cat([base_k[B:], -big * torch.ones(B, 1, **f64), big * torch.eye(B, **f64)], 1),
    ])
    t = guide_query @ guide_keys.T
    diagonal = (torch.arange(B), B + torch.arange(B))
    assert torch.allclose(t[diagonal], base_cos_sim[diagonal] * temp)
    off = torch.ones(B, 2 * B, dtype=torch.bool)
    off[torch.arange(B), B + torch.arange(B)] = False
    assert bool((t[off] < -28).all())
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = DEVICES[backend]
    y1, y2, y3 = (z.to(dev, dtype).requires_grad_() for z in (z1, z2, z3))
    got = fastneg.info_nce(y1, torch.cat([y2, y3]), temperature=temp, guide_query=guide_query.to(dev, dtype),
                           guide_keys=guide_keys.to(dev, dtype), guide_margin=None, weighting=fastneg.GCSE(alpha),
                           backend=backend)
    grads = torch.autograd.grad(got, (y1, y2, y3))
    # the transcription differentiates through cosine normalisation; inputs are unit vectors, so
    # compare the gradients' tangent parts
    def tangent(gr: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gr - (gr * z).sum(-1, keepdim=True) * z
    _assert_matches(got, want, tuple(tangent(gr.double().cpu(), z) for gr, z in zip(grads, (z1, z2, z3))),
                    tuple(tangent(w, z) for w, z in zip(wants, (z1, z2, z3))), dtype)
    # the offsets are not all zero: some hard negatives sit below the base model's logit
    student = (z1 * z3).sum(-1) / temp
    assert bool((student <= base_cos_sim[diagonal]).any()) and bool((student > base_cos_sim[diagonal]).any())


def _gcse_options(rule: str, B: int, N: int, D: int, seed: int) -> tuple:
    problem, options = build(rule, B, N, D, seed=seed, peaked=True)
    if "guide_query" not in problem.extra:
        problem, options = build("guide_absolute", B, N, D, seed=seed, peaked=True)
        options["guide_margin"] = None  # the reference model only offsets
    options["weighting"] = fastneg.GCSE(2.0)
    return problem, options


@pytest.mark.parametrize("rule", ["plain", "guide_absolute", "all_rules_simans"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gcse_cpu_kernel_matches_reference(rule: str, dtype: torch.dtype) -> None:
    problem, options = _gcse_options(rule, 130, 300, 24, seed=7)
    check(problem, "cpu", dtype, **options)


def test_gcse_triton_kernel_matches_reference() -> None:
    problem, options = _gcse_options("all_rules_simans", 37, 70, 19, seed=8)
    check(problem, "triton", torch.float32, **options)


def test_gcse_symmetric_matches_reference() -> None:
    problem, options = _gcse_options("plain", 40, 90, 16, seed=9)
    problem.positives = torch.randperm(90, generator=torch.Generator().manual_seed(0))[:40]
    check(problem, "cpu", torch.float64, symmetric=True, **options)


# --- soft labels (teacher distillation) -----------------------------------------------------------

def _ar2_normal_loss(retriever_simila: torch.Tensor, relevance_logits: torch.Tensor,
                     temperature_normal: float) -> torch.Tensor:
    """microsoft/AR2, wiki/co_training_wiki_train.py, the retriever's `normal_loss` transcribed: the
    ranker's softmax (at temperature_normal) as soft labels over each query's candidates."""
    eps = 1e-7
    retriever_dist_p = F.softmax(retriever_simila, dim=1)
    reranker_dist_p = F.softmax(relevance_logits / temperature_normal, dim=1)
    normal_loss = -reranker_dist_p * torch.log(retriever_dist_p + eps)
    return normal_loss.sum() / retriever_dist_p.size(0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "portable"])
def test_soft_labels_match_ar2(backend: str) -> None:
    """AR2's per-query candidate lists (positive first, then hard negatives), student logits
    q . c (temperature 1), teacher logits from a ranker. fastneg runs one query at a time with the
    ranker's logits as 1-dimensional guide scores; its KL plus the teacher's entropy is AR2's
    cross-entropy (their eps = 1e-7 inside the log is the only difference)."""
    B, C, D, tn = 4, 6, 8, 2.0
    g = torch.Generator().manual_seed(11)
    q = 0.6 * torch.randn(B, D, generator=g, dtype=torch.float64)
    ctx = 0.6 * torch.randn(B, C, D, generator=g, dtype=torch.float64)
    relevance = 3.0 * torch.randn(B, C, generator=g, dtype=torch.float64)
    xq, xc = q.clone().requires_grad_(), ctx.clone().requires_grad_()
    want = _ar2_normal_loss(torch.einsum("bh,bdh->bd", xq, xc), relevance, tn)
    wants = torch.autograd.grad(want, (xq, xc))
    p = F.softmax(relevance / tn, dim=1)
    entropy = float(-(p * p.log()).sum() / B)
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = DEVICES[backend]
    yq, yc = q.to(dev, dtype).requires_grad_(), ctx.to(dev, dtype).requires_grad_()
    total = 0
    for i in range(B):
        total = total + fastneg.info_nce(
            yq[i:i + 1], yc[i], torch.zeros(1, dtype=torch.long, device=dev), temperature=1.0,
            guide_query=torch.ones(1, 1, dtype=dtype, device=dev), guide_keys=relevance[i, :, None].to(dev, dtype),
            guide_margin=None, soft_labels=fastneg.SoftLabels(temperature=tn), backend=backend)
    got = total / B
    grads = torch.autograd.grad(got, (yq, yc))
    tol = max(_tolerance(dtype), 1e-6)  # AR2's eps
    got, want = got.detach(), want.detach()
    assert abs(float(got) + entropy - float(want)) <= tol * max(1.0, abs(float(want)))
    for gr, w in zip(grads, wants):
        assert float((gr.double().cpu() - w).abs().max()) <= tol * max(1.0, float(w.abs().max()))


def test_soft_labels_are_kl_with_in_batch_keys_and_mix_with_cross_entropy() -> None:
    """In-batch: the full key set, a mask rule and SimANS weights; loss = (1 - w) CE + w KL over the
    positive and unmasked negatives, written densely with torch.nn.functional."""
    problem, options = build("guide_absolute", 20, 50, 8, seed=12, peaked=True)
    q, k = problem.query.clone().requires_grad_(), problem.keys.clone().requires_grad_()
    gq, gk = problem.extra["guide_query"], problem.extra["guide_keys"]
    t, tt, w = 0.1, 0.05, 0.3
    s = q @ k.T
    pos = problem.positives
    keep = s.detach() <= s.detach().gather(1, pos[:, None]) - 0.05  # margin=0.05 masks the rest
    keep[torch.arange(20), pos] = True
    student = torch.where(keep, s / t, float("-inf"))
    teacher = torch.where(keep, gq @ gk.T / tt, float("-inf"))
    log_q = torch.where(keep, F.log_softmax(student, 1), 0.0)
    log_p = torch.where(keep, F.log_softmax(teacher, 1), 0.0)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    ce = F.cross_entropy(student, pos, reduction="none")
    want = ((1 - w) * ce + w * kl).mean()
    wants = torch.autograd.grad(want, (q, k))
    for backend in ("cpu", "reference"):
        x, y = problem.query.clone().requires_grad_(), problem.keys.clone().requires_grad_()
        got = fastneg.info_nce(x, y, pos, temperature=t, margin=0.05, guide_query=gq, guide_keys=gk, guide_margin=None,
                               soft_labels=fastneg.SoftLabels(temperature=tt, weight=w), backend=backend)
        grads = torch.autograd.grad(got, (x, y))
        _assert_matches(got, want, grads, wants, torch.float64)


SOFT_RULES = ["guide_absolute", "all_rules_simans"]


@pytest.mark.parametrize("rule", SOFT_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_soft_labels_cpu_kernel_matches_reference(rule: str, dtype: torch.dtype, weight: float) -> None:
    problem, options = build(rule, 130, 300, 24, seed=13, peaked=True)
    check(problem, "cpu", dtype, soft_labels=fastneg.SoftLabels(temperature=0.1, weight=weight), **options)


@pytest.mark.parametrize("rule", SOFT_RULES)
def test_soft_labels_triton_kernel_matches_reference(rule: str) -> None:
    problem, options = build(rule, 37, 70, 19, seed=14, peaked=True)
    check(problem, "triton", torch.float32, soft_labels=fastneg.SoftLabels(temperature=0.1, weight=0.7), **options)


# --- edge cases and bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference", "portable"])
def test_fully_masked_rows_stay_zero(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_()
    gq, gk = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    labels = torch.zeros(8, dtype=torch.long)
    for options in (dict(weighting=fastneg.HCL(1.0)), dict(weighting=fastneg.HCL(1.0), debias=0.1),
                    dict(weighting=fastneg.GCSE(1.0), guide_query=gq, guide_keys=gk, guide_margin=None),
                    dict(soft_labels=fastneg.SoftLabels(0.1, 0.5), guide_query=gq, guide_keys=gk)):
        q.grad = None
        loss = fastneg.info_nce(q, k, key_labels=labels, reduction="none", backend=backend, **options)
        loss.sum().backward()
        assert torch.equal(loss.detach(), torch.zeros(8)), options
        assert not bool(q.grad.abs().any()), options


def test_nan_key_reaches_every_row() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    k[7, 0] = float("nan")
    gq, gk = torch.randn(6, 3, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    for options in (dict(weighting=fastneg.HCL(1.0)), dict(soft_labels=fastneg.SoftLabels(), guide_query=gq,
                                                            guide_keys=gk, guide_margin=None)):
        got = fastneg.info_nce(q, k, reduction="none", backend="cpu", **options)
        ref = fastneg.info_nce(q, k, reduction="none", backend="reference", **options)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(got).all()), options


def test_bad_input() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    gq, gk = torch.randn(4, 2), torch.randn(6, 2)
    with pytest.raises(TypeError, match="HCL.beta"):
        fastneg.HCL("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="GCSE.alpha"):
        fastneg.GCSE(0.0)
    with pytest.raises(ValueError, match="SoftLabels.weight"):
        fastneg.SoftLabels(weight=1.5)
    with pytest.raises(ValueError, match="SoftLabels.temperature"):
        fastneg.SoftLabels(temperature=-1.0)
    with pytest.raises(ValueError, match="GCSE needs guide_query"):
        fastneg.info_nce(q, k, weighting=fastneg.GCSE())
    with pytest.raises(ValueError, match="soft_labels needs guide_query"):
        fastneg.info_nce(q, k, soft_labels=fastneg.SoftLabels())
    with pytest.raises(TypeError, match="soft_labels must be"):
        fastneg.info_nce(q, k, guide_query=gq, guide_keys=gk, soft_labels=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="HCL cannot be combined with symmetric"):
        fastneg.info_nce(q, k, weighting=fastneg.HCL(), symmetric=True)
    for bad in (dict(symmetric=True), dict(debias=0.1), dict(weighting=fastneg.HCL())):
        with pytest.raises(ValueError, match="soft_labels cannot be combined"):
            fastneg.info_nce(q, k, guide_query=gq, guide_keys=gk, soft_labels=fastneg.SoftLabels(), **bad)


def test_soft_label_temperature_defaults_to_the_loss_temperature() -> None:
    problem, _ = build("guide_absolute", 10, 20, 6, seed=2)
    gq, gk = problem.extra["guide_query"], problem.extra["guide_keys"]
    a = fastneg.info_nce(problem.query, problem.keys, temperature=0.2, guide_query=gq, guide_keys=gk,
                         soft_labels=fastneg.SoftLabels())
    b = fastneg.info_nce(problem.query, problem.keys, temperature=0.2, guide_query=gq, guide_keys=gk,
                         soft_labels=fastneg.SoftLabels(temperature=0.2))
    c = fastneg.info_nce(problem.query, problem.keys, temperature=0.2, guide_query=gq, guide_keys=gk,
                         soft_labels=fastneg.SoftLabels(temperature=0.5))
    assert float(a) == float(b) and not math.isclose(float(a), float(c))


ESTIMATORS = {
    "hcl": lambda p: dict(weighting=fastneg.HCL(1.0)),
    "hcl_debias": lambda p: dict(weighting=fastneg.HCL(0.5), debias=0.2),
    "gcse": lambda p: dict(weighting=fastneg.GCSE(2.0), guide_margin=None),
    "soft": lambda p: dict(soft_labels=fastneg.SoftLabels(0.1, 0.6)),
}


def _with_guide(problem):
    g = torch.Generator().manual_seed(99)
    B, N = problem.query.shape[0], problem.keys.shape[0]
    dg = min(problem.query.shape[1], 4)
    problem.extra.setdefault("guide_query", F.normalize(
        problem.query[:, :dg] + 0.1 * torch.randn(B, dg, generator=g, dtype=torch.float64), dim=-1))
    problem.extra.setdefault("guide_keys", F.normalize(
        problem.keys[:, :dg] + 0.1 * torch.randn(N, dg, generator=g, dtype=torch.float64), dim=-1))
    return problem


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (70, 70, 33), (200, 260, 16)])
def test_ragged_shapes_cpu(estimator: str, shape: tuple) -> None:
    problem = _with_guide(build("plain", *shape, seed=sum(shape), peaked=True)[0])
    check(problem, "cpu", torch.float64, **ESTIMATORS[estimator](problem))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_cpu(estimator: str, dtype: torch.dtype) -> None:
    problem = _with_guide(build("labels", 64, 150, 16, seed=21, peaked=True)[0])
    check(problem, "cpu", dtype, **ESTIMATORS[estimator](problem))


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_float16_triton(estimator: str) -> None:
    problem = _with_guide(build("labels", 37, 70, 19, seed=22, peaked=True)[0])
    check(problem, "triton", torch.float16, **ESTIMATORS[estimator](problem))
