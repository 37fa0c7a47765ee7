"""Every backend against the dense reference in float64 (SPEC sections 2-4).

The ground truth is computed in float64 from the inputs already rounded to the tested dtype,
so only the arithmetic of the backend is judged, against plain PyTorch's in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

import fastneg
from helpers import RULES, TRITON_DEVICE, build, check, make_problem, max_error, run

# --- the C++ CPU backend: every rule, several ragged shapes, fp32 and fp64 -------------------------

CPU_SHAPES = [(1, 1, 1), (5, 7, 3), (37, 90, 19), (70, 300, 33), (130, 530, 300)]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backend_rules(rule: str, dtype: torch.dtype) -> None:
    problem, options = build(rule, 70, 300, 33, duplicates=6, peaked=True)
    check(problem, "cpu", dtype, **options)


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("rule", ["plain", "all_rules_simans"])
def test_cpu_backend_ragged_shapes(shape: tuple[int, int, int], rule: str) -> None:
    B, N, D = shape
    problem, options = build(rule, B, N, D, seed=B, duplicates=2)
    check(problem, "cpu", torch.float32, **options)


def test_cpu_backend_half_inputs_computed_in_float32() -> None:
    problem, options = build("all_rules_simans", 40, 100, 24, duplicates=3)
    for dtype in (torch.float16, torch.bfloat16):
        check(problem, "cpu", dtype, **options)


def test_auto_backend_on_cpu_is_the_cpu_kernel() -> None:
    problem, options = build("margin", 33, 66, 17)
    check(problem, "auto", torch.float32, **options)


# --- the Triton kernels under the interpreter (slow: a few small shapes) ---------------------------

TRITON_RULES = ["plain", "labels", "margin", "relative_margin", "max_score", "guide_absolute", "guide_relative",
                "simans", "hardness", "all_rules_simans"]


@pytest.mark.parametrize("rule", TRITON_RULES)
def test_triton_backend_rules(rule: str) -> None:
    problem, options = build(rule, 37, 70, 19, duplicates=4, peaked=True)
    check(problem, "triton", torch.float32, **options)


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 50, 33), (40, 33, 70)])
def test_triton_backend_ragged_shapes(shape: tuple[int, int, int]) -> None:
    B, N, D = shape
    problem, options = build("all_rules_simans", B, max(N, B), D, seed=N)
    check(problem, "triton", torch.float32, **options)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    # the interpreter cannot run bfloat16 dots (numpy has no bfloat16): GPU only
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
])
def test_triton_backend_half_precision(dtype: torch.dtype) -> None:
    problem, options = build("all_rules_simans", 20, 40, 24, duplicates=2)
    check(problem, "triton", dtype, **options)


# --- edge cases: every backend --------------------------------------------------------------------

FUSED = ["cpu", "triton", "portable"]


@pytest.mark.parametrize("backend", FUSED)
def test_fully_masked_rows_give_zero_loss_and_gradient(backend: str) -> None:
    problem = make_problem(20, 40, 16, seed=3)
    # margin 10 masks every key of every row: only the positive is left
    got = run(problem, backend, torch.float32, margin=10.0)
    assert torch.equal(got.loss, torch.zeros(20))
    assert torch.equal(got.dq, torch.zeros_like(got.dq)) and torch.equal(got.dk, torch.zeros_like(got.dk))
    assert float(got.dt) == 0.0
    assert torch.equal(got.stats.num_negatives, torch.zeros(20, dtype=torch.int64))
    assert torch.equal(got.stats.num_masked, torch.full((20,), 39))


@pytest.mark.parametrize("backend", FUSED)
def test_some_fully_masked_rows_with_simans(backend: str) -> None:
    problem = make_problem(24, 24, 8, seed=4, shuffled_positives=False)
    labels = torch.arange(24) // 2
    labels[:6] = 100  # rows 0-5: labels mask every other key? no: only each other's; make rows 0-5 share one
    options = {"key_labels": labels, "query_labels": torch.where(torch.arange(24) < 3, 100, labels),
               "weighting": fastneg.SimANS(), "max_score": 0.9}
    check(problem, backend, torch.float32, **options)


@pytest.mark.parametrize("backend", FUSED)
def test_simans_weights_that_underflow(backend: str) -> None:
    # a = 1e4 makes every w_ij = exp(-1e4 * d^2) underflow in float32 and float64 alike:
    # the normaliser is computed in log space, so the loss stays finite and matches the reference
    problem = make_problem(30, 60, 12, seed=5)
    check(problem, backend, torch.float32, weighting=fastneg.SimANS(a=1e4, b=0.5))


@pytest.mark.parametrize("backend", FUSED)
def test_exact_duplicates_of_the_positive_tie_like_the_reference(backend: str) -> None:
    # with margin 0 and strict '>', an exact copy of the positive key is NOT masked; a near-copy
    # scoring above it is. The fused kernels must see the same tie as float64.
    problem = make_problem(40, 120, 24, seed=6, duplicates=30)
    for options in ({"margin": 0.0}, {"guide": None}):
        opts = dict(options)
        if "guide" in opts:
            opts = {"guide_query": problem.query, "guide_keys": problem.keys}
        truth = run(problem, "reference", torch.float64, grads=False, **opts)
        got = run(problem, backend, torch.float32, grads=False, **opts)
        assert torch.equal(got.stats.num_masked, truth.stats.num_masked)


@pytest.mark.parametrize("backend", FUSED)
def test_nan_pattern_matches_reference(backend: str) -> None:
    problem = make_problem(20, 40, 8, seed=7)
    problem.keys[33] = float("nan")  # a NaN key reaches every row that sees it
    problem.query[4] = float("nan")  # a NaN query only its own row
    truth = run(problem, "reference", torch.float64)
    got = run(problem, backend, torch.float32)
    assert torch.equal(torch.isnan(got.loss), torch.isnan(truth.loss))
    assert bool(torch.isnan(got.loss).all())
    # with key 33 masked by its label, only row 4 is NaN
    labels = torch.arange(40)
    labels[33] = -1
    query_labels = torch.full((20,), -1)
    truth = run(problem, "reference", torch.float64, key_labels=labels, query_labels=query_labels)
    got = run(problem, backend, torch.float32, key_labels=labels, query_labels=query_labels)
    assert torch.equal(torch.isnan(got.loss), torch.isnan(truth.loss))
    assert int(torch.isnan(got.loss).sum()) == 1
    assert max_error(got.dq, truth.dq) < 1e-4


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend: str, reduction: str) -> None:
    problem = make_problem(16, 32, 8, seed=8)
    out = {}
    for be in ("reference", backend):
        device = TRITON_DEVICE if be == "triton" else "cpu"
        q = problem.query.float().to(device).requires_grad_()
        loss = fastneg.info_nce(q, problem.keys.float().to(device), problem.positives.to(device), reduction=reduction,
                                backend=be, weighting="simans", margin=0.1)
        (loss if reduction != "none" else loss.sum()).backward()
        out[be] = (loss.detach().cpu(), q.grad.cpu())
    assert out[backend][0].shape == out["reference"][0].shape
    assert torch.allclose(out[backend][0], out["reference"][0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[backend][1], out["reference"][1], atol=1e-5, rtol=1e-5)


def test_reference_matches_textbook_info_nce() -> None:
    # with no rules, the loss is torch's cross-entropy over logits
    problem = make_problem(12, 30, 8, seed=9)
    q, k, p = problem.query, problem.keys, problem.positives
    expected = torch.nn.functional.cross_entropy(q @ k.T / 0.07, p, reduction="none")
    for backend in ("reference", "cpu"):
        got = fastneg.info_nce(q, k, p, temperature=0.07, reduction="none", backend=backend)
        assert torch.allclose(got, expected, atol=1e-10)


def test_reference_simans_matches_weights_by_hand() -> None:
    # a row with 2 negatives: beta = log(n w_j / sum w)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    s = (q @ k.T)[0]
    a, b, tau = 0.7, 0.1, 0.5
    w = torch.exp(-a * (s[1:] - s[0] - b) ** 2)
    beta = torch.log(2 * w / w.sum())
    expected = torch.logsumexp(torch.cat([s[:1] / tau, s[1:] / tau + beta]), 0) - s[0] / tau
    for backend in ("reference", "cpu"):
        got = fastneg.info_nce(q, k, temperature=tau, weighting=fastneg.SimANS(a, b), backend=backend)
        assert abs(float(got) - float(expected)) < 1e-12


def random_configuration(seed: int, backend: str, max_b: int, max_extra_n: int, max_d: int, dtypes: list) -> None:
    """A random shape, positives, rule combination and dtype, checked like the fixed cases."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    B = int(torch.randint(1, max_b, (1,), generator=g))
    N = B + int(torch.randint(0, max_extra_n, (1,), generator=g))
    D = int(torch.randint(1, max_d, (1,), generator=g))
    problem = make_problem(B, N, D, seed=seed, peaked=bool(seed % 2), duplicates=seed % 5,
                           labels=pick([None, 3, N // 2 + 1]), guide_dim=pick([None, 4]))
    options = {"margin": pick([None, 0.0, 0.1, -0.1]), "relative_margin": pick([None, 0.05]),
               "max_score": pick([None, 0.5]), "weighting": pick([None, fastneg.SimANS(), fastneg.SimANS(2.0, 0.3),
                                                                  fastneg.Hardness(3.0)])}
    if "guide_query" in problem.extra:
        options.update(guide_strategy=pick(["absolute", "relative"]), guide_margin=pick([0.0, 0.05]))
    check(problem, backend, pick(dtypes), **{k: v for k, v in options.items() if v is not None})


@pytest.mark.parametrize("seed", range(24))
def test_cpu_backend_random_configurations(seed: int) -> None:
    random_configuration(seed, "cpu", 150, 400, 140, [torch.float32, torch.float64])


@pytest.mark.parametrize("seed", range(6))
def test_triton_backend_random_configurations(seed: int) -> None:
    random_configuration(seed, "triton", 60, 120, 70, [torch.float32])


# --- info_nce(negatives=idx): each row restricted to its positive and listed keys (SPEC section 5) ---

@pytest.mark.parametrize("rule", ["plain", "all_rules_simans", "hardness", "labels", "guide_relative"])
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_listed_negatives_match_the_dense_reference(rule: str, backend: str) -> None:
    problem, options = build(rule, 30, 80, 12, seed=11, duplicates=3, peaked=True)
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(-1, 80, (30, 9), generator=g)
    idx[:, 0] = problem.positives  # the positive listed among the negatives is ignored
    idx[:, 1] = idx[:, 2]  # a key listed twice counts once
    idx[3] = -1  # a row with no negatives: loss 0
    truth = run(problem, "reference", torch.float64, negatives=idx, **options)
    got = run(problem, backend, torch.float64, negatives=idx, **options)
    for a, b in ((got.loss, truth.loss), (got.dq, truth.dq), (got.dk, truth.dk), (got.dt, truth.dt)):
        assert max_error(a, b) < 1e-10
    assert torch.equal(got.stats.num_masked, truth.stats.num_masked)
    assert torch.equal(got.stats.num_negatives, truth.stats.num_negatives)
    assert float(got.loss[3]) == 0.0 and int(got.stats.num_negatives[3]) == 0
    assert bool((got.stats.num_negatives + got.stats.num_masked <= 7).all())


def test_listed_negatives_equal_the_full_loss_when_every_key_is_listed() -> None:
    problem, options = build("all_rules_simans", 20, 50, 8, seed=13)
    every = torch.arange(50).repeat(20, 1)
    full = run(problem, "cpu", torch.float64, **options)
    listed = run(problem, "cpu", torch.float64, negatives=every, **options)
    assert max_error(listed.loss, full.loss) < 1e-10 and max_error(listed.dk, full.dk) < 1e-10


# --- Hardness(on="guide"): the bias from the guide's scores, the guide masking nothing ---------------

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_guide_score_hardness_matches_the_reference(backend: str) -> None:
    """beta_ij = a * t_ij with guide_margin=None; half of the guide keys zeroed, so those columns get
    no bias (how the integrations restrict a bias to one block of keys)."""
    problem = make_problem(37, 90, 19, seed=3, labels=20)
    guide_keys = problem.keys.clone()
    guide_keys[::2] = 0.0
    problem.extra.update(guide_query=problem.query.clone(), guide_keys=guide_keys)
    options = dict(margin=0.2, guide_margin=None, weighting=fastneg.Hardness(4.0, on="guide"))
    check(problem, backend, torch.float32, **options)
    # the bias is there (the loss differs without it) and the guide masks nothing (same counts)
    with_bias = run(problem, "reference", torch.float64, grads=False, **options)
    without = run(problem, "reference", torch.float64, grads=False, margin=0.2, guide_margin=None)
    assert float((with_bias.loss - without.loss).abs().max()) > 1e-3
    assert bool((with_bias.stats.num_masked == without.stats.num_masked).all())
