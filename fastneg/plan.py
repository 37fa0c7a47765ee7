"""The plan of one call: everything a backend needs beyond the tensors, built once and validated.

:class:`Plan` is made from the public options (the rules, the weighting, the estimator, the soft
labels, what flagged keys become) by :meth:`Plan.build`, which checks every value and names the
argument at fault. Every backend reads it by name: the dense reference directly, the C++ and
Triton ops through one encoding, a packed block of scalars (``Plan.scalars()``, indexed by
:class:`Scalar`) and a flags word (``Plan.flags()``: :class:`Flag` bits, the :class:`Weighting` or
:class:`Strategy` in the bits from ``KIND_SHIFT``). The fused forward returns the per-row state
that its backward reads as one ``[len(RowState), B]`` tensor, one named quantity per row
(:class:`RowState`).

These enums are the only definition of the encoding: ``csrc/plan.h`` repeats them for C++, and
importing the CPU backend checks that both agree (:func:`layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Optional, Union

import torch

from .options import GCSE, HCL, Hardness, SimANS, SoftLabels, WeightingOption, check_finite_float

__all__ = ["Plan", "Weighting", "Strategy", "Scalar", "Flag", "RowState", "KIND_SHIFT", "MAX_LABEL_LEVELS",
           "FALSE_NEGATIVES", "layout"]


class Weighting(IntEnum):
    """The loss's negative weighting (SPEC section 3)."""

    NONE = 0
    SIMANS = 1
    HARDNESS = 2
    GUIDE_HARDNESS = 3  # Hardness(on="guide"): beta_ij = weight_a * t_ij from the guide's scores
    HCL = 4
    GCSE = 5


class Strategy(IntEnum):
    """The sampler's draw (SPEC section 5)."""

    TOP = 0
    SIMANS = 1
    UNIFORM = 2


class Scalar(IntEnum):
    """Slots of the packed scalar block (0.0 where the rule is off: see :class:`Flag`)."""

    MARGIN = 0
    RELATIVE_MARGIN = 1
    MAX_SCORE = 2
    GUIDE_MARGIN = 3  # -inf: the guide does not mask
    WEIGHT_A = 4  # SimANS a, Hardness strength, HCL beta, GCSE alpha
    WEIGHT_B = 5  # SimANS b
    DEBIAS = 6  # DCL's tau_plus
    SOFT_TEMPERATURE = 7  # the teacher's temperature
    SOFT_WEIGHT = 8


class Flag(IntFlag):
    """Bits of the flags word."""

    HAS_MARGIN = 1 << 0
    HAS_RELATIVE_MARGIN = 1 << 1
    HAS_MAX_SCORE = 1 << 2
    GUIDE_RELATIVE = 1 << 3
    SYMMETRIC = 1 << 4
    DEBIAS = 1 << 5
    SOFT = 1 << 6
    ATTRACT = 1 << 7
    QUERY_GRAD = 1 << 8  # backward: compute dL/dquery
    KEYS_GRAD = 1 << 9  # backward: compute dL/dkeys
    TEMPERATURE_GRAD = 1 << 10  # backward: the temperature needs its gradient (the per-row sum)


#: The weighting (loss) or the strategy (sampler) sits in the flags word from this bit on.
KIND_SHIFT = 16
# the bits as plain ints, for the code torch.compile traces
_HAS_MARGIN, _HAS_RELATIVE_MARGIN, _HAS_MAX_SCORE = int(Flag.HAS_MARGIN), int(Flag.HAS_RELATIVE_MARGIN), int(Flag.HAS_MAX_SCORE)
_GUIDE_RELATIVE, _SYMMETRIC, _DEBIAS, _SOFT = int(Flag.GUIDE_RELATIVE), int(Flag.SYMMETRIC), int(Flag.DEBIAS), int(Flag.SOFT)
_ATTRACT, _QUERY_GRAD, _KEYS_GRAD = int(Flag.ATTRACT), int(Flag.QUERY_GRAD), int(Flag.KEYS_GRAD)


