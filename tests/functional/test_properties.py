"""Property-based differential tests: random problems over the whole option space (shapes, rules,
weightings, estimators, symmetric, ``negatives=``, dtypes, non-contiguous inputs, exact and near
duplicates, tensor temperatures) against the independent float64 oracle in ``oracle.py``.

Criterion, for the loss, the query / key / temperature gradients: ``|fastneg - truth| / scale <= 2 *
|plain PyTorch in the same dtype - truth| / scale + tol``, truth the oracle in float64 on the
same (dtype-rounded) inputs, "plain PyTorch" the oracle run in the inputs' dtype, ``scale`` the
size of the terms each entry sums (``sum_j |dS_ij| |k_jd|`` for dq, ``1 + |l+| + |lse|`` for a
row's loss): the most any floating-point summation of those terms can promise. Gradients also
get ``8 eps |lse|``: a fused kernel's probability ``exp(x - lse)`` carries the rounding of the
row's logsumexp in its exponent. On Triton with 16-bit inputs, dq and dk also get half an ulp of
that dtype: its backward rounds dS to it for the tensor-core products, as flash attention does. float16 and
bfloat16 inputs are judged against the float32 oracle on the same half-rounded inputs (its
gradients rounded to the inputs' dtype, as every implementation returns them), since fastneg
accumulates them in float32: stricter than plain half. Stats: logsumexp and positive
logit likewise, counts exact. Problems with a score within rounding distance of a threshold
(an exact tie decided by the last bit) are skipped, nothing else.

Profiles (``--hypothesis-profile``): ``ci`` (the default, a few minutes in all), ``long`` (on
demand: ``make test-long``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastneg  # noqa: E402
from helpers import TRITON_DEVICE  # noqa: E402
from oracle import Case, Out, evaluate  # noqa: E402


def examples(n: int) -> int:
    """``n`` problems under the ``ci`` profile (120 per test), proportionally more under ``long``."""
    return max(1, n * settings.default.max_examples // 120)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
TIE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def _unit(g: torch.Generator, n: int, d: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


@st.composite
def cases(draw: Any, symmetric_ok: bool = True, max_b: int = 10, max_n: int = 30) -> Case:
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    symmetric = symmetric_ok and draw(st.booleans())
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(B if symmetric else 1, max(B, max_n)))
    D = draw(st.integers(1, 20))
    keys = _unit(g, N, D)
    pos_kind = draw(st.sampled_from(["arange", "perm", "repeat"] if not symmetric else ["arange", "perm"]))
    if pos_kind == "repeat" or N < B:
        positives = torch.randint(0, N, (B,), generator=g)
    elif pos_kind == "perm":
        positives = torch.randperm(N, generator=g)[:B]
    else:
        positives = torch.arange(B)
    noise = draw(st.sampled_from([0.05, 0.3, 1.0, 3.0]))  # small: peaked, the positive far ahead
    query = torch.nn.functional.normalize(keys[positives] + noise * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    dups = draw(st.integers(0, 3))
    for _ in range(dups):  # exact and near copies of some row's positive key
        src, dst = int(positives[torch.randint(0, B, (1,), generator=g)]), int(torch.randint(0, N, (1,), generator=g))
        if dst not in positives.tolist():
            keys[dst] = keys[src] if draw(st.booleans()) else torch.nn.functional.normalize(
                keys[src] + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    temperature = draw(st.sampled_from([0.02, 0.05, 0.1, 0.5, 1.0]))
    c = Case(query, keys, positives, temperature)
    c.row_weights = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    estimator = draw(st.sampled_from(["none", "none", "debias", "soft"] if not symmetric else ["none"]))
    weightings = ["none", "simans", "hardness"]
    if not symmetric:
        weightings.append("hcl")
    guide = draw(st.sampled_from(["none", "noisy", "same"])) if estimator != "soft" else draw(
        st.sampled_from(["noisy", "same"]))
    if guide != "none":
        weightings += ["guide_hardness", "gcse"]
    if estimator == "soft":
        weightings = [w for w in weightings if w != "hcl"]
    kind = draw(st.sampled_from(weightings))
    if guide == "same":
        c.guide_query, c.guide_keys = query.clone(), keys.clone()
    elif guide == "noisy":
        gd = draw(st.integers(1, 12))
        c.guide_query = _unit(g, B, gd) * 0.3 + torch.nn.functional.pad(query, (0, max(0, gd - D)))[:, :gd]
        c.guide_keys = _unit(g, N, gd) * 0.3 + torch.nn.functional.pad(keys, (0, max(0, gd - D)))[:, :gd]
    if guide != "none" and kind not in ("guide_hardness", "gcse") and draw(st.booleans()):
        c.guide_margin = draw(st.sampled_from([0.0, 0.05, 0.2]))
        c.guide_relative = draw(st.booleans())
    if kind == "simans":
        c.weighting = ("simans", draw(st.sampled_from([0.0, 0.5, 2.0, 30.0, 300.0])), draw(st.sampled_from([0.0, 0.1, -0.2])))
    elif kind in ("hardness", "guide_hardness"):
        c.weighting = (kind, draw(st.sampled_from([-2.0, 1.0, 5.0])))
    elif kind == "hcl":
        c.weighting = ("hcl", draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])))
        # down to 0.005: (1 + beta) |l| up to 800, where a float32 rounding of e^{(1 + beta) l} terms costs
        # 6e-5 (the oracle shifts HCL's sums by the row's largest logit)
        c.temperature = draw(st.sampled_from([0.005, 0.01, 0.02, 0.05, 0.5]))
    elif kind == "gcse":
        c.weighting = ("gcse", draw(st.sampled_from([0.17, 0.5, 3.0])))
    if estimator == "debias":
        c.debias = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5]))
    elif estimator == "soft":
        c.soft = (draw(st.sampled_from([0.02, 0.05, 1.0])), draw(st.sampled_from([0.3, 1.0])))
    c.learn_temperature = estimator != "debias" and draw(st.booleans())
    if draw(st.booleans()):
        levels = draw(st.integers(0, 2))
        nlab = draw(st.integers(1, max(1, N)))
        c.key_labels = torch.randint(0, nlab, (N,) if levels == 0 else (N, levels + 1), generator=g)
        if draw(st.booleans()):
            c.query_labels = torch.randint(0, nlab, (B,) if levels == 0 else (B, levels + 1), generator=g)
    if draw(st.booleans()):
        c.margin = draw(st.sampled_from([0.0, 0.05, 0.2, -0.1]))
    if draw(st.booleans()):
        c.relative_margin = draw(st.sampled_from([0.0, 0.05, 0.3]))
    if draw(st.booleans()):
        c.max_score = draw(st.sampled_from([-2.0, 0.0, 0.3, 0.8]))
    c.symmetric = symmetric
    if not symmetric and draw(st.integers(0, 3)) == 0:
        K = draw(st.integers(0, N + 2))
        c.negatives = torch.randint(-1, N, (B, K), generator=g)
    if not symmetric and c.negatives is None:
        # attraction: the flagged keys as positives (not with DCL, soft labels or HCL)
        c.attract = estimator == "none" and kind != "hcl" and draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:  # one key removed from each row (-1: none; never the positive)
            ex = torch.randint(-1, N, (B,), generator=g)
            c.exclude = torch.where(ex == positives, torch.full_like(ex, -1), ex)
    return c


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other column of a wider buffer."""
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


