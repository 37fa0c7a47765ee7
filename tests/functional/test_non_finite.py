"""Non-finite embeddings: one behaviour on every backend (docs/reference.md, "Non-finite inputs").

The loss: a row whose softmax meets a ``+inf`` or NaN logit has loss NaN, as PyTorch's dense
cross-entropy; a ``-inf`` score is a key of weight zero; a key a rule masks is out of the softmax
whatever its score. The samplers: NaN and ``-inf`` scores are never drawn, ``+inf`` is the highest
score, and every backend draws the same keys.
"""

from __future__ import annotations

import pytest
import torch

import fastneg

BACKENDS = ["reference", "cpu", "portable", "triton"]
POISON = {"+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _problem(where: str, value: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(9, 8, generator=g, dtype=torch.float64), dim=-1)
    if where == "key":  # a non-positive key: one coordinate poisoned, the rest 0, so s_ij = q_i0 * value
        k[7] = 0.0
        k[7, 0] = value
    else:  # a query row
        q[2] = 0.0
        q[2, 0] = value
    return q, k


def _dense_oracle(q: torch.Tensor, k: torch.Tensor, temperature: float, max_score: float | None = None) -> torch.Tensor:
    """Plain PyTorch in float64: cross-entropy over the dense logits, a masked key filled with -inf."""
    s = q @ k.T
    if max_score is not None:
        pos = torch.arange(q.shape[0])
        masked = s > max_score
        masked[pos, pos] = False
        s = s.masked_fill(masked, float("-inf"))
    return torch.nn.functional.cross_entropy(s / temperature, torch.arange(q.shape[0]), reduction="none")


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    assert not torch.isinf(got).any(), got  # never a silent inf
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["key", "query"])
@pytest.mark.parametrize("poison", list(POISON))
def test_loss_nan_pattern_is_the_dense_cross_entropys(backend: str, where: str, poison: str) -> None:
    q, k = _problem(where, POISON[poison])
    dtype = torch.float32 if backend == "triton" else torch.float64
    got = fastneg.info_nce(q.to(dtype), k.to(dtype), backend=backend, reduction="none")
    want = _dense_oracle(q, k, 0.05)
    if poison != "-inf" or where == "key":
        assert torch.isnan(want).any()  # the case poisons some row (a -inf query row is NaN too)
    _same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_masked_infinite_key_leaves_the_softmax(backend: str) -> None:
    q, k = _problem("key", float("inf"))
    dtype = torch.float32 if backend == "triton" else torch.float64
    got = fastneg.info_nce(q.to(dtype), k.to(dtype), backend=backend, reduction="none", max_score=0.9)
    want = _dense_oracle(q, k, 0.05, max_score=0.9)
    assert torch.isfinite(want).all()  # the +inf scores are masked, the -inf ones weigh nothing
    _same(got, want)


@pytest.mark.parametrize("poison", list(POISON))
@pytest.mark.parametrize("strategy", ["top", "simans", "uniform"])
@pytest.mark.parametrize("where", ["key", "query"])
def test_samplers_agree_and_never_draw_nan_or_minus_inf(poison: str, strategy: str, where: str) -> None:
    q, k = _problem(where, POISON[poison])
    q, k = q.float(), k.float()
    scores = q.double() @ k.double().T
    drawn = {b: fastneg.sample_negatives(q, k, None, 8, strategy=strategy, seed=3, backend=b) for b in BACKENDS}
    for b in BACKENDS:
        assert torch.equal(drawn[b], drawn["reference"]), (b, drawn[b], drawn["reference"])
    idx = drawn["reference"]
    real = idx >= 0
    picked = scores.gather(1, idx.clamp(min=0))[real]
    assert not torch.isnan(picked).any() and not (picked == float("-inf")).any()
    # every candidate is drawn (8 = all 8 non-positive keys): exactly those with a score above -inf,
    # less SimANS's zero-weight keys (an infinite score or positive score)
    pos = torch.arange(5)
    candidate = scores > float("-inf")
    candidate[pos, pos] = False
    if strategy == "simans":
        candidate &= torch.isfinite(scores) & torch.isfinite(scores[pos, pos])[:, None]
    assert torch.equal(real.sum(1), candidate.sum(1)), (real.sum(1), candidate.sum(1))
    if strategy == "top" and poison == "+inf" and where == "key":
        plus = scores[:, 7] == float("inf")
        assert plus.any() and (idx[plus, 0] == 7).all()  # +inf is the highest score
