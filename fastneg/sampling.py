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

from .backends import resolve_backend, sample_op
from .backends.operands import kernel_operands, normalized_operands
from .options import SimANS
from .plan import Plan, Strategy
from .reference import sample_negatives_reference
from .validation import check_backend, check_exclude, check_num_negatives, validate_inputs

__all__ = ["sample_negatives", "STRATEGIES"]

STRATEGIES = ("top", "simans", "uniform")
# the fused Triton sampler keeps a [rows, K_PAD] running top-k in registers; beyond this many
# negatives the portable sampler draws them (the dense sampler on chunks of rows: the same values and noise)
MAX_FUSED_NEGATIVES = 512
StrategyOption = Union[str, SimANS]


def parse_strategy(strategy: object) -> tuple[Strategy, Optional[SimANS]]:
    """The sampler's :class:`~fastneg.plan.Strategy` and, for SimANS, its weighting."""
    if isinstance(strategy, SimANS):
        return Strategy.SIMANS, strategy
    if strategy == "simans":
        return Strategy.SIMANS, SimANS()
    if strategy == "top":
        return Strategy.TOP, None
    if strategy == "uniform":
        return Strategy.UNIFORM, None
    raise ValueError(f"strategy must be 'top', 'simans', 'uniform' or fastneg.SimANS(a, b), got {strategy!r}")


def draw_seed(seed: Optional[int], generator: Optional[torch.Generator]) -> int:
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
    strategy: StrategyOption,
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
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU, portable elsewhere), ``"triton"``, ``"cpu"``,
            ``"portable"`` (the dense sampler on chunks of rows, any device), ``"reference"`` (dense, for checking).

    Returns:
        int64 ``[B, num_negatives]`` key indices, best first (highest score, or highest perturbed
        log-weight: the order of sequential draws), ``-1`` where a row ran out of candidates.
    """
    validate_inputs(query, keys, positives, 1.0, query_labels, key_labels, guide_query, guide_keys)
    check_num_negatives(num_negatives)
    code, simans = parse_strategy(strategy)
    plan = Plan.build(margin, relative_margin, max_score, guide_margin, guide_strategy, simans)
    if exclude is not None:
        check_exclude(exclude, query.shape[0], keys.shape[0], query.device)
    check_backend(backend)
    chosen = resolve_backend(backend, query.device)
    if chosen == "triton" and query.dtype == torch.float64:
        # the Triton sampler packs float32 scores into int64 sort keys: no float64 path
        raise TypeError("query: backend='triton' samples float16, bfloat16 or float32, got float64; "
                        "use backend='cpu' (or 'auto') for float64")
    noise_seed = 0 if code == Strategy.TOP else draw_seed(seed, generator)

    positives, query_labels, key_labels, guide_query, guide_keys = normalized_operands(
        query, positives, query_labels, key_labels, guide_query, guide_keys)
    extra = 0 if exclude is None else exclude.shape[1]
    k = num_negatives + extra
    with torch.no_grad():
        if chosen == "reference":
            drawn = sample_negatives_reference(query, keys, positives, k, code, plan, noise_seed, query_labels,
                                               key_labels, guide_query, guide_keys)
        else:
            drawn = _fused_sample(chosen, query, keys, positives, k, code, plan, noise_seed, query_labels,
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
                  code: Strategy, plan: Plan, seed: int, query_labels: Optional[torch.Tensor],
                  key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
                  guide_keys: Optional[torch.Tensor]) -> torch.Tensor:
    if backend == "triton" and k > MAX_FUSED_NEGATIVES:
        # beyond the fused Triton sampler's k: the portable sampler (the dense sampler on chunks of rows,
        # memory O(chunk x N)); the same values and noise, so the same draw
        backend = "portable"
    query, keys, query_labels, key_labels, guide_query, guide_keys = kernel_operands(
        backend, query, keys, query_labels, key_labels, guide_query, guide_keys)
    return sample_op(backend)(query, keys, positives, query_labels, key_labels, guide_query, guide_keys,
                              plan.scalars(), plan.flags(kind=code), k, seed)