WEIGHTINGS = {"simans": lambda a, b: fastneg.SimANS(a, b), "hardness": fastneg.Hardness,
              "guide_hardness": lambda s: fastneg.Hardness(s, on="guide"), "hcl": fastneg.HCL, "gcse": fastneg.GCSE}


def kwargs_of(c: Case, dtype: torch.dtype, device: str, noncontiguous: bool = False) -> dict:
    """The same problem as fastneg's keyword arguments, tensors in ``dtype`` on ``device``."""
    def emb(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, dtype)
        return strided(x) if noncontiguous else x

    kw: dict[str, Any] = dict(positives=c.positives.to(device), reduction="none", return_stats=True,
                              symmetric=c.symmetric)
    kw["temperature"] = torch.tensor(c.temperature, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                     device=device, requires_grad=c.learn_temperature)
    for name in ("key_labels", "query_labels", "negatives"):
        if getattr(c, name) is not None:
            kw[name] = getattr(c, name).to(device)
    for name in ("margin", "relative_margin", "max_score", "debias"):
        if getattr(c, name) is not None:
            kw[name] = getattr(c, name)
    if c.guide_query is not None:
        kw["guide_query"], kw["guide_keys"] = emb(c.guide_query), emb(c.guide_keys)
        kw["guide_margin"] = c.guide_margin
        kw["guide_strategy"] = "relative" if c.guide_relative else "absolute"
    kind, *params = c.weighting
    kw["weighting"] = None if kind == "none" else WEIGHTINGS[kind](*params)
    if c.soft is not None:
        kw["soft_labels"] = fastneg.SoftLabels(temperature=c.soft[0], weight=c.soft[1])
    if c.attract:
        kw["false_negatives"] = "attract"
    if c.exclude is not None:
        kw["exclude"] = c.exclude.to(device)
    return kw


