"""Negatives from every rank: gathered keys with gradient, on torch.distributed.

Launch as any torch.distributed program (``torchrun --nproc-per-node=8 train.py`` on one node;
``torchrun --nnodes=2 --node-rank=R --rdzv-endpoint=HOST:PORT --nproc-per-node=8 train.py`` on
several), NCCL on GPUs, gloo on CPUs. Then::

    loss = fastneg.info_nce(q_local, k_local, process_group=torch.distributed.group.WORLD,
                            key_blocks=1 + num_hard_negatives)

What happens:

- One small all-gather of a per-rank descriptor (row counts, D, dtype, options): ranks whose
  inputs disagree (D, dtype, label levels, guide, rules...) all raise the same ``ValueError``
  instead of hanging in a later collective.
- ``keys`` is split into ``key_blocks`` equal column blocks (in-batch positives, then each
  hard-negative column) and each block is gathered across ranks separately, so the global key
  layout is *positives of all ranks, then negatives of all ranks*. Local ``positives``,
  ``key_labels`` and ``negatives`` indices are remapped to that layout; ``guide_keys`` are
  gathered like ``keys`` (without gradient). Queries, query labels and the guide's queries stay
  local: each rank computes its own rows against all keys.
- The gather is autograd-aware (``torch.distributed._functional_collectives``, traceable by torch.compile; its backward
  sum-reduces the key gradients back to their owners), so the gradients are those of the loss over
  the global batch.
- Ranks may hold different numbers of rows (the last batch of an epoch), including none.
- Reduction: ``"mean"`` returns ``(sum of this rank's row losses) * world_size / global_rows``:
  DDP averages gradients over ranks, which then gives exactly the gradient of the mean over the
  global batch, and the mean of the returned values over ranks is the global loss. ``"sum"``
  returns the local sum times ``world_size`` (same reasoning); ``"none"`` the local rows.

Memory per rank: the gathered keys ``N_global x D`` (and their gradient) plus the fused loss's
``O(B_local + N_global)``; never ``B x N``. Communication: one all-gather of ``N_global x D``
forward, one reduce-scatter of the same size backward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "all_gather_with_grad", "gather_sizes", "world_size", "rank", "raise_if_any_rank_failed",
           "fail_together", "distributed_info_nce"]

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _group(group: Any) -> Any:
    return dist.group.WORLD if group is None else group


def gather_sizes(n: int, group: Any = None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (a host sync)."""
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(out, t, group=_group(group))
    return [int(x) for x in torch.cat(out).tolist()]


