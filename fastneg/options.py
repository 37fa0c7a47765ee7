"""Loss options: negative weightings, the false-negative rule bundle, and input validation.

Everything a backend needs beyond the tensors is gathered here into one small frozen
dataclass, :class:`Rules`, so that the kernels receive a handful of scalars and flags
instead of a dozen loose keyword arguments. Validation happens here too, once, before
any kernel runs (SPEC section 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["SimANS", "Hardness", "HCL", "GCSE", "SoftLabels", "Rules", "WEIGHTING_NONE", "WEIGHTING_SIMANS",
           "WEIGHTING_HARDNESS", "WEIGHTING_GUIDE_HARDNESS", "WEIGHTING_HCL", "WEIGHTING_GCSE", "MAX_LABEL_LEVELS"]

WEIGHTING_NONE = 0
WEIGHTING_SIMANS = 1
WEIGHTING_HARDNESS = 2
# Hardness(strength, on="guide"): beta_ij = weight_a * t_ij from the guide scores.
WEIGHTING_GUIDE_HARDNESS = 3
WEIGHTING_HCL = 4
WEIGHTING_GCSE = 5
MAX_LABEL_LEVELS = 8

_REDUCTIONS = ("mean", "sum", "none")
_GUIDE_STRATEGIES = ("absolute", "relative")
# what the rules' flagged keys become: removed from the row ("mask", SPEC section 2) or positives ("attract")
FALSE_NEGATIVES = ("mask", "attract")
_BACKENDS = ("auto", "triton", "cpu", "reference")


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
        _check_finite_float("SimANS.a", self.a)
        _check_finite_float("SimANS.b", self.b)
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
        _check_finite_float("Hardness.strength", self.strength)
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

    Precision: the fused backward computes ``dS_ij = (1 + beta) P_ij - beta R_i softmax(beta l_i)_j``,
    a difference of two softmax terms. Where one negative dominates its row (an unmasked exact
    copy of the positive at a small temperature, say) the two nearly cancel, and in float32 that
    entry keeps about ``1 / (1 + 2 beta)`` of the relative precision plain PyTorch's autograd gets
    (``python benchmarks/precision_cases.py``, 2026-12-02, AMD EPYC: at worst 7.6x dense float32's
    query-gradient error, at beta 3, temperature 0.005, with unmasked exact duplicates;
    tests/test_regressions.py holds the bound). Mask duplicates (labels) or
    use float64 where that matters.
    """

    beta: float = 1.0

    def __post_init__(self) -> None:
        _check_finite_float("HCL.beta", self.beta)


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
        _check_finite_float("GCSE.alpha", self.alpha)
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
            _check_finite_float("SoftLabels.temperature", self.temperature)
            if self.temperature <= 0:
                raise ValueError(f"SoftLabels.temperature must be > 0, got {self.temperature}")
        _check_finite_float("SoftLabels.weight", self.weight)
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"SoftLabels.weight must be in [0, 1], got {self.weight}")


Weighting = Union[None, str, SimANS, Hardness, HCL, GCSE]
_WEIGHTING_NAMES = "None, 'simans', fastneg.SimANS, fastneg.Hardness, fastneg.HCL or fastneg.GCSE"


def _check_finite_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")


def _optional_float(name: str, value: object) -> Optional[float]:
    if value is None:
        return None
    _check_finite_float(name, value)
    return float(value)


