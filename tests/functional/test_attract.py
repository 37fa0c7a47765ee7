"""false_negatives="attract" (flagged keys join the positives) and exclude= (a key removed from a
row), on every backend, against a row-by-row float64 oracle written here from the docstring's
formula (independent of fastneg's reference)."""

from __future__ import annotations

import math

import pytest
import torch

import fastneg
from helpers import TRITON_DEVICE

BACKENDS = ["reference", "cpu", "triton", "portable"]


def oracle(q, k, pos, tau, *, labels=None, qlabels=None, margin=None, max_score=None, simans=None, exclude=None,
           attract=True):
    """Per-row loss, in float64, one row at a time with explicit index sets."""
    q, k = q.double(), k.double()
    out = []
    for i in range(q.shape[0]):
        s = [float(q[i] @ k[j]) for j in range(k.shape[0])]
        p = int(pos[i])
        flagged, negatives = [], []
        for j in range(k.shape[0]):
            if j == p or (exclude is not None and j == int(exclude[i])):
                continue
            flag = False
            if labels is not None:
                flag |= int(labels[j]) == int(qlabels[i])
            if margin is not None:
                flag |= s[j] > s[p] - margin
            if max_score is not None:
                flag |= s[j] > max_score
            (flagged if flag else negatives).append(j)
        beta = {j: 0.0 for j in negatives}
        if simans is not None and negatives:
            a, b = simans
            w = {j: math.exp(-a * (s[j] - s[p] - b) ** 2) for j in negatives}
            total = sum(w.values())
            beta = {j: math.log(len(negatives) * w[j] / total) for j in negatives}
        if attract:
            terms = [s[j] / tau for j in [p] + flagged] + [s[j] / tau + beta[j] for j in negatives]
            m = max(terms)
            lse = m + math.log(sum(math.exp(x - m) for x in terms))
            out.append(lse - sum(s[j] / tau for j in [p] + flagged) / (1 + len(flagged)))
        else:
            terms = [s[p] / tau] + [s[j] / tau + beta[j] for j in negatives]
            m = max(terms)
            out.append(m + math.log(sum(math.exp(x - m) for x in terms)) - s[p] / tau)
    return torch.tensor(out, dtype=torch.float64)


