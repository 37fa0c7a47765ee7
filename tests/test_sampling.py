"""fastneg.sample_negatives (SPEC section 5) on the C++ kernel and the Triton kernel (interpreter
on CPU), against brute force over the dense masked score matrix."""

from __future__ import annotations

import pytest
import scipy.stats
import torch

import fastneg
from fastneg.reference import false_negative_mask
from helpers import RULES, TRITON_DEVICE, build, make_problem

BACKENDS = ["cpu", "triton", "portable"]


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _mask_options(options: dict) -> dict:
    return {n: v for n, v in options.items() if n != "weighting"}


def _candidates(problem, options: dict) -> torch.Tensor:
    """[B, N] bool: the keys a row may draw (unmasked, not the positive), by brute force in float64."""
    q, k = problem.query, problem.keys
    rules = fastneg.Rules(**options).masking_plan()
    kl = problem.extra.get("key_labels")
    ql = problem.extra.get("query_labels")
    if kl is not None and ql is None:
        ql = kl[problem.positives]
    labels = None if kl is None else (kl[None] if kl.dim() == 1 else kl[None, :, :])
    guide = None
    if "guide_query" in problem.extra:
        guide = problem.extra["guide_query"] @ problem.extra["guide_keys"].T
    cols = problem.positives[:, None]
    masked = false_negative_mask(q @ k.T, cols, rules, ql, labels, guide)
    masked.scatter_(1, cols, True)
    return ~masked


def _sample(problem, backend: str, k: int, dtype: torch.dtype = torch.float32, **kw) -> torch.Tensor:
    device = _device(backend)
    extra = {n: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for n, v in problem.extra.items()}
    return fastneg.sample_negatives(problem.query.to(device, dtype), problem.keys.to(device, dtype),
                                    problem.positives.to(device), k, backend=backend, **extra, **kw).cpu()


# --- "top": the highest-scoring unmasked negatives -----------------------------------------------

@pytest.mark.parametrize("rule", list(RULES))
def test_top_equals_brute_force_sort_float64(rule: str) -> None:
    problem, options = build(rule, 130, 530, 24, seed=1, peaked=True)
    options = _mask_options(options)
    got = _sample(problem, "cpu", 20, torch.float64, strategy="top", **options)
    scores = (problem.query @ problem.keys.T).masked_fill(~_candidates(problem, options), float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    want = torch.where(order.values[:, :20] > float("-inf"), order.indices[:, :20], -1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["plain", "label_levels", "margin", "guide_relative", "all_rules_simans"])
def test_top_float32_picks_the_top_scores(backend: str, rule: str) -> None:
    """float32 scores may swap keys whose scores tie to rounding: compare the scores drawn."""
    problem, options = build(rule, 37, 90, 19, seed=2, peaked=True)
    options = _mask_options(options)
    got = _sample(problem, backend, 6, strategy="top", **options)
    cand = _candidates(problem, options)
    scores = (problem.query @ problem.keys.T).masked_fill(~cand, float("-inf"))
    best = torch.sort(scores, dim=1, descending=True).values[:, :6]
    valid = got >= 0
    assert torch.equal(valid, best > float("-inf"))
    drawn = torch.where(valid, scores.gather(1, got.clamp(min=0)), torch.tensor(float("-inf"), dtype=torch.float64))
    assert bool(cand.gather(1, got.clamp(min=0))[valid].all())
    assert torch.allclose(drawn[valid], best[valid], atol=1e-5)


# --- sampling: distributions, exclusions, padding, seeds -------------------------------------------

def _one_row_repeated(rows: int, n: int, seed: int):  # noqa: ANN202
    """`rows` copies of one query over n keys (all with the same positive): each row is an independent draw."""
    p = make_problem(1, n, 8, seed=seed, peaked=True)
    p.query = p.query.expand(rows, -1).contiguous()
    p.positives = p.positives.expand(rows).contiguous()
    p.extra = {}
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", [fastneg.SimANS(4.0, -1.0), "uniform"], ids=["simans", "uniform"])
def test_single_draws_follow_the_distribution(backend: str, strategy) -> None:
    rows, n = 2000, 13
    p = _one_row_repeated(rows, n, seed=3)
    max_score = 0.3  # masks some keys: they must never be drawn and get no probability
    got = _sample(p, backend, 1, strategy=strategy, max_score=max_score, seed=1234)[:, 0]
    s = (p.query[0] @ p.keys.T).float()
    pos = int(p.positives[0])
    cand = ~(s > max_score)
    cand[pos] = False
    if isinstance(strategy, fastneg.SimANS):
        w = torch.exp(-strategy.a * (s - s[pos] - strategy.b) ** 2)
    else:
        w = torch.ones(n)
    w = torch.where(cand, w, torch.zeros(n))
    assert int(cand.sum()) >= 6 and int((s > max_score).sum()) >= 2  # the positive and at least one masked key
    assert bool(cand[got].all()), "a masked key or the positive was drawn"
    counts = torch.bincount(got, minlength=n)[cand].double()
    expected = w[cand].double() / w[cand].double().sum() * rows
    assert float(expected.min()) > 5  # chi-square needs expected counts of at least ~5
    stat, pvalue = scipy.stats.chisquare(counts.numpy(), expected.numpy())
    assert pvalue > 1e-3, (stat, pvalue, counts.tolist(), expected.tolist())


def test_the_chi_square_check_can_fail() -> None:
    """Uniform draws do not pass as SimANS draws with peaked weights."""
    rows, n = 3000, 13
    p = _one_row_repeated(rows, n, seed=3)
    got = _sample(p, "cpu", 1, strategy="uniform", seed=1234)[:, 0]
    s = (p.query[0] @ p.keys.T).float()
    pos = int(p.positives[0])
    w = torch.exp(-4.0 * (s - s[pos] + 1.0) ** 2)
    w[pos] = 0
    keep = w > 0
    counts = torch.bincount(got, minlength=n)[keep].double()
    _, pvalue = scipy.stats.chisquare(counts.numpy(), (w[keep].double() / w[keep].double().sum() * rows).numpy())
    assert pvalue < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["simans", "uniform", "top"])
