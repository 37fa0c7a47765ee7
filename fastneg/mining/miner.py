"""Hard-negative mining over a corpus with the loss's rules: :func:`mine_hard_negatives`.

Two ways to find candidates, the same rules and strategies after:

- ``index="exact"`` (default): the fused sampler (:func:`fastneg.sample_negatives`) over the whole
  corpus, on the embeddings' device (C++ on CPU, Triton on CUDA), for any number of negatives.
  Memory: the corpus embeddings plus ``O(batch_size * k)``; no query x corpus matrix.
- a FAISS index: ``"flat"`` (exact inner product), ``"ivf"`` (``IndexIVFFlat``), ``"hnsw"``
  (``IndexHNSWFlat``), or any ``faiss.Index`` already holding the corpus. Each batch of queries
  retrieves a candidate pool; the rules are then applied to the pool with exactly recomputed
  scores, and the strategy picks from what is left. faiss-cpu by default; the flat and IVF
  indexes move to the GPUs when faiss-gpu is installed and the embeddings are on CUDA.

Rules: ``margin`` / ``relative_margin`` / ``max_score`` as in the loss, with the reference score
the *minimum* score among the query's positives (NV-Retriever, sentence-transformers); every
positive is excluded; ``query_labels`` / ``corpus_labels`` mask keys with the query's label;
``min_score`` drops candidates scoring below it. ``range_min`` / ``range_max`` restrict the draw
to ranks ``[range_min, range_max)`` among the candidates left after the rules (sentence-
transformers' window). Strategies: ``"top"``, ``"simans"`` / ``SimANS(a, b)``, ``"uniform"``
(alias ``"random"``).

Randomness: the Gumbel noise of a draw is a function of (seed, query batch, row, corpus id); the
same seed and ``batch_size`` give the same negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from ..plan import Plan, Strategy
from ..reference import gumbel_noise, label_match, score_threshold, simans_log_weight
from ..sampling import StrategyOption, draw_seed, parse_strategy, sample_negatives
from ..validation import check_num_negatives

__all__ = ["MinedNegatives", "mine_hard_negatives", "build_index", "INDEX_KINDS"]

INDEX_KINDS = ("exact", "flat", "ivf", "hnsw")
FAISS_GPU_MAX_K = 2048  # FAISS's GPU search returns at most this many neighbours per query


@dataclass
class MinedNegatives:
    """Mined negatives for each query: corpus ids ``indices`` ``[Q, k]`` (best first, -1 when
    the rules left fewer than k), their scores ``scores`` ``[Q, k]`` (-inf at -1), and the
    reference positive score ``positive_scores`` ``[Q]`` (the minimum over the query's positives)."""

    indices: torch.Tensor
    scores: torch.Tensor
    positive_scores: torch.Tensor


def _as_tensor(name: str, x: object) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x


def _positives_matrix(positives: object, Q: int, N: int, device: torch.device) -> torch.Tensor:
    """[Q, P] int64 corpus ids, -1 padded, from [Q], [Q, P] or a list of id lists."""
    if isinstance(positives, (list, tuple)):
        rows = [list(p) if isinstance(p, (list, tuple)) else [p] for p in positives]
        width = max((len(r) for r in rows), default=0)
        if any(len(r) == 0 for r in rows):
            raise ValueError("positives: every query needs at least one positive")
        positives = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)
    if isinstance(positives, np.ndarray):
        positives = torch.from_numpy(positives)
    if not isinstance(positives, torch.Tensor) or positives.is_floating_point() or positives.dtype == torch.bool:
        raise TypeError("positives must be an integer tensor [Q] or [Q, P] (-1 padded), or a list of id lists")
    positives = positives.long().to(device)
    if positives.dim() == 1:
        positives = positives[:, None]
    if positives.dim() != 2 or positives.shape[0] != Q:
        raise ValueError(f"positives must have Q = {Q} rows, got shape {tuple(positives.shape)}")
    if bool((positives[:, 0] < 0).any()):
        raise ValueError("positives: every query needs at least one positive (first entry >= 0)")
    if bool(((positives < -1) | (positives >= N)).any()):
        raise ValueError(f"positives must be corpus ids in [0, {N}) or -1 for padding")
    return positives


