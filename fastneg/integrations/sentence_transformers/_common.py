"""What the sentence-transformers drop-ins share: text hashes (``mask_duplicates``), the fusable
similarities, the merged column forward, one-time warnings, and fastneg's keyword arguments."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...options import Hardness, SimANS
from ...rules import PLAIN, Rules, check_carried, resolve_rules
from ...validation import check_backend
from .._fallback import _warned, warn_dense_once  # noqa: F401  (_warned: cleared by tests)

try:
    from sentence_transformers import util as _st_util
    from sentence_transformers.sentence_transformer import losses as _st_losses
except ImportError as exc:  # pragma: no cover - explained to the user
    raise ImportError(
        "fastneg.integrations.sentence_transformers needs sentence-transformers >= 6: install the "
        "'sentence-transformers' extra (pip install --no-build-isolation '.[sentence-transformers]' from a clone)"
    ) from exc

__all__ = ["text_hashes", "fused_similarity", "_st_losses", "_st_util"]

_HASH_BASE = 1_000_003
_HASH_MASK = (1 << 63) - 1
_HASH_LENGTH = 0x9E3779B97F4A7C15 % (1 << 62)
_DOCS = "https://sbert.net/docs/package_reference/sentence_transformer/losses.html#"


# --- helpers --------------------------------------------------------------------------------------

def _powers(length: int, device: torch.device) -> Tensor:
    """base^t mod 2^64 for t < length, as signed int64 (the products wrap around)."""
    powers, p = [], 1
    for _ in range(length):
        powers.append(p - (1 << 64) if p >= (1 << 63) else p)
        p = (p * _HASH_BASE) % (1 << 64)
    return torch.tensor(powers, dtype=torch.long, device=device)


def text_hashes(features: dict[str, Tensor]) -> Tensor:
    """[B] int64 hash (>= 0) of each row's token ids, attention-masked and position-compacted,
    so left and right padding and different padded widths give the same value for the same text.

    Padded features (2-D ``input_ids`` with an optional ``attention_mask``) and the flat
    EmbeddingBag layout of ``StaticEmbedding`` (1-D ``input_ids`` with per-text ``offsets``)
    are both read; the same token sequence hashes to the same value in either."""
    ids = features.get("input_ids")
    offsets = features.get("offsets")
    if isinstance(ids, Tensor) and ids.dim() == 1 and isinstance(offsets, Tensor) and offsets.dim() == 1:
        ids, offsets = ids.long(), offsets.long()
        B, n = offsets.shape[0], ids.shape[0]
        ends = torch.cat([offsets[1:], offsets.new_tensor([n])])
        lengths = (ends - offsets).clamp(min=0)
        if int(lengths.sum()) != n:
            raise ValueError("mask_duplicates: 'offsets' must start at 0 and increase through 'input_ids'")
        row = torch.repeat_interleave(torch.arange(B, device=ids.device), lengths)
        position = torch.arange(n, device=ids.device) - offsets[row]
        terms = (ids + 1) * _powers(int(lengths.max()) if B else 0, ids.device)[position]
        h = torch.zeros(B, dtype=torch.long, device=ids.device).index_add_(0, row, terms) + lengths * _HASH_LENGTH
        return h & _HASH_MASK
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("mask_duplicates needs token features: a 2-D 'input_ids' tensor (padded), or a 1-D "
                         "'input_ids' with 'offsets' (StaticEmbedding)")
    ids = ids.long()
    mask = features.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    position = (mask.cumsum(1) - 1).clamp(min=0)
    power = _powers(ids.shape[1], ids.device)[position]
    h = ((ids + 1) * mask * power).sum(1) + mask.sum(1) * _HASH_LENGTH
    return h & _HASH_MASK


_BY_NAME = {"cos_sim": _st_util.cos_sim, "cos": _st_util.cos_sim, "dot_score": _st_util.dot_score,
            "dot": _st_util.dot_score}


def _similarity_argument(similarity_fct: Any) -> Any:
    """The callable for ``similarity_fct`` ('cos_sim' / 'dot_score' as names are accepted too)."""
    if isinstance(similarity_fct, str):
        if similarity_fct not in _BY_NAME:
            raise ValueError(f"similarity_fct: unknown name {similarity_fct!r}; pass a callable such as "
                             "sentence_transformers.util.cos_sim, or 'cos_sim' / 'dot_score'")
        return _BY_NAME[similarity_fct]
    return similarity_fct


def fused_similarity(similarity_fct: Any) -> Optional[str]:
    """"cos" or "dot" when the fused op computes ``similarity_fct``'s scores (dot products of
    normalised or raw embeddings), else None."""
    fn = similarity_fct
    while isinstance(fn, partial) and not fn.args and not fn.keywords:
        fn = fn.func
    if fn is _st_util.cos_sim or fn is getattr(_st_util, "pytorch_cos_sim", None):
        return "cos"
    if fn is _st_util.dot_score:
        return "dot"
    return None


def _prepare(x: Tensor, kind: str) -> Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=-1) if kind == "cos" else x


def _module_of(cls: type) -> ModuleType:
    return sys.modules[cls.__module__]


def _embed_columns(module: ModuleType, model: Any, features: list[dict[str, Any]]) -> list[Tensor]:
    """The original's column forward (merged where it merges), or one forward per column where
    the installed version has none."""
    embed = getattr(module, "embed_columns", None)
    if embed is not None:
        return embed(model, features)
    return [model(f)["sentence_embedding"] for f in features]


def _weighting_repr(w: object) -> object:
    return repr(w) if isinstance(w, (SimANS, Hardness)) else w


def _warn_dense(loss: nn.Module, why: str) -> None:
    warn_dense_once(loss, why, "sentence-transformers' dense computation")


def _gather_hashes(hashes: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
    """Every rank's hashes (integers, no gradient); the local ones when not distributed."""
    if hashes is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return hashes
    return [_st_util.all_gather(h.contiguous()) for h in hashes]


