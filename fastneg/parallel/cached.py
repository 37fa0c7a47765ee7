"""Gradient cache (GradCache, Gao et al. 2021) for plain PyTorch encoders.

For encoders whose activations do not fit at the full batch: the contrastive loss couples every
example of the batch, so the batch cannot simply be split into accumulation steps. Instead::

    loss = fastneg.cached.cached_loss([query_encoder, doc_encoder], [queries, docs],
                                      lambda q, d: fastneg.info_nce(q, d), chunk_size=32)
    loss.backward()          # re-runs the encoders chunk by chunk and accumulates their gradients
    optimizer.step()

1. every input column is embedded in chunks of ``chunk_size`` rows **without** a graph, the
   random state of each chunk's forward saved (CPU and CUDA generators);
2. ``loss_fn`` runs on the full embeddings (fastneg's fused loss needs O(B) memory) and its
   gradient with respect to the embeddings is computed and kept;
3. ``loss.backward()`` (a hook on the returned loss) re-embeds each chunk **with** a graph under
   the saved random state, so dropout draws the same masks, and back-propagates the cached
   gradient through it, scaled by whatever gradient reaches the loss (AMP's scaler, accumulation).

The result equals the uncached step (same loss, same parameter gradients up to float summation
order). Peak memory holds one chunk's activations plus the embeddings. Works under DDP as any
sequence of backward calls does; wrap all but the last in ``model.no_sync()`` yourself to avoid
extra all-reduces (not done here: the encoders are plain callables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["cached_loss", "RandState", "batch_rows", "chunk_ranges", "slice_rows"]

Batch = Union[Tensor, Mapping, list, tuple]


class RandState:
    """The CPU generator's state and that of the accelerators the given tensors live on, taken at
    construction and restored inside ``with`` (the surrounding state is put back on exit)."""

    def __init__(self, *tensors: Any) -> None:
        from torch.utils.checkpoint import get_device_states

        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*[t for t in tensors if isinstance(t, Tensor)])

    def __enter__(self) -> None:
        from torch.utils.checkpoint import set_device_states

        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        set_device_states(self.devices, self.states)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


def batch_rows(batch: Batch) -> int:
    """Rows of a tensor, of a dict-like batch of tensors (a ``dict``, a tokenizer's ``BatchEncoding``:
    any ``Mapping``; input_ids / attention_mask first) or of a list."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for key in ("input_ids", "attention_mask"):  # tokenizer output: these are always batch-first
            if isinstance(batch.get(key), Tensor):
                return int(batch[key].shape[0])
        return next(int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
    return len(batch)


def _tensors(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, Tensor)]
    return [v for v in batch if isinstance(v, Tensor)]


def slice_rows(batch: Batch, begin: int, end: int) -> Batch:
    """Rows ``begin:end`` of a tensor, a dict-like batch (any ``Mapping``, e.g. a ``BatchEncoding``;
    tensors whose first dim is the batch are sliced, other values passed through; a plain ``dict``
    comes back) or a list of examples."""
    if isinstance(batch, Tensor):
        return batch[begin:end]
    if isinstance(batch, Mapping):
        n = batch_rows(batch)
        return {k: (v[begin:end] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                for k, v in batch.items()}
    return batch[begin:end]


def chunk_ranges(rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(b, min(b + chunk_size, rows)) for b in range(0, rows, chunk_size)]


def _embed_chunks(encode: Callable[[Batch], Tensor], batch: Batch, ranges: list[tuple[int, int]], with_grad: bool,
                  states: Sequence[RandState] | None = None) -> Iterator[tuple[Tensor, RandState | None]]:
    for index, (begin, end) in enumerate(ranges):
        chunk = slice_rows(batch, begin, end)
        replay = states[index] if states is not None else nullcontext()
        with replay, (nullcontext() if with_grad else torch.no_grad()):
            state = RandState(*_tensors(chunk)) if states is None else None  # before the forward draws
            yield encode(chunk), state


def cached_loss(encoders: Union[Callable[[Batch], Tensor], Sequence[Callable[[Batch], Tensor]]],
                inputs: Sequence[Batch], loss_fn: Callable[..., Tensor], *, chunk_size: int) -> Tensor:
    """The loss ``loss_fn(*[encoder(column) for column])`` with a gradient cache (module docstring).

    Args:
        encoders: one callable for every column, or one shared by all; each maps a chunk of its
            column to ``[rows, D]`` embeddings.
        inputs: the columns (tensors, dicts of tensors, or lists), all sliced along their first dim.
        loss_fn: takes one embedding tensor per column and returns a scalar.
        chunk_size: rows per encoder call.

    Returns:
        A scalar tensor equal to the loss. Calling ``.backward()`` on it (or on anything computed from
        it) back-propagates into the encoders' parameters chunk by chunk. Under ``torch.no_grad()``
        the loss is computed in chunks and returned without any hook.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ValueError("inputs must be a non-empty list of columns")
    encode = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders] * len(inputs)
    if len(encode) != len(inputs):
        raise ValueError(f"encoders: got {len(encode)} for {len(inputs)} input columns")
    grad_enabled = torch.is_grad_enabled()
    ranges = [chunk_ranges(batch_rows(column), chunk_size) for column in inputs]
    reps: list[Tensor] = []
    states: list[list[RandState]] = []
    for fn, column, column_ranges in zip(encode, inputs, ranges):
        parts, column_states = [], []
        for rep, state in _embed_chunks(fn, column, column_ranges, with_grad=False):
            parts.append(rep.detach())
            column_states.append(state)
        reps.append(torch.cat(parts).requires_grad_(grad_enabled))
        states.append(column_states)
    if not grad_enabled:
        return loss_fn(*reps)
    with torch.enable_grad():
        loss = loss_fn(*reps)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, reps, allow_unused=True)
    cache = [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads)]
    out = loss.detach().requires_grad_()
    out.register_hook(partial(_replay, encode=encode, inputs=inputs, ranges=ranges, cache=cache, states=states))
    return out


def _replay(grad_output: Tensor, *, encode: list[Callable[[Batch], Tensor]], inputs: Sequence[Batch],
            ranges: list[list[tuple[int, int]]], cache: list[Tensor], states: list[list[RandState]]) -> None:
    with torch.enable_grad():
        for fn, column, column_ranges, grad, column_states in zip(encode, inputs, ranges, cache, states):
            for (rep, _), (begin, end) in zip(_embed_chunks(fn, column, column_ranges, True, column_states),
                                              column_ranges):
                if rep.requires_grad:
                    rep.backward(grad[begin:end].to(rep.dtype) * grad_output.to(rep.dtype))
