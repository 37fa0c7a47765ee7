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

Several processes (``process_group``, any ``torch.distributed`` backend): each rank passes its share
of the queries (any number, none included) and its shard of the corpus; row and corpus ids are
global, in the rank-ordered concatenation of the shares and shards. Each rank searches only its
shard (the fused sampler, or a FAISS index it builds over its shard: ``"ivf"`` with the coarse
quantizer one process would train, shared, so every shard probes one process's lists; ``"hnsw"``
one graph per shard) for every query of a batch;
the shards' candidates are merged exactly (:mod:`fastneg.parallel.sharded`): ``top`` gives the global
top-k and ``simans`` / ``uniform`` the one-process draw, because the noise is keyed by the global
corpus id; every rule is decided from the positive's score wherever the positive lives (its
embedding is sent to every rank). With shards that start at multiples of 256 rows
(:func:`fastneg.parallel.shard_bounds`) and the exact path or a flat index, the output is
bit-identical to one process over the whole corpus with the same ``batch_size`` and seed (IVF:
the same, up to k-means' rounding with another thread count). Scores
are ``pair_scores``: float64 products summed per pair, rounded to float32 once, so that they do
not depend on which process computed them.

Memory per rank: its shard with room for one batch of positives (``(N / ranks + batch_size) x
D``), the batch's queries (``batch_size x D``, gathered) and the candidates (``ranks x batch_size x
pool``); no query x corpus matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from ..backends import resolve_backend
from ..backends.operands import normalized_operands
from ..backends.sampler import draw
from ..parallel.gather import fail_together, gather_sizes, rank, world_size
from ..parallel.sharded import KEY_ALIGN, agree, gather_candidates, gather_owned, gather_rows, merge_top, pair_scores, shard_draw
from ..plan import Plan, Strategy
from ..reference import gumbel_noise, label_match, score_threshold, simans_log_weight
from ..rules import Rules, resolve_rules
from ..sampling import StrategyOption, draw_seed, parse_strategy
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


def _as_tensor(name: str, x: object, allow_empty: bool = False) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    return x


def _positives_matrix(positives: object, Q: int, N: int, device: torch.device) -> torch.Tensor:  # noqa: C901
    """[Q, P] int64 corpus ids, -1 padded, from [Q], [Q, P] or a list of id lists."""
    if isinstance(positives, (list, tuple)):
        rows = [list(p) if isinstance(p, (list, tuple)) else [p] for p in positives]
        width = max((len(r) for r in rows), default=0)
        if any(len(r) == 0 for r in rows):
            raise ValueError("positives: every query needs at least one positive")
        positives = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)
    if isinstance(positives, np.ndarray):
        positives = torch.from_numpy(positives)
    if not isinstance(positives, torch.Tensor) or positives.is_floating_point() or positives.dtype == torch.bool:
        raise TypeError("positives must be an integer tensor [Q] or [Q, P] (-1 padded), or a list of id lists")
    positives = positives.long().to(device)
    if positives.dim() == 1:
        positives = positives[:, None]
    if positives.dim() != 2 or positives.shape[0] != Q:
        raise ValueError(f"positives must have Q = {Q} rows, got shape {tuple(positives.shape)}")
    if positives.shape[0] and bool((positives[:, 0] < 0).any()):
        raise ValueError("positives: every query needs at least one positive (first entry >= 0)")
    if bool(((positives < -1) | (positives >= N)).any()):
        raise ValueError(f"positives must be corpus ids in [0, {N}) or -1 for padding")
    return positives