def problem(B=7, N=11, D=5, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    k[3] = q[1]  # a planted near-copy of a query
    labels = torch.randint(0, classes, (N,), generator=g)
    pos = torch.randint(0, N, (B,), generator=g)
    qlabels = labels[pos]
    return q, k, pos, labels, qlabels


CASES = {
    "labels": dict(labels=True),
    "margin": dict(margin=0.1),
    "labels+max_score+simans": dict(labels=True, max_score=0.5, simans=(2.0, 0.1)),
    "labels+exclude": dict(labels=True, exclude=True),
    "nothing flagged": dict(),
}


def _kwargs(case, labels, qlabels, B, N, pos):
    kw, ok = {}, dict(case)
    if ok.pop("labels", False):
        kw.update(key_labels=labels, query_labels=qlabels)
    if "margin" in ok:
        kw["margin"] = ok["margin"]
    if "max_score" in ok:
        kw["max_score"] = ok["max_score"]
    if "simans" in ok:
        kw["weighting"] = fastneg.SimANS(*ok["simans"])
    exclude = None
    if ok.get("exclude"):
        exclude = torch.tensor([(int(p) + 1 + i) % N for i, p in enumerate(pos)])
        exclude[0] = -1
        kw["exclude"] = exclude
    return kw, exclude


def _oracle_for(case, q, k, pos, tau, labels, qlabels, exclude, attract=True):
    return oracle(q, k, pos, tau, labels=labels if case.get("labels") else None, qlabels=qlabels,
                  margin=case.get("margin"), max_score=case.get("max_score"), simans=case.get("simans"),
                  exclude=exclude, attract=attract)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_attract_loss_and_gradients_match_the_oracle(backend, case) -> None:
    q, k, pos, labels, qlabels = problem(seed=list(CASES).index(case))
    tau = 0.1
    spec = CASES[case]
    kw, exclude = _kwargs(spec, labels, qlabels, q.shape[0], k.shape[0], pos)
    want = _oracle_for(spec, q, k, pos, tau, labels, qlabels, exclude)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    qq = q.to(device, dtype).requires_grad_()
    kk = k.to(device, dtype).requires_grad_()
    t = torch.tensor(tau, dtype=dtype, device=device, requires_grad=True)
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    loss, stats = fastneg.info_nce(qq, kk, pos.to(device), temperature=t, false_negatives="attract",
                                   reduction="none", return_stats=True, backend=backend, **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double().cpu(), want, rtol=tol, atol=tol)
    # gradients against the oracle's, by autograd on a float64 dense transcription of the same sets
    qr = q.clone().requires_grad_()
    kr = k.clone().requires_grad_()
    tr = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    ref = _dense_attract(qr, kr, pos, tr, spec, labels, qlabels, exclude)
    torch.testing.assert_close(ref.detach(), want, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, q.shape[0], dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (qr, kr, tr))
    grads = torch.autograd.grad((loss * weights.to(device, loss.dtype)).sum(), (qq, kk, t))
    for got, exp in zip(grads, ref_grads):
        scale = float(exp.abs().max()) + 1e-12
        assert float((got.double().cpu() - exp).abs().max()) <= (1e-9 if dtype == torch.float64 else 1e-4) * scale
    excluded = torch.zeros(q.shape[0], dtype=torch.long) if exclude is None else (exclude >= 0).long()
    assert torch.equal(stats.num_masked.cpu() + stats.num_negatives.cpu(), k.shape[0] - 1 - excluded)
    assert torch.equal(stats.num_positives, stats.num_masked + 1)


def _dense_attract(q, k, pos, tau, spec, labels, qlabels, exclude):
    """The same sets as the oracle, as masks over a dense matrix, for autograd's gradients."""
    B, N = q.shape[0], k.shape[0]
    s = q @ k.T
    sd = s.detach()
    is_pos = torch.zeros(B, N, dtype=torch.bool)
    is_pos[torch.arange(B), pos] = True
    excluded = torch.zeros(B, N, dtype=torch.bool)
    if exclude is not None:
        rows = (exclude >= 0).nonzero().flatten()
        excluded[rows, exclude[rows]] = True
    flag = torch.zeros(B, N, dtype=torch.bool)
    sp = sd.gather(1, pos[:, None])
    if spec.get("labels"):
        flag |= labels[None, :] == qlabels[:, None]
    if spec.get("margin") is not None:
        flag |= sd > sp - spec["margin"]
    if spec.get("max_score") is not None:
        flag |= sd > spec["max_score"]
    flag &= ~is_pos & ~excluded
    neg = ~flag & ~is_pos & ~excluded
    beta = torch.zeros(B, N, dtype=torch.float64)
    if spec.get("simans") is not None:
        a, b = spec["simans"]
        logw = torch.where(neg, -a * (sd - sp - b) ** 2, torch.tensor(float("-inf"), dtype=torch.float64))
        off = torch.log(neg.sum(1, keepdim=True).double()) - torch.logsumexp(logw, 1, keepdim=True)
        beta = torch.where(neg, logw + off, torch.zeros_like(beta))
    logits = s / tau
    x = torch.where(neg | flag | is_pos, logits + beta, torch.tensor(float("-inf"), dtype=torch.float64))
    attracted = flag | is_pos
    return torch.logsumexp(x, 1) - torch.where(attracted, logits, torch.zeros_like(logits)).sum(1) / attracted.sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_removes_the_key_from_a_masking_row(backend) -> None:
    q, k, pos, labels, qlabels = problem(B=6, N=9, seed=4)
    exclude = torch.tensor([(int(p) + 2) % 9 for p in pos])
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    got = fastneg.info_nce(q.to(device, dtype), k.to(device, dtype), pos.to(device), temperature=0.2, margin=0.05,
                           exclude=exclude.to(device), reduction="none", backend=backend)
    want = oracle(q, k, pos, 0.2, margin=0.05, exclude=exclude, attract=False)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=2e-5)


