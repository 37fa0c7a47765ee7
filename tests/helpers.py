"""Shared test machinery: problems with planted false negatives, and the error criterion
(a backend's error against float64 may not exceed plain PyTorch's error in the same dtype,
plus a small tolerance)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

import fastneg


@dataclass
class Problem:
    query: torch.Tensor
    keys: torch.Tensor
    positives: torch.Tensor
    row_weights: torch.Tensor  # upstream gradient of the per-row loss
    extra: dict[str, Any] = field(default_factory=dict)


def make_problem(B: int, N: int, D: int, seed: int = 0, *, peaked: bool = False, duplicates: int = 0,
                 shuffled_positives: bool = True, labels: Optional[int] = None, guide_dim: Optional[int] = None) -> Problem:
    """Normalised embeddings in float64. ``peaked``: queries close to their positives (scores near
    1 with temperature 0.05 give logits ~20 apart). ``duplicates``: that many keys are exact copies
    and as many near-copies (noise 1e-3) of some row's positive key."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D, generator=g, dtype=torch.float64)
    positives = torch.randperm(N, generator=g)[:B] if shuffled_positives else torch.arange(B)
    query = torch.randn(B, D, generator=g, dtype=torch.float64)
    if peaked:
        query = keys[positives] + 0.3 * query / D**0.5
    non_pos = torch.tensor(sorted(set(range(N)) - set(positives.tolist())), dtype=torch.long)
    for c in range(min(duplicates, len(non_pos) // 2)):
        src = positives[c % B]
        keys[non_pos[2 * c]] = keys[src]
        keys[non_pos[2 * c + 1]] = keys[src] + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64)
    query = torch.nn.functional.normalize(query, dim=-1)
    keys = torch.nn.functional.normalize(keys, dim=-1)
    extra: dict[str, Any] = {}
    if labels is not None:
        extra["key_labels"] = torch.randint(0, labels, (N,), generator=g)
    if guide_dim is not None:
        extra["guide_query"] = torch.nn.functional.normalize(
            query[:, : min(D, guide_dim)] + 0.1 * torch.randn(B, min(D, guide_dim), generator=g, dtype=torch.float64), dim=-1)
        extra["guide_keys"] = torch.nn.functional.normalize(
            keys[:, : min(D, guide_dim)] + 0.1 * torch.randn(N, min(D, guide_dim), generator=g, dtype=torch.float64), dim=-1)
    weights = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return Problem(query, keys, positives, weights, extra)


@dataclass
class Result:
    loss: torch.Tensor
    dq: Optional[torch.Tensor]
    dk: Optional[torch.Tensor]
    dt: Optional[torch.Tensor]
    stats: fastneg.InfoNCEStats


# Triton runs on CUDA where there is a GPU, else on CPU tensors through the interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(problem: Problem, backend: str, dtype: torch.dtype, temperature: float = 0.05, device: Optional[str] = None,
        grads: bool = True, **options: Any) -> Result:
    device = device or (TRITON_DEVICE if backend == "triton" else "cpu")
    q = problem.query.to(device=device, dtype=dtype).detach().clone().requires_grad_(grads)
    k = problem.keys.to(device=device, dtype=dtype).detach().clone().requires_grad_(grads)
    # DCL's debias takes no learned temperature (its floor depends on it): a constant tensor then
    t = torch.tensor(temperature, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=device, requires_grad=grads and options.get("debias") is None)
    kwargs = {name: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              for name, v in problem.extra.items()}
    kwargs.update(options)
    loss, stats = fastneg.info_nce(q, k, problem.positives.to(device), temperature=t, reduction="none",
                                   return_stats=True, backend=backend, **kwargs)
    if grads:
        (loss * problem.row_weights.to(device=device, dtype=loss.dtype)).sum().backward()
    def cpu(x: Any) -> Any:
        return x.detach().cpu() if isinstance(x, torch.Tensor) else x

    return Result(cpu(loss), cpu(q.grad), cpu(k.grad), cpu(t.grad),
                  fastneg.InfoNCEStats(*(cpu(v) for v in stats)))