class _FastnegRules:
    """fastneg's keyword arguments, validated once; the rules reach the fused op as one
    :class:`fastneg.Rules`.

    Defaults live on the class, so an instance built without ``__init__`` (``cls.__new__`` and
    attributes set by hand, as some tests of the originals do) computes the original loss.
    ``_rule_fields``: the :class:`~fastneg.Rules` fields this loss carries; a rules object that
    sets any other field is refused at construction (never silently dropped)."""

    mask_duplicates: bool = False
    mask_labels: bool = False  # the ranking losses' (the dataset's label column as relevance groups)
    rules: Rules = PLAIN
    backend: str = "auto"
    _pending_hashes: Optional[list[Tensor]] = None
    _margin_key = "margin"
    _rule_fields: tuple[str, ...] = ("margin", "relative_margin", "max_score", "weighting")

    def _init_fastneg(self, mask_duplicates: bool, rules: Optional[Rules], backend: str, **keywords: object) -> None:
        name = type(self).__name__
        rules = resolve_rules(name, rules, **keywords)
        check_carried(name, rules, self._rule_fields)
        check_backend(backend)
        # plain attributes: nn.Module's __setattr__ would take a Rules for a non-module value anyway
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "mask_duplicates", bool(mask_duplicates))

    def _has_rules(self) -> bool:
        return self.mask_duplicates or self.mask_labels or not self.rules.is_plain

    def _hashes(self, sentence_features: Sequence[dict[str, Tensor]]) -> Optional[list[Tensor]]:
        return [text_hashes(f) for f in sentence_features] if self.mask_duplicates else None

    def _refuse_rules(self, why: str) -> None:
        if self._has_rules():
            raise ValueError(f"{type(self).__name__}: {why}; fastneg's rules (mask_duplicates, margins, weighting) "
                             "need the fused op, which computes cos_sim or dot_score (similarity_fct)")

    def _fastneg_config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"mask_duplicates": self.mask_duplicates, "mask_labels": self.mask_labels}
        for k, v in self.rules.changed().items():
            extra[self._margin_key if k == "margin" else k] = _weighting_repr(v) if k == "weighting" else v
        return {k: v for k, v in extra.items() if v is not False}

    def _fastneg_citation(self, original: type) -> str:
        name = original.__name__
        return (f"\n@misc{{fastneg,\n    title={{fastneg: fused contrastive losses with false-negative masking}},\n"
                f"    note={{fastneg.integrations.sentence_transformers.{type(self).__name__}, a drop-in for "
                f"sentence-transformers' {name} ({_DOCS}{name.lower()})}}\n}}\n")
