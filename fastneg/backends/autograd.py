"""The fused ops as ``torch.library`` operators: fake (meta) kernels and autograd.

Every backend registers an op pair with one schema (``csrc/register.cpp``; the Triton ops in
:mod:`fastneg.backends.triton` take the same arguments)::

    forward(query, keys, positives, temperature, query_labels?, key_labels?, guide_query?,
            guide_keys?, exclude?, scalars: float[], flags: int)
        -> (loss [B], row_state [len(RowState), B], num_masked [B], num_negatives [B])
    backward(grad_loss, query, keys, positives, temperature, query_labels?, key_labels?,
             guide_query?, guide_keys?, exclude?, row_state, scalars, flags)
        -> (dquery or [0], dkeys or [0], per-row sum_j dS_ij s_ij)

``scalars`` and ``flags`` are the call's :class:`~fastneg.plan.Plan` (``Plan.scalars()``,
``Plan.flags()``); the backward's flags add ``QUERY_GRAD`` / ``KEYS_GRAD`` / ``TEMPERATURE_GRAD``
(without the last, a backend may return zeros for the per-row temperature sum). ``row_state`` holds
one named per-row quantity per row (:class:`~fastneg.plan.RowState`): the backward recomputes the
score tiles from it, so nothing of size B x N is kept. ``exclude`` [B] (or None) names a column
removed from each row entirely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..plan import Flag, RowState

__all__ = ["FORWARD_OPS", "SAMPLE_OPS", "register_fused_op", "register_sample_op"]

FORWARD_OPS: dict[str, Any] = {}
SAMPLE_OPS: dict[str, Any] = {}


def _fake_forward(query: torch.Tensor, keys: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    B = query.shape[0]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_empty(B, dtype=acc), query.new_empty(len(RowState), B, dtype=acc),
            query.new_empty(B, dtype=torch.int64), query.new_empty(B, dtype=torch.int64))


def _device_rowsum_dtype(query: torch.Tensor) -> torch.dtype:
    """The C++ op's per-row sums (float64, on CPU); the Triton and portable ops pass their own."""
    return torch.float64 if query.device.type == "cpu" else torch.float32


def register_fused_op(name: str, forward: Any, backward: Callable[..., tuple[torch.Tensor, ...]],
                      rowsum_dtype: Callable[[torch.Tensor], torch.dtype] = _device_rowsum_dtype) -> None:
    """Attach fake kernels and autograd to a forward/backward op pair with the fused schema
    (``rowsum_dtype``: the dtype of the backward's per-row temperature sums, from ``query``)."""

    def fake_backward(grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
        flags = args[-1]
        dq = torch.empty_like(query) if flags & Flag.QUERY_GRAD else query.new_empty(0)
        dk = torch.empty_like(keys) if flags & Flag.KEYS_GRAD else keys.new_empty(0)
        return dq, dk, query.new_empty(query.shape[0], dtype=rowsum_dtype(query))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        *tensors, scalars, flags = inputs
        _, row_state, _, _ = output
        ctx.save_for_backward(*tensors, row_state)
        ctx.scalars, ctx.flags = scalars, flags
        for t in output[1:]:
            ctx.mark_non_differentiable(t)

    def autograd_backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused_grads: Any) -> tuple[Optional[torch.Tensor], ...]:
        *tensors, row_state = ctx.saved_tensors
        temperature = tensors[3]  # the schema's fourth argument
        need_q, need_k, _, need_t = ctx.needs_input_grad[:4]
        no_grads: tuple[Optional[torch.Tensor], ...] = (None,) * len(ctx.needs_input_grad)
        if grad_loss is None or not (need_q or need_k or need_t):
            return no_grads
        flags = (ctx.flags | (Flag.QUERY_GRAD if need_q else 0) | (Flag.KEYS_GRAD if need_k else 0)
                 | (Flag.TEMPERATURE_GRAD if need_t else 0))
        dq, dk, tau_rowsum = backward(grad_loss, *tensors, row_state, ctx.scalars, int(flags))
        # L depends on tau through l = s / tau: dL/dtau = -(1 / tau) * sum_ij dL/ds_ij * s_ij
        d_temp = None
        if need_t:
            d_temp = (-(tau_rowsum.sum()) / temperature.to(tau_rowsum.dtype)).to(temperature.dtype).reshape(temperature.shape)
        return (dq if need_q else None, dk if need_k else None, None, d_temp) + no_grads[4:]

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(fake_backward)
    torch.library.register_autograd(forward, autograd_backward, setup_context=setup_context)
    FORWARD_OPS[name] = forward


def register_sample_op(name: str, op: Any, value_dtype: Callable[[torch.Tensor], torch.dtype]) -> None:
    """Attach the fake kernel of a sampler op (``[B, num_negatives]`` int64 indices and their values
    in ``value_dtype(query)``, no autograd)."""

    def fake_sample(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, query_labels: Any,
                    key_labels: Any, guide_query: Any, guide_keys: Any, scalars: Any, flags: int,
                    num_negatives: int, seed: int, first_key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (query.shape[0], num_negatives)
        return query.new_empty(shape, dtype=torch.int64), query.new_empty(shape, dtype=value_dtype(query))

    torch.library.register_fake(op)(fake_sample)
    SAMPLE_OPS[name] = op
