"""Negative sampling with the loss's rules (SPEC section 5): :func:`sample_negatives`.

One pass over the score tiles, as in the loss: each row keeps a running top-k of its unmasked
negatives (never the positive, never a masked key), scored by

- ``"top"``: the score ``s_ij`` (the hardest negatives, as in UniME and NV-Retriever's TopK-*);
- ``SimANS(a, b)`` / ``"simans"``: ``log w_ij + G_ij`` with ``w_ij = exp(-a (s_ij - s_i+ - b)^2)``:
  Gumbel-top-k, i.e. ``k`` draws without replacement with ``P(j) = w_ij / sum_k w_ik`` for the
  first draw;
- ``"uniform"``: ``G_ij`` (uniform draws without replacement).

``G_ij`` is standard Gumbel noise computed from a hash of ``(seed, i, j)``: the draw is a pure
function of the inputs and the seed, independent of tiling and thread count, and the C++ and
Triton kernels and the dense reference compute the same noise. Rows with fewer candidates than
``num_negatives`` are padded with ``-1``. Keys whose score is NaN are never drawn.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops
from .options import Rules, SimANS, check_backend, check_exclude, check_num_negatives, validate_inputs
from .reference import false_negative_mask

__all__ = ["sample_negatives", "sample_negatives_reference", "gumbel_noise", "STRATEGIES"]

STRATEGIES = ("top", "simans", "uniform")
STRATEGY_TOP, STRATEGY_SIMANS, STRATEGY_UNIFORM = 0, 1, 2

Strategy = Union[str, SimANS]


def _strategy(strategy: object) -> tuple[int, float, float]:
    """(kernel code, SimANS a, SimANS b)."""
    if isinstance(strategy, SimANS):
        return STRATEGY_SIMANS, float(strategy.a), float(strategy.b)
    if strategy == "simans":
        return STRATEGY_SIMANS, SimANS().a, SimANS().b
    if strategy == "top":
        return STRATEGY_TOP, 0.0, 0.0
    if strategy == "uniform":
        return STRATEGY_UNIFORM, 0.0, 0.0
    raise ValueError(f"strategy must be 'top', 'simans', 'uniform' or fastneg.SimANS(a, b), got {strategy!r}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (the kernels' integer hash)."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise G[i, j] under ``seed`` for broadcastable index tensors ``rows`` and
    ``cols`` (e.g. [R, 1] and [1, C]), float32, bit for bit the kernels' integers (the final logs
    may differ in the last ulp)."""
    m = 0xFFFFFFFF
    h = _mix32(torch.tensor(seed & m, dtype=torch.int64, device=rows.device))
    h = _mix32(h ^ (rows.long() & m))
    h = _mix32(h ^ (cols.long() & m))
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)
    return -torch.log(-torch.log(u))


def _seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        return seed & 0xFFFFFFFF
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())