class RowState(IntEnum):
    """Rows of the fused forward's per-row state (what the backward recomputes from)."""

    LOGSUMEXP = 0  # over the positive and the unmasked, biased negatives (attraction: P_i U N_i)
    POSITIVE_SCORE = 1  # s_i+
    OFFSET = 2  # the negatives' normaliser offset (SimANS; DCL's shift); HCL: c_i in P_ij below
    THRESHOLD = 3  # the score rules' threshold
    GUIDE_THRESHOLD = 4
    COLUMN_LOGSUMEXP = 5  # symmetric: the logsumexp of the row's positive column
    COLUMN_OFFSET = 6
    POSITIVE_COEF = 7  # c+ in dL/dl+ = c+ e^{l+ - lse} - 1 (1 but with DCL's debias)
    HCL_MASS = 8  # HCL: beta R, R the negatives' share of the softmax
    HCL_SHIFT = 9  # HCL: -log sum_k e^{beta (l_ik - HCL_WEIGHT_REFERENCE)}
    TEACHER_LOGSUMEXP = 10  # soft labels
    INV_NUM_POSITIVES = 11  # attraction: 1 / |P_i|
    # HCL: P_ij = e^{(1 + beta) (s_ij - r_i) / t + OFFSET} and softmax_k(beta l_ik)_j = e^{beta (s_ij - w_i)
    # / t + HCL_SHIFT}, with r_i, w_i the scores of the row's reference negatives (the largest; the
    # smallest where the factor is negative): no exponent is a difference of two rounded terms of
    # size (1 + beta) |l|
    HCL_REFERENCE = 12
    HCL_WEIGHT_REFERENCE = 13
    # l+ - LOGSUMEXP, the log of the positive's share of the softmax (what the backward's dL/dl+ reads);
    # HCL: -loss, from the row's terms relative to its largest, not a difference of two rounded numbers
    # of the logits' size (the precision of the dense DCL's e^{l+ - c} / Z)
    LOG_POSITIVE_SHARE = 14
    # DCL (not HCL): the largest biased logit x_ij over the row's negatives, in the units of the backend's
    # exponentials (natural on CPU, base 2 in Triton); P_ij = e^{(x_ij - NEGATIVE_MAX) + OFFSET}, so the
    # dominant negative's exponent is exact, as in the dense loss's e^{x - c} / Z
    NEGATIVE_MAX = 15


MAX_LABEL_LEVELS = 8
# what the rules' flagged keys become: removed from the row ("mask", SPEC section 2) or positives ("attract")
FALSE_NEGATIVES = ("mask", "attract")
_GUIDE_STRATEGIES = ("absolute", "relative")
_WEIGHTING_NAMES = "None, 'simans', fastneg.SimANS, fastneg.Hardness, fastneg.HCL or fastneg.GCSE"


