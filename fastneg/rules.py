"""One object for the rules of a call: :class:`Rules`.

Every entry point takes it as ``rules=`` (:func:`fastneg.info_nce`, :class:`fastneg.InfoNCE`,
:func:`fastneg.sample_negatives`, :func:`fastneg.mine_hard_negatives`, the sentence-transformers,
open_clip and pytorch-metric-learning drop-ins, ``fastneg mine --rules``), alongside the keyword
arguments of the same names, which build one. The object is validated when it is made (each
error names its field) and becomes the :class:`~fastneg.plan.Plan` the backends read, once per
call (:meth:`Rules.plan`).

Labels and guide embeddings are tensors of a call, not rules: they are passed beside ``rules``
(``query_labels``/``key_labels``, ``guide_query``/``guide_keys``), and the guide's fields here
act only where guide embeddings are given. The samplers and the miner read the masking rules
(``margin``, ``relative_margin``, ``max_score``, the guide's) and ignore the loss's own fields
(``weighting``, ``debias``, ``soft_labels``, ``false_negatives``: the sampler never draws a flagged
key, and its ``strategy`` is its weighting), so one object serves a loss and its miner.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .options import SoftLabels, WeightingOption
from .plan import Plan

__all__ = ["Rules", "RULE_FIELDS", "MASKING_FIELDS", "PLAIN", "resolve_rules", "check_carried"]


@dataclass(frozen=True)
class Rules:
    """The false-negative rules, the negative weighting and the estimator of a call (SPEC sections 2-4).

    Args:
        margin: mask ``s_ij > s_i+ - margin``.
        relative_margin: mask ``s_ij > s_i+ - |s_i+| relative_margin``.
        max_score: mask ``s_ij > max_score``.
        guide_margin, guide_strategy: GISTEmbed's mask from the guide's scores ``t_ij``
            (``"absolute"``: ``t_ij > t_i+ - g``; ``"relative"``: ``t_ij > t_i+ - |t_i+| g``;
            ``guide_margin=None``: the guide masks nothing). Active where guide embeddings are given.
        weighting: ``None``, ``"simans"``, :class:`~fastneg.SimANS`, :class:`~fastneg.Hardness`,
            :class:`~fastneg.HCL` or :class:`~fastneg.GCSE` (the loss's).
        debias: DCL's ``tau_plus`` (the loss's estimator).
        soft_labels: :class:`~fastneg.SoftLabels` (the loss's).
        false_negatives: ``"mask"`` or ``"attract"``: what the flagged keys become (the loss's).

    ``Rules()`` is plain InfoNCE. ``rules.replace(margin=0.1)`` gives a changed copy.
    :func:`fastneg.info_nce` documents each field in full.
    """

    margin: Optional[float] = None
    relative_margin: Optional[float] = None
    max_score: Optional[float] = None
    guide_margin: Optional[float] = 0.0
    guide_strategy: str = "absolute"
    weighting: WeightingOption = None
    debias: Optional[float] = None
    soft_labels: Optional[SoftLabels] = None
    false_negatives: str = "mask"

    def __post_init__(self) -> None:
        plan = self._build(1.0)  # validates every field now (each error names it)
        # the plan is the same at every temperature unless soft labels take the loss's: kept, so a call
        # plans once (Plan is frozen)
        takes_temperature = self.soft_labels is not None and self.soft_labels.temperature is None
        object.__setattr__(self, "_plan", None if takes_temperature else plan)

    def plan(self, temperature: Union[float, torch.Tensor, None] = None) -> Plan:
        """The plan the backends read. ``temperature``: the loss's (soft labels without their own
        temperature take it)."""
        return self._plan if self._plan is not None else self._build(temperature)

    def _build(self, temperature: Union[float, torch.Tensor, None]) -> Plan:
        return Plan.build(margin=self.margin, relative_margin=self.relative_margin, max_score=self.max_score,
                          guide_margin=self.guide_margin, guide_strategy=self.guide_strategy, weighting=self.weighting,
                          debias=self.debias, soft_labels=self.soft_labels, temperature=temperature,
                          false_negatives=self.false_negatives)

    def masking_plan(self, weighting: WeightingOption = None) -> Plan:
        """The plan of a sampler or miner: the masking rules only, with its own ``weighting``
        (SimANS for ``strategy="simans"``)."""
        return Plan.build(margin=self.margin, relative_margin=self.relative_margin, max_score=self.max_score,
                          guide_margin=self.guide_margin, guide_strategy=self.guide_strategy, weighting=weighting)

    def replace(self, **changes: Any) -> Rules:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> dict[str, Any]:
        """The fields that differ from :class:`Rules`' defaults, by name (what a config records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}

    @property
    def is_plain(self) -> bool:
        """Whether these are plain InfoNCE's rules (every field at its default)."""
        return not self.changed()


#: plain InfoNCE's rules (every field at its default)
PLAIN = Rules()
#: every field of :class:`Rules`, in order
RULE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Rules))
#: the fields the samplers and the miner read
MASKING_FIELDS: tuple[str, ...] = ("margin", "relative_margin", "max_score", "guide_margin", "guide_strategy")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Rules)}


def resolve_rules(where: str, rules: Optional[Rules], **keywords: Any) -> Rules:
    """The call's rules: ``rules``, or the keyword arguments (each at its default when not given),
    never both. ``where`` names the function in the error."""
    given = {k: v for k, v in keywords.items() if not _is_default(k, v)}
    if rules is None:  # plain InfoNCE's keywords (the common call): the validated constant, not a new object
        if not given:
            return PLAIN
        try:
            hash(tuple(keywords.values()))
        except TypeError:  # a value Rules will refuse, naming it
            return Rules(**keywords)
        return _keyword_rules(**keywords)  # a loop calls with the same keywords: validated and planned once
    if not isinstance(rules, Rules):
        raise TypeError(f"{where}: rules must be a fastneg.Rules, got {type(rules).__name__}")
    if given:
        raise TypeError(f"{where}: pass the rules either as rules= or as keyword arguments, not both "
                        f"(got rules= and {', '.join(sorted(given))}=)")
    return rules


@functools.lru_cache(maxsize=256, typed=True)  # typed: margin=1 and margin=True are different calls
def _keyword_rules(**keywords: Any) -> Rules:
    return Rules(**keywords)


def _is_default(name: str, value: Any) -> bool:
    default = _DEFAULTS[name]
    if value is default:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return False
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    return isinstance(value, str) and value == default


def check_carried(where: str, rules: Rules, fields: tuple[str, ...]) -> None:
    """Refuse ``rules`` that set a field outside ``fields`` (what ``where`` carries): an integration
    never drops a rule silently."""
    foreign = [k for k in rules.changed() if k not in fields]
    if foreign:
        raise ValueError(f"{where}: rules.{foreign[0]} is not available here (it carries {', '.join(fields)}); "
                         "fastneg.info_nce takes every rule")