def test_never_draws_a_masked_key_or_the_positive(backend: str, strategy: str) -> None:
    problem, options = build("all_rules_simans", 20, 64, 16, seed=4)
    options = _mask_options(options)
    got = _sample(problem, backend, 8, strategy=strategy, seed=7, **options)
    cand = _candidates(problem, options)
    valid = got >= 0
    assert bool(cand.gather(1, got.clamp(min=0))[valid].all())
    # as many draws as candidates allow, no repeats
    assert torch.equal(valid.sum(1), cand.sum(1).clamp(max=8))
    for row in got.tolist():
        drawn = [j for j in row if j >= 0]
        assert len(drawn) == len(set(drawn))
        assert row[len(drawn):] == [-1] * (8 - len(drawn))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_when_candidates_run_out(backend: str) -> None:
    problem = make_problem(5, 5, 8, seed=5)
    got = _sample(problem, backend, 7, strategy="uniform", seed=1)
    assert got.shape == (5, 7)
    assert torch.equal((got >= 0).sum(1), torch.full((5,), 4))  # 5 keys, minus the positive
    assert bool((got[:, 4:] == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_indices(backend: str) -> None:
    problem = make_problem(16, 40, 16, seed=6)
    a = _sample(problem, backend, 5, strategy="simans", seed=11)
    b = _sample(problem, backend, 5, strategy="simans", seed=11)
    c = _sample(problem, backend, 5, strategy="simans", seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(_sample(problem, backend, 5, strategy="uniform", generator=g1),
                       _sample(problem, backend, 5, strategy="uniform", generator=g2))


@pytest.mark.parametrize("strategy", ["simans", "uniform"])
def test_kernels_draw_what_the_dense_reference_draws(strategy: str) -> None:
    """The noise is a function of (seed, i, j): C++, Triton and the dense sampler agree."""
    problem, options = build("labels", 24, 64, 16, seed=7)
    ref = _sample(problem, "reference", 6, torch.float64, strategy=strategy, seed=99, **options)
    assert torch.equal(_sample(problem, "cpu", 6, torch.float64, strategy=strategy, seed=99, **options), ref)
    assert torch.equal(_sample(problem, "triton", 6, strategy=strategy, seed=99, **options), ref)


def test_thread_count_does_not_change_the_draw() -> None:
    problem = make_problem(300, 400, 16, seed=8)
    before = torch.get_num_threads()
    try:
        draws = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            draws.append(_sample(problem, "cpu", 9, strategy="simans", seed=5))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_removes_other_positives(backend: str) -> None:
    problem = make_problem(20, 60, 16, seed=9, peaked=True)
    top = _sample(problem, backend, 6, strategy="top")
    exclude = torch.stack([top[:, 0], top[:, 2], torch.full((20,), -1)], dim=1)
    got = _sample(problem, backend, 4, strategy="top", exclude=exclude.to(_device(backend)))
    assert torch.equal(got, torch.stack([top[:, 1], top[:, 3], top[:, 4], top[:, 5]], dim=1))


def test_large_k_on_cpu_is_exact() -> None:
    problem = make_problem(10, 3000, 8, seed=10)
    got = _sample(problem, "cpu", 2500, torch.float64, strategy="top")
    scores = (problem.query @ problem.keys.T).scatter(1, problem.positives[:, None], float("-inf"))
    assert torch.equal(got, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :2500])


def test_samples_feed_the_loss() -> None:
    """info_nce(negatives=sample) equals the dense reference restricted to the drawn keys."""
    problem = make_problem(40, 200, 16, seed=11, peaked=True)
    idx = fastneg.sample_negatives(problem.query, problem.keys, problem.positives, 8, strategy="simans", seed=3,
                                   margin=0.1)
    fused = fastneg.info_nce(problem.query, problem.keys, problem.positives, negatives=idx, margin=0.1)
    ref = fastneg.info_nce(problem.query, problem.keys, problem.positives, negatives=idx, margin=0.1,
                           backend="reference")
    assert abs(float(fused - ref)) < 1e-10


def test_bad_input() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="num_negatives"):
        fastneg.sample_negatives(q, k, None, 0, strategy="top")
    with pytest.raises(TypeError, match="num_negatives"):
        fastneg.sample_negatives(q, k, None, True, strategy="top")
    with pytest.raises(ValueError, match="strategy"):
        fastneg.sample_negatives(q, k, None, 2, strategy="hardest")
    with pytest.raises(ValueError, match="exclude"):
        fastneg.sample_negatives(q, k, None, 2, strategy="top", exclude=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="exclude"):
        fastneg.sample_negatives(q, k, None, 2, strategy="top", exclude=torch.full((4, 1), 6))
    with pytest.raises(ValueError, match="seed or generator"):
        fastneg.sample_negatives(q, k, None, 2, strategy="uniform", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="positives"):
        fastneg.sample_negatives(q, k, torch.tensor([0, 1, 2, 9]), 2, strategy="top")
    with pytest.raises(ValueError, match="keys"):
        fastneg.sample_negatives(q, torch.randn(6, 4), None, 2, strategy="top")


def test_triton_half_precision_top() -> None:
    """float16 inputs (scores accumulate in float32): the drawn keys are the top candidates."""
    problem, options = build("labels", 20, 48, 16, seed=12, peaked=True)
    got = _sample(problem, "triton", 5, torch.float16, strategy="top", **options)
    cand = _candidates(problem, options)
    scores = (problem.query @ problem.keys.T).masked_fill(~cand, float("-inf"))
    best = torch.sort(scores, dim=1, descending=True).values[:, :5]
    assert bool((got >= 0).all()) and bool(cand.gather(1, got).all())
    assert torch.allclose(scores.gather(1, got), best, atol=2e-3)


@pytest.mark.parametrize("strategy", ["top", "simans", "uniform"])
def test_beyond_the_fused_triton_k_the_draw_is_the_same(strategy) -> None:
    """k above the fused Triton sampler's register top-k: the portable sampler draws, the same keys
    as the C++ sampler (the same values and noise)."""
    from fastneg.sampling import MAX_FUSED_NEGATIVES

    problem = make_problem(3, MAX_FUSED_NEGATIVES + 40, 8, seed=11, labels=50)
    k = MAX_FUSED_NEGATIVES + 5
    drawn = {}
    for backend in ("cpu", "triton", "reference"):
        device = _device(backend)
        drawn[backend] = fastneg.sample_negatives(
            problem.query.float().to(device), problem.keys.float().to(device), problem.positives.to(device), k,
            strategy=strategy, seed=3, margin=0.1, key_labels=problem.extra["key_labels"].to(device),
            backend=backend).cpu()
    assert drawn["cpu"].shape == (3, k) and int((drawn["cpu"] >= 0).sum()) > k
    assert torch.equal(drawn["cpu"], drawn["triton"]) and torch.equal(drawn["cpu"], drawn["reference"])