def _optional_float(name: str, value: object) -> Optional[float]:
    if value is None:
        return None
    check_finite_float(name, value)
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Plan:
    """The validated options of one call, as every backend reads them.

    ``margin``, ``relative_margin``, ``max_score``, ``debias`` and ``soft_temperature`` are
    ``None`` when off; ``guide_margin`` is ``-inf`` when the guide does not mask. ``weighting``
    is a :class:`Weighting` with its two scalars in ``weight_a`` / ``weight_b``.
    """

    margin: Optional[float] = None
    relative_margin: Optional[float] = None
    max_score: Optional[float] = None
    guide_margin: float = 0.0
    guide_relative: bool = False
    weighting: Weighting = Weighting.NONE
    weight_a: float = 0.0
    weight_b: float = 0.0
    debias: Optional[float] = None  # DCL's tau_plus (Chuang et al. 2020)
    soft_temperature: Optional[float] = None  # SoftLabels: the teacher's temperature
    soft_weight: float = 1.0
    attract: bool = False  # false_negatives="attract": flagged keys join the positives

    @staticmethod
    def build(
        *,
        margin: object = None,
        relative_margin: object = None,
        max_score: object = None,
        guide_margin: object = 0.0,
        guide_strategy: object = "absolute",
        weighting: WeightingOption = None,
        debias: object = None,
        soft_labels: object = None,
        temperature: Union[float, torch.Tensor, None] = None,
        false_negatives: object = "mask",
    ) -> Plan:
        """Validate the public options (each error names its argument) and encode them. Called by
        :class:`fastneg.Rules` (``Rules.plan``), the one public way in."""
        if false_negatives not in FALSE_NEGATIVES:
            raise ValueError(f"false_negatives must be one of {FALSE_NEGATIVES}, got {false_negatives!r}")
        if guide_strategy not in _GUIDE_STRATEGIES:
            raise ValueError(f"guide_strategy must be one of {_GUIDE_STRATEGIES}, got {guide_strategy!r}")
        if guide_margin is None:  # the guide does not mask (it may still weight: Hardness(on="guide"))
            guide_margin = float("-inf")
        else:
            check_finite_float("guide_margin", guide_margin)
        kind, wa, wb = _weighting(weighting)
        soft_temperature, soft_weight = None, 1.0
        if soft_labels is not None:
            if not isinstance(soft_labels, SoftLabels):
                raise TypeError(f"soft_labels must be None or fastneg.SoftLabels, got {type(soft_labels).__name__}")
            soft_weight = float(soft_labels.weight)
            if soft_labels.temperature is not None:
                soft_temperature = float(soft_labels.temperature)
            elif isinstance(temperature, torch.Tensor):  # the loss's temperature (every caller passes it)
                soft_temperature = float(temperature.detach().reshape(()))
            else:
                soft_temperature = float(temperature)  # type: ignore[arg-type]
        debias_value = _optional_float("debias", debias)
        if debias_value is not None and not 0.0 <= debias_value < 1.0:
            raise ValueError(f"debias (DCL's tau_plus, the prior of a false negative) must be in [0, 1), got {debias_value}")
        return Plan(
            margin=_optional_float("margin", margin),
            relative_margin=_optional_float("relative_margin", relative_margin),
            max_score=_optional_float("max_score", max_score),
            guide_margin=float(guide_margin),  # type: ignore[arg-type]
            guide_relative=guide_strategy == "relative",
            weighting=kind,
            weight_a=wa,
            weight_b=wb,
            debias=debias_value,
            soft_temperature=soft_temperature,
            soft_weight=soft_weight,
            attract=false_negatives == "attract",
        )

    def check(self, symmetric: bool, has_guide: bool, temperature: Union[float, torch.Tensor, None] = None) -> None:
        """The combinations the loss refuses, each with an error naming the options."""
        w = self.weighting
        if w == Weighting.GUIDE_HARDNESS and not has_guide:
            raise ValueError("weighting=Hardness(on='guide') needs guide_query and guide_keys")
        if w == Weighting.GCSE and not has_guide:
            raise ValueError("weighting=GCSE needs guide_query and guide_keys (the reference model's embeddings)")
        if self.soft_temperature is not None and not has_guide:
            raise ValueError("soft_labels needs guide_query and guide_keys (the teacher's embeddings)")
        if w == Weighting.HCL and symmetric:
            raise ValueError("weighting=HCL cannot be combined with symmetric=True")
        if self.soft_temperature is not None:
            if symmetric:
                raise ValueError("soft_labels cannot be combined with symmetric=True")
            if self.debias is not None:
                raise ValueError("soft_labels cannot be combined with debias (DCL's estimator is for hard labels)")
            if w == Weighting.HCL:
                raise ValueError("soft_labels cannot be combined with weighting=HCL")
        if self.debias is not None:
            if symmetric:
                raise ValueError("debias cannot be combined with symmetric=True")
            if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
                raise ValueError("debias: a learned temperature is not supported (the clamp's floor depends on it); "
                                 "pass a float or a tensor without gradient")
        if self.attract:
            if symmetric:
                raise ValueError("false_negatives='attract' cannot be combined with symmetric=True")
            if self.debias is not None:
                raise ValueError("false_negatives='attract' cannot be combined with debias (DCL re-estimates the negatives)")
            if self.soft_temperature is not None:
                raise ValueError("false_negatives='attract' cannot be combined with soft_labels")
            if w == Weighting.HCL:
                raise ValueError("false_negatives='attract' cannot be combined with weighting=HCL")

    def scalars(self) -> list[float]:
        """The packed scalar block, indexed by :class:`Scalar` (plain floats: torch.compile traces this)."""
        return [self.margin or 0.0, self.relative_margin or 0.0, self.max_score or 0.0, self.guide_margin,
                self.weight_a, self.weight_b, self.debias or 0.0, self.soft_temperature or 0.0, self.soft_weight]

    def flags(self, symmetric: bool = False, query_grad: bool = False, keys_grad: bool = False,
              kind: Optional[int] = None) -> int:
        """The flags word; ``kind`` replaces the weighting (the sampler passes its :class:`Strategy`)."""
        word = 0
        for on, bit in ((self.margin is not None, _HAS_MARGIN), (self.relative_margin is not None, _HAS_RELATIVE_MARGIN),
                        (self.max_score is not None, _HAS_MAX_SCORE), (self.guide_relative, _GUIDE_RELATIVE),
                        (symmetric, _SYMMETRIC), (self.debias is not None, _DEBIAS),
                        (self.soft_temperature is not None, _SOFT), (self.attract, _ATTRACT),
                        (query_grad, _QUERY_GRAD), (keys_grad, _KEYS_GRAD)):
            if on:
                word |= bit
        return word | (int(self.weighting if kind is None else kind) << KIND_SHIFT)

    @staticmethod
    def decode(scalars: list[float], flags: int, sampler: bool = False) -> Plan:
        """The plan an op receives as (scalars, flags). ``sampler``: the word's kind is a
        :class:`Strategy` (read it with :func:`kind`), not the weighting."""
        if len(scalars) != len(Scalar):
            raise ValueError(f"scalars must have {len(Scalar)} entries (fastneg.plan.Scalar), got {len(scalars)}")
        f = Flag(flags & ((1 << KIND_SHIFT) - 1))

        def opt(flag: Flag, slot: Scalar) -> Optional[float]:
            return float(scalars[slot]) if flag in f else None

        return Plan(
            margin=opt(Flag.HAS_MARGIN, Scalar.MARGIN),
            relative_margin=opt(Flag.HAS_RELATIVE_MARGIN, Scalar.RELATIVE_MARGIN),
            max_score=opt(Flag.HAS_MAX_SCORE, Scalar.MAX_SCORE),
            guide_margin=float(scalars[Scalar.GUIDE_MARGIN]),
            guide_relative=Flag.GUIDE_RELATIVE in f,
            weighting=Weighting.NONE if sampler else Weighting(kind(flags)),
            weight_a=float(scalars[Scalar.WEIGHT_A]),
            weight_b=float(scalars[Scalar.WEIGHT_B]),
            debias=opt(Flag.DEBIAS, Scalar.DEBIAS),
            soft_temperature=opt(Flag.SOFT, Scalar.SOFT_TEMPERATURE),
            soft_weight=float(scalars[Scalar.SOFT_WEIGHT]),
            attract=Flag.ATTRACT in f,
        )