def sample_negatives(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: Optional[torch.Tensor],
    num_negatives: int,
    *,
    strategy: Strategy,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    margin: Optional[float] = None,
    relative_margin: Optional[float] = None,
    max_score: Optional[float] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_keys: Optional[torch.Tensor] = None,
    guide_margin: Optional[float] = 0.0,
    guide_strategy: str = "absolute",
    exclude: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw ``num_negatives`` negatives per query under the loss's masking rules (module docstring).

    Args:
        query ``[B, D]``, keys ``[N, D]``, positives ``[B]`` (default ``arange(B)``): as in
            :func:`fastneg.info_nce`; the rules (labels, margins, ``max_score``, guide) are the
            loss's, with thresholds from the positive's score.
        num_negatives: ``k >= 1``, negatives per row.
        strategy: ``"top"``, ``"simans"`` (``SimANS()``), ``fastneg.SimANS(a, b)`` or ``"uniform"``.
        exclude: ``[B, E]`` key indices (-1 = none) never drawn for that row, e.g. the query's other
            positives (the sampler draws ``k + E`` and drops them, which keeps top-k exact and
            Gumbel-top-k an exact draw from the remaining keys).
        generator, seed: the randomness (one of them; neither: torch's default generator). The
            same seed and inputs give the same indices on a device.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"``, ``"reference"``
            (dense, for checking).

    Returns:
        int64 ``[B, num_negatives]`` key indices, best first (highest score, or highest perturbed
        log-weight: the order of sequential draws), ``-1`` where a row ran out of candidates.
    """
    from .functional import _resolve_backend, normalized_operands  # the same backend rules as the loss

    validate_inputs(query, keys, positives, 1.0, query_labels, key_labels, guide_query, guide_keys)
    check_num_negatives(num_negatives)
    code, a, b = _strategy(strategy)
    rules = Rules.build(margin, relative_margin, max_score, guide_margin, guide_strategy,
                        SimANS(a, b) if code == STRATEGY_SIMANS else None)
    if exclude is not None:
        check_exclude(exclude, query.shape[0], keys.shape[0], query.device)
    check_backend(backend)
    chosen = _resolve_backend(backend, query.device)
    if chosen == "triton" and query.dtype == torch.float64:
        # the Triton sampler packs float32 scores into int64 sort keys: no float64 path
        raise TypeError("query: backend='triton' samples float16, bfloat16 or float32, got float64; "
                        "use backend='cpu' (or 'auto') for float64")
    noise_seed = 0 if code == STRATEGY_TOP else _seed(seed, generator)

    positives, query_labels, key_labels, guide_query, guide_keys = normalized_operands(
        query, positives, query_labels, key_labels, guide_query, guide_keys)
    extra = 0 if exclude is None else exclude.shape[1]
    k = num_negatives + extra
    with torch.no_grad():
        if chosen == "reference":
            drawn = sample_negatives_reference(query, keys, positives, k, code, rules, noise_seed, query_labels,
                                               key_labels, guide_query, guide_keys)
        else:
            drawn = _fused_sample(chosen, query, keys, positives, k, code, rules, noise_seed, query_labels,
                                  key_labels, guide_query, guide_keys)
    if exclude is not None:
        drawn = _drop_excluded(drawn, exclude.long(), num_negatives)
    return drawn


def _drop_excluded(drawn: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """Remove each row's excluded keys from its ranked list and keep the first k (order kept)."""
    hit = ((drawn[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(-1) | (drawn < 0)
    # stable sort on the drop flag moves kept entries to the front in their original order
    order = torch.sort(hit.to(torch.int8), dim=1, stable=True).indices
    kept = drawn.gather(1, order)[:, :k]
    return torch.where(hit.gather(1, order)[:, :k], torch.full_like(kept, -1), kept)


def _fused_sample(backend: str, query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, k: int,
                  code: int, rules: Rules, seed: int, query_labels: Optional[torch.Tensor],
                  key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
                  guide_keys: Optional[torch.Tensor]) -> torch.Tensor:
    from .functional import kernel_operands

    if backend == "triton":
        from . import triton_ops
        if k > triton_ops.MAX_FUSED_NEGATIVES:
            return _chunked_sample(query, keys, positives, k, code, rules, seed, query_labels, key_labels,
                                   guide_query, guide_keys)
    query, keys, query_labels, key_labels, guide_query, guide_keys = kernel_operands(
        backend, query, keys, query_labels, key_labels, guide_query, guide_keys)
    return ops.SAMPLE_OPS[backend](query, keys, positives, query_labels, key_labels, guide_query, guide_keys,
                                   rules.margin, rules.relative_margin, rules.max_score, rules.guide_margin,
                                   rules.guide_relative, code, rules.weight_a, rules.weight_b, k, seed)


def _chunked_sample(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, k: int, code: int,
                    rules: Rules, seed: int, query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
                    guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor]) -> torch.Tensor:
    """A k beyond the fused Triton sampler's: the dense sampler on row chunks of at most 2^26
    scores each (memory O(chunk x N), never B x N); the same values and noise, so the same draw."""
    chunk = max(1, 2**26 // max(1, keys.shape[0]))
    parts = []
    for start in range(0, query.shape[0], chunk):
        rows = slice(start, start + chunk)
        parts.append(sample_negatives_reference(
            query[rows].float(), keys.float(), positives[rows], k, code, rules, seed,
            query_labels[rows] if query_labels is not None else None, key_labels,
            guide_query[rows].float() if guide_query is not None else None,
            guide_keys.float() if guide_keys is not None else None, first_row=start))
    return torch.cat(parts)


def sample_negatives_reference(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, k: int, code: int,
                               rules: Rules, seed: int, query_labels: Optional[torch.Tensor] = None,
                               key_labels: Optional[torch.Tensor] = None, guide_query: Optional[torch.Tensor] = None,
                               guide_keys: Optional[torch.Tensor] = None, first_row: int = 0) -> torch.Tensor:
    """The sampler written densely: masked [B, N] values, a stable descending sort (ties: the
    smaller key index first), the first k, -1 where the values ran out. ``first_row``: the
    global index of ``query``'s first row (the noise depends on it)."""
    B, N = query.shape[0], keys.shape[0]
    cols = positives.view(B, 1)
    scores = query @ keys.T
    guide_scores = None
    if guide_query is not None and guide_keys is not None:
        guide_scores = (guide_query @ guide_keys.T).to(scores.dtype)
    labels = None
    if key_labels is not None:
        labels = key_labels[None, :] if key_labels.dim() == 1 else key_labels[None, :, :]
    masked = false_negative_mask(scores, cols, rules, query_labels, labels, guide_scores)
    masked.scatter_(1, cols, True)
    masked |= torch.isnan(scores)
    if code == STRATEGY_TOP:
        values = scores
    else:
        noise = gumbel_noise(seed, torch.arange(first_row, first_row + B, device=query.device)[:, None],
                             torch.arange(N, device=query.device)[None, :])
        if code == STRATEGY_UNIFORM:
            values = noise.to(scores.dtype)
        else:
            d = scores - scores.gather(1, cols) - rules.weight_b
            values = -rules.weight_a * d * d + noise.to(scores.dtype)
    values = values.masked_fill(masked, float("-inf"))
    order = torch.sort(values, dim=1, descending=True, stable=True)
    idx = order.indices[:, :k]
    idx = torch.where(order.values[:, :k] > float("-inf"), idx, torch.full_like(idx, -1))
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((B, k - idx.shape[1]), -1)], dim=1)
    return idx