def max_error(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    assert x is not None and ref is not None
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert x.shape == ref.shape, (x.shape, ref.shape)
    same_nan = torch.isnan(x) == torch.isnan(ref)
    assert bool(same_nan.all()), "NaN pattern differs from the reference"
    finite = ~torch.isnan(ref)
    if not bool(finite.any()):
        return 0.0
    return float((x[finite] - ref[finite]).abs().max())


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_truth(result: Result, torch_same_dtype: Result, truth: Result, dtype: torch.dtype,
                          grads: bool = True) -> None:
    """Each quantity: |fused - truth| <= 2 * |torch(dtype) - truth| + tol * scale."""
    pairs = [("loss", result.loss, torch_same_dtype.loss, truth.loss)]
    if grads:
        pairs += [("dq", result.dq, torch_same_dtype.dq, truth.dq), ("dk", result.dk, torch_same_dtype.dk, truth.dk)]
        if truth.dt is not None:
            pairs.append(("temperature grad", result.dt, torch_same_dtype.dt, truth.dt))
    for name, got, plain, ref in pairs:
        scale = max(1.0, float(ref.detach().abs().max()))
        err, plain_err = max_error(got, ref), max_error(plain, ref)
        bound = 2 * plain_err + TOLERANCE[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3g} vs plain PyTorch {plain_err:.3g} (bound {bound:.3g})"
    # counts: exact, except on rows where plain PyTorch in the same dtype also misses the float64
    # decision (a key within rounding distance of a threshold)
    for name in ("num_masked", "num_negatives"):
        got, plain, ref = (getattr(r.stats, name).cpu() for r in (result, torch_same_dtype, truth))
        wrong = got != ref
        assert bool((~wrong | (plain != ref)).all()), f"{name}: rows {wrong.nonzero().flatten().tolist()}"


# --- rule sets and the standard check against float64 --------------------------------------------

RULES = {
    "plain": {},
    "labels": {"key_labels": "labels"},
    "label_levels": {"key_labels": "levels"},
    "margin": {"margin": 0.05},
    "negative_margin": {"margin": -0.1},
    "relative_margin": {"relative_margin": 0.05},
    "max_score": {"max_score": 0.3},
    "guide_absolute": {"guide": True},
    "guide_relative": {"guide": True, "guide_strategy": "relative", "guide_margin": 0.05},
    "simans": {"weighting": fastneg.SimANS()},
    "simans_shifted": {"weighting": fastneg.SimANS(a=2.0, b=-0.2)},
    "hardness": {"weighting": fastneg.Hardness(5.0)},
    "all_rules_simans": {"key_labels": "labels", "margin": 0.1, "relative_margin": 0.1, "max_score": 0.6,
                         "guide": True, "weighting": fastneg.SimANS(1.0, 0.1)},
}


def build(rule: str, B: int, N: int, D: int, seed: int = 0, **kw) -> tuple[Problem, dict]:
    spec = dict(RULES[rule])
    labels = spec.pop("key_labels", None)
    problem = make_problem(B, N, D, seed, labels=max(2, N // 4) if labels else None,
                           guide_dim=8 if spec.pop("guide", False) else None, **kw)
    if labels == "levels":  # three independent label sets, OR-ed; explicit query labels on one level
        g = torch.Generator().manual_seed(seed + 1)
        key_labels = torch.stack([problem.extra["key_labels"], torch.randint(0, max(2, N // 3), (N,), generator=g),
                                  torch.randint(0, max(2, N // 2), (N,), generator=g)], dim=1)
        query_labels = key_labels[problem.positives].clone()
        query_labels[:, 2] = torch.randint(0, max(2, N // 2), (B,), generator=g)
        problem.extra.update(key_labels=key_labels, query_labels=query_labels)
    return problem, spec


def rounded(problem: Problem, dtype: torch.dtype) -> Problem:
    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).double() if t.is_floating_point() else t
    return dataclasses.replace(problem, query=r(problem.query), keys=r(problem.keys),
                               extra={k: r(v) for k, v in problem.extra.items()})


def check(problem: Problem, backend: str, dtype: torch.dtype, **options) -> None:
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    problem = rounded(problem, dtype)
    truth = run(problem, "reference", torch.float64, **options)
    plain = run(problem, "reference", dtype, device=device, **options)
    got = run(problem, backend, dtype, device=device, **options)
    assert_close_to_truth(got, plain, truth, dtype)


def simclr_negatives(out_1: torch.Tensor, out_2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The part shared by chingyaoc/DCL's and joshr17/HCL's `criterion`, transcribed: the 2B views
    against each other with `get_negative_mask` (self and the positive pair removed), and the
    positive term. Returns (neg [2B, 2B - 2], pos [2B]), both exponentiated logits."""
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool)
    for i in range(batch_size):
        mask[i, i] = 0
        mask[i, i + batch_size] = 0
    mask = torch.cat((mask, mask), 0)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    return neg, torch.cat([pos, pos], dim=0)


def two_views(B: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit-norm views of B items, float64: half the pairs close (DCL's / HCL's Ng then hits
    the clamp's floor at large tau+), half random (it does not)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    b[: B // 2] = a[: B // 2] + 0.05 * b[: B // 2]
    return a, torch.nn.functional.normalize(b, dim=-1)
