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
``num_negatives`` are padded with ``-1``. Keys whose score is NaN or ``-inf`` are never drawn (nor,
under SimANS, keys of weight zero: an infinite score or positive score); ``+inf`` is the highest
score. Every backend draws the same keys (docs/reference.md, non-finite embeddings).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed

from .backends import MAX_FUSED_NEGATIVES, resolve_backend
from .backends.operands import normalized_operands
from .backends.sampler import draw
from .options import SimANS
from .plan import Strategy
from .rules import Rules, resolve_rules
from .validation import check_backend, check_backend_dtype, check_exclude, check_num_negatives, validate_inputs

__all__ = ["sample_negatives", "STRATEGIES", "MAX_FUSED_NEGATIVES"]

STRATEGIES = ("top", "simans", "uniform")
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
    rules: Optional[Rules] = None,
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
    process_group: Any = None,
) -> torch.Tensor:
    """Draw ``num_negatives`` negatives per query under the loss's masking rules (module docstring).

    Args:
        query ``[B, D]``, keys ``[N, D]``, positives ``[B]`` (default ``arange(B)``): as in
            :func:`fastneg.info_nce`; the rules (labels, margins, ``max_score``, guide) are the
            loss's, with thresholds from the positive's score.
        num_negatives: ``k >= 1``, negatives per row.
        strategy: ``"top"``, ``"simans"`` (``SimANS()``), ``fastneg.SimANS(a, b)`` or ``"uniform"``.
        rules: a :class:`fastneg.Rules` (its masking rules: margins, ``max_score``, the guide's; the
            loss's weighting, estimator and ``false_negatives`` do not apply to a draw), or the
            keyword arguments ``margin`` ... ``guide_strategy``, which build one (not both).
        exclude: ``[B, E]`` key indices (-1 = none) never drawn for that row, e.g. the query's other
            positives (the sampler draws ``k + E`` and drops them, which keeps top-k exact and
            Gumbel-top-k an exact draw from the remaining keys).
        generator, seed: the randomness (one of them; neither: torch's default generator). The
            same seed and inputs give the same indices on a device.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU, portable elsewhere), ``"triton"``, ``"cpu"``,
            ``"portable"`` (the dense sampler on chunks of rows, any device), ``"reference"`` (dense, for checking).
        process_group: keys spread over the ranks of a ``torch.distributed`` group (collective:
            every rank calls it). Each rank passes its own queries (any number, none included) and
            its own keys; key and row indices are *global*, in the rank-ordered concatenation of
            every rank's keys and queries (``positives`` default: each row's own global index,
            as ``arange(B)`` in one process; ``exclude`` global key indices). Each rank gets the
            draw of its rows: the draw one process makes over the concatenations with the same
            seed (the noise is keyed by global indices; each rank draws from its keys and the
            candidates are merged exactly, :mod:`fastneg.parallel.sharded`). Bit-identical on the
            CPU kernels when every rank's keys start at a multiple of 256 keys
            (:func:`fastneg.parallel.shard_bounds`); otherwise equal except where two values lie
            within a rounding of each other. Memory per rank: its keys (copied once per call
            with room for every row's positive) and ``ranks x rows x D`` of gathered embeddings.

    Returns:
        int64 ``[B, num_negatives]`` key indices, best first (highest score, or highest perturbed
        log-weight: the order of sequential draws), ``-1`` where a row ran out of candidates.
    """
    rules = resolve_rules("sample_negatives", rules, margin=margin, relative_margin=relative_margin,
                          max_score=max_score, guide_margin=guide_margin, guide_strategy=guide_strategy)
    if process_group is not None:
        return _sample_sharded(query, keys, positives, num_negatives, strategy, query_labels, key_labels, rules,
                               guide_query, guide_keys, exclude, generator, seed, backend, process_group)
    validate_inputs(query, keys, positives, 1.0, query_labels, key_labels, guide_query, guide_keys)
    check_num_negatives(num_negatives)
    code, simans = parse_strategy(strategy)
    plan = rules.masking_plan(simans)
    if exclude is not None:
        check_exclude(exclude, query.shape[0], keys.shape[0], query.device)
    chosen, noise_seed = _backend_and_seed(backend, query, code, seed, generator)

    positives, query_labels, key_labels, guide_query, guide_keys = normalized_operands(
        query, positives, query_labels, key_labels, guide_query, guide_keys)
    drawn, _ = draw(chosen, query, keys, positives, num_negatives, code, plan, noise_seed, query_labels, key_labels,
                    guide_query, guide_keys, None if exclude is None else exclude.long())
    return drawn


def _backend_and_seed(backend: str, query: torch.Tensor, code: Strategy, seed: Optional[int],
                      generator: Optional[torch.Generator]) -> tuple[str, int]:
    """The checked backend and the draw's seed (0 for ``"top"``, which draws no noise)."""
    check_backend(backend)
    chosen = resolve_backend(backend, query.device)
    check_backend_dtype(chosen, query.dtype, "samples")
    return chosen, 0 if code == Strategy.TOP else draw_seed(seed, generator)


def _sample_sharded(query: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor], num_negatives: int,
                    strategy: StrategyOption, query_labels: Optional[torch.Tensor], key_labels: Optional[torch.Tensor],
                    rules: Rules, guide_query: Optional[torch.Tensor], guide_keys: Optional[torch.Tensor],
                    exclude: Optional[torch.Tensor],
                    generator: Optional[torch.Generator], seed: Optional[int], backend: str,
                    group: Any) -> torch.Tensor:
    from .parallel.gather import fail_together
    from .parallel.sharded import sample_negatives_sharded

    with fail_together(group):  # local checks first; every rank learns whether one failed
        validate_inputs(query, keys, None, 1.0, query_labels, key_labels, guide_query, guide_keys,
                        allow_empty=True, local_positives=False)
        check_num_negatives(num_negatives)
        code, simans = parse_strategy(strategy)
        plan = rules.masking_plan(simans)
        if positives is not None and (not isinstance(positives, torch.Tensor) or positives.dim() != 1
                                      or positives.shape[0] != query.shape[0] or positives.is_floating_point()):
            raise ValueError(f"positives must be an integer tensor [B] = [{query.shape[0]}] of global key indices")
        if exclude is not None and (not isinstance(exclude, torch.Tensor) or exclude.dim() != 2
                                    or exclude.shape[0] != query.shape[0] or exclude.is_floating_point()):
            raise ValueError(f"exclude must be an integer tensor [B, E] = [{query.shape[0]}, E] of global key indices")
        chosen, noise_seed = _backend_and_seed(backend, query, code, seed, generator)
    # every rank draws with rank 0's seed (a default-generator seed differs per rank)
    shared = [noise_seed]
    torch.distributed.broadcast_object_list(shared, src=torch.distributed.get_global_rank(group, 0), group=group)
    with torch.no_grad():
        return sample_negatives_sharded(chosen, query, keys, positives, num_negatives, code, plan, int(shared[0]),
                                        query_labels, key_labels, guide_query, guide_keys, exclude, group)
