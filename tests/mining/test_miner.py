"""fastneg.mine_hard_negatives: the exact (fused) path against brute force, real FAISS indexes
against the exact path, several positives per query, windows, labels, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastneg

faiss = pytest.importorskip("faiss")


def _data(Q: int, N: int, D: int, seed: int = 0, noise: float = 0.5):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    corpus = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    pos = torch.randint(0, N, (Q,), generator=g)
    q = torch.nn.functional.normalize(corpus[pos] + noise * torch.randn(Q, D, generator=g), dim=-1)
    return q, corpus, pos


def _brute_force_top(q, corpus, positives: list[list[int]], k: int, margin=None, relative_margin=None,
                     max_score=None, min_score=None, labels=None, range_min=0, range_max=None):  # noqa: ANN001, ANN202
    """Row by row in float64: drop positives and rule violations (reference: the minimum positive
    score), rank by score (ties: smaller id), keep ranks [range_min, range_max), take k."""
    s = (q.double() @ corpus.double().T)
    out = []
    for i, pos in enumerate(positives):
        ref = min(float(s[i, p]) for p in pos)
        keep = []
        for j in sorted(range(corpus.shape[0]), key=lambda j: (-float(s[i, j]), j)):
            v = float(s[i, j])
            if j in pos or (margin is not None and v > ref - margin) \
                    or (relative_margin is not None and v > ref - abs(ref) * relative_margin) \
                    or (max_score is not None and v > max_score) or (min_score is not None and v < min_score) \
                    or (labels is not None and labels[1][j] == labels[0][i]):
                continue
            keep.append(j)
        keep = keep[range_min:range_max][:k]
        out.append(keep + [-1] * (k - len(keep)))
    return torch.tensor(out)


@pytest.mark.parametrize("rules", [{}, {"margin": 0.05}, {"relative_margin": 0.1, "max_score": 0.5},
                                   {"min_score": 0.1, "range_min": 2, "range_max": 30}])
def test_exact_path_equals_brute_force(rules: dict) -> None:
    q, corpus, pos = _data(40, 600, 16, seed=1)
    got = fastneg.mine_hard_negatives(q.double(), corpus.double(), pos, 7, batch_size=16, **rules)
    want = _brute_force_top(q, corpus, [[p] for p in pos.tolist()], 7, **rules)
    assert torch.equal(got.indices, want)
    s = q.double() @ corpus.double().T
    ok = got.indices >= 0
    assert torch.allclose(got.scores[ok].double(), s.gather(1, got.indices.clamp(min=0))[ok], atol=1e-6)
    assert bool(torch.isinf(got.scores[~ok]).all())


def test_several_positives_use_the_minimum_and_are_all_excluded() -> None:
    q, corpus, pos = _data(30, 400, 16, seed=2)
    g = torch.Generator().manual_seed(5)
    extra = torch.randint(0, 400, (30, 2), generator=g)
    extra[::3, 1] = -1  # ragged: some queries have two positives, some three
    positives = torch.cat([pos[:, None], extra], dim=1)
    lists = [[p for p in row if p >= 0] for row in positives.tolist()]
    got = fastneg.mine_hard_negatives(q.double(), corpus.double(), positives, 6, margin=0.02, batch_size=8)
    assert torch.equal(got.indices, _brute_force_top(q, corpus, lists, 6, margin=0.02))
    s = q.double() @ corpus.double().T
    want_ref = torch.tensor([min(float(s[i, p]) for p in row) for i, row in enumerate(lists)], dtype=torch.float64)
    assert torch.allclose(got.positive_scores.double(), want_ref, atol=1e-6)
    # the list form gives the same answer
    again = fastneg.mine_hard_negatives(q.double(), corpus.double(), lists, 6, margin=0.02, batch_size=8)
    assert torch.equal(again.indices, got.indices)


def test_labels_mask_duplicates() -> None:
    q, corpus, pos = _data(20, 300, 16, seed=3)
    corpus_labels = torch.arange(300) % 50
    query_labels = corpus_labels[pos]
    got = fastneg.mine_hard_negatives(q.double(), corpus.double(), pos, 5, query_labels=query_labels,
                                      corpus_labels=corpus_labels)
    want = _brute_force_top(q, corpus, [[p] for p in pos.tolist()], 5, labels=(query_labels, corpus_labels))
    assert torch.equal(got.indices, want)


@pytest.mark.parametrize("kw", [{"margin": 0.05}, {"relative_margin": 0.1, "max_score": 0.5},
                                {"strategy": "simans", "seed": 1, "margin": 0.05, "range_min": 3, "range_max": 60},
                                {"strategy": "uniform", "seed": 4, "range_max": 40}])
def test_faiss_flat_equals_the_exact_path(kw: dict) -> None:
    """With a pool of the whole corpus the flat index sees what the fused sampler sees."""
    q, corpus, pos = _data(200, 3000, 32, seed=4)
    exact = fastneg.mine_hard_negatives(q, corpus, pos, 10, batch_size=64, **kw)
    flat = fastneg.mine_hard_negatives(q, corpus, pos, 10, batch_size=64, index="flat", pool=3000, **kw)
    assert torch.equal(exact.indices, flat.indices)
    assert torch.allclose(exact.scores, flat.scores, atol=1e-6)


def test_faiss_default_pool_can_run_out_where_the_exact_path_does_not() -> None:
    """The pool bounds a FAISS search (as in sentence-transformers): rules applied inside it."""
    q, corpus, pos = _data(200, 3000, 32, seed=4)
    exact = fastneg.mine_hard_negatives(q, corpus, pos, 10, margin=0.05)
    flat = fastneg.mine_hard_negatives(q, corpus, pos, 10, margin=0.05, index="flat")
    assert int((exact.indices < 0).sum()) < int((flat.indices < 0).sum())
    found = (flat.indices >= 0).all(1)
    assert torch.equal(flat.indices[found], exact.indices[found])


def test_ivf_recall_on_200k_x_128() -> None:
    """A clustered synthetic corpus (200k x 128: 1000 unit centres plus Gaussian noise of norm
    about 0.9), queries near their positives: IVF's top-10 (default nlist and nprobe) against
    the exact path. (On near-uniform data, noise of norm 1.7, the default nprobe gives 0.90 and
    nprobe = nlist / 4 gives 0.96: raise nprobe there.)"""
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(1000, 128, generator=g), dim=-1)
    corpus = torch.nn.functional.normalize(centers[torch.randint(0, 1000, (200_000,), generator=g)]
                                           + 0.08 * torch.randn(200_000, 128, generator=g), dim=-1)
    pos = torch.randint(0, 200_000, (1000,), generator=g)
    q = torch.nn.functional.normalize(corpus[pos] + 0.1 * torch.randn(1000, 128, generator=g), dim=-1)
    exact = fastneg.mine_hard_negatives(q, corpus, pos, 10)
    ivf = fastneg.mine_hard_negatives(q, corpus, pos, 10, index="ivf")
    hits = sum(len(set(a) & set(b)) for a, b in zip(exact.indices.tolist(), ivf.indices.tolist()))
    recall = hits / exact.indices.numel()
    print(f"IVF recall@10 against exact: {recall:.4f}")
    assert recall >= 0.95


def test_hnsw_and_a_user_index() -> None:
    q, corpus, pos = _data(100, 2000, 32, seed=6)
    exact = fastneg.mine_hard_negatives(q, corpus, pos, 5)
    hnsw = fastneg.mine_hard_negatives(q, corpus, pos, 5, index="hnsw")
    overlap = sum(len(set(a) & set(b)) for a, b in zip(exact.indices.tolist(), hnsw.indices.tolist()))
    assert overlap / exact.indices.numel() >= 0.9
    index = faiss.IndexFlatIP(32)
    index.add(corpus.numpy())
    mine = fastneg.mine_hard_negatives(q.numpy(), corpus.numpy(), pos.numpy(), 5, index=index, pool=2000)
    assert torch.equal(mine.indices, exact.indices)


def test_same_seed_same_negatives() -> None:
    q, corpus, pos = _data(50, 800, 16, seed=7)
    a = fastneg.mine_hard_negatives(q, corpus, pos, 4, strategy="simans", seed=3, batch_size=16)
    b = fastneg.mine_hard_negatives(q, corpus, pos, 4, strategy="simans", seed=3, batch_size=16)
    c = fastneg.mine_hard_negatives(q, corpus, pos, 4, strategy="simans", seed=4, batch_size=16)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert bool((a.indices != pos[:, None]).all())


def test_bad_input() -> None:
    q, corpus, pos = _data(5, 50, 8)
    with pytest.raises(ValueError, match="corpus_embeddings"):
        fastneg.mine_hard_negatives(q, torch.randn(50, 9), pos, 3)
    with pytest.raises(ValueError, match="positives"):
        fastneg.mine_hard_negatives(q, corpus, torch.tensor([0, 1, 2, 3, 50]), 3)
    with pytest.raises(ValueError, match="positives"):
        fastneg.mine_hard_negatives(q, corpus, pos[:4], 3)
    with pytest.raises(ValueError, match="range_max"):
        fastneg.mine_hard_negatives(q, corpus, pos, 3, range_min=5, range_max=6)
    with pytest.raises(ValueError, match="index"):
        fastneg.mine_hard_negatives(q, corpus, pos, 3, index="lsh")
    with pytest.raises(ValueError, match="strategy"):
        fastneg.mine_hard_negatives(q, corpus, pos, 3, strategy="hardest")
    with pytest.raises(ValueError, match="num_negatives"):
        fastneg.mine_hard_negatives(q, corpus, pos, 0)
    with pytest.raises(ValueError, match="empty"):
        fastneg.mine_hard_negatives(np.zeros((0, 8), dtype=np.float32), corpus, [], 3)
