"""The fused op as ``torch.library`` operators: fake (meta) kernels and autograd.

Two operator pairs share one schema and one autograd formula:

- ``fastneg::info_nce_fwd_cpu`` / ``info_nce_bwd_cpu``: the C++ kernels in ``csrc/``.
- ``fastneg::info_nce_fwd_triton`` / ``info_nce_bwd_triton``: the Triton kernels through
  ``torch.library.triton_op`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Forward returns, per row: loss, logsumexp, positive score, SimANS normaliser offset, the
score threshold, the guide threshold, number of masked keys, number of negatives, and for the
symmetric loss the logsumexp and SimANS offset of the row's positive column (zeros otherwise;
with ``symmetric`` the loss is already ``(row + column) / 2``), and the positive's coefficient
``c+`` in ``dL/dl+ = c+ e^{l+ - lse} - 1`` (1 but with DCL's ``debias``) stacked [4, B] with HCL's
negative mass ``beta R`` and ``-logsumexp_k(beta l_ik)`` and the soft labels' teacher logsumexp
(zeros when unused; with ``attract``, row 1 holds ``1 / |P_i|``). ``exclude`` [B] (or None) names a
column removed from each row entirely. Backward recomputes the score
tiles from the saved per-row values, so nothing of size B x N is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastneg.*_cpu)
except ImportError as exc:  # pragma: no cover - an install problem, explained
    raise ImportError(
        "fastneg's C++ kernels (fastneg._C) are missing or were built against another torch: "
        "reinstall with `pip install --no-build-isolation .` in the environment that runs fastneg"
    ) from exc

__all__ = ["FORWARD_OPS", "SAMPLE_OPS", "register_fused_op", "register_sample_op"]

FORWARD_OPS: dict[str, Any] = {}
SAMPLE_OPS: dict[str, Any] = {}


def _fake_forward(query: torch.Tensor, keys: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    B = query.shape[0]
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    rows = [query.new_empty(B, dtype=acc) for _ in range(6)]
    counts = [query.new_empty(B, dtype=torch.int64) for _ in range(2)]
    columns = [query.new_empty(B, dtype=acc) for _ in range(2)]
    return (*rows, *counts, *columns, query.new_empty(4, B, dtype=acc))


def _fake_backward(grad_loss: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    query_grad, keys_grad = args[-2], args[-1]
    dq = torch.empty_like(query) if query_grad else query.new_empty(0)
    dk = torch.empty_like(keys) if keys_grad else keys.new_empty(0)
    return dq, dk, query.new_empty(query.shape[0], dtype=torch.float64 if query.device.type == "cpu" else torch.float32)


def register_fused_op(name: str, forward: Any, backward: Callable[..., tuple[torch.Tensor, ...]]) -> None:
    """Attach fake kernels and autograd to a forward/backward op pair with the fused schema."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        (query, keys, positives, temperature, query_labels, key_labels, guide_query, guide_keys,
         _margin, _relative_margin, _max_score, _guide_margin, _guide_relative,
         weighting, weight_a, weight_b, symmetric, _debias, soft_temperature, soft_weight, exclude, attract) = inputs
        _, lse, positive_score, row_offset, threshold, guide_threshold, _, _, col_lse, col_offset, pos_coef = output
        ctx.save_for_backward(query, keys, positives, temperature, query_labels, key_labels, guide_query,
                              guide_keys, lse, positive_score, row_offset, threshold, guide_threshold, col_lse,
                              col_offset, pos_coef, exclude)
        ctx.attract = attract
        ctx.weighting = (weighting, weight_a, weight_b)
        ctx.soft = (soft_temperature, soft_weight)
        ctx.symmetric = symmetric
        for t in output[1:]:
            ctx.mark_non_differentiable(t)

    def autograd_backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused_grads: Any) -> tuple[Optional[torch.Tensor], ...]:
        (query, keys, positives, temperature, query_labels, key_labels, guide_query, guide_keys,
         lse, positive_score, row_offset, threshold, guide_threshold, col_lse, col_offset,
         pos_coef, exclude) = ctx.saved_tensors
        need_q, need_k, _, need_t = ctx.needs_input_grad[:4]
        no_grads: tuple[Optional[torch.Tensor], ...] = (None,) * 22
        if grad_loss is None or not (need_q or need_k or need_t):
            return no_grads
        weighting, weight_a, weight_b = ctx.weighting
        dq, dk, tau_rowsum = backward(
            grad_loss, query, keys, positives, temperature, query_labels, key_labels, guide_query, guide_keys,
            lse, positive_score, row_offset, threshold, guide_threshold, col_lse, col_offset, pos_coef, weighting,
            weight_a, weight_b, ctx.symmetric, *ctx.soft, exclude, ctx.attract, bool(need_q), bool(need_k))
        # L depends on tau through l = s / tau: dL/dtau = -(1 / tau) * sum_ij dL/ds_ij * s_ij
        d_temp = None
        if need_t:
            d_temp = (-(tau_rowsum.sum()) / temperature.to(tau_rowsum.dtype)).to(temperature.dtype).reshape(temperature.shape)
        return (dq if need_q else None, dk if need_k else None, None, d_temp) + (None,) * 18

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    torch.library.register_autograd(forward, autograd_backward, setup_context=setup_context)
    FORWARD_OPS[name] = forward


register_fused_op("cpu", torch.ops.fastneg.info_nce_fwd_cpu.default, torch.ops.fastneg.info_nce_bwd_cpu.default)


def _fake_sample(query: torch.Tensor, *args: Any) -> torch.Tensor:
    num_negatives = args[-2]
    return query.new_empty(query.shape[0], num_negatives, dtype=torch.int64)


def register_sample_op(name: str, op: Any) -> None:
    """Attach the fake kernel of a sampler op (``[B, num_negatives]`` int64, no autograd)."""
    torch.library.register_fake(op)(_fake_sample)
    SAMPLE_OPS[name] = op


register_sample_op("cpu", torch.ops.fastneg.sample_negatives_cpu.default)