def kind(flags: int) -> int:
    """The weighting or strategy stored in a flags word."""
    return flags >> KIND_SHIFT


def _weighting(weighting: WeightingOption) -> tuple[Weighting, float, float]:
    if isinstance(weighting, str):
        if weighting != "simans":
            raise ValueError(f"weighting must be {_WEIGHTING_NAMES}, got {weighting!r}")
        weighting = SimANS()
    if weighting is None:
        return Weighting.NONE, 0.0, 0.0
    if isinstance(weighting, SimANS):
        return Weighting.SIMANS, float(weighting.a), float(weighting.b)
    if isinstance(weighting, Hardness):
        kind_ = Weighting.GUIDE_HARDNESS if weighting.on == "guide" else Weighting.HARDNESS
        return kind_, float(weighting.strength), 0.0
    if isinstance(weighting, HCL):
        return Weighting.HCL, float(weighting.beta), 0.0
    if isinstance(weighting, GCSE):
        return Weighting.GCSE, float(weighting.alpha), 0.0
    raise TypeError(f"weighting must be {_WEIGHTING_NAMES}, got {type(weighting).__name__}")


def layout() -> dict[str, int]:
    """Every value of the encoding by name (``csrc/plan.h``'s ``layout()`` must return the same)."""
    out = {f"{enum.__name__}.{m.name}": int(m) for enum in (Weighting, Strategy, Scalar, Flag, RowState) for m in enum}
    out.update(KIND_SHIFT=KIND_SHIFT, MAX_LABEL_LEVELS=MAX_LABEL_LEVELS, NUM_SCALARS=len(Scalar),
               NUM_ROW_STATES=len(RowState))
    return out