def test_supcon_by_attraction_equals_supcontrast() -> None:
    """SupCon's outside form (Khosla et al. 2020; the SupContrast repository's loss, base_temperature =
    temperature) from attraction: every same-label view a positive, the anchor itself excluded."""
    g = torch.Generator().manual_seed(3)
    n, d, tau = 12, 6, 0.07
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4])
    # SupContrast, transcribed: logits over all but self; mean log-prob over same-label others
    logits = z @ z.T / tau
    self_mask = torch.eye(n, dtype=torch.bool)
    positive_mask = (y[:, None] == y[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    want = -(log_prob * positive_mask).sum(1) / positive_mask.sum(1).clamp(min=1)
    # fastneg: one designated positive per row (any same-label other), the rest attracted by label
    designated = torch.tensor([int(positive_mask[i].nonzero()[0]) if positive_mask[i].any() else i for i in range(n)])
    has_pos = positive_mask.any(1)
    for backend in ("reference", "cpu"):
        got = fastneg.info_nce(z, z, designated, temperature=tau, key_labels=y, query_labels=y,
                               exclude=torch.where(has_pos, torch.arange(n), -1), false_negatives="attract",
                               reduction="none", backend=backend)
        torch.testing.assert_close(got[has_pos], want[has_pos], rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got[has_pos].sum(), z)[0]
        g_want = torch.autograd.grad(want[has_pos].sum(), z, retain_graph=True)[0]
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_a_row_whose_only_key_is_its_positive_has_loss_zero() -> None:
    q = torch.randn(1, 4, dtype=torch.float64)
    k = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        loss = fastneg.info_nce(q, k, torch.tensor([0]), false_negatives="attract", backend=backend)
        assert float(loss.detach()) == 0.0
        assert float(torch.autograd.grad(loss, k)[0].abs().max()) == 0.0


@pytest.mark.parametrize("bad, match", [
    (dict(false_negatives="pull"), "false_negatives"),
    (dict(false_negatives="attract", symmetric=True), "symmetric"),
    (dict(false_negatives="attract", debias=0.1), "debias"),
    (dict(false_negatives="attract", weighting=fastneg.HCL(1.0)), "HCL"),
    (dict(false_negatives="attract", negatives=torch.zeros(4, 2, dtype=torch.long)), "negatives"),
    (dict(exclude=torch.zeros(3, dtype=torch.long)), "exclude"),
    (dict(exclude=torch.arange(4)), "exclude"),  # each row's own positive
    (dict(exclude=torch.full((4,), 9)), "exclude"),
    (dict(exclude=torch.zeros(4)), "exclude"),
    (dict(exclude=torch.ones(4, dtype=torch.long), symmetric=True), "exclude"),
])
def test_bad_attract_and_exclude_arguments(bad, match) -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises((ValueError, TypeError), match=match):
        fastneg.info_nce(q, k, **bad)


def test_attract_and_exclude_under_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(16, 8, generator=g), torch.randn(24, 8, generator=g)
    labels, exclude = torch.randint(0, 4, (24,), generator=g), (torch.arange(16) + 1) % 24

    def loss(q, k):  # noqa: ANN001, ANN202
        return fastneg.info_nce(q, k, key_labels=labels, false_negatives="attract", exclude=exclude,
                                weighting=fastneg.SimANS(), backend="cpu")

    leaves = [t.clone().requires_grad_() for t in (q, k, q, k)]
    eager = loss(leaves[0], leaves[1])
    compiled = torch.compile(loss, fullgraph=True)(leaves[2], leaves[3])
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    (eager + compiled).backward()
    for a, b in ((leaves[0], leaves[2]), (leaves[1], leaves[3])):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