def build_index(kind: str, corpus: torch.Tensor, *, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                hnsw_m: int = 32, ef_search: int = 128, use_gpu: Optional[bool] = None,
                gpu_device: Optional[int] = None) -> Any:
    """A FAISS inner-product index over ``corpus`` (float32): ``"flat"``, ``"ivf"`` (``nlist``
    default ``4 sqrt(N)``, trained on up to ``64 nlist`` vectors; ``nprobe`` default ``nlist / 8``)
    or ``"hnsw"`` (``M = hnsw_m``, ``efSearch = ef_search``). ``use_gpu``: move flat/IVF indexes
    to every GPU (default: when faiss has GPUs and the corpus is on CUDA), or to ``gpu_device``
    alone (each rank of a process group uses its own GPU)."""
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
        nlist, nprobe, sample = ivf_layout(N, nlist, nprobe)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x if sample is None else x[sample])
        index.nprobe = nprobe
    if use_gpu is None:
        use_gpu = corpus.device.type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if use_gpu and kind != "hnsw":
        if gpu_device is not None:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu_device, index)
        else:
            index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def ivf_layout(N: int, nlist: Optional[int] = None, nprobe: Optional[int] = None) -> tuple[int, int, Optional[np.ndarray]]:
    """``(nlist, nprobe, training rows)`` of :func:`build_index`'s IVF index over ``N`` vectors
    (``None``: every row, in order)."""
    nlist = nlist or max(1, min(int(4 * math.sqrt(N)), N // 39 or 1))
    sample = None if N <= 64 * nlist else np.random.default_rng(0).choice(N, 64 * nlist, replace=False)
    return nlist, nprobe or max(1, nlist // 8), sample


def build_sharded_ivf(shard: torch.Tensor, first_key: int, N: int, group: Any, gpu_device: Optional[int] = None) -> Any:
    """This rank's IVF index over its shard, with the coarse quantizer one process would train over
    the whole corpus (the same training rows, gathered from their owners; rank 0 trains it and every
    rank receives the centroids) and the same ``nprobe``: every shard probes the lists one process
    probes, so the shards' candidates together are one process's. Collective."""
    import faiss
    import torch.distributed as dist

    from ..parallel.gather import _group

    nlist, nprobe, sample = ivf_layout(N)
    D = shard.shape[1]
    ids = torch.arange(N) if sample is None else torch.from_numpy(sample)
    me = rank(group)
    parts = []
    for r in range(0, ids.shape[0], 16384):  # the training rows from their owners, a slice at a time
        rows = gather_owned(ids[r:r + 16384].to(shard.device), first_key, shard.float(), group)
        if me == 0:
            parts.append(rows.cpu())
    centroids = torch.empty(nlist, D, dtype=torch.float32)
    if me == 0:
        trainer = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        trainer.train(np.ascontiguousarray(torch.cat(parts).numpy()))
        centroids = torch.from_numpy(trainer.quantizer.reconstruct_n(0, nlist))
    collective = centroids.to(shard.device) if dist.get_backend(_group(group)) == "nccl" else centroids
    dist.broadcast(collective, src=dist.get_global_rank(_group(group), 0), group=_group(group))
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(np.ascontiguousarray(collective.cpu().numpy()))
    index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = nprobe
    if gpu_device is not None:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu_device, index)
    if shard.shape[0]:
        index.add(np.ascontiguousarray(shard.detach().float().cpu().numpy()))
    return index


def mine_hard_negatives(
    query_embeddings: Union[torch.Tensor, np.ndarray],
    corpus_embeddings: Union[torch.Tensor, np.ndarray],
    positives: Any,
    num_negatives: int,
    *,
    strategy: StrategyOption = "top",
    rules: Optional[Rules] = None,
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
    process_group: Any = None,
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
        rules: a :class:`fastneg.Rules` (its ``margin``, ``relative_margin`` and ``max_score``; the
            miner takes no guide embeddings, and the loss's own fields do not apply to a draw), or
            those three as keyword arguments (not both).
        margin, relative_margin, max_score: the loss's rules, against the minimum positive score.
        min_score: drop candidates scoring below it.
        range_min, range_max: draw from ranks ``[range_min, range_max)`` among the candidates left.
        batch_size: queries per step (progress and, for FAISS, the search batch).
        index: ``"exact"``, ``"flat"``, ``"ivf"``, ``"hnsw"`` (built here with :func:`build_index`), or
            a ``faiss.Index`` holding ``corpus_embeddings`` in order (with ``process_group``: this
            rank's shard).
        pool: FAISS candidates retrieved per query (default ``range_max + P`` with a window, else
            ``range_min + 10 k + P`` with rules and ``k + P`` without, as sentence-transformers).
        seed, generator: randomness of ``"simans"`` / ``"uniform"`` (with ``process_group``, rank 0's).
        show_progress_bar: a tqdm bar over query batches (rank 0's, with ``process_group``).
        process_group: a ``torch.distributed`` group: this rank's queries and corpus shard, global
            ids (module docstring). Collective: every rank calls it with the same options.

    Returns:
        :class:`MinedNegatives` for this rank's queries (all of them in one process), global ids.
    """
    run = Mining(query_embeddings, corpus_embeddings, positives, num_negatives, strategy=strategy, rules=rules,
                 query_labels=query_labels, corpus_labels=corpus_labels, margin=margin,
                 relative_margin=relative_margin, max_score=max_score, min_score=min_score, range_min=range_min,
                 range_max=range_max, batch_size=batch_size, index=index, pool=pool, seed=seed, generator=generator,
                 process_group=process_group)
    lo, hi = run.first_row, run.first_row + run.q.shape[0]
    out_idx = torch.full((hi - lo, num_negatives), -1, dtype=torch.long, device=run.q.device)
    out_scores = torch.full((hi - lo, num_negatives), float("-inf"), dtype=torch.float32, device=run.q.device)
    ref_scores = torch.empty(hi - lo, dtype=torch.float32, device=run.q.device)
    steps = list(run.steps())
    if show_progress_bar and run.rank == 0:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="Mining hard negatives", unit="batch")
    for step, start in steps:
        idx, sc, ref = run.mine(step, start)
        a, b = max(lo, start), min(hi, start + idx.shape[0])
        if a < b:
            out_idx[a - lo:b - lo], out_scores[a - lo:b - lo] = idx[a - start:b - start], sc[a - start:b - start]
            ref_scores[a - lo:b - lo] = ref[a - start:b - start]
    return MinedNegatives(out_idx, out_scores, ref_scores)


class Mining:
    """One mining run, batch by batch (:func:`mine_hard_negatives` and ``fastneg mine`` drive it):
    validated inputs, this rank's share of the queries and shard of the corpus, and :meth:`mine`,
    which returns every row of one batch (the same on every rank). ``corpus_room``: a tensor whose
    first ``N`` rows already hold this rank's shard, with room for a batch of positives after
    them (``fastneg mine`` loads the shard into it, so the shard is held once)."""

    def __init__(self, query_embeddings: Any, corpus_embeddings: Any, positives: Any, num_negatives: int, *,
                 strategy: StrategyOption = "top", rules: Optional[Rules] = None,
                 query_labels: Optional[torch.Tensor] = None,
                 corpus_labels: Optional[torch.Tensor] = None, margin: Optional[float] = None,
                 relative_margin: Optional[float] = None, max_score: Optional[float] = None,
                 min_score: Optional[float] = None, range_min: int = 0, range_max: Optional[int] = None,
                 batch_size: int = 16384, index: Any = "exact", pool: Optional[int] = None, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, process_group: Any = None,
                 corpus_room: Optional[torch.Tensor] = None) -> None:
        group = process_group
        self.group, self.world, self.rank = group, world_size(group) if group is not None else 1, \
            rank(group) if group is not None else 0
        with fail_together(group):
            resolved = resolve_rules("mine_hard_negatives", rules, margin=margin, relative_margin=relative_margin,
                                     max_score=max_score)
            margin, relative_margin, max_score = resolved.margin, resolved.relative_margin, resolved.max_score
            self.rule_set = resolved
            self._validate(query_embeddings, corpus_embeddings, positives, num_negatives, strategy, query_labels,
                           corpus_labels, margin, relative_margin, max_score, min_score, range_min, range_max,
                           batch_size, index, seed, generator)
        width = None
        if group is not None:
            width = self._agree(positives)
        else:
            self.counts_q, self.counts_n = [self.q.shape[0]], [self.corpus.shape[0]]
        self.first_row, self.first_key = sum(self.counts_q[:self.rank]), sum(self.counts_n[:self.rank])
        self.Q, self.N = sum(self.counts_q), sum(self.counts_n)
        with fail_together(group):
            self.pos = _positives_matrix(positives, self.q.shape[0], self.N, self.q.device)
        if width is not None and self.pos.shape[1] < width:  # every rank as wide as the widest
            self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], width - self.pos.shape[1]), -1)], 1)
        self.P = self.pos.shape[1]
        if self.range_max is not None and self.range_max - self.range_min < num_negatives:
            raise ValueError(f"range_max - range_min must leave num_negatives = {num_negatives} ranks, got "
                             f"range_min={self.range_min}, range_max={self.range_max}")
        self.window_end = (self.range_max if self.range_max is not None
                           else self.range_min + (10 if self.filters else 1) * num_negatives)
        self.backend = resolve_backend("auto", self.q.device)
        self.faiss_index = None
        if self.use_faiss:
            n = self.corpus.shape[0]
            if isinstance(self.index_arg, str):
                own_gpu = self.corpus.device.index if self.world > 1 and self.corpus.device.type == "cuda" else None
                if self.index_arg == "ivf" and self.world > 1:  # the one-process quantizer, shared
                    self.faiss_index = build_sharded_ivf(self.corpus, self.first_key, self.N, self.group, own_gpu)
                else:
                    self.faiss_index = build_index(self.index_arg, self.corpus, gpu_device=own_gpu) if n else None
            else:
                self.faiss_index = self.index_arg
                if self.faiss_index.ntotal != n:
                    raise ValueError(f"index holds {self.faiss_index.ntotal} vectors, corpus_embeddings has {n}")
            self.pool = min(pool if pool is not None else self.window_end + self.P, self.N)
        # the room after the shard for one batch of positives (the sharded draw appends them)
        self.room = None
        if self.world > 1 and not self.use_faiss:
            need = max(self.corpus.shape[0] + self.batch_size, KEY_ALIGN)
            if corpus_room is not None and corpus_room.shape[0] >= need and corpus_room.dtype == self.q.dtype:
                self.room = corpus_room
            else:
                self.room = self.corpus.new_zeros((need, self.corpus.shape[1]))
                self.room[:self.corpus.shape[0]] = self.corpus
            self.corpus = self.room[:self.corpus.shape[0]]

    def _validate(self, query_embeddings: Any, corpus_embeddings: Any, positives: Any, num_negatives: int,
                  strategy: StrategyOption, query_labels: Any, corpus_labels: Any, margin: Optional[float],
                  relative_margin: Optional[float], max_score: Optional[float], min_score: Optional[float],
                  range_min: int, range_max: Optional[int], batch_size: int, index: Any, seed: Optional[int],
                  generator: Optional[torch.Generator]) -> None:
        sharded = self.world > 1
        q = _as_tensor("query_embeddings", query_embeddings, allow_empty=sharded)
        corpus = _as_tensor("corpus_embeddings", corpus_embeddings, allow_empty=sharded)
        if corpus.shape[1] != q.shape[1]:
            raise ValueError(f"corpus_embeddings must have dim {q.shape[1]} like query_embeddings, got {corpus.shape[1]}")
        self.q, self.corpus = q, corpus.to(q.device, q.dtype)
        check_num_negatives(num_negatives)
        self.k = num_negatives
        if strategy == "random":
            strategy = "uniform"
        self.code, simans = parse_strategy(strategy)
        self.a, self.b = (simans.a, simans.b) if simans is not None else (0.0, 0.0)
        if (query_labels is None) != (corpus_labels is None):
            raise ValueError("query_labels and corpus_labels must be given together")
        if query_labels is not None:
            query_labels, corpus_labels = torch.as_tensor(query_labels).long(), torch.as_tensor(corpus_labels).long()
            if query_labels.shape != (q.shape[0],) or corpus_labels.shape != (corpus.shape[0],):
                raise ValueError(f"query_labels must be [Q] = [{q.shape[0]}] and corpus_labels [N] = "
                                 f"[{corpus.shape[0]}], got {tuple(query_labels.shape)} and {tuple(corpus_labels.shape)}")
            query_labels, corpus_labels = query_labels.to(q.device), corpus_labels.to(q.device)
        self.query_labels, self.corpus_labels = query_labels, corpus_labels
        for name, value in (("range_min", range_min), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if range_min < 0:
            raise ValueError(f"range_min must be >= 0, got {range_min}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if range_max is not None and (isinstance(range_max, bool) or not isinstance(range_max, int)):
            raise TypeError(f"range_max must be an int, got {type(range_max).__name__}")
        self.range_min, self.range_max, self.batch_size = range_min, range_max, batch_size
        self.use_faiss = not (isinstance(index, str) and index == "exact")
        if isinstance(index, str) and index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS} or a faiss.Index, got {index!r}")
        self.index_arg = index
        self.base_seed = 0 if self.code == Strategy.TOP else draw_seed(seed, generator)
        self.windowed = range_min > 0 or range_max is not None or min_score is not None
        self.filters = margin is not None or relative_margin is not None or max_score is not None or min_score is not None
        self.margin, self.relative_margin, self.max_score, self.min_score = margin, relative_margin, max_score, min_score
        self.rules = self.rule_set.masking_plan()
        self.plan = self.rule_set.masking_plan(simans)

    def _agree(self, positives: Any) -> int:
        """Every rank's share sizes and rank 0's seed; ranks whose dim, dtype, labels, index or
        ``num_negatives`` disagree all raise. Returns the widest rank's positives width."""
        group = self.group
        self.counts_q = gather_sizes(self.q.shape[0], group)
        self.counts_n = gather_sizes(self.corpus.shape[0], group)
        width = 1
        if isinstance(positives, (list, tuple)):
            width = max((len(p) if isinstance(p, (list, tuple)) else 1 for p in positives), default=1)
        elif hasattr(positives, "shape") and len(positives.shape) == 2:
            width = int(positives.shape[1])
        described = {"embedding dim": self.q.shape[1], "dtype": str(self.q.dtype),
                     "labels": self.query_labels is not None, "index": self.use_faiss, "num_negatives": self.k,
                     "seed": self.base_seed, "width": width}
        table = agree(described, group, ("embedding dim", "dtype", "labels", "index", "num_negatives"))
        self.base_seed = int(table[0]["seed"])  # rank 0's (a default-generator seed differs per rank)
        return max(row["width"] for row in table)

    def steps(self) -> Any:
        """``(step, first row)`` of every batch."""
        return enumerate(range(0, self.Q, self.batch_size))

    def _rows(self, t: Optional[torch.Tensor], lo: int, hi: int) -> Optional[torch.Tensor]:
        if t is None:
            return None
        if self.group is None:
            return t[lo:hi]
        return gather_rows(t, self.counts_q, lo, hi, self.group)

    def mine(self, step: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``step`` (rows ``start ..``): ``(indices [b, k], scores [b, k], reference positive
        scores [b])`` of every row, global ids, on every rank."""
        end = min(self.Q, start + self.batch_size)
        qb, pb = self._rows(self.q, start, end), self._rows(self.pos, start, end)
        qlb = self._rows(self.query_labels, start, end)
        b = qb.shape[0]
        # the reference positive: the one with the minimum score; every positive is excluded
        pemb = gather_owned(pb, self.first_key, self.corpus, self.group)
        pscore = pair_scores(qb, pemb).masked_fill(pb < 0, float("inf"))
        ref_col = pscore.argmin(1)
        ref = pb.gather(1, ref_col[:, None])[:, 0]
        ref_scores = pscore.gather(1, ref_col[:, None])[:, 0]
        ref_emb = pemb[torch.arange(b, device=qb.device), ref_col]
        batch_seed = (self.base_seed + 0x9E3779B9 * (step + 1)) & 0xFFFFFFFF
        if not self.use_faiss and not self.windowed:
            others = pb.masked_fill(pb == ref[:, None], -1)
            ids, values = self._draw(qb, qlb, ref, ref_emb, self.k, self.code, self.plan, batch_seed, others)
            scores = self._local_scores(qb, ids)
            values, idx, scores = self._merge(values, ids, self.k, scores)
            return idx, scores, ref_scores
        if self.use_faiss:
            ids, values = self._faiss(qb)
            size = self.pool
        else:  # the window's candidates: the top window_end + P keys, then the rules below
            size = min(self.N, self.window_end + self.P)
            ids, values = self._draw(qb, qlb, ref, ref_emb, size, Strategy.TOP, self.rules, 0, None)
        extras = [self._local_scores(qb, ids)]
        if self.corpus_labels is not None:
            extras.append(self._local_labels(ids))
        merged = self._merge(values, ids, size, *extras)
        cand, scores = merged[1], merged[2]
        cand_labels = merged[3] if self.corpus_labels is not None else None
        idx, sc = _select(cand, scores, cand_labels, qlb, pb, ref_scores, self.k, self.code, self.a, self.b,
                          batch_seed, self.min_score, self.rules, self.range_min, self.window_end, start)
        return idx, sc, ref_scores

    def _draw(self, qb: torch.Tensor, qlb: Optional[torch.Tensor], ref: torch.Tensor, ref_emb: torch.Tensor, k: int,
              code: Strategy, plan: Plan, seed: int, exclude: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's candidates: global ids and values ``[b, k]``."""
        if self.world == 1:
            positives, ql, kl, _, _ = normalized_operands(qb, ref, qlb, self.corpus_labels, None, None)
            return draw(self.backend, qb, self.corpus, positives, k, code, plan, seed, ql, kl, None, None, exclude)
        n = self.corpus.shape[0]
        self.room[n:n + qb.shape[0]] = ref_emb  # the positives after the shard, where shard_draw reads them
        return shard_draw(self.backend, qb, self.corpus, self.first_key, ref, ref_emb, k, code, plan, seed, qlb,
                          self.corpus_labels, exclude=exclude, keys_room=self.room)

    def _faiss(self, qb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = qb.shape[0], self.corpus.shape[0]
        if self.faiss_index is None or n == 0 or b == 0:
            return (torch.full((b, 1), -1, dtype=torch.long, device=qb.device),
                    torch.full((b, 1), float("-inf"), dtype=torch.float32, device=qb.device))
        found, ids = _faiss_candidates(self.faiss_index, qb, min(self.pool, n))
        values = found.masked_fill(ids < 0, float("-inf"))
        return torch.where(ids >= 0, ids + self.first_key, -1), values

    def _local_scores(self, qb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scores of this rank's candidates (-inf at -1): :func:`pair_scores`."""
        n = self.corpus.shape[0]
        if n == 0:
            return torch.full(ids.shape, float("-inf"), dtype=torch.float32, device=ids.device)
        local = (ids - self.first_key).clamp(0, n - 1)
        return pair_scores(qb, self.corpus, local).masked_fill(ids < 0, float("-inf"))

    def _local_labels(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.corpus.shape[0]
        if n == 0:
            return torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
        return self.corpus_labels[(ids - self.first_key).clamp(0, n - 1)]

    def _merge(self, values: torch.Tensor, ids: torch.Tensor, k: int, *extras: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The top-k over every rank's candidates by (value, smaller id): ``(values, ids, *extras)``."""
        width = max(1, ids.shape[1])
        if self.group is not None:  # equal widths on every rank for the all-gather
            width = max(gather_sizes(ids.shape[1], self.group))
        if ids.shape[1] < width:
            pad = width - ids.shape[1]
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
            values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
            extras = tuple(torch.cat([e, e.new_zeros((e.shape[0], pad))], 1) for e in extras)
        stacked = gather_candidates(self.group, values.float(), ids, *extras)
        return merge_top(stacked[0], stacked[1], k, *stacked[2:])


def _faiss_candidates(index: Any, qb: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    gpu = hasattr(index, "getDevice") or "Gpu" in type(index).__name__
    if gpu and pool > FAISS_GPU_MAX_K:
        raise ValueError(f"pool: FAISS on GPU retrieves at most {FAISS_GPU_MAX_K} candidates per query, asked for "
                         f"{pool}; lower range_max / pool or use index='exact'")
    found, ids = index.search(np.ascontiguousarray(qb.detach().float().cpu().numpy()), pool)
    return torch.from_numpy(found).float().to(qb.device), torch.from_numpy(ids).long().to(qb.device)


def _select(cand: torch.Tensor, scores: torch.Tensor, cand_labels: Optional[torch.Tensor],
            query_labels: Optional[torch.Tensor], pb: torch.Tensor, ref_score: torch.Tensor, k: int, code: Strategy,
            a: float, b: float, seed: int, min_score: Optional[float], rules: Plan, range_min: int, window_end: int,
            first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules, window and strategy on a candidate pool [b, C] (-1 = none) with its exact scores
    (and labels), in the order of corpus ids, so that ties go to the smaller id."""
    by_id = torch.sort(torch.where(cand >= 0, cand, torch.iinfo(torch.long).max), dim=1, stable=True).indices
    cand, scores = cand.gather(1, by_id), scores.gather(1, by_id)
    drop = (cand < 0) | (cand[:, :, None] == pb[:, None, :]).any(-1) | torch.isnan(scores)
    if query_labels is not None and cand_labels is not None:
        drop |= label_match(query_labels, cand_labels.gather(1, by_id))
    ref = ref_score[:, None]
    drop |= scores > score_threshold(ref, rules)
    if min_score is not None:
        drop |= scores < min_score
    # rank what is left by score (ties: smaller corpus id), keep ranks [range_min, window_end)
    ranked = torch.sort(torch.where(drop, float("-inf"), scores), dim=1, descending=True, stable=True).indices
    cand, scores, drop = cand.gather(1, ranked), scores.gather(1, ranked), drop.gather(1, ranked)
    cand, scores, drop = (t[:, range_min:window_end] for t in (cand, scores, drop))
    if code == Strategy.TOP:
        values = scores
    else:
        rows = torch.arange(first_row, first_row + cand.shape[0], device=cand.device)
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