def fastneg_out(c: Case, dtype: torch.dtype, backend: str, noncontiguous: bool = False) -> Out:
    """fastneg's loss, stats and gradients on the case (Triton on its device), back on the CPU."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    kw = kwargs_of(c, dtype, device, noncontiguous)
    q = c.query.to(device, dtype).detach().requires_grad_()
    k = c.keys.to(device, dtype).detach().requires_grad_()
    # non-contiguous: a strided query and column-major keys
    qin, kin = (strided(q), k.T.contiguous().T) if noncontiguous else (q, k)
    t = kw["temperature"]
    loss, stats = fastneg.info_nce(qin, kin, backend=backend, **kw)
    (loss * c.row_weights.to(device, loss.dtype)).sum().backward()
    return Out(*(v.detach().cpu() for v in (loss, *stats[:4])), q.grad.cpu(), k.grad.cpu(),
               t.grad.cpu() if c.learn_temperature else None)


def rounded(c: Case, dtype: torch.dtype) -> Case:
    """The case with its embeddings rounded to ``dtype`` (held in float64)."""
    def r(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.to(dtype).double()
    return dataclasses.replace(c, query=r(c.query), keys=r(c.keys), guide_query=r(c.guide_query), guide_keys=r(c.guide_keys))


def near_tie(c: Case, dtype: torch.dtype) -> bool:
    """True when some threshold comparison of the float64 problem is within rounding distance of
    its bound (the decision then belongs to the last bit, on every implementation)."""
    eps = TIE[dtype]
    s = c.query @ c.keys.T
    B = s.shape[0]
    idx = torch.arange(B)
    smallest = math.inf

    def add(gap: torch.Tensor, columns: bool) -> None:
        """``gap`` [B, N] over row i's keys, or [B, B] over column p_i's queries (``columns``); the
        positive's own entry is never compared."""
        nonlocal smallest
        gap = gap.abs().clone()
        if columns:
            gap.fill_diagonal_(math.inf)
        else:
            gap[idx, c.positives] = math.inf
        if gap.numel():
            smallest = min(smallest, float(gap.min()))

    def thresholds(scores: torch.Tensor, pos: torch.Tensor, columns: bool) -> None:
        if c.margin is not None:
            add(scores - (pos[:, None] - c.margin), columns)
        if c.relative_margin is not None:
            add(scores - (pos[:, None] - pos.abs()[:, None] * c.relative_margin), columns)
        if c.max_score is not None:
            add(scores - c.max_score, columns)

    s_pos = s[idx, c.positives]
    thresholds(s, s_pos, False)
    if c.symmetric:
        thresholds(s[:, c.positives].T, s_pos, True)  # column p_i against every query
    if c.guide_query is not None:
        t = c.guide_query @ c.guide_keys.T
        tp = t[idx, c.positives][:, None]
        if c.guide_margin is not None:
            bound = tp - tp.abs() * c.guide_margin if c.guide_relative else tp - c.guide_margin
            add(t - bound, False)
            if c.symmetric:
                add(t[:, c.positives].T - bound, True)
        if c.weighting[0] == "gcse" and not torch.equal(c.guide_query, c.query):
            add(s - t, False)  # s <= t decides the offset; an identical guide ties exactly, by construction
    if c.debias is not None:  # DCL's clamp max(raw, floor): which side passes the gradient
        smallest = min(smallest, float(evaluate(c, torch.float64, grads=False).clamp_gap.min()))
    return smallest < eps * 4


