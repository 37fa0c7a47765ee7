"""``mine_hard_negatives`` for a sentence-transformers model and a ``datasets.Dataset``
(re-exported by :mod:`fastneg.integrations.sentence_transformers`).

It takes the arguments of ``sentence_transformers.util.mine_hard_negatives`` that concern
mining, and returns its output formats (``"triplet"``, ``"n-tuple"``, ``"labeled-pair"``,
``"labeled-list"``, each with ``output_scores``) row for row, column for column. The search is
:func:`fastneg.mine_hard_negatives`: the fused exact sampler by default, a FAISS index with
``use_faiss=True`` (flat, as sentence-transformers) or ``index=``.

Differences, on purpose:

- Exact search applies the rules (margins, ``max_score``, ``min_score``) to the whole corpus,
  so a query whose closest candidates are all filtered out still gets negatives; sentence-
  transformers filters a pool of ``range_max + max_positives`` candidates (its FAISS path and
  ours with ``use_faiss=True`` both do, and then agree).
- ``sampling_strategy`` also takes ``"simans"`` or :class:`fastneg.SimANS`; ``"random"`` draws
  uniformly without replacement from the window (seeded by ``seed``).
- ``query_labels``-style duplicate masking comes free: corpus texts equal to the query's
  positive texts are never negatives (the corpus is de-duplicated, as in sentence-transformers).
- ``cache_folder`` uses sentence-transformers' file names and hashes, so either library reads
  the embeddings the other saved.
- ``process_group`` (fastneg's own): under ``torchrun``, every rank passes the same dataset and
  model; each encodes only its shard of the corpus and its share of the queries, mines its shard
  (:func:`fastneg.mine_hard_negatives` with ``process_group``) and every rank returns the same
  dataset, the one process's (bit-identical on CPU with the exact search or a flat index).
- Not supported: ``cross_encoder`` rescoring, ``use_multi_process``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Union

import numpy as np
import torch

from ...mining import mine_hard_negatives as _mine
from ...options import SimANS
from ...rules import Rules, resolve_rules

_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


def _encode(model: Any, texts: list[str], kind: str, prompt_name: Optional[str], prompt: Optional[str],
            batch_size: int, verbose: bool, cache_folder: Optional[str]) -> torch.Tensor:
    cache_file = None
    if cache_folder:
        # sentence-transformers' cache layout: <kind>_embeddings_<sha256 of (model, prompt, prompt name, texts)>.npy
        model_name = getattr(getattr(model, "model_card_data", None), "base_model", None) or ""
        digest = hashlib.sha256(repr((model_name, prompt, prompt_name, texts)).encode(), usedforsecurity=False)
        name = "query" if kind == "query" else "corpus"
        cache_file = os.path.join(cache_folder, f"{name}_embeddings_{digest.hexdigest()}.npy")
        if os.path.exists(cache_file):
            return torch.from_numpy(np.load(cache_file, allow_pickle=False)).float()
    encode = getattr(model, f"encode_{kind}", None) or model.encode
    emb = encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                 show_progress_bar=verbose, prompt_name=prompt_name, prompt=prompt).float()
    if cache_file:
        os.makedirs(cache_folder, exist_ok=True)
        np.save(cache_file, emb.cpu().numpy())
    return emb


def mine_hard_negatives(
    dataset: Any,
    model: Any,
    anchor_column_name: Optional[str] = None,
    positive_column_name: Optional[str] = None,
    corpus: Optional[list[str]] = None,
    range_min: int = 0,
    range_max: Optional[int] = None,
    max_score: Optional[float] = None,
    min_score: Optional[float] = None,
    absolute_margin: Optional[float] = None,
    relative_margin: Optional[float] = None,
    num_negatives: int = 3,
    sampling_strategy: Union[str, SimANS] = "top",
    query_prompt_name: Optional[str] = None,
    query_prompt: Optional[str] = None,
    corpus_prompt_name: Optional[str] = None,
    corpus_prompt: Optional[str] = None,
    output_format: str = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    verbose: bool = True,
    cache_folder: Optional[str] = None,
    *,
    index: Any = None,
    seed: Optional[int] = None,
    process_group: Any = None,
    rules: Optional[Rules] = None,
) -> Any:
    """Add mined negatives to a dataset of (anchor, positive) pairs (module docstring).

    Arguments as in ``sentence_transformers.util.mine_hard_negatives``; ``faiss_batch_size`` is the
    number of queries per mining step on every path. fastneg's own: ``index`` (``"exact"``,
    ``"flat"``, ``"ivf"``, ``"hnsw"`` or a ``faiss.Index``; default ``"flat"`` with ``use_faiss``,
    else ``"exact"``), ``seed`` (for ``"random"`` / ``"simans"``), ``process_group`` (a
    ``torch.distributed`` group: each rank encodes and searches its shard of the corpus; module
    docstring) and ``rules`` (a :class:`fastneg.Rules` in place of ``absolute_margin``,
    ``relative_margin`` and ``max_score``: its ``margin`` is the absolute margin; not both; the
    loss's own fields are ignored, as by :func:`fastneg.mine_hard_negatives`).
    """
    from datasets import Dataset

    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if output_format not in _FORMATS:
        raise ValueError(f"output_format must be one of {_FORMATS}, got {output_format!r}")
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    if isinstance(sampling_strategy, str) and sampling_strategy not in ("top", "random", "simans"):
        raise ValueError(f"sampling_strategy must be 'top', 'random', 'simans' or fastneg.SimANS, got {sampling_strategy!r}")
    columns = dataset.column_names
    if not anchor_column_name or anchor_column_name not in columns:
        anchor_column_name = columns[0]
    if not positive_column_name or positive_column_name not in columns:
        if len(columns) < 2:
            raise ValueError("dataset must have at least two columns to pick the positive column")
        positive_column_name = columns[1]

    queries_all = list(dataset[anchor_column_name])
    positives_all = list(dataset[positive_column_name])
    corpus = list(dict.fromkeys((corpus or []) + positives_all)) if corpus is not None else list(
        dict.fromkeys(positives_all))
    corpus_idx = {text: i for i, text in enumerate(corpus)}
    queries = list(dict.fromkeys(queries_all))
    queries_idx = {text: i for i, text in enumerate(queries)}
    positive_indices: list[list[int]] = [[] for _ in queries]
    for query, positive in zip(queries_all, positives_all):
        row = positive_indices[queries_idx[query]]
        if corpus_idx[positive] not in row:
            row.append(corpus_idx[positive])
    n_positives = [len(p) for p in positive_indices]
    max_positives = max(n_positives)
    rules = resolve_rules("mine_hard_negatives", rules, margin=absolute_margin, relative_margin=relative_margin,
                          max_score=max_score)
    filters = any(v is not None for v in (rules.margin, rules.relative_margin, rules.max_score, min_score))
    if range_max is None and (use_faiss or index not in (None, "exact")):
        # sentence-transformers' pool: the window it retrieves before filtering
        range_max = range_min + (10 if filters else 1) * num_negatives + max_positives
    if range_max is not None and num_negatives > range_max - range_min:
        raise ValueError(f"cannot mine {num_negatives} negatives from ranks [{range_min}, {range_max})")

    strategy = "uniform" if sampling_strategy == "random" else sampling_strategy
    if index is None:
        index = "flat" if use_faiss else "exact"
    options = dict(strategy=strategy, rules=rules, min_score=min_score, range_min=range_min, range_max=range_max,
                   batch_size=faiss_batch_size, index=index, pool=None if range_max is None else range_max + max_positives,
                   seed=seed, show_progress_bar=verbose)
    # per (query, positive) pair, in the order of the de-duplicated queries
    pair_query = [q for q in range(len(queries)) for _ in range(n_positives[q])]
    pair_doc = [d for q in range(len(queries)) for d in positive_indices[q]]
    if process_group is None:
        corpus_emb = _encode(model, corpus, "document", corpus_prompt_name, corpus_prompt, batch_size, verbose,
                             cache_folder)
        query_emb = _encode(model, queries, "query", query_prompt_name, query_prompt, batch_size, verbose,
                            cache_folder)
        mined = _mine(query_emb, corpus_emb, positive_indices, num_negatives, **options)
        indices, negative_scores = mined.indices.cpu(), mined.scores.cpu()
        positive_scores = (query_emb[pair_query] * corpus_emb[pair_doc]).sum(-1).cpu()
    else:
        from ...parallel.gather import all_gather, rank, world_size
        from ...parallel.sharded import gather_owned, shard_bounds

        world, me = world_size(process_group), rank(process_group)
        lo, hi = shard_bounds(len(corpus), world)[me]
        q_lo, q_hi = len(queries) * me // world, len(queries) * (me + 1) // world
        device = torch.device(getattr(model, "device", "cpu"))

        def encode_share(texts: list[str], kind: str, prompt_name: Optional[str], prompt: Optional[str]) -> torch.Tensor:
            if not texts:  # an empty shard or share (more ranks than rows) encodes nothing
                return torch.empty(0, model.get_sentence_embedding_dimension(), device=device)
            return _encode(model, texts, kind, prompt_name, prompt, batch_size, verbose and me == 0,
                           cache_folder).to(device)

        corpus_emb = encode_share(corpus[lo:hi], "document", corpus_prompt_name, corpus_prompt)
        query_emb = encode_share(queries[q_lo:q_hi], "query", query_prompt_name, query_prompt)
        options["show_progress_bar"] = verbose and me == 0
        mined = _mine(query_emb, corpus_emb, positive_indices[q_lo:q_hi], num_negatives, process_group=process_group,
                      **options)
        counts = [len(queries) * (r + 1) // world - len(queries) * r // world for r in range(world)]
        indices, negative_scores = (all_gather(t, process_group, counts).cpu() for t in (mined.indices, mined.scores))
        query_all = all_gather(query_emb, process_group, counts)
        docs = gather_owned(torch.tensor(pair_doc, device=device), lo, corpus_emb, process_group)
        positive_scores = (query_all[pair_query] * docs).sum(-1).cpu()
    if isinstance(strategy, str) and strategy != "top":
        # sentence-transformers re-sorts sampled negatives by score, best first
        order = torch.sort(negative_scores, dim=1, descending=True, stable=True).indices
        indices, negative_scores = indices.gather(1, order), negative_scores.gather(1, order)
    found = indices >= 0

    data: dict[str, list] = {}
    if output_format == "triplet":
        data = {anchor_column_name: [], positive_column_name: [], "negative": []}
        if output_scores:
            data["scores"] = []
        for p, (q, d) in enumerate(zip(pair_query, pair_doc)):
            for j in range(num_negatives):
                if not found[q, j]:
                    continue
                data[anchor_column_name].append(queries[q])
                data[positive_column_name].append(corpus[d])
                data["negative"].append(corpus[int(indices[q, j])])
                if output_scores:
                    data["scores"].append([float(positive_scores[p]), float(negative_scores[q, j])])
    elif output_format == "labeled-pair":
        data = {anchor_column_name: [], positive_column_name: [], "score" if output_scores else "label": []}
        value = "score" if output_scores else "label"
        p = 0
        for q in range(len(queries)):
            for d in positive_indices[q]:
                data[anchor_column_name].append(queries[q])
                data[positive_column_name].append(corpus[d])
                data[value].append(float(positive_scores[p]) if output_scores else 1)
                p += 1
            for j in range(num_negatives):
                if found[q, j]:
                    data[anchor_column_name].append(queries[q])
                    data[positive_column_name].append(corpus[int(indices[q, j])])
                    data[value].append(float(negative_scores[q, j]) if output_scores else 0)
    elif output_format == "n-tuple":
        keep = [p for p, q in enumerate(pair_query) if bool(found[q].all())]
        data = {anchor_column_name: [queries[pair_query[p]] for p in keep],
                positive_column_name: [corpus[pair_doc[p]] for p in keep]}
        for j in range(num_negatives):
            data[f"negative_{j + 1}"] = [corpus[int(indices[pair_query[p], j])] for p in keep]
        if output_scores:
            data["scores"] = [[float(positive_scores[p])] + negative_scores[pair_query[p]].tolist() for p in keep]
    else:  # labeled-list
        keep = [p for p, q in enumerate(pair_query) if bool(found[q].any())]
        data = {anchor_column_name: [queries[pair_query[p]] for p in keep],
                positive_column_name: [[corpus[pair_doc[p]]] + [corpus[int(i)] for i in indices[pair_query[p]]
                                                                 if i >= 0] for p in keep]}
        if output_scores:
            data["scores"] = [[float(positive_scores[p])] + negative_scores[pair_query[p]][found[pair_query[p]]].tolist()
                              for p in keep]
        else:
            data["labels"] = [[1] + [0] * int(found[pair_query[p]].sum()) for p in keep]
    if verbose:
        missing = int((~found).sum())
        print(f"fastneg: mined {int(found.sum()):,} negatives for {len(queries):,} queries"
              + (f"; {missing:,} slots without a valid negative" if missing else ""))
    return Dataset.from_dict(data)
