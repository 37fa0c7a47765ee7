"""Tensor-level losses behind the sentence-transformers integration.

sentence-transformers' ranking losses softmax each query over several *blocks* of scores
(query -> documents, query -> other queries, document -> queries, document -> other
documents) and GISTEmbed adds anchor-anchor and positive-positive blocks. Here every such
layout is **one** call of the fused op: the row's "query" is the concatenation
``[q_i | d_i]`` and each key block is zero-padded on the other half, so ``[q_i | d_i] . [k | 0]
= q_i . k`` and ``[q_i | d_i] . [0 | k] = d_i . k``. Structural exclusions (a query's own
score against itself, a document against its own query's documents) and duplicate texts
are label levels of the same call. Nothing of size B x N is built.

What the fused op cannot express in one call, per-row structure of a *bias*
(sentence-transformers' ``hardness_mode`` "in_batch_negatives" / "hard_negatives", which treat a
row's own hard negatives differently from everyone else's), is split off: the row's own hard
negatives (``B x num_hard`` scores) are computed densely and merged with the fused row by
``logaddexp`` (the fused loss is ``log(1 + sum_j e^(x_ij - l_i+))``, the own negatives add
``sum_c e^(x_ic - l_i+)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ...functional import info_nce
from ...options import Hardness
from ...plan import Plan
from ...reference import false_negative_mask
from ...rules import PLAIN, Rules

__all__ = ["ranking_loss", "gist_loss", "NO_LABEL"]

NO_LABEL = -1  # a key label no query label ever equals (hashes and row ids are >= 0)


def _options(rules: Rules, **overrides: object) -> dict[str, object]:
    """Keyword arguments of :func:`fastneg.info_nce`: ``rules`` with ``overrides`` (a block's own
    weighting or guide)."""
    return {"rules": rules.replace(**overrides) if overrides else rules}


def _call(backend: str, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float,
          options: dict[str, object], query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
          guide_query: Optional[torch.Tensor] = None, guide_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row loss of one fused call, through the public op ([B])."""
    return info_nce(query, keys, positives, temperature=temperature, query_labels=query_labels,  # type: ignore[arg-type]
                    key_labels=key_labels, guide_query=guide_query, guide_keys=guide_keys, reduction="none",
                    backend=backend, **options)