def all_gather_with_grad(t: Tensor, group: Any = None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0, in rank order, differentiable: the backward
    sum-reduces the gradient of the gathered tensor and hands each rank the rows it owns.

    Ranks may contribute different numbers of rows; ``sizes`` (every rank's row count) skips the
    exchange that learns them, which also keeps the call traceable by torch.compile when sizes
    are equal. Identity when torch.distributed is not initialised."""
    if world_size(group) == 1:
        return t
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd  # newer name first
    sizes = list(sizes) if sizes is not None else gather_sizes(t.shape[0], group, t.device)
    longest = max(sizes)
    padded = t if t.shape[0] == longest else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    gathered = gather(padded.contiguous(), gather_dim=0, group=_group(group))
    if all(s == longest for s in sizes):
        return gathered
    return torch.cat([gathered[r * longest: r * longest + s] for r, s in enumerate(sizes)])


def _collective_device(group: Any) -> torch.device:
    """Where small bookkeeping tensors must live for this group's backend (NCCL: the current GPU)."""
    if dist.get_backend(_group(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_if_any_rank_failed(error: Optional[BaseException], group: Any = None) -> None:
    """Collective: every rank learns whether some rank rejected its inputs, and all raise (the
    failing ranks their own error, the others a ValueError naming them) instead of leaving the
    healthy ranks waiting in a collective the failing ones never reach."""
    flags = all_gather(torch.tensor([[0 if error is None else 1]], device=_collective_device(group)), group,
                              [1] * world_size(group))
    failed = [r for r, f in enumerate(flags[:, 0].tolist()) if f]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (their error says why)")


@contextmanager
def fail_together(group: Any, kinds: tuple[type[BaseException], ...] = (TypeError, ValueError)) -> Iterator[None]:
    """Run the block's checks on every rank of ``group`` and fail on all if one failed
    (:func:`raise_if_any_rank_failed`); ``group=None``: one process, an error raises at once."""
    error: Optional[BaseException] = None
    try:
        yield
    except kinds as exc:
        if group is None:
            raise
        error = exc
    if group is not None:
        raise_if_any_rank_failed(error, group)


def all_gather(t: Tensor, group: Any = None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Every rank's rows of ``t`` concatenated in rank order, without gradient (labels, guide
    embeddings); ``sizes``: each rank's row count when they differ (default: all equal)."""
    if sizes is None:
        sizes = [t.shape[0]] * world_size(group)
    longest = max(sizes)
    padded = t if t.shape[0] == longest else torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=_group(group))
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


_FIELDS = ("embedding dim", "dtype", "key_blocks", "label levels", "guide dim", "negatives width", "options")


def _descriptor(query: Tensor, keys: Tensor, key_blocks: int, key_labels: Optional[Tensor],
                guide_keys: Optional[Tensor], negatives: Optional[Tensor], options: str) -> Tensor:
    levels = 0 if key_labels is None else (1 if key_labels.dim() == 1 else key_labels.shape[1]) + 1
    digest = int.from_bytes(hashlib.sha256(options.encode()).digest()[:7], "little")
    values = [query.shape[0], keys.shape[0], query.shape[1], _DTYPES.index(query.dtype), key_blocks, levels,
              0 if guide_keys is None else guide_keys.shape[1] + 1,
              -1 if negatives is None else negatives.shape[1], digest]
    return torch.tensor(values, dtype=torch.long)


def _check_agreement(table: Tensor) -> None:
    """Raise the same ValueError on every rank when the ranks' descriptors disagree."""
    for column, name in enumerate(_FIELDS, start=2):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            shown = values if name != "dtype" else [str(_DTYPES[v]) for v in values]
            raise ValueError(
                f"process_group: ranks disagree on {name}: {shown} (rank r's value at position r). Every rank must "
                "pass the same embedding dim, dtype, key_blocks, label levels, guide dim and options")


def distributed_info_nce(query: Tensor, keys: Tensor, positives: Optional[Tensor], *, group: Any, key_blocks: int,
                         key_labels: Optional[Tensor], query_labels: Optional[Tensor],
                         guide_query: Optional[Tensor], guide_keys: Optional[Tensor], negatives: Optional[Tensor],
                         reduction: str, options: str, compute: Any, symmetric: bool = False) -> Any:
    """The gathered loss (module docstring). ``compute(query, keys, positives, key_labels,
    query_labels, guide_query, guide_keys, negatives)`` runs the local rows against the global
    keys and returns ``(per-row loss, stats)``; ``options`` is a canonical string of every other
    argument, compared across ranks. ``symmetric``: queries (and their labels and guide) are
    gathered too, and each local positive key is contrasted against every rank's queries."""
    world = world_size(group)
    me = rank(group)
    if key_blocks < 1 or keys.shape[0] % key_blocks:
        raise ValueError(f"key_blocks must divide keys.shape[0] = {keys.shape[0]}, got {key_blocks}")
    descriptor = _descriptor(query, keys, key_blocks, key_labels, guide_keys, negatives, options)
    table = all_gather(descriptor.to(_collective_device(group))[None], group, [1] * world).cpu()
    _check_agreement(table)
    rows = table[:, 0].tolist()
    block = [n // key_blocks for n in table[:, 1].tolist()]
    total_block, total_rows = sum(block), sum(rows)
    if total_rows == 0:
        raise ValueError("query: every rank has an empty query; at least one row is needed in the group")
    if total_block == 0:
        raise ValueError("keys: every rank has empty keys; at least one key is needed in the group")

    mine = block[me]
    starts = [sum(block[:r]) for r in range(world)]

    def global_columns(local: Tensor) -> Tensor:
        c, r = local // max(mine, 1), local % max(mine, 1)
        return c * total_block + starts[me] + r

    def gather_blocks(t: Tensor, with_grad: bool) -> Tensor:
        parts = []
        for c in range(key_blocks):
            piece = t[c * mine:(c + 1) * mine]
            parts.append(all_gather_with_grad(piece, group, block) if with_grad else all_gather(piece, group, block))
        return torch.cat(parts)

    B = query.shape[0]
    if positives is None:
        if B > keys.shape[0]:
            raise ValueError(f"positives defaults to arange(B), which requires keys.shape[0] >= query.shape[0]; "
                             f"got N={keys.shape[0]} < B={B} on rank {me}")
        positives = torch.arange(B, device=query.device)
    if key_labels is not None and query_labels is None:
        query_labels = key_labels[positives.long()]
    all_keys = gather_blocks(keys, True)
    all_labels = gather_blocks(key_labels, False) if key_labels is not None else None
    all_guide = gather_blocks(guide_keys.detach(), False) if guide_keys is not None else None
    all_queries = all_query_labels = all_guide_queries = None
    if symmetric:
        all_queries = all_gather_with_grad(query, group, rows)
        if query_labels is not None:
            all_query_labels = all_gather(query_labels, group, rows)
        if guide_query is not None:
            all_guide_queries = all_gather(guide_query.detach(), group, rows)
    if B == 0:
        if all_queries is not None:
            all_keys = all_keys + 0.0 * all_queries.sum()
        # no rows here; the gathered keys still enter the graph so that this rank joins the
        # backward's reduce-scatter like every other rank
        zero = (all_keys.sum() + query.sum()) * 0.0
        return zero if reduction != "none" else query.new_zeros(0), None
    local_positives = positives
    positives = global_columns(positives.long())
    if negatives is not None:
        negatives = torch.where(negatives >= 0, global_columns(negatives.long().clamp(min=0)), negatives.long())
    loss, stats = compute(query, all_keys, positives, all_labels, query_labels, guide_query, all_guide, negatives)
    if symmetric:
        assert all_queries is not None
        own_rows = torch.arange(B, device=query.device) + sum(rows[:me])
        column_loss, _ = compute(
            keys[local_positives], all_queries, own_rows,
            all_query_labels, key_labels[local_positives] if key_labels is not None else None,
            guide_keys[local_positives].detach() if guide_keys is not None else None, all_guide_queries, None)
        loss = (loss + column_loss.to(loss.dtype)) / 2
    if reduction == "mean":
        return loss.sum() * (world / total_rows), stats
    if reduction == "sum":
        return loss.sum() * world, stats
    return loss, stats