def _err(x: Optional[torch.Tensor], ref: torch.Tensor, scale: torch.Tensor, rounding: float = 0.0,
         spacing: float = 0.0) -> float:
    """max (|x - ref| - rounding |ref| - spacing) / scale over the finite entries of ``ref`` (``rounding``,
    ``spacing``: the last rounding to a half-precision output, one ulp and the subnormal spacing, allowed
    on top); NaN and infinities must match."""
    assert x is not None
    x, ref = x.detach().double(), ref.detach().double()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert bool((torch.isnan(x) == torch.isnan(ref)).all()), "NaN pattern differs"
    inf = torch.isinf(ref)
    assert torch.equal(x[inf], ref[inf]), "infinities differ"
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    return float((((x - ref).abs() - rounding * ref.abs() - spacing).clamp_min(0) / scale)[finite].max())


def assert_matches(got: Out, c: Case, dtype: torch.dtype, backend: str = "cpu") -> None:
    """Each quantity against the float64 truth, in units of the magnitude of the terms it sums
    (a gradient entry sums |dS_ij| |k_jd| over j; a loss is a difference of logits of size
    |l+| and |lse|): fastneg's error may not exceed twice plain PyTorch's plus ``TOL``."""
    c = rounded(c, dtype)
    truth = evaluate(c, torch.float64)
    plain = evaluate(c, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    if dtype in (torch.float16, torch.bfloat16):  # the gradients come back in the inputs' dtype
        plain.dq, plain.dk = plain.dq.to(dtype), plain.dk.to(dtype)
    assert torch.equal(got.num_masked.long(), truth.num_masked), (got.num_masked, truth.num_masked)
    assert torch.equal(got.num_negatives.long(), truth.num_negatives), (got.num_negatives, truth.num_negatives)
    # each gradient entry sums dS_ij k_jd over j; dS_ij is itself a difference of terms (P_ij - [j = p_i],
    # HCL's two softmax terms, the teacher's and the student's softmax): their sizes, weighted
    ds = truth.dscores.abs() + c.row_weights[:, None] * truth.terms
    ds[torch.arange(ds.shape[0]), c.positives] += c.row_weights / c.temperature
    # below tiny / eps a float cannot hold a term to working precision (subnormals, flushed to zero)
    info = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    tiny = info.tiny / info.eps
    row_scale = 1.0 + truth.positive_logit.abs() + truth.lse.abs().nan_to_num(0.0, 0.0, 0.0)
    if c.symmetric:
        row_scale = row_scale + truth.scores.abs().max() / c.temperature
    if c.soft is not None:  # the KL's terms: the teacher's logits t / T and its logsumexp
        row_scale = row_scale + 2 * (c.guide_query @ c.guide_keys.T).abs().max(1).values / c.soft[0]
    checks = [("loss", got.loss, plain.loss, truth.loss, row_scale),
              ("dq", got.dq, plain.dq, truth.dq, ds @ c.keys.abs() + tiny),
              ("dk", got.dk, plain.dk, truth.dk, ds.T @ c.query.abs() + tiny)]
    if not c.symmetric:  # symmetric stats report the query-to-key direction only; the oracle's match
        checks += [("logsumexp", got.lse, plain.lse, truth.lse, 1.0 + truth.lse.abs().nan_to_num(0.0, 0.0, 0.0)),
                   ("positive_logit", got.positive_logit, plain.positive_logit, truth.positive_logit,
                    1.0 + truth.positive_logit.abs())]
    if c.learn_temperature:
        checks.append(("temperature grad", got.dt, plain.dt, truth.dt,
                       (ds * truth.scores.abs()).sum() / c.temperature + truth.dt.abs() + tiny))
    half_ulp = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
    # the fused kernels form each probability as exp(x - lse) (flash attention's form): its exponent
    # carries the rounding of the row's logsumexp, a few ulps of |lse| (plain softmax shifts by the max)
    # the Triton backward feeds dS to the tensor-core products in the inputs' dtype (as flash attention
    # does): half an ulp of that dtype per term
    dS_rounding = torch.finfo(dtype).eps / 2 if dtype in (torch.float16, torch.bfloat16) else 0.0
    logit_size = float((truth.lse.abs().nan_to_num(0.0, 0.0, 0.0) + truth.positive_logit.abs()).max())
    if c.soft is not None:  # the teacher's probabilities exp(t' - T) likewise carry the rounding of its logsumexp
        logit_size += 2 * float((c.guide_query @ c.guide_keys.T).abs().max()) / c.soft[0]
    lse_ulps = 8 * info.eps * logit_size
    for name, mine, theirs, ref, scale in checks:
        rounding = half_ulp if name in ("dq", "dk") else 0.0
        spacing = torch.finfo(dtype).tiny * torch.finfo(dtype).eps if rounding else 0.0  # the smallest subnormal
        err, plain_err = _err(mine, ref, scale, rounding, spacing), _err(theirs, ref, scale)
        # HCL's fused gradient keeps 1 / (1 + 2 beta) of plain autograd's precision (documented on HCL)
        factor = 2 * (1 + 2 * c.weighting[1]) if c.weighting[0] == "hcl" else 2
        bound = factor * plain_err + TOL[dtype] + (lse_ulps if name in ("dq", "dk", "temperature grad") else 0.0)
        if backend == "triton" and name in ("dq", "dk"):
            bound += dS_rounding
        assert err <= bound, f"{name}: error {err:.3g}, plain PyTorch {plain_err:.3g}, bound {bound:.3g} (relative to term size)"
    assert got.loss.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@given(c=cases(), noncontiguous=st.booleans())
def test_cpu_matches_oracle(c: Case, noncontiguous: bool, dtype: torch.dtype) -> None:
    assume(not near_tie(rounded(c, dtype), dtype))
    assert_matches(fastneg_out(c, dtype, "cpu", noncontiguous), c, dtype)


@contextlib.contextmanager
def chunks_of(rows: int, cols: int, dtype: torch.dtype) -> Iterator[None]:
    """The portable backend's memory budget set so that its chunks hold ``rows`` rows of ``cols`` keys."""
    from fastneg.backends.portable import _TEMPORARIES, MEMORY_ENV

    size = 8 if dtype == torch.float64 else 4
    old = os.environ.get(MEMORY_ENV)
    os.environ[MEMORY_ENV] = repr(rows * cols * size * _TEMPORARIES / 2**20)
    try:
        yield
    finally:
        if old is None:
            del os.environ[MEMORY_ENV]
        else:
            os.environ[MEMORY_ENV] = old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@given(c=cases(), noncontiguous=st.booleans(), rows=st.integers(1, 5))
@settings(max_examples=examples(80))
def test_portable_matches_oracle(c: Case, noncontiguous: bool, rows: int, dtype: torch.dtype) -> None:
    """The portable backend in chunks of 1 to 5 rows (the backward recomputing each chunk)."""
    assume(not near_tie(rounded(c, dtype), dtype))
    with chunks_of(rows, max(c.keys.shape[0], c.query.shape[0]), dtype):
        got = fastneg_out(c, dtype, "portable", noncontiguous)
    assert_matches(got, c, dtype, "portable")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@given(c=cases(max_b=8, max_n=20))
@settings(max_examples=examples(60))
def test_reference_matches_oracle(c: Case, dtype: torch.dtype) -> None:
    """fastneg's own dense reference (the benchmarks' naive loss) under the same criterion."""
    assume(not near_tie(rounded(c, dtype), dtype))
    assert_matches(fastneg_out(c, dtype, "reference"), c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).split(".")[-1])