def _stack_levels(query_levels: list[torch.Tensor], key_levels: list[torch.Tensor]
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if not key_levels:
        return None, None
    return torch.stack(query_levels, 1), torch.stack(key_levels, 1)


def _pad(blocks: list[tuple[torch.Tensor, int]], halves: int) -> torch.Tensor:
    """Concatenate key blocks, each placed in half ``h`` of a ``halves * D`` wide row."""
    if halves == 1:
        return torch.cat([b for b, _ in blocks])
    out = []
    for block, half in blocks:
        parts = [block if h == half else block.new_zeros(block.shape) for h in range(halves)]
        out.append(torch.cat(parts, 1))
    return torch.cat(out)


def _own_negatives(q_loc: torch.Tensor, own: torch.Tensor, s_pos: torch.Tensor, temperature: float, rules: Plan,
                   bias_strength: float, pos_hash: Optional[torch.Tensor], own_hash: Optional[torch.Tensor]
                   ) -> torch.Tensor:
    """log sum_c exp(x_ic - l_i+) over row i's own hard negatives ``own`` [B, C, D] (-inf when none
    is left): the same rules as the fused call, plus a hardness bias ``bias_strength * s_ic``."""
    scores = torch.einsum("bd,bcd->bc", q_loc, own)
    detached = scores.detach()
    masked = false_negative_mask(torch.cat([s_pos.detach()[:, None], detached], 1),
                                 torch.zeros(len(scores), 1, dtype=torch.long, device=scores.device),
                                 rules)[:, 1:]
    if pos_hash is not None and own_hash is not None:
        masked |= own_hash == pos_hash[:, None]
    x = scores / temperature + bias_strength * detached - (s_pos / temperature)[:, None]
    live = ~masked
    any_live = live.any(1)
    x = torch.where(live, x, torch.full_like(x, float("-inf")))
    lse = torch.logsumexp(torch.where(any_live[:, None], x, torch.zeros_like(x)), 1)
    return torch.where(any_live, lse, torch.full_like(lse, float("-inf")))


def ranking_loss(
    queries: torch.Tensor,
    docs: Sequence[torch.Tensor],
    *,
    offset: int,
    local: int,
    temperature: float,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    rules: Rules = PLAIN,
    query_hashes: Optional[torch.Tensor] = None,
    doc_hashes: Optional[Sequence[torch.Tensor]] = None,
    labels: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss, per local row ([local]).

    ``queries`` [Bw, D] and each of ``docs`` (positives, then hard-negative columns) [Bw, D] are
    the (possibly gathered) batch; this process's rows are ``offset .. offset + local``.
    ``query_hashes`` [Bw] / ``doc_hashes`` (one [Bw] per column) mask duplicate texts: a key
    whose text equals the row's positive (document blocks) or the row's query (query blocks).
    ``labels`` [Bw] (int64 >= 0): rows with equal labels are relevant to each other, so a row's
    query and positive are false negatives of every other row with its label (hard-negative
    columns stay negatives). With ``rules.false_negatives == "attract"`` every flagged key becomes
    a positive; structural exclusions (``query_to_query``, ``doc_to_doc``, a hardness mode that
    splits the row's own negatives off) cannot be told apart from flags, so they refuse it.
    """
    Bw, D = queries.shape
    n_cols = len(docs)
    device = queries.device
    rows = torch.arange(offset, offset + local, device=device)
    q_loc, d_loc = queries[offset:offset + local], docs[0][offset:offset + local]
    docs_all = torch.cat(list(docs))
    positives = rows.clone()
    no_label_docs = torch.full((Bw * n_cols,), NO_LABEL, dtype=torch.long, device=device)
    no_label_queries = torch.full((Bw,), NO_LABEL, dtype=torch.long, device=device)
    group = torch.arange(Bw, device=device)  # the query each document column belongs to
    hashes = query_hashes is not None and doc_hashes is not None
    if hashes:
        assert query_hashes is not None and doc_hashes is not None
        doc_hash_all = torch.cat(list(doc_hashes))
        pos_hash = doc_hashes[0][rows]
        q_hash = query_hashes[rows]

    # hardness: which columns carry the bias, and whether the row's own hard negatives go dense
    strength = float(hardness_strength) if hardness_mode is not None else 0.0
    split_own = strength > 0.0 and n_cols > 1 and hardness_mode in ("in_batch_negatives", "hard_negatives")
    own_bias = strength if hardness_mode == "hard_negatives" else 0.0
    fused_bias = strength if hardness_mode in ("in_batch_negatives", "all_negatives") else 0.0
    base = rules.plan()
    if strength > 0.0 and rules.weighting is not None:
        raise ValueError("hardness_mode and fastneg's weighting are both negative weightings: use one of them")
    structural_layout = split_own or (partition_mode != "per_direction"
                                      and ("query_to_query" in directions or "doc_to_doc" in directions))
    if rules.false_negatives == "attract" and structural_layout:
        raise ValueError("false_negatives='attract' needs a layout without structural exclusions: directions "
                         "query_to_doc / doc_to_query, and no hardness_mode that splits the row's own hard negatives")
    row_label = labels[rows] if labels is not None else None
    no_label_hard = torch.full((Bw * (n_cols - 1),), NO_LABEL, dtype=torch.long, device=device)

    def own_part(s_pos: torch.Tensor) -> torch.Tensor:
        own = torch.stack([d[offset:offset + local] for d in docs[1:]], 1)  # [local, C, D]
        own_h = torch.stack([h[rows] for h in doc_hashes[1:]], 1) if hashes else None  # type: ignore[index]
        return _own_negatives(q_loc, own, s_pos, temperature, base, own_bias, pos_hash if hashes else None, own_h)

    def q2d_doc_labels() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # label levels of the query -> documents block alone
        ql, kl = [], []
        if split_own:  # row i's own hard negatives leave the fused call (they are added densely)
            own = torch.cat([no_label_queries] + [group] * (n_cols - 1))
            ql.append(rows)
            kl.append(own)
        if hashes:
            ql.append(pos_hash)
            kl.append(doc_hash_all)
        if labels is not None:
            ql.append(row_label)
            kl.append(torch.cat([labels, no_label_hard]))
        return ql, kl

    if partition_mode == "per_direction":
        # one softmax per direction, averaged: query -> docs and (optionally) doc -> query
        ql, kl = q2d_doc_labels()
        opts = _options(rules) if fused_bias == 0.0 else _options(rules, weighting=Hardness(fused_bias))
        losses = [_call(backend, q_loc, docs_all, positives, temperature, opts, *_stack_levels(ql, kl))]
        if split_own:
            s_pos = (q_loc * d_loc).sum(1)
            losses[0] = torch.logaddexp(losses[0], own_part(s_pos).to(losses[0].dtype))
        if "doc_to_query" in directions:
            ql2, kl2 = ([q_hash], [query_hashes]) if hashes else ([], [])
            if labels is not None:
                ql2.append(row_label)
                kl2.append(labels)
            losses.append(_call(backend, d_loc, queries, positives, temperature, _options(rules),
                                *_stack_levels(ql2, kl2)))
        return torch.stack(losses).mean(0)

    # joint: one softmax over every selected block, one fused call on [q | d] rows
    use_docs_side = "doc_to_query" in directions or "doc_to_doc" in directions
    halves = 2 if use_docs_side else 1
    query_row = torch.cat([q_loc, d_loc], 1) if use_docs_side else q_loc
    blocks: list[tuple[torch.Tensor, int]] = [(docs_all, 0)]
    # label levels: structural (row ids), document text, query text
    ql_struct, ql_doc, ql_query = rows, pos_hash if hashes else None, q_hash if hashes else None
    kl_struct: list[torch.Tensor] = []
    kl_doc: list[torch.Tensor] = []
    kl_query: list[torch.Tensor] = []
    kl_label: list[torch.Tensor] = []  # the rows' labels: a row's query and positive carry it
    kl_struct.append(torch.cat([no_label_queries] + [group] * (n_cols - 1)) if split_own else no_label_docs)
    if hashes:
        kl_doc.append(doc_hash_all)
        kl_query.append(no_label_docs)
    if labels is not None:
        kl_label.append(torch.cat([labels, no_label_hard]))
    if "query_to_query" in directions:  # other queries; the row's own query is excluded
        blocks.append((queries, 0))
        kl_struct.append(group)
        if hashes:
            kl_doc.append(no_label_queries)
            kl_query.append(query_hashes)
        if labels is not None:
            kl_label.append(labels)
    if "doc_to_query" in directions:  # d_i against every query (its own included, as in sentence-transformers)
        blocks.append((queries, 1))
        kl_struct.append(no_label_queries)
        if hashes:
            kl_doc.append(no_label_queries)
            kl_query.append(query_hashes)
        if labels is not None:
            kl_label.append(labels)
    if "doc_to_doc" in directions:  # d_i against every document but its own query's
        blocks.append((docs_all, 1))
        kl_struct.append(group.repeat(n_cols))
        if hashes:
            kl_doc.append(doc_hash_all)
            kl_query.append(no_label_docs)
        if labels is not None:
            kl_label.append(torch.cat([labels, no_label_hard]))
    keys = _pad(blocks, halves)
    ql_levels: list[torch.Tensor] = []
    kl_levels: list[torch.Tensor] = []
    structural = split_own or "query_to_query" in directions or "doc_to_doc" in directions
    if structural:
        ql_levels.append(ql_struct)
        kl_levels.append(torch.cat(kl_struct))
    if hashes:
        assert ql_doc is not None and ql_query is not None
        ql_levels += [ql_doc, ql_query]
        kl_levels += [torch.cat(kl_doc), torch.cat(kl_query)]
    if labels is not None:
        assert row_label is not None
        ql_levels.append(row_label)
        kl_levels.append(torch.cat(kl_label))
    query_labels, key_labels = _stack_levels(ql_levels, kl_levels)

    guide_query = guide_keys = None
    opts = _options(rules)
    if fused_bias != 0.0:
        if len(blocks) == 1:
            opts = _options(rules, weighting=Hardness(fused_bias))
        else:  # the bias belongs to the query -> documents block only: a guide that is zero elsewhere
            guide_query = q_loc.detach()
            guide_keys = torch.cat([docs_all.detach()] + [b.new_zeros(b.shape) for b, _ in blocks[1:]])
            opts = _options(rules, weighting=Hardness(fused_bias, on="guide"), guide_margin=None)
    loss = _call(backend, query_row, keys, positives, temperature, opts, query_labels, key_labels,
                 guide_query, guide_keys)
    if split_own:
        s_pos = (q_loc * d_loc).sum(1)
        loss = torch.logaddexp(loss, own_part(s_pos).to(loss.dtype))
    return loss


def gist_loss(
    anchors: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    anchors_guide: torch.Tensor,
    candidates_guide: Sequence[torch.Tensor],
    *,
    offset: int,
    temperature: float,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    rules: Rules = PLAIN,
    anchor_hashes: Optional[torch.Tensor] = None,
    candidate_hashes: Optional[Sequence[torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GISTEmbedLoss per local anchor ([B]): anchors [B, D] are local, candidates (positives, then
    negatives) [Bw, D] possibly gathered, local positives at ``offset .. offset + B``. Blocks:
    anchor-positive, anchor-anchor (local anchors), positive-positive, anchor-negative; the guide's
    scores mask ``t_ij > t_i+ - margin`` (or the relative form) in every block, sparing the positive."""
    B = anchors.shape[0]
    device = anchors.device
    rows = torch.arange(offset, offset + B, device=device)
    pos_all = candidates[0]
    p_loc, gp_loc = pos_all[offset:offset + B], candidates_guide[0][offset:offset + B]
    halves = 2 if contrast_positives else 1
    query_row = torch.cat([anchors, p_loc], 1) if contrast_positives else anchors
    guide_row = torch.cat([anchors_guide, gp_loc], 1) if contrast_positives else anchors_guide
    blocks = [(pos_all, 0)]
    gblocks = [(candidates_guide[0], 0)]
    hashes = anchor_hashes is not None and candidate_hashes is not None
    kl_doc: list[torch.Tensor] = []
    kl_query: list[torch.Tensor] = []

    def no_label(n: int) -> torch.Tensor:
        return torch.full((n,), NO_LABEL, dtype=torch.long, device=device)

    if hashes:
        assert anchor_hashes is not None and candidate_hashes is not None
        kl_doc.append(candidate_hashes[0])
        kl_query.append(no_label(len(pos_all)))
    if contrast_anchors:
        blocks.append((anchors, 0))
        gblocks.append((anchors_guide, 0))
        if hashes:
            kl_doc.append(no_label(B))
            kl_query.append(anchor_hashes)  # type: ignore[arg-type]
    if contrast_positives:
        blocks.append((pos_all, 1))
        gblocks.append((candidates_guide[0], 1))
        if hashes:
            kl_doc.append(candidate_hashes[0])  # type: ignore[index]
            kl_query.append(no_label(len(pos_all)))
    for c in range(1, len(candidates)):
        blocks.append((candidates[c], 0))
        gblocks.append((candidates_guide[c], 0))
        if hashes:
            kl_doc.append(candidate_hashes[c])  # type: ignore[index]
            kl_query.append(no_label(len(candidates[c])))
    query_labels = key_labels = None
    if hashes:
        query_labels, key_labels = _stack_levels([candidate_hashes[0][rows], anchor_hashes[rows - offset]],  # type: ignore[index]
                                                 [torch.cat(kl_doc), torch.cat(kl_query)])
    opts = _options(rules, guide_margin=float(margin), guide_strategy=margin_strategy)
    return _call(backend, query_row, _pad(blocks, halves), rows, temperature, opts, query_labels, key_labels,
                 guide_row.detach().to(query_row.dtype), _pad(gblocks, halves).detach().to(query_row.dtype))
