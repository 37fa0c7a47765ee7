"""Regression tests for defects found by randomized differential testing (one test or more per
defect, each with the smallest input that showed it and a value derived by hand)."""

from __future__ import annotations

import math

import pytest
import torch

import fastneg
from helpers import TRITON_DEVICE

BACKENDS = ["cpu", "reference", "triton", "portable"]


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


@pytest.mark.parametrize("kernels", ["default", "generic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gcse_with_a_reference_equal_to_the_student(backend: str, kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen copy of the student as GCSE's reference: every gap l - r is exactly 0, so every
    negative gets the full offset -l and its biased logit is 0: L_i = log(e^{l+} + n) - l+.
    (The AVX2 build once contracted l - r into a fused multiply-add: 23.86 instead of 6.17.)"""
    if kernels == "generic":
        if backend != "cpu":
            pytest.skip("the generic build is the CPU backend's")
        monkeypatch.setenv("FASTNEG_CPU_KERNELS", "generic")
    dev = _device(backend)
    q, k = _unit(4, 3, seed=1).to(dev), _unit(6, 3, seed=2).to(dev)
    t = 0.05
    loss = fastneg.info_nce(q, k, temperature=t, weighting=fastneg.GCSE(0.5), guide_query=q, guide_keys=k,
                            guide_margin=None, reduction="none", backend=backend)
    l_pos = (q.double() * k[:4].double()).sum(1) / t
    expected = torch.log(torch.exp(l_pos) + 5.0) - l_pos
    torch.testing.assert_close(loss.double().cpu(), expected.cpu(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "portable"])
def test_gcse_with_a_reference_equal_to_strided_student_embeddings(backend: str, dtype: torch.dtype,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with a strided query and column-major keys beside contiguous copies as the reference:
    the scores and the reference's scores must still round alike. The portable backend in chunks of
    one row once computed them from differently laid-out operands (a matrix-vector product whose
    rounding depends on the layout), and the tie s <= t went the other way for some keys."""
    monkeypatch.setenv("FASTNEG_PORTABLE_MEMORY_MB", "1e-6")  # chunks of one row
    wide = _unit(5, 12, seed=2, dtype=dtype)[:, ::2]  # a strided [5, 6] query
    keys = _unit(15, 6, seed=1002, dtype=dtype).T.contiguous().T  # column-major keys
    t = 0.05
    loss = fastneg.info_nce(wide, keys, temperature=t, weighting=fastneg.GCSE(0.17), guide_query=wide.contiguous(),
                            guide_keys=keys.contiguous(), guide_margin=None, reduction="none", backend=backend)
    l_pos = (wide.double() * keys[:5].double()).sum(1) / t
    expected = torch.log(torch.exp(l_pos) + 14.0) - l_pos
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negatives_with_zero_columns_is_the_positive_alone(backend: str) -> None:
    dev = _device(backend)
    q, k = _unit(4, 3, seed=3).to(dev).requires_grad_(), _unit(6, 3, seed=4).to(dev).requires_grad_()
    loss, stats = fastneg.info_nce(q, k, negatives=torch.empty(4, 0, dtype=torch.long, device=dev), reduction="none",
                                   return_stats=True, backend=backend)
    assert torch.equal(loss.detach().cpu(), torch.zeros(4))
    torch.testing.assert_close(stats.logsumexp, stats.positive_logit)
    assert torch.equal(stats.num_negatives.cpu(), torch.zeros(4, dtype=torch.long))
    loss.sum().backward()
    assert bool((q.grad == 0).all()) and bool((k.grad == 0).all())


@pytest.mark.parametrize("path", ["fused", "negatives", "reference"])
def test_debias_without_negatives_and_a_very_low_positive_logit(path: str) -> None:
    """Every negative masked and l+ = -200 < -1/t - 88: the floor n e^{-1/t - c} was 0 * inf = NaN
    on the negatives= path and the reference; SPEC says loss 0, gradient 0."""
    q = (-10.0 * torch.eye(3, 4)).requires_grad_()
    k = torch.eye(3, 4).requires_grad_()
    kw: dict = dict(temperature=0.05, debias=0.1, key_labels=torch.zeros(3, dtype=torch.long), reduction="none")
    if path == "negatives":
        kw["negatives"] = torch.tensor([[1, 2], [0, 2], [0, 1]])
    loss = fastneg.info_nce(q, k, backend="reference" if path == "reference" else "cpu", **kw)
    assert torch.equal(loss.detach(), torch.zeros(3))
    loss.sum().backward()
    assert bool((q.grad == 0).all()) and bool((k.grad == 0).all())


@pytest.mark.parametrize("path", ["fused", "negatives", "reference"])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_scalar_temperature_of_any_shape_gives_per_row_outputs(path: str, shape: tuple) -> None:
    q, k = _unit(4, 5, seed=5), _unit(7, 5, seed=6)
    t = torch.full(shape, 0.05)
    kw: dict = dict(temperature=t, debias=0.1, reduction="none", return_stats=True)
    if path == "negatives":
        kw["negatives"] = torch.tensor([[4, 5, 6]] * 4)
    loss, stats = fastneg.info_nce(q, k, backend="reference" if path == "reference" else "cpu", **kw)
    assert loss.shape == (4,)
    assert all(v.shape == (4,) for v in stats[:5])
    plain, _ = fastneg.info_nce(q, k, **{**kw, "temperature": 0.05}, backend="reference" if path == "reference" else "cpu")
    torch.testing.assert_close(loss, plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_carry_no_gradient(backend: str) -> None:
    dev = _device(backend)
    q = _unit(5, 4, seed=7).to(dev).requires_grad_()
    t = torch.tensor(0.1, device=dev, requires_grad=True)
    for negatives in (None, torch.tensor([[0, 1, 2]] * 5, device=dev)):
        _, stats = fastneg.info_nce(q, _unit(6, 4, seed=8).to(dev), temperature=t, negatives=negatives,
                                    return_stats=True, backend=backend)
        assert not stats.logsumexp.requires_grad and not stats.positive_logit.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_negatives_path_computes_half_inputs_in_float32(dtype: torch.dtype) -> None:
    """With every key listed, negatives= is the full loss: same dtype (float32) and, computed in
    float32 from the same half inputs, the same value as the fused kernel to float32 rounding."""
    q, k = _unit(6, 16, seed=9, dtype=dtype), _unit(10, 16, seed=10, dtype=dtype)
    every = torch.arange(10).repeat(6, 1)
    listed = fastneg.info_nce(q, k, negatives=every, reduction="none", backend="cpu")
    fused = fastneg.info_nce(q, k, reduction="none", backend="cpu")
    assert listed.dtype == fused.dtype == torch.float32
    torch.testing.assert_close(listed, fused, rtol=1e-5, atol=1e-5)
    exact = fastneg.info_nce(q.double(), k.double(), reduction="none", backend="reference")
    assert float((listed.double() - exact).abs().max()) < 1e-4  # half-precision products would be ~1e-2 off


def test_float64_temperature_does_not_promote_the_loss() -> None:
    q, k = _unit(3, 4, seed=11), _unit(5, 4, seed=12)
    t = torch.tensor(0.05, dtype=torch.float64)
    for negatives in (None, torch.tensor([[3, 4]] * 3)):
        assert fastneg.info_nce(q, k, temperature=t, negatives=negatives).dtype == torch.float32


def test_exact_duplicates_are_masked_exactly_by_label() -> None:
    """The case where the tile products round an exact copy of the positive key differently on
    some rows (float64, 64 x 16, k[5] = k[0], every positive 0): what is guaranteed is that a label
    masks it on every row, and that the positive itself is never masked."""
    q = _unit(64, 16, seed=13, dtype=torch.float64)
    k = _unit(16, 16, seed=14, dtype=torch.float64)
    k[5] = k[0]
    positives = torch.zeros(64, dtype=torch.long)
    labels = torch.arange(16)
    labels[5] = 0  # the copy shares the positive's label
    for backend in ("cpu", "reference"):
        _, stats = fastneg.info_nce(q, k, positives, key_labels=labels, margin=0.0, return_stats=True,
                                    reduction="none", backend=backend)
        # the copy masked by its label on every row; the other keys by margin 0 where they outscore
        # the positive, which at margin 0 is exactly what the float64 scores say
        s = q @ k.T
        expected = 1 + ((s > s[:, :1]) & (torch.arange(16) != 5) & (torch.arange(16) != 0)).sum(1)
        assert torch.equal(stats.num_masked, expected)


def test_triton_sampler_refuses_float64_up_front() -> None:
    q, k = _unit(4, 8, seed=15, dtype=torch.float64), _unit(9, 8, seed=16, dtype=torch.float64)
    if torch.cuda.is_available():
        pytest.skip("float64 on CUDA is refused earlier, for every op")
    with pytest.raises(TypeError, match="query"):
        fastneg.sample_negatives(q, k, torch.arange(4), 2, strategy="top", backend="triton")


def test_hcl_gradient_precision_is_within_the_documented_bound() -> None:
    """HCL's dS = (1 + beta) P - beta R softmax(beta l) is a difference of two softmax terms: where
    one negative (here an unmasked exact copy of the positive) dominates, float32 keeps about
    1 / (1 + 2 beta) of the relative precision of plain PyTorch's autograd of the same loss.
    The bound documented in HCL's docstring: at most (1 + 2 beta) x 2 x plain PyTorch's error,
    relative to the size of the gradient's terms."""
    beta, t = 3.0, 0.005
    q = _unit(16, 8, seed=17, dtype=torch.float64)
    k = _unit(40, 8, seed=18, dtype=torch.float64)
    k[20], k[21] = k[3], k[0]

    def grad(dtype: torch.dtype, backend: str) -> torch.Tensor:
        qq = q.to(dtype).detach().clone().requires_grad_()
        fastneg.info_nce(qq, k.to(dtype), temperature=t, weighting=fastneg.HCL(beta), debias=0.0, reduction="sum",
                         backend=backend).backward()
        return qq.grad.double()

    truth = grad(torch.float64, "reference")
    plain = float((grad(torch.float32, "reference") - truth).abs().max())
    fused = float((grad(torch.float32, "cpu") - truth).abs().max())
    scale = float(truth.abs().max())
    assert fused <= (1 + 2 * beta) * 2 * plain + 1e-6 * scale, (fused, plain)
    assert math.isfinite(fused)


@pytest.mark.parametrize("backend", ["cpu", "triton", "portable"])
def test_soft_labels_with_peaked_simans_weights(backend: str) -> None:
    """SimANS at a = 3000 gives log-weights of -1e3 and a row offset of +1e3: the KL once summed
    p_j (t'_j - l_j - u_j) and subtracted offset (1 - p+), two large terms whose difference is the
    answer (float32 error 1e-3, 1000x dense float32's; a negative KL). The log-weights are now kept
    relative to their running maximum. Bound: 40x dense float32's error (what remains is the
    rounding of logsumexps of size |t / T| = 50), and the KL never negative."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    positives = torch.randperm(8, generator=g)[:8]
    query = torch.nn.functional.normalize(keys[positives] + 0.3 * torch.randn(8, 6, generator=g, dtype=torch.float64),
                                          dim=1)
    guide = torch.nn.functional.normalize(query + 0.2 * torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    kw = dict(temperature=0.05, weighting=fastneg.SimANS(3000.0, 0.0), soft_labels=fastneg.SoftLabels(0.02, 1.0),
              margin=0.05, reduction="none")

    def run(dtype: torch.dtype, be: str, device: str = "cpu") -> torch.Tensor:
        return fastneg.info_nce(query.to(device, dtype), keys.to(device, dtype), positives.to(device),
                                guide_query=guide.to(device, dtype), guide_keys=keys.to(device, dtype), backend=be,
                                **kw).double().cpu()

    truth = run(torch.float64, "reference")
    plain = float((run(torch.float32, "reference") - truth).abs().max())
    got = run(torch.float32, backend, dev)
    assert float((got - truth).abs().max()) <= 40 * plain + 1e-6
    assert bool((got >= 0).all())


def _hcl_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """The HCL cases where float32 lost digits (the search of benchmarks/precision_cases.py), in
    float64; the scores and (at temperature 2^-8) the logits are exact in float32, so that only the
    loss's own arithmetic can differ from the float64 truth."""
    g = torch.Generator().manual_seed(len(name))
    if name == "duplicates_d1":  # B = N = 4, D = 1: every score is +-1, ties with the positive, labels, DCL
        k = torch.tensor([[1.0], [-1.0], [1.0], [1.0]], dtype=torch.float64)
        q = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64)
        kw = dict(temperature=torch.tensor(0.005), weighting=fastneg.HCL(1.0), debias=0.5, relative_margin=0.0,
                  query_labels=torch.tensor([0, 1, 2, 0]), key_labels=torch.tensor([0, 1, 3, 3]))
        return q, k, torch.arange(4), kw, torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    k = torch.nn.functional.normalize(torch.randn(16, 5, generator=g, dtype=torch.float64), dim=1)
    pos = torch.tensor([11, 14])
    q = torch.nn.functional.normalize(k[pos] + 0.01 * torch.randn(2, 5, generator=g, dtype=torch.float64), dim=1)
    k[15] = k[11]  # an unmasked exact copy of row 0's positive: it dominates its row
    q, k = q.float().double(), k.float().double()
    if name == "copy_beta3":
        kw = dict(temperature=torch.tensor(2.0 ** -8), weighting=fastneg.HCL(3.0), debias=0.0)
    elif name == "copy_dcl":
        kw = dict(temperature=torch.tensor(2.0 ** -8), weighting=fastneg.HCL(1.0), debias=0.1)
    else:  # "copy_negative_beta": importance weights against the smallest negative logit
        kw = dict(temperature=torch.tensor(2.0 ** -5), weighting=fastneg.HCL(-0.5), debias=0.1)
    return q, k, pos, kw, torch.tensor([1.0, 0.7], dtype=torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "triton", "portable"])
@pytest.mark.parametrize("name", ["duplicates_d1", "copy_beta3", "copy_dcl", "copy_negative_beta"])
def test_hcl_float32_gradients_as_precise_as_the_dense_loss(name: str, backend: str) -> None:
    """HCL with and without DCL in float32: dS = (1 + beta) P - beta R softmax(beta l) was computed
    from exponents of size (1 + beta) |l| (800 at temperature 0.005) rounded apart, so a row that one
    negative dominates lost up to 5e-5 of the gradient's scale (900x the dense float32 loss's error
    in the first case, 1e-4 in the second). Now every exponent is relative to a reference negative's
    score: the error stays within a few times the dense float32 loss's, relative to the gradient's
    scale."""
    q, k, pos, kw, w = _hcl_case(name)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"

    def run(dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
        qq = q.to(dev, dtype).detach().clone().requires_grad_()
        kk = k.to(dev, dtype).detach().clone()
        kk = (torch.cat([kk, kk], dim=1)[:, ::2] if name == "duplicates_d1" else kk).detach().requires_grad_()
        args = {key: (v.to(dev, dtype) if key == "temperature" else v.to(dev) if isinstance(v, torch.Tensor) else v)
                for key, v in kw.items()}
        loss = fastneg.info_nce(qq, kk, pos.to(dev), reduction="none", backend=backend, **args)
        (loss * w.to(dev, dtype)).sum().backward()
        return [loss.detach().double().cpu(), qq.grad.double().cpu(), kk.grad.double().cpu()]

    truth, dense, fused = run(torch.float64, "reference"), run(torch.float32, "reference"), run(torch.float32, backend)
    scale = max(float(truth[1].abs().max()), float(truth[2].abs().max()), 1.0)
    for what, t, d, f in zip(("loss", "dq", "dk"), truth, dense, fused):
        size = max(float(t.abs().max()), 1.0) if what == "loss" else scale
        err, plain = float((f - t).abs().max()), float((d - t).abs().max())
        assert math.isfinite(err)
        assert err <= 4 * plain + 4e-7 * size, (what, err, plain, size)


@pytest.mark.parametrize("backend", ["cpu", "portable"])
def test_listed_negatives_bfloat16_key_gradient_rounded_once(backend: str) -> None:
    """With ``negatives=``, a key listed by several rows gets its gradient summed over them: in float32
    and rounded to bfloat16 once. It was rounded to bfloat16 at each listing and summed in bfloat16
    (-1.375 here where the float64 value is -1.2775; found by the long property profile)."""
    q = torch.tensor([[-1.0], [1.0], [1.0], [-1.0], [-1.0], [-1.0], [1.0], [-1.0]])
    k = torch.tensor([[1.0], [-1.0], [-1.0]])
    positives = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2])
    negatives = torch.tensor([[1], [-1], [1], [2], [2], [0], [2], [2]])
    w = torch.tensor([1.2579, 0.6139, 1.2440, 1.2068, 1.2945, 1.1953, 0.9236, 0.6344], dtype=torch.float64)

    def key_grad(dtype: torch.dtype) -> torch.Tensor:
        qq, kk = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
        loss = fastneg.info_nce(qq, kk, positives, temperature=0.02, negatives=negatives, reduction="none",
                                backend=backend)
        (loss * w.to(loss.dtype)).sum().backward()
        return kk.grad

    truth = key_grad(torch.float64)
    got = key_grad(torch.bfloat16)
    assert torch.equal(got, truth.to(torch.bfloat16)), (got, truth)