@given(c=cases(max_b=6, max_n=12))
@settings(max_examples=examples(40))
def test_triton_matches_oracle(c: Case, dtype: torch.dtype) -> None:
    """Under the interpreter (slow): fewer, smaller problems."""
    assume(not near_tie(rounded(c, dtype), dtype))
    got = fastneg_out(c, dtype, "triton")
    assert_matches(got, c, dtype, "triton")


# --- invariants -------------------------------------------------------------------------------

@given(c=cases(symmetric_ok=False))
@settings(max_examples=examples(40))
def test_batch_permutation(c: Case) -> None:
    """Permuting the query rows permutes the per-row losses and the query gradient (float64, so
    any difference is rounding, never a changed decision)."""
    assume(not near_tie(c, torch.float64))
    perm = torch.randperm(c.query.shape[0], generator=torch.Generator().manual_seed(1))
    pc = dataclasses.replace(
        c, query=c.query[perm], positives=c.positives[perm], row_weights=c.row_weights[perm],
        query_labels=None if c.query_labels is None else c.query_labels[perm],
        guide_query=None if c.guide_query is None else c.guide_query[perm],
        negatives=None if c.negatives is None else c.negatives[perm],
        exclude=None if c.exclude is None else c.exclude[perm])
    a, b = fastneg_out(c, torch.float64, "cpu"), fastneg_out(pc, torch.float64, "cpu")
    torch.testing.assert_close(b.loss, a.loss[perm], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.dq, a.dq[perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.dk, a.dk, rtol=1e-9, atol=1e-9)
    assert torch.equal(b.num_masked, a.num_masked[perm])


@given(c=cases())
@settings(max_examples=examples(30))
def test_deterministic(c: Case) -> None:
    """The same call twice gives the same bits (loss, gradients, stats)."""
    a, b = fastneg_out(c, torch.float32, "cpu"), fastneg_out(c, torch.float32, "cpu")
    for x, y in [(a.loss, b.loss), (a.dq, b.dq), (a.dk, b.dk), (a.lse, b.lse), (a.num_masked, b.num_masked)]:
        assert torch.equal(x, y) or (torch.isnan(x).any() and torch.equal(torch.isnan(x), torch.isnan(y)))


@pytest.mark.parametrize("backend", ["cpu", "portable"])
@given(c=cases())
@settings(max_examples=examples(40))
def test_fully_masked_rows_are_exactly_zero(c: Case, backend: str) -> None:
    """max_score below every score masks every negative: loss exactly 0, gradients exactly 0."""
    c.max_score = -2.0  # unit vectors: every score is >= -1 > -2
    c.attract = False  # with attraction every key would be a positive: a loss, by design
    c.learn_temperature = c.learn_temperature and c.debias is None
    out = fastneg_out(c, torch.float32, backend)
    assert torch.equal(out.num_negatives, torch.zeros_like(out.num_negatives)) or c.negatives is not None
    rows = out.num_negatives == 0
    assert bool((out.loss[rows] == 0).all())
    if bool(rows.all()):
        assert bool((out.dq == 0).all()) and bool((out.dk == 0).all())
        if out.dt is not None:
            assert float(out.dt) == 0.0


@given(c=cases(max_b=6, max_n=12))
@settings(max_examples=examples(20))
def test_cpu_and_triton_agree(c: Case) -> None:
    """The two fused backends on the same float32 problem: the same mask decisions (counts) and
    losses within float32 rounding of the terms."""
    assume(not near_tie(rounded(c, torch.float32), torch.float32))
    a, b = fastneg_out(c, torch.float32, "cpu"), fastneg_out(c, torch.float32, "triton")
    assert torch.equal(a.num_masked.cpu(), b.num_masked.cpu()) and torch.equal(a.num_negatives.cpu(), b.num_negatives.cpu())
    scale = 1.0 + a.positive_logit.abs() + a.lse.abs().nan_to_num(0.0, 0.0, 0.0)
    if c.symmetric:
        scale = scale + 1.0 / c.temperature
    assert bool(torch.equal(torch.isnan(a.loss), torch.isnan(b.loss.cpu())))
    assert float(((a.loss - b.loss.cpu()).abs() / scale).nan_to_num(0.0).max()) < 1e-5
