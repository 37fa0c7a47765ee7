"""Drop-in replacements for pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss``.

::

    from fastneg.integrations.pytorch_metric_learning import SupConLoss
    loss_fn = SupConLoss(temperature=0.1)          # the original's arguments, distance and reducer
    loss = loss_fn(embeddings, labels)             # same loss and gradients, memory linear in the batch

Each class is a subclass of the pytorch-metric-learning (2.x) loss of the same name: the
constructor (``temperature``, ``distance``, ``reducer``, ``embedding_regularizer``, ...), ``forward
(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``, the reducers and
the regularizers are the original's. fastneg replaces ``compute_loss``: the original builds the
``B x N`` distance matrix and the ``B x N`` pair masks; here the per-element losses the reducer
receives come from the fused op, with nothing of size ``B x N``:

- ``NTXentLoss``: every positive pair ``(a, p)`` (same label; ``a != p`` when the reference set is
  the batch itself) is a row with query ``embeddings[a]`` and positive ``p``; keys of the anchor's
  label are masked (``key_labels``), so each row's denominator is its positive and the anchor's
  negatives, as in the original. Losses per positive pair, reduced as the original's
  (``"pos_pair"``).
- ``SupConLoss``: every anchor with a positive is a row whose same-label keys are attracted
  (``false_negatives="attract"``) and whose own key is excluded when the reference set is the batch
  itself: ``L_i = logsumexp_{j != i} l_ij - mean_{p in P_i} l_ip``, SupCon's outside form. Losses
  per anchor (0 for anchors without a positive), reduced by the original's default
  ``AvgNonZeroReducer`` or any other.

Fused: ``CosineSimilarity`` (the default) and ``DotProductSimilarity`` (with or without
normalisation, ``power=1``), labels given, no ``indices_tuple``. Anything else (another distance,
a miner's ``indices_tuple``, labels absent) runs the original's computation, with a one-time
warning that its memory is quadratic. The distance object is not called on the fused path, so its
recorded statistics (``initial_avg_query_norm`` and the like) are not updated there. The original
adds ``finfo.tiny`` inside a log (NT-Xent) and to a divisor (SupCon); the fused values omit it
(a relative difference below 1e-37).

fastneg's rules on top: ``rules=fastneg.Rules(...)`` at construction (``margin``,
``relative_margin``, ``max_score``, ``weighting``; any other field is refused), applied to every
row's keys beside the label mask. With rules, the unfused cases raise instead of falling back.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..functional import info_nce
from ..rules import PLAIN, Rules, check_carried, resolve_rules
from ._fallback import _warned, warn_dense_once  # noqa: F401  (_warned: cleared by tests)

try:
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
except ImportError as exc:  # pragma: no cover - explained to the user
    raise ImportError("fastneg.integrations.pytorch_metric_learning needs pytorch-metric-learning: "
                      "pip install pytorch-metric-learning") from exc

__all__ = ["NTXentLoss", "SupConLoss", "same_label_pairs"]

# the Rules fields the two losses carry (their labels decide the positives and what is masked)
_CARRIED = ("margin", "relative_margin", "max_score", "weighting")



def _warn_dense(loss: Any, why: str) -> None:
    warn_dense_once(loss, why, "pytorch-metric-learning's computation")


def same_label_pairs(labels: Tensor, ref_labels: Tensor, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """All ``(a, p)`` with ``labels[a] == ref_labels[p]`` (and ``a != p`` with ``exclude_self``), in
    ``torch.where``'s row-major order, without a ``B x N`` matrix: memory linear in the pairs."""
    device = labels.device
    both = torch.cat([labels.reshape(-1), ref_labels.reshape(-1)])
    _, ids = torch.unique(both, return_inverse=True)
    q_ids, r_ids = ids[:labels.numel()], ids[labels.numel():]
    order = torch.sort(r_ids, stable=True).indices  # reference indices grouped by label, ascending within
    counts = torch.bincount(r_ids, minlength=int(ids.max()) + 1 if ids.numel() else 0)
    starts = torch.cumsum(counts, 0) - counts
    per_anchor = counts[q_ids]
    anchors = torch.repeat_interleave(torch.arange(labels.numel(), device=device), per_anchor)
    first = torch.cumsum(per_anchor, 0) - per_anchor
    within = torch.arange(anchors.numel(), device=device) - first[anchors]
    partners = order[starts[q_ids[anchors]] + within]
    if exclude_self:
        keep = partners != anchors
        anchors, partners = anchors[keep], partners[keep]
    return anchors, partners


