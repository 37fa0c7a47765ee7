"""Public entry points: :func:`info_nce` and the :class:`InfoNCE` module (SPEC section 6)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .backends import forward_op, resolve_backend
from .backends.operands import kernel_operands, normalized_operands
from .options import SoftLabels, WeightingOption
from .plan import Plan, RowState
from .reference import info_nce_gathered, info_nce_reference
from .rules import RULE_FIELDS, Rules, resolve_rules
from .validation import (
    check_attract_inputs,
    check_backend,
    check_backend_dtype,
    check_loss_exclude,
    check_negatives,
    check_reduction,
    check_symmetric_inputs,
    validate_inputs,
)

__all__ = ["info_nce", "InfoNCE", "InfoNCEStats"]


class InfoNCEStats(NamedTuple):
    """Per-row statistics returned with ``return_stats=True`` (no gradient)."""

    logsumexp: torch.Tensor  # [B] logsumexp over the positive and the unmasked, biased negatives (with
    # false_negatives="attract": over the positives, the flagged keys included, and the negatives)
    positive_logit: torch.Tensor  # [B] s_i+ / temperature
    num_masked: torch.Tensor  # [B] int64, keys the false-negative rules flagged (removed, or attracted)
    num_negatives: torch.Tensor  # [B] int64, negatives left in the denominator
    num_positives: Optional[torch.Tensor] = None  # [B] int64, |P_i|: 1, or 1 + num_masked with attraction
    backend: Optional[str] = None  # the backend that computed the loss ("auto" resolved: fastneg.backends)


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.05,
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
    weighting: WeightingOption = None,
    negatives: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
    symmetric: bool = False,
    process_group: Optional[object] = None,
    key_blocks: int = 1,
    debias: Optional[float] = None,
    soft_labels: Optional[SoftLabels] = None,
    false_negatives: str = "mask",
    exclude: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, InfoNCEStats]]:
    r"""InfoNCE with false-negative masking and negative weighting, fused (SPEC sections 1-4).

    With scores ``s_ij = q_i . k_j``, logits ``l_ij = s_ij / temperature`` and the positive in
    column ``p_i``::

        L_i = logsumexp_{j in {p_i} U unmasked_i} (l_ij + beta_ij) - l_{i,p_i}

    Args:
        query: ``[B, D]`` float16/bfloat16/float32 (float64 on CPU).
        keys: ``[N, D]``, same dtype and device: in-batch positives, hard negatives, gathered keys.
        positives: ``[B]`` int64 column of each query's positive; default ``arange(B)``.
        temperature: float or scalar tensor (receives a gradient if it requires one).
        rules: a :class:`fastneg.Rules` holding the rules, weighting and estimator below
            (``margin`` ... ``false_negatives``); or pass those as keyword arguments, which build
            one (not both).
        query_labels, key_labels: mask keys whose label equals the query's; ``query_labels``
            defaults to ``key_labels[positives]``. ``[B]``/``[N]``, or ``[B, L]``/``[N, L]`` for
            ``L <= 8`` independent label sets (e.g. text hashes and cluster ids): a key is masked
            when any of them matches.
        margin: mask ``s_ij > s_i+ - margin``. relative_margin: mask ``s_ij > s_i+ - |s_i+| r``.
        max_score: mask ``s_ij > max_score``. All comparisons on raw scores, strict. At a margin of
            exactly 0, an exact copy of the positive key may score a few ulps either side of
            ``s_i+`` (the matrix product's rounding depends on the position in the tile), so it may
            be masked or not; use ``key_labels`` to mask duplicates exactly (docs/reference.md, "Ties at a threshold").
        guide_query, guide_keys, guide_margin, guide_strategy: GISTEmbed-style mask from a guide
            model's scores ``t_ij`` (``"absolute"``: ``t_ij > t_i+ - g``; ``"relative"``:
            ``t_ij > t_i+ - |t_i+| g``). No gradient reaches the guide. Guide embeddings are
            cast to ``query``'s dtype. ``guide_margin=None``: the guide masks nothing (for a guide
            that only weights, ``weighting=Hardness(s, on="guide")``).
        weighting: ``None``, ``"simans"``, :class:`SimANS`, :class:`Hardness`, :class:`GCSE` (constant
            logit biases; ``Hardness(s, on="guide")`` and ``GCSE`` take them from the guide's scores)
            or :class:`HCL` (importance weights ``e^{beta l}`` with gradient through them, as in HCL).
        negatives: ``[B, K]`` int64 key indices (-1 = none): restricts row i's denominator to its
            positive and the keys ``negatives[i]`` (masking rules still apply; a key listed twice
            counts once; the positive listed there is ignored). Computed on the gathered keys
            (memory O(B K D), autograd through PyTorch) on every backend but ``"reference"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-row ``[B]``).
        return_stats: also return :class:`InfoNCEStats`.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU, ``"portable"`` on other devices or without
            a compiler: :mod:`fastneg.backends`), ``"triton"``, ``"cpu"``, ``"portable"`` (plain PyTorch
            over chunks of rows, any device), ``"reference"`` (dense).
        symmetric: CLIP-style loss ``(L_i + L'_i) / 2``, where ``L'_i`` contrasts key ``p_i`` against
            every query: ``logsumexp_{i'} (l_{i' p_i} + beta') - l_{i p_i}`` with the same rules applied
            to that column (labels ``query_labels[i'] == key_labels[p_i]``, thresholds from the column's
            positive score ``s_{i p_i}``, weights normalised over the column). Needs distinct positives.
            One pass over the score tiles: the fused kernels read each tile by rows and by columns and
            keep a partial logsumexp per positive column, merged without any [B, N] buffer.
            ``return_stats`` reports the query-to-key direction.
        process_group: a torch.distributed group (e.g. ``torch.distributed.group.WORLD``): keys,
            key labels and guide keys are gathered from every rank with gradient and this rank's rows
            are computed against all of them; see :mod:`fastneg.parallel.gather` for the layout, uneven
            batches and the reduction's scaling. ``None``: local only.
        key_blocks: with ``process_group``, ``keys`` is this many equal column blocks (positives,
            then each hard-negative column), gathered block by block.
        debias: DCL's ``tau_plus`` (Chuang et al. 2020), the prior probability that a negative is a
            false one: the row's (masked, weighted) negative sum ``S`` becomes
            ``Ng = max((S - n tau+ e^{l+}) / (1 - tau+), n e^{-1/t})`` over its ``n`` negatives, and
            ``L_i = log(e^{l+} + Ng) - l+``. The gradient flows as in the authors' code (through the
            clamp where it is not active). Not with ``symmetric`` or a learned temperature. With
            ``weighting=HCL(beta)`` the weighted sum is HCL's reweighted negative term (their
            full estimator). ``S - n tau+ e^{l+}`` cancels where the two are close (inherent to
            the estimator); the fused backends compute the loss, the positive's gradient and the
            negatives' from terms relative to the row's largest, so float32 stays within a few
            times the dense float32 loss's error (:class:`HCL`'s docstring; docs/reference.md).
        soft_labels: :class:`SoftLabels`: distil from the guide model as teacher, ``(1 - w) CE + w
            KL(teacher softmax || student softmax)`` over each row's positive and unmasked negatives.
        false_negatives: what the rules' flagged keys become. ``"mask"`` (default): they leave the
            row (the formula above). ``"attract"``: they join the positives (supervised contrastive
            learning's "outside" form, Khosla et al. 2020; false-negative cancellation's attraction,
            Huynh et al. 2022): with ``P_i`` the positive plus every flagged key and ``N_i`` the
            unflagged negatives, ``L_i = logsumexp_{j in P_i U N_i}(l_ij + beta_ij) - 1/|P_i|
            sum_{p in P_i} l_ip``, ``beta = 0`` on ``P_i`` (weightings normalise over ``N_i``). Every
            rule and the SimANS, Hardness and GCSE weightings apply; not with ``symmetric``,
            ``debias``, ``soft_labels``, ``HCL`` or ``negatives=`` (each changes what a positive's
            term is). Stats: ``num_masked`` counts the flagged keys, so ``|P_i| = 1 + num_masked``.
            A row without negatives still has a loss (it pulls its positives together); a row whose
            only key is its positive has loss 0.
        exclude: ``[B]`` int64 (-1 = none): a key column removed from row i entirely, neither
            positive, flagged nor negative (e.g. the anchor itself when the keys are the queries, as
            in SupCon). Never row i's positive. Not with ``symmetric``.

    Returns:
        The loss (float32 for float16/bfloat16 inputs, else the input dtype; ``backend="reference"``,
        the dense naive loss, computes and returns the input dtype), and the stats when
        ``return_stats`` (detached: they carry no gradient). A tensor temperature is used in the
        computation's dtype, whatever its own. A row whose negatives are all masked has loss 0 and
        zero gradient. A row whose softmax meets a ``+inf`` or NaN logit has loss NaN on every
        backend, as the dense cross-entropy (a ``-inf`` score weighs nothing; a masked key is out
        of the softmax whatever its score); non-finite inputs are not refused.

    float16/bfloat16 on the ``cpu`` backend are computed in float32.
    """
    rules = resolve_rules("info_nce", rules, margin=margin, relative_margin=relative_margin, max_score=max_score,
                          guide_margin=guide_margin, guide_strategy=guide_strategy, weighting=weighting,
                          debias=debias, soft_labels=soft_labels, false_negatives=false_negatives)
    if process_group is not None:
        return _gathered_info_nce(query, keys, positives, process_group, key_blocks, rules, dict(
            symmetric=symmetric, temperature=temperature, query_labels=query_labels, key_labels=key_labels,
            guide_query=guide_query, guide_keys=guide_keys, negatives=negatives, reduction=reduction,
            return_stats=return_stats, backend=backend, exclude=exclude))
    # validated and planned once, then dispatched
    validate_inputs(query, keys, positives, temperature, query_labels, key_labels, guide_query, guide_keys)
    check_reduction(reduction)
    plan = rules.plan(temperature)
    plan.check(symmetric, guide_query is not None, temperature)
    check_attract_inputs(plan, negatives)
    check_loss_exclude(exclude, symmetric, negatives, positives, query.shape[0], keys.shape[0], query.device)
    if negatives is not None:
        check_negatives(negatives, query.shape[0], keys.shape[0], query.device)
    if symmetric:
        check_symmetric_inputs(positives, negatives, query.shape[0])
    chosen = resolve_backend(backend, query.device)
    check_backend_dtype(chosen, query.dtype, "computes")
    return _dispatch(chosen, plan, query, keys, positives, temperature, query_labels, key_labels, guide_query,
                     guide_keys, negatives, exclude, symmetric, reduction, return_stats)


def _dispatch(chosen: str, plan: Plan, query: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor],
              temperature: Union[float, torch.Tensor], query_labels: Optional[torch.Tensor],
              key_labels: Optional[torch.Tensor], guide_query: Optional[torch.Tensor],
              guide_keys: Optional[torch.Tensor], negatives: Optional[torch.Tensor], exclude: Optional[torch.Tensor],
              symmetric: bool, reduction: str, return_stats: bool) -> Union[torch.Tensor, tuple[torch.Tensor, InfoNCEStats]]:
    """The loss of validated inputs under ``plan`` on backend ``chosen`` (no checks here)."""
    device = query.device
    B = query.shape[0]
    positives, query_labels, key_labels, guide_query, guide_keys = normalized_operands(
        query, positives, query_labels, key_labels, guide_query, guide_keys)

    exclude = exclude.reshape(-1).long() if exclude is not None else None
    if chosen == "reference":
        loss, lse, pos_logit, n_masked, n_neg = info_nce_reference(
            query, keys, positives, temperature, plan, query_labels, key_labels, guide_query, guide_keys,
            negatives=negatives.long() if negatives is not None else None, exclude=exclude)
    elif negatives is not None:
        loss, lse, pos_logit, n_masked, n_neg = info_nce_gathered(
            query, keys, positives, negatives.long(), temperature, plan, query_labels, key_labels, guide_query,
            guide_keys)
    else:
        loss, lse, pos_logit, n_masked, n_neg = _fused(
            chosen, query, keys, positives, temperature, plan, query_labels, key_labels, guide_query, guide_keys,
            symmetric=symmetric, exclude=exclude)
    if symmetric and chosen == "reference":
        # dense check: key p_i against every query, i.e. the transposed problem on the positive columns
        col_loss = info_nce_reference(
            keys[positives], query, torch.arange(B, device=device), temperature, plan,
            key_labels[positives] if key_labels is not None else None, query_labels,
            guide_keys[positives] if guide_keys is not None else None, guide_query)[0]
        loss = (loss + col_loss) / 2

    if reduction == "mean":
        out = loss.mean()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    if return_stats:
        n_pos = n_masked + 1 if plan.attract else torch.ones_like(n_masked)
        return out, InfoNCEStats(lse, pos_logit, n_masked, n_neg, n_pos, chosen)
    return out


def _gathered_info_nce(query: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor], group: object,
                       key_blocks: int, rules: Rules, kw: dict) -> Union[torch.Tensor, tuple[torch.Tensor, InfoNCEStats]]:
    """info_nce over keys gathered from every rank of ``group`` (:mod:`fastneg.parallel.gather`):
    validated and planned once here; each local computation is dispatched under that plan."""
    from .parallel import gather as distributed

    error: Optional[BaseException] = None
    plan, chosen = None, ""
    try:  # a rank that rejects its inputs must not leave the others waiting in a collective
        validate_inputs(query, keys, positives, kw["temperature"], kw["query_labels"], kw["key_labels"],
                        kw["guide_query"], kw["guide_keys"], allow_empty=True)
        check_reduction(kw["reduction"])
        plan = rules.plan(kw["temperature"])
        plan.check(kw["symmetric"], kw["guide_query"] is not None, kw["temperature"])
        check_attract_inputs(plan, kw["negatives"])
        if kw["exclude"] is not None:
            raise ValueError("exclude cannot be combined with process_group (its columns would name local keys)")
        if isinstance(key_blocks, bool) or not isinstance(key_blocks, int):
            raise TypeError(f"key_blocks must be an int, got {type(key_blocks).__name__}")
        if key_blocks < 1 or keys.shape[0] % key_blocks:
            raise ValueError(f"key_blocks must be >= 1 and divide keys.shape[0] = {keys.shape[0]}, got {key_blocks}")
        if kw["negatives"] is not None:
            check_negatives(kw["negatives"], query.shape[0], keys.shape[0], query.device)
        if kw["symmetric"]:
            check_symmetric_inputs(positives, kw["negatives"], query.shape[0])
        if positives is None and keys.shape[0] < query.shape[0]:
            raise ValueError("positives defaults to arange(B), which requires keys.shape[0] >= query.shape[0]; "
                             f"got N={keys.shape[0]} < B={query.shape[0]}")
        chosen = resolve_backend(kw["backend"], query.device)
        check_backend_dtype(chosen, query.dtype, "computes")
    except (TypeError, ValueError) as exc:
        error = exc
    distributed.raise_if_any_rank_failed(error, group)
    assert plan is not None
    temperature = kw["temperature"]
    tau = float(temperature.detach().reshape(())) if isinstance(temperature, torch.Tensor) else float(temperature)
    options = repr((plan, tau, kw["reduction"], kw["backend"], kw["query_labels"] is not None,
                    kw["guide_query"] is not None, kw["symmetric"]))

    def compute(q, k, pos, kl, ql, gq, gk, neg):  # noqa: ANN001, ANN202
        return _dispatch(chosen, plan, q, k, pos, temperature, ql, kl, gq, gk, neg, None, False, "none", True)

    out, stats = distributed.distributed_info_nce(
        query, keys, positives, group=group, key_blocks=key_blocks, key_labels=kw["key_labels"],
        query_labels=kw["query_labels"], guide_query=kw["guide_query"], guide_keys=kw["guide_keys"],
        negatives=kw["negatives"], reduction=kw["reduction"], options=options, compute=compute,
        symmetric=kw["symmetric"])
    if kw["return_stats"]:
        return out, stats
    return out


def _fused(
    backend: str,
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    plan: Plan,
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
    symmetric: bool = False,
    exclude: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    query, keys, query_labels, key_labels, guide_query, guide_keys = kernel_operands(
        backend, query, keys, query_labels, key_labels, guide_query, guide_keys)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    temp_device = "cpu" if backend == "cpu" else query.device
    if isinstance(temperature, torch.Tensor):
        temp = temperature.reshape(()).to(device=temp_device, dtype=acc)
    else:
        temp = torch.tensor(float(temperature), dtype=acc, device=temp_device)
    loss, state, n_masked, n_neg = forward_op(backend)(
        query, keys, positives, temp, query_labels, key_labels, guide_query, guide_keys, exclude, plan.scalars(),
        plan.flags(symmetric=symmetric))
    # the stats are documented as carrying no gradient: detached, so that back-propagating through them
    # fails loudly instead of giving silent zeros
    lse, pos_score = state[RowState.LOGSUMEXP], state[RowState.POSITIVE_SCORE]
    return loss, lse.detach(), (pos_score / temp).detach(), n_masked, n_neg


class InfoNCE(torch.nn.Module):
    """Module form of :func:`info_nce`; the constructor takes the same keyword arguments
    (everything but the tensors ``query``, ``keys``, ``positives`` and per-call labels/guides).

    ``forward(query, keys, positives=None, **per_call)`` accepts per-call tensors
    (``query_labels``, ``key_labels``, ``guide_query``, ``guide_keys``) and overrides.
    A tensor ``temperature`` (e.g. an ``nn.Parameter``) is registered and learned.
    ``gather=True``: keys are gathered from every rank of the default process group when
    torch.distributed is initialised (``process_group=torch.distributed.group.WORLD``; pass
    ``key_blocks`` for hard-negative columns); a no-op otherwise.
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.temperature = options.pop("temperature", 0.05)
        self.gather = bool(options.pop("gather", False))
        # the rules, validated once: a bad argument fails at construction time
        self.rules = resolve_rules("InfoNCE", options.pop("rules", None),  # type: ignore[arg-type]
                                   **{k: options.pop(k) for k in RULE_FIELDS if k in options})
        self.rules.plan(self.temperature)  # type: ignore[arg-type]
        self.options = options
        check_reduction(options.get("reduction", "mean"))
        check_backend(options.get("backend", "auto"))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor] = None,
                **per_call: object) -> Union[torch.Tensor, tuple[torch.Tensor, InfoNCEStats]]:
        kwargs = {**self.options, **per_call}
        rules = kwargs.pop("rules", None) or self.rules
        changes = {k: kwargs.pop(k) for k in RULE_FIELDS if k in kwargs}
        if changes:  # per-call overrides of single rules
            rules = rules.replace(**changes)  # type: ignore[union-attr]
        if self.gather and "process_group" not in kwargs and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            kwargs["process_group"] = torch.distributed.group.WORLD
        return info_nce(query, keys, positives, temperature=self.temperature, rules=rules,  # type: ignore[arg-type]
                        **kwargs)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in {**self.rules.changed(), **self.options}.items())
        return f"temperature={self.temperature!r}" + (f", {opts}" if opts else "")
