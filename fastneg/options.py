"""The public loss options: negative weightings and soft labels (SPEC sections 3-4).

Each is a small frozen dataclass that checks its own values at construction, so a bad option
fails where it is written. :mod:`fastneg.plan` turns them into the plan the backends read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["SimANS", "Hardness", "HCL", "GCSE", "SoftLabels", "WeightingOption", "check_finite_float"]


def check_finite_float(name: str, value: object) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming ``name`` unless ``value`` is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclass(frozen=True)
class SimANS:
    """SimANS negative weighting (Zhou et al., 2022).

    Each unmasked negative gets ``w_ij = exp(-a * (s_ij - s_i+ - b)^2)``, normalised over the
    row's ``n_i`` unmasked negatives so that uniform weights give plain InfoNCE back:
    ``beta_ij = log(n_i * w_ij / sum_k w_ik)``, added to the logit as a constant
    (no gradient flows through it). Negatives scoring about ``b`` below the positive are
    preferred; very easy and very hard (likely false) negatives are down-weighted.
    """

    a: float = 0.5
    b: float = 0.0

    def __post_init__(self) -> None:
        check_finite_float("SimANS.a", self.a)
        check_finite_float("SimANS.b", self.b)
        if self.a < 0:
            raise ValueError(f"SimANS.a must be >= 0, got {self.a}")


@dataclass(frozen=True)
class Hardness:
    """Hardness weighting: ``beta_ij = strength * s_ij`` (detached), as sentence-transformers'
    ``hardness_mode``. Positive strength up-weights hard negatives.

    ``on="guide"``: the bias comes from the guide's scores instead, ``beta_ij = strength * t_ij``
    (needs ``guide_query`` / ``guide_keys``; pass ``guide_margin=None`` when the guide should only
    weight, not mask). Zeroing some guide keys exempts those columns from the bias, which is how
    a bias can be restricted to one block of keys."""

    strength: float
    on: str = "scores"

    def __post_init__(self) -> None:
        check_finite_float("Hardness.strength", self.strength)
        if self.on not in ("scores", "guide"):
            raise ValueError(f"Hardness.on must be 'scores' or 'guide', got {self.on!r}")


@dataclass(frozen=True)
class HCL:
    """Hard-negative reweighting of Robinson et al. (2021), "Contrastive Learning with Hard Negative
    Samples" (joshr17/HCL).

    Each unmasked negative gets the importance weight ``e^{beta l_ij}`` (``l = s / temperature``:
    the authors' code raises ``exp(s / t)`` to the power ``beta``), normalised over the row's ``n``
    negatives: ``beta_ij = beta l_ij + log n - logsumexp_k(beta l_ik)``, so the negative term is
    ``n sum_j e^{(1 + beta) l_ij} / sum_j e^{beta l_ij}``, the original's
    ``(imp * neg).sum() / imp.mean()``. Unlike :class:`Hardness`, the gradient flows through the
    weights, as in the original. Combine with ``debias=tau_plus`` for the paper's full estimator
    (``debias=0.0`` keeps its clamp at ``n e^{-1/t}`` with no debiasing). ``beta = 0`` is plain
    InfoNCE. Not with ``symmetric=True``.

    Precision: ``dS_ij = (1 + beta) P_ij - beta R_i softmax(beta l_i)_j`` is a difference of two
    softmax terms. The fused backends (C++, Triton) take every exponent relative to one of the row's
    negatives (its largest score; its smallest where the factor is negative) as a difference of two
    scores, and the row's total, loss and positive share relative to the negatives' log-mass, so no
    exponent is a difference of two rounded terms of size ``(1 + beta) |l|`` (800 at temperature
    0.005, beta 3). ``python benchmarks/precision_cases.py`` (2026-12-05, Intel Xeon, float32
    against float64, relative to the gradient's scale): over 2978 random HCL and HCL + DCL problems
    (beta -0.5 to 3, tau+ 0 to 0.5, temperatures 2^-8 to 1/4, exact copies of the positive, labels,
    margins) whose scores and logits are exact in float32, the C++ kernels' worst error on the loss,
    dq and dk is 7.0x the dense float32 loss's (the case that was 900x is held within 4x by
    tests/functional/test_regressions.py, on every backend). On scores rounded by float32 products
    both carry the rounding of the scores, which DCL with a large ``tau+`` amplifies.
    """

    beta: float = 1.0

    def __post_init__(self) -> None:
        check_finite_float("HCL.beta", self.beta)


@dataclass(frozen=True)
class GCSE:
    """GCSE's Gaussian-decayed offset for hard negatives ("Enhancing Unsupervised Sentence Embeddings
    via Knowledge-Driven Data Augmentation and Gaussian-Decayed Contrastive Learning", 2024;
    code: aleversn/GCSE, ``main/models/gcse.py``), relative to a reference model's logit.

    With the student's logit ``l_ij`` and the reference (guide) model's logit ``r_ij = t_ij /
    temperature`` (``t`` from ``guide_query`` / ``guide_keys``), every unmasked negative gets the
    constant bias ``beta_ij = -l_ij exp(-(l_ij - r_ij)^2 / (2 alpha^2))`` where ``l_ij <= r_ij``
    and 0 where the student already scores it above the reference: a negative that the student
    scores about as high as the reference does is pulled towards logit 0. No gradient flows
    through the bias (the original detaches it). ``alpha`` is in logit units; the authors use 0.17
    (BERT) and 8.58 (RoBERTa). Every backend decides ``l_ij <= r_ij`` on the raw scores
    (``s_ij <= t_ij``) and computes the gap as ``(s_ij - t_ij) / temperature``, so a reference that
    scores a key exactly like the student (a frozen copy at step 0) gives gap 0 and the full offset.

    The original applies the offset to each sentence's own generated hard negative only; here it
    applies to every unmasked negative of the row (a key whose reference score sits below the
    student's gets exactly 0, so a guide with very low ``t_ij`` on the keys to leave alone
    restricts it). Needs ``guide_query`` / ``guide_keys``; pass ``guide_margin=None`` so that the
    reference only offsets and does not also mask.
    """

    alpha: float = 0.17

    def __post_init__(self) -> None:
        check_finite_float("GCSE.alpha", self.alpha)
        if self.alpha <= 0:
            raise ValueError(f"GCSE.alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class SoftLabels:
    """Soft-label targets from a teacher: the guide model's scores ``t_ij`` (``guide_query`` /
    ``guide_keys``), as in RocketQA / AR2 / CUSA-style distillation.

    Over each row's positive and unmasked negatives, the teacher's distribution is
    ``p_ij = softmax_j(t_ij / temperature)`` and the student's ``q_ij = softmax_j(l_ij + beta_ij)``
    (the loss's own logits, with any constant weighting bias). The row's loss is
    ``(1 - weight) * CE + weight * KL(p_i || q_i)``, where CE is the usual InfoNCE term; both
    come from the same single pass over the score tiles (the teacher's logsumexp is computed
    online next to the student's). ``temperature=None`` takes the loss's temperature.
    No gradient reaches the teacher. Not with ``symmetric``, ``debias`` or :class:`HCL`.
    """

    temperature: Optional[float] = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature is not None:
            check_finite_float("SoftLabels.temperature", self.temperature)
            if self.temperature <= 0:
                raise ValueError(f"SoftLabels.temperature must be > 0, got {self.temperature}")
        check_finite_float("SoftLabels.weight", self.weight)
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"SoftLabels.weight must be in [0, 1], got {self.weight}")


WeightingOption = Union[None, str, SimANS, Hardness, HCL, GCSE]