def build_index(kind: str, corpus: torch.Tensor, *, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                hnsw_m: int = 32, ef_search: int = 128, use_gpu: Optional[bool] = None) -> Any:
    """A FAISS inner-product index over ``corpus`` (float32): ``"flat"``, ``"ivf"`` (``nlist``
    default ``4 sqrt(N)``, trained on up to ``64 nlist`` vectors; ``nprobe`` default ``nlist / 8``)
    or ``"hnsw"`` (``M = hnsw_m``, ``efSearch = ef_search``). ``use_gpu``: move flat/IVF indexes
    to every GPU (default: when faiss has GPUs and the corpus is on CUDA)."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("FAISS indexes need faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    if kind not in INDEX_KINDS[1:]:
        raise ValueError(f"index must be one of {INDEX_KINDS} or a faiss.Index, got {kind!r}")
    x = np.ascontiguousarray(corpus.detach().float().cpu().numpy())
    N, D = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(D)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(D, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        nlist = nlist or max(1, min(int(4 * math.sqrt(N)), N // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = x if N <= 64 * nlist else x[rng.choice(N, 64 * nlist, replace=False)]
        index.train(train)
        index.nprobe = nprobe or max(1, nlist // 8)
    if use_gpu is None:
        use_gpu = corpus.device.type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if use_gpu and kind != "hnsw":
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def mine_hard_negatives(
    query_embeddings: Union[torch.Tensor, np.ndarray],
    corpus_embeddings: Union[torch.Tensor, np.ndarray],
    positives: Any,
    num_negatives: int,
    *,
    strategy: StrategyOption = "top",
    query_labels: Optional[torch.Tensor] = None,
    corpus_labels: Optional[torch.Tensor] = None,
    margin: Optional[float] = None,
    relative_margin: Optional[float] = None,
    max_score: Optional[float] = None,
    min_score: Optional[float] = None,
    range_min: int = 0,
    range_max: Optional[int] = None,
    batch_size: int = 16384,
    index: Any = "exact",
    pool: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    show_progress_bar: bool = False,
) -> MinedNegatives:
    """Mine ``num_negatives`` negatives per query from the corpus (module docstring).

    Args:
        query_embeddings ``[Q, D]``, corpus_embeddings ``[N, D]``: tensors or numpy arrays, scored
            by inner product (normalise them for cosine). The exact path runs on their device.
        positives: ``[Q]`` corpus ids, ``[Q, P]`` ids with ``-1`` padding, or a list of id lists.
        num_negatives: ``k >= 1``.
        strategy: ``"top"``, ``"simans"``, ``fastneg.SimANS(a, b)``, ``"uniform"`` or ``"random"``.
        query_labels ``[Q]``, corpus_labels ``[N]``: a corpus entry with the query's label is masked
            (e.g. duplicate ids); both or neither.
        margin, relative_margin, max_score: the loss's rules, against the minimum positive score.
        min_score: drop candidates scoring below it.
        range_min, range_max: draw from ranks ``[range_min, range_max)`` among the candidates left.
        batch_size: queries per step (progress and, for FAISS, the search batch).
        index: ``"exact"``, ``"flat"``, ``"ivf"``, ``"hnsw"`` (built here with :func:`build_index`), or
            a ``faiss.Index`` holding ``corpus_embeddings`` in order.
        pool: FAISS candidates retrieved per query (default ``range_max + P`` with a window, else
            ``range_min + 10 k + P`` with rules and ``k + P`` without, as sentence-transformers).
        seed, generator: randomness of ``"simans"`` / ``"uniform"``.
        show_progress_bar: a tqdm bar over query batches.
    """
    q = _as_tensor("query_embeddings", query_embeddings)
    corpus = _as_tensor("corpus_embeddings", corpus_embeddings)
    if corpus.shape[1] != q.shape[1]:
        raise ValueError(f"corpus_embeddings must have dim {q.shape[1]} like query_embeddings, got {corpus.shape[1]}")
    corpus = corpus.to(q.device, q.dtype)
    check_num_negatives(num_negatives)
    if strategy == "random":
        strategy = "uniform"
    code, simans = parse_strategy(strategy)
    a, b = (simans.a, simans.b) if simans is not None else (0.0, 0.0)
    Q, N = q.shape[0], corpus.shape[0]
    pos = _positives_matrix(positives, Q, N, q.device)
    if (query_labels is None) != (corpus_labels is None):
        raise ValueError("query_labels and corpus_labels must be given together")
    if query_labels is not None:
        query_labels, corpus_labels = torch.as_tensor(query_labels).long(), torch.as_tensor(corpus_labels).long()
        if query_labels.shape != (Q,) or corpus_labels.shape != (N,):
            raise ValueError(f"query_labels must be [Q] = [{Q}] and corpus_labels [N] = [{N}], got "
                             f"{tuple(query_labels.shape)} and {tuple(corpus_labels.shape)}")
        query_labels, corpus_labels = query_labels.to(q.device), corpus_labels.to(q.device)
    for name, value in (("range_min", range_min), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if range_min < 0:
        raise ValueError(f"range_min must be >= 0, got {range_min}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if range_max is not None:
        if isinstance(range_max, bool) or not isinstance(range_max, int):
            raise TypeError(f"range_max must be an int, got {type(range_max).__name__}")
        if range_max - range_min < num_negatives:
            raise ValueError(f"range_max - range_min must leave num_negatives = {num_negatives} ranks, got "
                             f"range_min={range_min}, range_max={range_max}")
    use_faiss = not (isinstance(index, str) and index == "exact")
    if isinstance(index, str) and index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS} or a faiss.Index, got {index!r}")
    base_seed = 0 if code == Strategy.TOP else draw_seed(seed, generator)
    windowed = range_min > 0 or range_max is not None or min_score is not None
    P = pos.shape[1]
    filters = margin is not None or relative_margin is not None or max_score is not None or min_score is not None
    window_end = range_max if range_max is not None else range_min + (10 if filters else 1) * num_negatives

    faiss_index = None
    if use_faiss:
        faiss_index = build_index(index, corpus) if isinstance(index, str) else index
        if faiss_index.ntotal != N:
            raise ValueError(f"index holds {faiss_index.ntotal} vectors, corpus_embeddings has {N}")
        if pool is None:
            pool = window_end + P
        pool = min(pool, N)

    out_idx = torch.full((Q, num_negatives), -1, dtype=torch.long, device=q.device)
    out_scores = torch.full((Q, num_negatives), float("-inf"), dtype=torch.float32, device=q.device)
    ref_scores = torch.empty(Q, dtype=torch.float32, device=q.device)
    starts = range(0, Q, batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="Mining hard negatives", unit="batch")
    for step, start in enumerate(starts):
        rows = slice(start, min(Q, start + batch_size))
        qb, pb = q[rows], pos[rows]
        # the reference positive: the one with the minimum score; every positive is excluded
        pscore = torch.einsum("bd,bpd->bp", qb, corpus[pb.clamp(min=0)]).float()
        pscore = pscore.masked_fill(pb < 0, float("inf"))
        ref_col = pscore.argmin(1)
        ref = pb.gather(1, ref_col[:, None])[:, 0]
        ref_scores[rows] = pscore.gather(1, ref_col[:, None])[:, 0]
        batch_seed = (base_seed + 0x9E3779B9 * (step + 1)) & 0xFFFFFFFF
        labels = {} if query_labels is None else {"query_labels": query_labels[rows], "key_labels": corpus_labels}
        rules = dict(margin=margin, relative_margin=relative_margin, max_score=max_score)
        if not use_faiss and not windowed:
            exclude = pb.masked_fill(pb == ref[:, None], -1)
            idx = sample_negatives(qb, corpus, ref, num_negatives, strategy=strategy, exclude=exclude,
                                   seed=batch_seed, **labels, **rules)
            out_idx[rows] = idx
            out_scores[rows] = _scores_of(qb, corpus, idx)
            continue
        if use_faiss:
            cand = _faiss_candidates(faiss_index, qb, pool)
        else:  # the window's candidates: the top window_end + P keys, then the rules below
            cand = sample_negatives(qb, corpus, ref, min(N, window_end + P), strategy="top", **labels, **rules)
        idx, sc = _select(qb, corpus, cand, pb, ref_scores[rows], num_negatives, code, a, b, batch_seed,
                          query_labels[rows] if query_labels is not None else None, corpus_labels, margin,
                          relative_margin, max_score, min_score, range_min, window_end, start)
        out_idx[rows], out_scores[rows] = idx, sc
    return MinedNegatives(out_idx, out_scores, ref_scores)


def _scores_of(qb: torch.Tensor, corpus: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """q_i . corpus[idx[i, c]], gathering at most ~2^24 embedding values at a time."""
    rows = max(1, 2**24 // max(1, idx.shape[1] * corpus.shape[1]))
    parts = [torch.einsum("bd,bkd->bk", qb[r:r + rows], corpus[idx[r:r + rows].clamp(min=0)]).float()
             for r in range(0, max(1, idx.shape[0]), rows)]
    s = torch.cat(parts) if parts else idx.new_zeros(idx.shape, dtype=torch.float32)
    return s.masked_fill(idx < 0, float("-inf"))


def _faiss_candidates(index: Any, qb: torch.Tensor, pool: int) -> torch.Tensor:
    gpu = hasattr(index, "getDevice") or "Gpu" in type(index).__name__
    if gpu and pool > FAISS_GPU_MAX_K:
        raise ValueError(f"pool: FAISS on GPU retrieves at most {FAISS_GPU_MAX_K} candidates per query, asked for "
                         f"{pool}; lower range_max / pool or use index='exact'")
    _, ids = index.search(np.ascontiguousarray(qb.detach().float().cpu().numpy()), pool)
    return torch.from_numpy(ids).long().to(qb.device)


def _select(qb: torch.Tensor, corpus: torch.Tensor, cand: torch.Tensor, pb: torch.Tensor, ref_score: torch.Tensor,
            k: int, code: Strategy, a: float, b: float, seed: int, query_labels: Optional[torch.Tensor],
            corpus_labels: Optional[torch.Tensor], margin: Optional[float], relative_margin: Optional[float],
            max_score: Optional[float], min_score: Optional[float], range_min: int, window_end: int,
            first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules, window and strategy on a candidate pool [b, C] (-1 = none), with exact scores."""
    scores = _scores_of(qb, corpus, cand)
    drop = (cand < 0) | (cand[:, :, None] == pb[:, None, :]).any(-1) | torch.isnan(scores)
    if query_labels is not None and corpus_labels is not None:
        drop |= label_match(query_labels, corpus_labels[cand.clamp(min=0)])
    ref = ref_score[:, None]
    drop |= scores > score_threshold(ref, Plan(margin=margin, relative_margin=relative_margin, max_score=max_score))
    if min_score is not None:
        drop |= scores < min_score
    # rank what is left by score (ties: smaller corpus id), keep ranks [range_min, window_end)
    ranked = torch.sort(torch.where(drop, float("-inf"), scores), dim=1, descending=True, stable=True).indices
    cand, scores, drop = cand.gather(1, ranked), scores.gather(1, ranked), drop.gather(1, ranked)
    cand, scores, drop = (t[:, range_min:window_end] for t in (cand, scores, drop))
    if code == Strategy.TOP:
        values = scores
    else:
        rows = torch.arange(first_row, first_row + qb.shape[0], device=qb.device)
        noise = gumbel_noise(seed, rows[:, None], cand.clamp(min=0))
        values = noise if code != Strategy.SIMANS else simans_log_weight(scores, ref, a, b) + noise
    values = values.masked_fill(drop, float("-inf"))
    order = torch.sort(values, dim=1, descending=True, stable=True)
    pick = order.indices[:, :k]
    ok = order.values[:, :k] > float("-inf")
    idx = torch.where(ok, cand.gather(1, pick), -1)
    sc = torch.where(ok, scores.gather(1, pick), float("-inf"))
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], 1)
        sc = torch.cat([sc, sc.new_full((sc.shape[0], pad), float("-inf"))], 1)
    return idx, sc