@dataclass(frozen=True)
class Rules:
    """The scalar part of one loss call, as the kernels see it.

    ``margin``, ``relative_margin`` and ``max_score`` are each ``None`` when disabled.
    ``weighting`` is one of ``WEIGHTING_NONE / SIMANS / HARDNESS`` with its two scalars in
    ``weight_a`` / ``weight_b`` (SimANS a, b; Hardness strength, unused).
    """

    margin: Optional[float] = None
    relative_margin: Optional[float] = None
    max_score: Optional[float] = None
    guide_margin: float = 0.0
    guide_relative: bool = False
    weighting: int = WEIGHTING_NONE
    weight_a: float = 0.0
    weight_b: float = 0.0
    debias: Optional[float] = None  # DCL's tau_plus (Chuang et al. 2020); None: off
    soft_temperature: Optional[float] = None  # SoftLabels: the teacher's temperature; None: off
    soft_weight: float = 1.0
    attract: bool = False  # false_negatives="attract": flagged keys join the positives

    @staticmethod
    def build(
        margin: object,
        relative_margin: object,
        max_score: object,
        guide_margin: object,
        guide_strategy: object,
        weighting: Weighting,
        debias: object = None,
        soft_labels: object = None,
        temperature: Union[float, torch.Tensor, None] = None,
        false_negatives: object = "mask",
    ) -> Rules:
        if false_negatives not in FALSE_NEGATIVES:
            raise ValueError(f"false_negatives must be one of {FALSE_NEGATIVES}, got {false_negatives!r}")
        if guide_strategy not in _GUIDE_STRATEGIES:
            raise ValueError(f"guide_strategy must be one of {_GUIDE_STRATEGIES}, got {guide_strategy!r}")
        if guide_margin is None:  # the guide does not mask (it may still weight: Hardness(on="guide"))
            guide_margin = float("-inf")
        else:
            _check_finite_float("guide_margin", guide_margin)
        if isinstance(weighting, str):
            if weighting != "simans":
                raise ValueError(f"weighting must be {_WEIGHTING_NAMES}, got {weighting!r}")
            weighting = SimANS()
        if weighting is None:
            kind, wa, wb = WEIGHTING_NONE, 0.0, 0.0
        elif isinstance(weighting, SimANS):
            kind, wa, wb = WEIGHTING_SIMANS, float(weighting.a), float(weighting.b)
        elif isinstance(weighting, Hardness):
            kind = WEIGHTING_GUIDE_HARDNESS if weighting.on == "guide" else WEIGHTING_HARDNESS
            wa, wb = float(weighting.strength), 0.0
        elif isinstance(weighting, HCL):
            kind, wa, wb = WEIGHTING_HCL, float(weighting.beta), 0.0
        elif isinstance(weighting, GCSE):
            kind, wa, wb = WEIGHTING_GCSE, float(weighting.alpha), 0.0
        else:
            raise TypeError(f"weighting must be {_WEIGHTING_NAMES}, got {type(weighting).__name__}")
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
        return Rules(
            margin=_optional_float("margin", margin),
            relative_margin=_optional_float("relative_margin", relative_margin),
            max_score=_optional_float("max_score", max_score),
            guide_margin=float(guide_margin),  # type: ignore[arg-type]
            guide_relative=guide_strategy == "relative",
            weighting=kind,
            weight_a=wa,
            weight_b=wb,
            debias=_check_debias(debias),
            soft_temperature=soft_temperature,
            soft_weight=soft_weight,
            attract=false_negatives == "attract",
        )


def _check_debias(debias: object) -> Optional[float]:
    value = _optional_float("debias", debias)
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"debias (DCL's tau_plus, the prior of a false negative) must be in [0, 1), got {value}")
    return value


