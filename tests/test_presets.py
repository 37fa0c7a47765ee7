"""fastneg.presets: every preset runs through the loss and negative selection, carries its
citation, and the UniME preset reproduces the authors' loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastneg
from fastneg import presets

ALL = [presets.nv_retriever, presets.gist, presets.simans, presets.qwen3_embedding, presets.unime]


def _batch(seed: int = 0, B: int = 24, N: int = 40, D: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    k[:B] = F.normalize(q + 0.5 * k[:B], dim=-1)  # positives on the diagonal
    k[B:B + 6] = F.normalize(k[:6] + 0.01 * k[B:B + 6], dim=-1)  # near-duplicates of positives 0-5
    k[B + 6:B + 12] = q[6:12]  # keys scoring far above the positives of rows 6-11
    return {"query": q, "keys": k, "guide_query": F.normalize(q + 0.2 * torch.randn(B, D, generator=g,
                                                                                   dtype=torch.float64), dim=-1),
            "guide_keys": F.normalize(k + 0.2 * torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1),
            "key_labels": torch.arange(N) % 30}


def _per_call(preset: presets.Preset, batch: dict, keys: str = "keys") -> dict:
    extra = {}
    if "guide" in preset.needs:
        extra.update(guide_query=batch["guide_query"], guide_keys=batch["guide_" + keys])
    if "key_labels" in preset.needs:
        extra["key_labels"] = batch["key_labels"]
    return extra


@pytest.mark.parametrize("make", ALL, ids=lambda f: f.__name__)
def test_preset_runs_and_masks_what_it_says(make) -> None:
    preset = make()
    assert preset.citation and preset.name == make.__name__
    batch = _batch()
    q = batch["query"].clone().requires_grad_()
    loss, stats = fastneg.info_nce(q, batch["keys"], **preset.loss, **_per_call(preset, batch), return_stats=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    plain = fastneg.info_nce(batch["query"], batch["keys"], temperature=preset.loss.get("temperature", 0.05))
    if preset.name != "simans":  # the others mask: some key must leave a denominator on this batch
        assert int(stats.num_masked.sum()) > 0, preset.name
        assert not torch.isclose(loss.detach(), plain)
    k = preset.num_negatives or 5
    idx = fastneg.sample_negatives(batch["query"], batch["keys"], torch.arange(24), k, **preset.negatives,
                                   **_per_call(preset, batch), seed=0)
    assert idx.shape == (24, k)
    if "guide" in preset.needs:  # the corpus miner takes no guide: GIST's rule is an in-batch one
        return
    labels = batch["key_labels"]
    mined = fastneg.mine_hard_negatives(batch["query"], batch["keys"], torch.arange(24), k, **preset.negatives,
                                        **({"corpus_labels": labels, "query_labels": labels[:24]}
                                           if "key_labels" in preset.needs else {}))
    assert mined.indices.shape == (24, k)


def test_overrides_and_citations() -> None:
    assert presets.gist().loss["temperature"] == 0.01  # sentence-transformers' GISTEmbedLoss default
    assert presets.nv_retriever().loss == {"relative_margin": 0.05}
    assert presets.nv_retriever(relative_margin=0.1).negatives["relative_margin"] == 0.1
    assert presets.unime().loss == {"temperature": 0.02, "margin": -0.1}
    assert presets.simans().loss["weighting"] == fastneg.SimANS(0.5, 0.0)
    for make, ref in ((presets.nv_retriever, "2407.15831"), (presets.gist, "2402.16829"),
                      (presets.simans, "2210.11773"), (presets.qwen3_embedding, "2506.05176"),
                      (presets.unime, "2504.17432")):
        assert ref in make().citation


def _unime_original(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.02, topk: int = 8,
                    threshold_value: float = 0.1) -> torch.Tensor:
    """deepglint/UniME, loss.py `SimpleContrastiveLossBatchRank.__call__`, transcribed."""
    similarity_matrix = x @ y.T
    n = similarity_matrix.size(0)
    modified = similarity_matrix.clone()
    diag_values = torch.diag(similarity_matrix)
    threshold = diag_values.view(-1, 1) + threshold_value
    mask = (modified > threshold) & (~torch.eye(n, dtype=torch.bool))
    modified[mask] = -float("inf")
    modified.fill_diagonal_(-float("inf"))
    _, neg_indices = torch.topk(modified, topk, dim=1)
    all_keys = torch.cat([y.unsqueeze(1), y[neg_indices]], dim=1)
    scores = torch.bmm(x.unsqueeze(1), all_keys.transpose(1, 2)).squeeze(1)
    return F.cross_entropy(scores / temperature, torch.zeros(n, dtype=torch.long))


def test_unime_preset_reproduces_the_authors_loss() -> None:
    g = torch.Generator().manual_seed(4)
    B, D = 32, 16
    x0 = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y0 = F.normalize(x0 + 0.6 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    y0[5] = F.normalize(x0[7] + 0.01 * y0[5], dim=-1)  # key 5 scores far above row 7's positive: filtered
    x1, y1 = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    want = _unime_original(x1, y1)
    wants = torch.autograd.grad(want, (x1, y1))
    preset = presets.unime()
    x2, y2 = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    with torch.no_grad():
        idx = fastneg.sample_negatives(x2, y2, torch.arange(B), preset.num_negatives, **preset.negatives)
    assert 5 not in idx[7].tolist() and bool((idx >= 0).all())
    got = fastneg.info_nce(x2, y2, negatives=idx, **preset.loss)
    grads = torch.autograd.grad(got, (x2, y2))
    assert abs(float(got.detach()) - float(want.detach())) < 1e-10
    for a, b in zip(grads, wants):
        assert float((a - b).abs().max()) < 1e-10
