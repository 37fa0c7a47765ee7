"""Public entry points: :func:`info_nce` and the :class:`InfoNCE` module (SPEC section 6)."""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch

from . import ops
from .options import Rules, Weighting, check_backend, check_negatives, check_reduction, validate_inputs
from .reference import info_nce_gathered, info_nce_reference

__all__ = ["info_nce", "InfoNCE", "InfoNCEStats"]


class InfoNCEStats(NamedTuple):
    """Per-row statistics returned with ``return_stats=True`` (no gradient)."""

    logsumexp: torch.Tensor  # [B] logsumexp over the positive and the unmasked, biased negatives
    positive_logit: torch.Tensor  # [B] s_i+ / temperature
    num_masked: torch.Tensor  # [B] int64, keys removed by the false-negative rules
    num_negatives: torch.Tensor  # [B] int64, negatives left in the denominator


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got query on {device}")
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install triton")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing fastneg")
    return backend


def _forward_op(backend: str):  # noqa: ANN202 - an OpOverloadPacket
    if backend == "triton" and "triton" not in ops.FORWARD_OPS:
        from . import triton_ops  # noqa: F401  (registers the Triton op pair)
    return ops.FORWARD_OPS[backend]


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.05,
    query_labels: Optional[torch.Tensor] = None,
    key_labels: Optional[torch.Tensor] = None,
    margin: Optional[float] = None,
    relative_margin: Optional[float] = None,
    max_score: Optional[float] = None,
    guide_query: Optional[torch.Tensor] = None,
    guide_keys: Optional[torch.Tensor] = None,
    guide_margin: float = 0.0,
    guide_strategy: str = "absolute",
    weighting: Weighting = None,
    negatives: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
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
        query_labels, key_labels: mask keys whose label equals the query's; ``query_labels``
            defaults to ``key_labels[positives]``. ``[B]``/``[N]``, or ``[B, L]``/``[N, L]`` for
            ``L <= 8`` independent label sets (e.g. text hashes and cluster ids): a key is masked
            when any of them matches.
        margin: mask ``s_ij > s_i+ - margin``. relative_margin: mask ``s_ij > s_i+ - |s_i+| r``.
        max_score: mask ``s_ij > max_score``. All comparisons on raw scores, strict.
        guide_query, guide_keys, guide_margin, guide_strategy: GISTEmbed-style mask from a guide
            model's scores ``t_ij`` (``"absolute"``: ``t_ij > t_i+ - g``; ``"relative"``:
            ``t_ij > t_i+ - |t_i+| g``). No gradient reaches the guide. Guide embeddings are
            cast to ``query``'s dtype.
        weighting: ``None``, ``"simans"``, :class:`SimANS` or :class:`Hardness` (constant logit biases).
        negatives: ``[B, K]`` int64 key indices (-1 = none): restricts row i's denominator to its
            positive and the keys ``negatives[i]`` (masking rules still apply; a key listed twice
            counts once; the positive listed there is ignored). Computed on the gathered keys
            (memory O(B K D), autograd through PyTorch) on every backend but ``"reference"``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-row ``[B]``).
        return_stats: also return :class:`InfoNCEStats`.
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpu"``, ``"reference"``.

    Returns:
        The loss (fused backends: float32 for float16/bfloat16 inputs, else the input dtype; the
        reference and the ``negatives`` path: the input dtype), and the stats when ``return_stats``.
        A row whose negatives are all masked has loss 0 and zero gradient.

    float16/bfloat16 on the ``cpu`` backend are computed in float32.
    """
    validate_inputs(query, keys, positives, temperature, query_labels, key_labels, guide_query, guide_keys)
    check_reduction(reduction)
    rules = Rules.build(margin, relative_margin, max_score, guide_margin, guide_strategy, weighting)
    if negatives is not None:
        check_negatives(negatives, query.shape[0], keys.shape[0], query.device)
    device = query.device
    chosen = _resolve_backend(backend, device)

    B = query.shape[0]
    if positives is None:
        positives = torch.arange(B, device=device)
    positives = positives.long()
    if key_labels is not None:
        key_labels = key_labels.long()
        query_labels = key_labels[positives] if query_labels is None else query_labels.long()
    if guide_query is not None and guide_keys is not None:
        guide_query = guide_query.detach().to(query.dtype)
        guide_keys = guide_keys.detach().to(query.dtype)

    if chosen == "reference":
        loss, lse, pos_logit, n_masked, n_neg = info_nce_reference(
            query, keys, positives, temperature, rules, query_labels, key_labels, guide_query, guide_keys,
            negatives=negatives.long() if negatives is not None else None)
    elif negatives is not None:
        loss, lse, pos_logit, n_masked, n_neg = info_nce_gathered(
            query, keys, positives, negatives.long(), temperature, rules, query_labels, key_labels, guide_query,
            guide_keys)
    else:
        loss, lse, pos_logit, n_masked, n_neg = _fused(
            chosen, query, keys, positives, temperature, rules, query_labels, key_labels, guide_query, guide_keys)

    if reduction == "mean":
        out = loss.mean()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    if return_stats:
        return out, InfoNCEStats(lse, pos_logit, n_masked, n_neg)
    return out


def _fused(
    backend: str,
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: Union[float, torch.Tensor],
    rules: Rules,
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    if backend == "cpu" and query.dtype in (torch.float16, torch.bfloat16):
        query, keys = query.float(), keys.float()
        if guide_query is not None and guide_keys is not None:
            guide_query, guide_keys = guide_query.float(), guide_keys.float()
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        temp = temperature.reshape(()).to(device=query.device if backend == "triton" else "cpu", dtype=acc)
    else:
        temp = torch.tensor(float(temperature), dtype=acc, device=query.device if backend == "triton" else "cpu")
    if key_labels is not None and query_labels is not None and key_labels.dim() == 2:
        # the ops take several label levels as [levels, rows]
        query_labels, key_labels = query_labels.T.contiguous(), key_labels.T.contiguous()
    loss, lse, pos_score, _offset, _thr, _gthr, n_masked, n_neg = _forward_op(backend)(
        query, keys, positives, temp, query_labels, key_labels, guide_query, guide_keys,
        rules.margin, rules.relative_margin, rules.max_score, rules.guide_margin, rules.guide_relative,
        rules.weighting, rules.weight_a, rules.weight_b)
    return loss, lse, pos_score / temp.detach(), n_masked, n_neg


class InfoNCE(torch.nn.Module):
    """Module form of :func:`info_nce`; the constructor takes the same keyword arguments
    (everything but the tensors ``query``, ``keys``, ``positives`` and per-call labels/guides).

    ``forward(query, keys, positives=None, **per_call)`` accepts per-call tensors
    (``query_labels``, ``key_labels``, ``guide_query``, ``guide_keys``) and overrides.
    A tensor ``temperature`` (e.g. an ``nn.Parameter``) is registered and learned.
    """

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.temperature = options.pop("temperature", 0.05)
        self.options = options
        # validate the scalar options once, so a bad argument fails at construction time
        Rules.build(options.get("margin"), options.get("relative_margin"), options.get("max_score"),
                    options.get("guide_margin", 0.0), options.get("guide_strategy", "absolute"),
                    options.get("weighting"))  # type: ignore[arg-type]
        check_reduction(options.get("reduction", "mean"))
        check_backend(options.get("backend", "auto"))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor] = None,
                **per_call: object) -> Union[torch.Tensor, tuple[torch.Tensor, InfoNCEStats]]:
        kwargs = {**self.options, **per_call}
        return info_nce(query, keys, positives, temperature=self.temperature, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"temperature={self.temperature!r}" + (f", {opts}" if opts else "")