def check_reduction(reduction: object) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_backend(backend: object) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_matrix(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _check_index_tensor(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like query, got {t.device}")
    return t


def _check_index_vector(name: str, t: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    t = _check_index_tensor(name, t, device)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length_name}] = [{length}], got {tuple(t.shape)}")
    return t


def _check_labels(name: str, t: object, length: int, length_name: str, device: torch.device) -> torch.Tensor:
    """Labels are [rows] or [rows, levels] (several label sets, OR-ed: a key is masked when any level matches)."""
    t = _check_index_tensor(name, t, device)
    if t.dim() == 1 and t.shape[0] == length:
        return t
    if t.dim() == 2 and t.shape[0] == length and 1 <= t.shape[1] <= MAX_LABEL_LEVELS:
        return t
    raise ValueError(
        f"{name} must have shape [{length_name}] = [{length}] or [{length_name}, levels] with 1 <= levels <= "
        f"{MAX_LABEL_LEVELS}, got {tuple(t.shape)}")


def _check_key_lists(name: str, t: object, width: str, B: int, N: int, device: torch.device) -> None:
    """[B, width] key indices in [0, N), -1 for none."""
    t = _check_index_tensor(name, t, device)
    if t.dim() != 2 or t.shape[0] != B:
        raise ValueError(f"{name} must have shape [B, {width}] with B = {B}, got {tuple(t.shape)}")
    if not _is_compiling() and t.numel() and bool(((t < -1) | (t >= N)).any()):
        raise ValueError(f"{name} must be key indices in [0, N) = [0, {N}) or -1 for none")


def check_negatives(negatives: object, B: int, N: int, device: torch.device) -> None:
    _check_key_lists("negatives", negatives, "K", B, N, device)


def check_num_negatives(num_negatives: object) -> None:
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")


def check_exclude(exclude: object, B: int, N: int, device: torch.device) -> None:
    _check_key_lists("exclude", exclude, "E", B, N, device)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def validate_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    positives: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    guide_query: Optional[torch.Tensor],
    guide_keys: Optional[torch.Tensor],
    allow_empty: bool = False,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the offending argument (SPEC section 7).
    ``allow_empty``: a rank of a process group may hold no rows (checked across the group)."""
    _check_matrix("query", query)
    _check_matrix("keys", keys)
    B, D = query.shape
    N = keys.shape[0]
    if keys.shape[1] != D:
        raise ValueError(f"keys must have the same embedding dim as query ({D}), got {keys.shape[1]}")
    if keys.dtype != query.dtype:
        raise TypeError(f"keys must have the same dtype as query ({query.dtype}), got {keys.dtype}")
    if keys.device != query.device:
        raise ValueError(f"keys must be on the same device as query ({query.device}), got {keys.device}")
    if B == 0 and not allow_empty:
        raise ValueError("query must have at least one row, got an empty query")
    if N == 0 and not allow_empty:
        raise ValueError("keys must have at least one row, got empty keys")
    if D == 0:
        raise ValueError("query and keys must have embedding dim >= 1, got 0")
    if query.dtype == torch.float64 and query.device.type != "cpu":
        raise TypeError("query: float64 is supported on CPU only; use float32, float16 or bfloat16 on GPU")

    if positives is None:
        if N < B:
            raise ValueError(
                f"positives defaults to arange(B), which requires keys.shape[0] >= query.shape[0]; got N={N} < B={B}")
    else:
        _check_index_vector("positives", positives, B, "B", query.device)
        if not _is_compiling():
            if bool(((positives < 0) | (positives >= N)).any()):
                raise ValueError(f"positives must be in [0, N) = [0, {N}), got values outside that range")

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar (one element), got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        if temperature.device != query.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature must be on {query.device} or the CPU, got {temperature.device}")
        if not _is_compiling():
            t = float(temperature.detach().reshape(()).item())
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"temperature must be finite and > 0, got {t}")
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float or a scalar tensor, got {type(temperature).__name__}")
        if not (math.isfinite(float(temperature)) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")

    if key_labels is not None:
        _check_labels("key_labels", key_labels, N, "N", query.device)
    if query_labels is not None:
        if key_labels is None:
            raise ValueError("query_labels requires key_labels (the labels of the keys to compare against)")
        _check_labels("query_labels", query_labels, B, "B", query.device)
        if query_labels.dim() != key_labels.dim() or (query_labels.dim() == 2 and query_labels.shape[1] != key_labels.shape[1]):
            raise ValueError(
                f"query_labels must have as many label levels as key_labels: got shapes {tuple(query_labels.shape)} "
                f"and {tuple(key_labels.shape)}")

    if (guide_query is None) != (guide_keys is None):
        raise ValueError("guide_query and guide_keys must be given together")
    if guide_query is not None:
        assert guide_keys is not None
        _check_matrix("guide_query", guide_query)
        _check_matrix("guide_keys", guide_keys)
        if guide_query.shape[0] != B:
            raise ValueError(f"guide_query must have B = {B} rows, got {guide_query.shape[0]}")
        if guide_keys.shape[0] != N:
            raise ValueError(f"guide_keys must have N = {N} rows, got {guide_keys.shape[0]}")
        if guide_keys.shape[1] != guide_query.shape[1]:
            raise ValueError(
                f"guide_keys must have the same dim as guide_query ({guide_query.shape[1]}), got {guide_keys.shape[1]}"
            )
        for name, g in (("guide_query", guide_query), ("guide_keys", guide_keys)):
            if g.device != query.device:
                raise ValueError(f"{name} must be on {query.device} like query, got {g.device}")