class _Fused:
    """What the two losses share: fastneg's rules, when the fused op applies, and its inputs."""

    temperature: float
    distance: Any
    rules: Rules = PLAIN  # a class default: an instance built without __init__ computes the original

    def _init_rules(self, rules: Optional[Rules]) -> None:
        rules = resolve_rules(type(self).__name__, rules)
        check_carried(type(self).__name__, rules, _CARRIED)
        self.rules = rules

    def _fusible(self, labels: Optional[Tensor], indices_tuple: Any) -> bool:
        d = self.distance
        reasons = []
        if type(d) not in (CosineSimilarity, DotProductSimilarity) or getattr(d, "power", 1) != 1:
            reasons.append(f"distance {type(d).__name__} (power {getattr(d, 'power', 1)}) is not a dot product")
        if indices_tuple is not None:
            reasons.append("indices_tuple (a miner's pairs) is given")
        if labels is None:
            reasons.append("labels are not given")
        if not reasons:
            return True
        if not self.rules.is_plain:
            raise ValueError(f"{type(self).__name__}: fastneg's rules need the fused op, which does not apply: "
                             + "; ".join(reasons))
        _warn_dense(self, "; ".join(reasons))
        return False

    def _prepared(self, x: Tensor) -> Tensor:
        return self.distance.maybe_normalize(x)


class NTXentLoss(_Fused, _pml_losses.NTXentLoss):
    """pytorch-metric-learning's ``NTXentLoss`` (NT-Xent, SimCLR's loss), computed by fastneg's fused
    op: one row per positive pair, the anchor's same-label keys masked. Same arguments and numbers;
    ``rules``: fastneg's rules on top (module docstring)."""

    def __init__(self, temperature: float = 0.07, *, rules: Optional[Rules] = None, **kwargs: Any) -> None:
        super().__init__(temperature=temperature, **kwargs)
        self._init_rules(rules)

    def compute_loss(self, embeddings: Tensor, labels: Optional[Tensor], indices_tuple: Any, ref_emb: Tensor,
                     ref_labels: Optional[Tensor]) -> dict:
        if not self._fusible(labels, indices_tuple):
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        assert labels is not None and ref_labels is not None
        a1, p = same_label_pairs(labels, ref_labels, exclude_self=ref_labels is labels)
        negative_pairs = _negative_pairs(labels, ref_labels, a1)
        if len(a1) == 0 or negative_pairs == 0 or (len(a1) <= 1 and negative_pairs <= 1):
            return self.zero_losses()
        q, k = self._prepared(embeddings), self._prepared(ref_emb)
        losses = info_nce(q[a1], k, p, temperature=float(self.temperature), key_labels=ref_labels,
                          query_labels=labels[a1], reduction="none", rules=self.rules)
        return {"loss": {"losses": losses.to(embeddings.dtype), "indices": (a1, p), "reduction_type": "pos_pair"}}


class SupConLoss(_Fused, _pml_losses.SupConLoss):
    """pytorch-metric-learning's ``SupConLoss`` (Khosla et al. 2020, the "outside" form), computed by
    fastneg's fused op with attraction: every same-label key a positive. Same arguments and numbers; ``rules``:
    fastneg's rules on top (module docstring)."""

    def __init__(self, temperature: float = 0.1, *, rules: Optional[Rules] = None, **kwargs: Any) -> None:
        super().__init__(temperature=temperature, **kwargs)
        self._init_rules(rules)

    def compute_loss(self, embeddings: Tensor, labels: Optional[Tensor], indices_tuple: Any, ref_emb: Tensor,
                     ref_labels: Optional[Tensor]) -> dict:
        if not self._fusible(labels, indices_tuple):
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        assert labels is not None and ref_labels is not None
        exclude_self = ref_labels is labels
        a1, p = same_label_pairs(labels, ref_labels, exclude_self)
        negative_pairs = _negative_pairs(labels, ref_labels, a1)
        if len(a1) == 0 or negative_pairs == 0 or (len(a1) <= 1 and negative_pairs <= 1):
            return self.zero_losses()
        B = labels.numel()
        # one designated positive per anchor (its first same-label key); the others are attracted
        counts = torch.bincount(a1, minlength=B)
        rows = (counts > 0).nonzero().flatten()
        first = p[(torch.cumsum(counts, 0) - counts)[rows]]  # pairs are sorted by anchor, partners ascending
        q, k = self._prepared(embeddings), self._prepared(ref_emb)
        exclude = rows if exclude_self else None
        per_row = info_nce(q[rows], k, first, temperature=float(self.temperature), key_labels=ref_labels,
                           query_labels=labels[rows], exclude=exclude, reduction="none",
                           rules=self.rules.replace(false_negatives="attract"))
        losses = torch.zeros(B, dtype=per_row.dtype, device=per_row.device).index_put((rows,), per_row)
        return {"loss": {"losses": losses.to(embeddings.dtype), "indices": torch.arange(B, device=labels.device),
                         "reduction_type": "element"}}


def _negative_pairs(labels: Tensor, ref_labels: Tensor, anchors: Tensor) -> int:
    """Number of (a, j) with different labels: all pairs but the same-label ones (the positive pairs
    ``anchors`` lists, and each anchor with itself when the reference set is the batch)."""
    same = anchors.numel() + (labels.numel() if ref_labels is labels else 0)
    return labels.numel() * ref_labels.numel() - same
