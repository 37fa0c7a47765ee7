"""Drawing negatives from keys spread over ranks: each rank draws from its own shard, and the
shards' candidates are merged exactly.

Why the merge is exact: a shard's draw is the top-k of its keys by a value that depends only on
the (query, key) pair: the score (``"top"``), or a log-weight plus Gumbel noise keyed by the key's
*global* index (``first_key + j``; ``"simans"``, ``"uniform"``). The one-process draw is the top-k
of all keys by that value (ties: the smaller key index first), i.e. the top-k of the union of
every shard's top-k, ordered the same way. Excluded keys (a query's other positives) are removed
from each shard's list before the merge, as the one-process sampler removes them from its list.

The rules need each row's positive score, and the positive lives on one rank: every rank
receives the positive keys' embeddings (one all-gather of ``ranks x rows x D``) and appends them
after its shard, masked for every row by one extra label level, so the kernel computes the
positive score exactly as it does in one process (the same gathered tile).

Bit-identical to one process (CPU kernels): the C++ kernels score keys in tiles of
:data:`KEY_ALIGN` keys with one BLAS product per tile, and an element's rounding may depend on its
position in the tile. Shards that start at multiples of :data:`KEY_ALIGN` (:func:`shard_bounds`)
put every key at its one-process position, so every value, and hence the draw, is the one
process's, bit for bit. Other shard boundaries give the same draw except where two values lie
within a rounding of each other.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.sampler import draw
from ..plan import Plan, Strategy
from .gather import _group, all_gather, fail_together, gather_sizes, rank, world_size

__all__ = ["KEY_ALIGN", "shard_bounds", "gather_rows", "gather_owned", "shard_draw", "merge_top", "pair_scores", "agree"]

KEY_ALIGN = 256  # the C++ kernels' key tile (csrc/common.h kMaxKeyTile)


def _alone(group: Any) -> bool:
    """No exchange: ``group`` is ``None`` (one process, even inside an initialised
    torch.distributed program, where ``None`` would otherwise mean the world) or of one rank."""
    return group is None or world_size(group) == 1


def shard_bounds(n: int, world: int, align: int = KEY_ALIGN) -> list[tuple[int, int]]:
    """``world`` contiguous ``[start, end)`` shards of ``n`` rows, as even as blocks of ``align``
    rows allow, every start a multiple of ``align`` (trailing shards may be empty)."""
    blocks = -(-n // align)
    per, extra = divmod(blocks, world)
    bounds, start = [], 0
    for r in range(world):
        end = min(n, start + (per + (r < extra)) * align)
        bounds.append((start, end))
        start = end
    return bounds


def pair_scores(query: Tensor, rows: Tensor, ids: Optional[Tensor] = None) -> Tensor:
    """``query[i] . rows[i, c]`` for ``query`` ``[b, D]`` and ``rows`` ``[b, m, D]`` (or, with
    ``ids`` ``[b, m]``, ``rows[ids[i, c]]`` of a table ``rows`` ``[n, D]``, gathered a slice at a
    time): products in float64 (exact for float32 inputs), summed per pair and rounded to float32
    once. An entry does not depend on its position or on the other entries, so a shard and one
    process compute the same bits for the same pair. Memory: slices of ``2^21`` products."""
    b, m = (ids.shape if ids is not None else rows.shape[:2])
    out = torch.empty((b, m), dtype=torch.float32, device=rows.device)
    step = max(1, 2**21 // max(1, m * rows.shape[-1]))
    for r in range(0, b, step):
        q = query[r:r + step].double()
        part = rows[ids[r:r + step]] if ids is not None else rows[r:r + step]
        out[r:r + step] = (q[:, None, :] * part.double()).sum(-1).float()
    return out


def gather_rows(local: Tensor, counts: list[int], lo: int, hi: int, group: Any) -> Tensor:
    """Rows ``[lo, hi)`` of the rank-ordered concatenation of every rank's ``local`` rows
    (``counts``: every rank's row count), on every rank."""
    if _alone(group):
        return local[lo:hi]
    start, count = sum(counts[:rank(group)]), local.shape[0]
    begin = min(max(lo - start, 0), count)
    mine = local[begin:max(begin, min(hi - start, count))]
    sizes = []
    offset = 0
    for c in counts:
        sizes.append(max(0, min(hi, offset + c) - max(lo, offset)))
        offset += c
    return all_gather(mine.contiguous(), group, sizes)


def gather_owned(ids: Tensor, first: int, shard: Tensor, group: Any) -> Tensor:
    """``shard``-rows of the global row ids ``ids`` (any shape; ``-1``: zeros), each from the rank
    whose shard ``[first, first + len(shard))`` holds it: ``ids.shape + shard.shape[1:]``. Each rank
    sends only the rows it owns (with their positions): ``numel(ids)`` rows in all."""
    n = shard.shape[0]
    own = ((ids >= first) & (ids < first + n)).reshape(-1)
    out = shard.new_zeros((ids.numel(), *shard.shape[1:]))
    positions = own.nonzero()[:, 0]
    rows = shard[ids.reshape(-1)[positions] - first] if n else out[:0]
    if _alone(group):
        out[positions] = rows
        return out.view(*ids.shape, *shard.shape[1:])
    sizes = gather_sizes(positions.shape[0], group, positions.device)
    out[all_gather(positions, group, sizes)] = all_gather(rows.contiguous(), group, sizes)
    return out.view(*ids.shape, *shard.shape[1:])


def _appended(shard: Tensor, extra: Tensor, total: int) -> Tensor:
    """``shard``, then ``extra``, then zero rows up to ``total`` rows."""
    out = shard.new_zeros((total, *shard.shape[1:]))
    out[:shard.shape[0]] = shard
    out[shard.shape[0]:shard.shape[0] + extra.shape[0]] = extra
    return out


def shard_draw(backend: str, query: Tensor, shard: Tensor, first_key: int, positive_ids: Tensor,
               positive_rows: Tensor, k: int,
               code: Strategy, plan: Plan, seed: int, query_labels: Optional[Tensor] = None,
               shard_labels: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
               guide_shard: Optional[Tensor] = None, guide_positive_rows: Optional[Tensor] = None,
               exclude: Optional[Tensor] = None, keys_room: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One shard's draw for every row of ``query``: ``[b, k]`` *global* key indices (-1: none) and
    their values (-inf at -1), best first. ``shard``: keys ``[first_key, first_key + n)``;
    ``positive_ids`` ``[b]``: each row's positive (global; never drawn, as in one process) and
    ``positive_rows`` ``[b, D]`` its embedding (wherever it lives); ``query_labels``
    ``[b]`` or ``[b, L]`` (the query's labels, already defaulted from its positive's),
    ``shard_labels`` the shard's; ``exclude`` ``[b, E]`` global indices never drawn. ``keys_room``:
    at least ``max(n + b, KEY_ALIGN)`` keys whose first ``n`` rows are the shard and the next ``b`` the
    positive rows (the miner keeps one, so that the shard is not copied per batch)."""
    b, n = query.shape[0], shard.shape[0]
    if n == 0 or b == 0:
        return (torch.full((b, k), -1, dtype=torch.long, device=query.device),
                torch.full((b, k), float("-inf"), dtype=torch.float32, device=query.device))
    # at least one full key tile: the kernel then tiles the shard's keys as one process does
    total = max(n + b, KEY_ALIGN)
    keys = keys_room[:total] if keys_room is not None else _appended(shard, positive_rows.to(shard.dtype), total)
    guide_keys = None
    if guide_shard is not None and guide_positive_rows is not None:
        guide_keys = _appended(guide_shard, guide_positive_rows.to(guide_shard.dtype), total)
    positives = torch.arange(n, n + b, device=query.device)
    # one extra label level masks the appended rows for every row (the shard's keys never match)
    sentinel_q = torch.zeros(b, 1, dtype=torch.long, device=query.device)
    sentinel_k = torch.zeros(total, 1, dtype=torch.long, device=query.device)
    sentinel_k[:n] = 1
    if query_labels is not None and shard_labels is not None:
        ql = query_labels.long().reshape(b, -1)
        kl = torch.zeros(total, ql.shape[1], dtype=torch.long, device=query.device)
        kl[:n] = shard_labels.long().reshape(n, -1)
        ql, kl = torch.cat([ql, sentinel_q], 1), torch.cat([kl, sentinel_k], 1)
    else:
        ql, kl = sentinel_q[:, 0], sentinel_k[:, 0]
    # the positive's own key, where this shard holds it, is excluded like the one-process positive
    never = positive_ids.long()[:, None] if exclude is None else torch.cat([positive_ids.long()[:, None], exclude], 1)
    inside = (never >= first_key) & (never < first_key + n)
    local_exclude = torch.where(inside, never - first_key, -1)
    idx, values = draw(backend, query, keys, positives, k, code, plan, seed, ql, kl, guide_query, guide_keys,
                       local_exclude, first_key)
    return torch.where(idx >= 0, idx + first_key, -1), values.float()


def merge_top(values: Tensor, ids: Tensor, k: int, *extras: Tensor) -> tuple[Tensor, ...]:
    """The top-``k`` of each row over every shard's candidates: ``values``, ``ids`` and ``extras``
    ``[shards, b, m]``, ordered by value (descending), then the smaller id; -1 / -inf where the
    candidates ran out. Returns ``(values, ids, *extras)``, each ``[b, k]``."""
    s, b, m = ids.shape
    flat = [t.permute(1, 0, 2).reshape(b, s * m) for t in (values, ids, *extras)]
    by_id = torch.sort(torch.where(flat[1] >= 0, flat[1], torch.iinfo(torch.long).max), dim=1, stable=True).indices
    flat = [t.gather(1, by_id) for t in flat]
    by_value = torch.sort(flat[0], dim=1, descending=True, stable=True).indices[:, :k]
    flat = [t.gather(1, by_value) for t in flat]
    found = flat[0] > float("-inf")
    flat[0] = flat[0].masked_fill(~found, float("-inf"))
    flat[1] = torch.where(found, flat[1], -1)
    if flat[0].shape[1] < k:
        pad = k - flat[0].shape[1]
        fills = [float("-inf"), -1] + [0] * len(extras)
        flat = [torch.cat([t, t.new_full((b, pad), f)], 1) for t, f in zip(flat, fills)]
    return tuple(flat)


def gather_candidates(group: Any, *tensors: Tensor) -> list[Tensor]:
    """Every rank's ``[b, m]`` candidate tensors stacked ``[ranks, b, m]`` (equal shapes on every rank)."""
    if _alone(group):
        return [t[None] for t in tensors]
    return [all_gather(t[None].contiguous(), group) for t in tensors]


def agree(described: dict[str, Any], group: Any, checked: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every rank's ``described`` (collective). Ranks whose ``checked`` fields differ all raise the
    same ``ValueError`` naming them, instead of failing or hanging in a later collective."""
    table: list[Any] = [None] * world_size(group)
    dist.all_gather_object(table, described, group=_group(group))
    differ = [name for name in checked if len({repr(row[name]) for row in table}) > 1]
    if differ:  # every rank sees the same table and raises the same error
        raise ValueError("process_group: ranks disagree on the "
                         + "; the ".join(f"{name}: {[row[name] for row in table]}" for name in differ))
    return table


def sample_negatives_sharded(backend: str, query: Tensor, keys: Tensor, positives: Optional[Tensor], k: int,
                             code: Strategy, plan: Plan, seed: int, query_labels: Optional[Tensor],
                             key_labels: Optional[Tensor], guide_query: Optional[Tensor],
                             guide_keys: Optional[Tensor], exclude: Optional[Tensor], group: Any) -> Tensor:
    """:func:`fastneg.sample_negatives` with ``process_group``: each rank's queries against every
    rank's keys (global index: the rank-ordered concatenation), merged exactly (module docstring)."""
    described = {"embedding dim": query.shape[1], "dtype": str(query.dtype),
                 "label levels": None if key_labels is None else tuple(key_labels.shape[1:]),
                 "query_labels given": query_labels is not None,
                 "guide dim": None if guide_query is None else guide_query.shape[1],
                 "exclude width": None if exclude is None else exclude.shape[1], "num_negatives": k}
    agree(described, group, tuple(described))
    counts_b = gather_sizes(query.shape[0], group)
    counts_n = gather_sizes(keys.shape[0], group)
    me = rank(group)
    row0, first_key, n_total = sum(counts_b[:me]), sum(counts_n[:me]), sum(counts_n)
    b_total = sum(counts_b)
    if positives is None:
        positives = torch.arange(row0, row0 + query.shape[0], device=query.device)
    with fail_together(group):
        bad = (positives < 0) | (positives >= n_total)
        if bool(bad.any()):
            raise ValueError(f"positives must be global key indices in [0, {n_total}) (the keys of every rank, "
                             f"in rank order), got {int(positives[bad][0])}")
    everything = (0, b_total)
    q_all = gather_rows(query, counts_b, *everything, group)
    p_all = gather_rows(positives.long(), counts_b, *everything, group)
    positive_rows = gather_owned(p_all, first_key, keys, group)
    ql_all = None
    if key_labels is not None:
        if query_labels is None:
            ql_all = gather_owned(p_all, first_key, key_labels.long(), group)
        else:
            ql_all = gather_rows(query_labels.long(), counts_b, *everything, group)
    gq_all = gather_rows(guide_query, counts_b, *everything, group) if guide_query is not None else None
    gpos = gather_owned(p_all, first_key, guide_keys, group) if guide_keys is not None else None
    ex_all = gather_rows(exclude.long(), counts_b, *everything, group) if exclude is not None else None
    ids, values = shard_draw(backend, q_all, keys, first_key, p_all, positive_rows, k, code, plan, seed, ql_all, key_labels,
                             gq_all, guide_keys, gpos, ex_all)
    all_values, all_ids = gather_candidates(group, values, ids)
    _, merged = merge_top(all_values, all_ids, k)
    return merged[row0:row0 + query.shape[0]]
