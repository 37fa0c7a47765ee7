"""Drop-in replacements for sentence-transformers' in-batch-negative losses.

::

    from fastneg.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)                      # same numbers as the original
    loss = MultipleNegativesRankingLoss(model, mask_duplicates=True,  # and what it lacks
                                        margin=0.05, weighting=fastneg.SimANS())

Each class **is** the sentence-transformers (6.x) loss of the same name (a subclass of it): the
constructor, the attributes (assignable after construction, as in the original), the error
messages, the merged column forward, the gradient cache with its ``embed_minibatch`` /
``embed_minibatch_iter`` / ``calculate_loss`` / ``calculate_loss_and_cache_gradients`` contract,
``sim_matrix`` / ``similarity_fct`` / ``cross_entropy_loss`` on the GIST classes, the refusal of
a ``StaticEmbedding`` behind a router, and the model-card config are the original's. What fastneg
replaces is the score-matrix stage: every score block of a row (query -> documents, -> queries,
document -> queries, -> documents; GIST's anchor-anchor and positive-positive) is **one** call of
the fused op (see ``fastneg/integrations/_losses.py``), so the loss needs memory linear in the
batch instead of the originals' B x N matrices (per mini-batch in the cached ones).

fastneg's own keyword arguments, on every class:

- ``mask_duplicates``: hash each column's token ids before embedding and mask keys whose text is
  identical to the row's positive (document columns) or to the row's query (query columns), so
  batches need no de-duplicating sampler. Needs ``forward`` (the hashes come from the features);
  ``compute_loss_from_embeddings`` takes them as ``hashes=``.
- ``margin``, ``relative_margin``, ``max_score`` (SPEC section 2; on GIST the first is called
  ``score_margin``, since GIST's ``margin`` is the guide's): compared with each row's positive
  score in every block, raw similarities (cosine by default).
- ``weighting``: ``None``, ``"simans"``, :class:`fastneg.SimANS` or :class:`fastneg.Hardness`
  over every block (not together with ``hardness_mode``, which is itself a weighting).
- ``backend``: as in :func:`fastneg.info_nce`.

``get_config_dict()`` returns the original's keys, plus those of these five that differ from
their defaults (``mask_duplicates``, ``margin`` / ``score_margin``, ``relative_margin``,
``max_score``, ``weighting``), so a model card records them; with fastneg's defaults it is the
original's dict. ``citation`` is the original's BibTeX plus an entry naming fastneg's class and the
original loss it replaces, with the original's documentation link.

When the fused op is used, and when not: the fused op computes dot products, so
``similarity_fct`` ``util.cos_sim`` / ``pytorch_cos_sim`` (on normalised embeddings) and
``util.dot_score`` (and ``functools.partial`` of them without arguments) are fused; on the GIST
classes, the default ``nn.CosineSimilarity(dim=-1)``, ``sim_matrix`` and
``nn.CrossEntropyLoss()``. Any other similarity (``util.euclidean_sim``, ``util.manhattan_sim``,
a lambda; none of sentence-transformers' others is a dot product after a transform of each side),
a ``sim_matrix`` or ``cross_entropy_loss`` replaced on the instance or in a subclass, or a GIST
``temperature <= 0`` run the original's own dense computation, with a one-time warning that its
memory is quadratic in the batch. With fastneg's rules and an unfused similarity, the ranking
losses apply the rules densely to ``similarity_fct``'s scores (fastneg's dense reference) for
``directions=("query_to_doc",)`` without ``hardness_mode``; other layouts, and the GIST classes,
raise a ``ValueError`` naming ``similarity_fct``.

Gathering across devices uses the original modules' ``all_gather_with_grad`` / ``get_rank``, as
the originals do. Needs sentence-transformers >= 6 (the ``sentence_transformers.sentence_transformer``
package layout).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..options import Hardness, SimANS, check_backend
from ._losses import BlockRules, gist_loss, ranking_loss
from ._mining import mine_hard_negatives

try:
    from sentence_transformers import util as _st_util
    from sentence_transformers.sentence_transformer import losses as _st_losses
except ImportError as exc:  # pragma: no cover - explained to the user
    raise ImportError(
        "fastneg.integrations.sentence_transformers needs sentence-transformers >= 6: install the "
        "'sentence-transformers' extra (pip install --no-build-isolation '.[sentence-transformers]' from a clone)"
    ) from exc

__all__ = [
    "mine_hard_negatives",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "CachedGISTEmbedLoss",
    "text_hashes",
]

_HASH_BASE = 1_000_003
_HASH_MASK = (1 << 63) - 1
_HASH_LENGTH = 0x9E3779B97F4A7C15 % (1 << 62)
_DOCS = "https://sbert.net/docs/package_reference/sentence_transformer/losses.html#"


# --- helpers --------------------------------------------------------------------------------------

def text_hashes(features: dict[str, Tensor]) -> Tensor:
    """[B] int64 hash (>= 0) of each row's token ids, attention-masked and position-compacted,
    so left and right padding and different padded widths give the same value for the same text."""
    if "input_ids" not in features or not isinstance(features["input_ids"], Tensor) or features["input_ids"].dim() != 2:
        raise ValueError("mask_duplicates needs padded token features with a 2-D 'input_ids' tensor")
    ids = features["input_ids"].long()
    mask = features.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    position = (mask.cumsum(1) - 1).clamp(min=0)
    T = ids.shape[1]
    powers, p = [], 1
    for _ in range(T):  # base^t mod 2^64, as signed int64 (the products wrap around)
        powers.append(p - (1 << 64) if p >= (1 << 63) else p)
        p = (p * _HASH_BASE) % (1 << 64)
    power = torch.tensor(powers, dtype=torch.long, device=ids.device)[position]
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


_warned: set[str] = set()


def _warn_dense(loss: nn.Module, why: str) -> None:
    key = f"{type(loss).__name__}:{why}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{type(loss).__name__}: {why}, so the loss runs sentence-transformers' dense computation "
                      "(memory quadratic in the batch) instead of fastneg's fused op", stacklevel=3)


def _gather_hashes(hashes: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
    """Every rank's hashes (integers, no gradient); the local ones when not distributed."""
    if hashes is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return hashes
    return [_st_util.all_gather(h.contiguous()) for h in hashes]


class _FastnegRules:
    """fastneg's keyword arguments, validated once; the rules reach the fused op as a BlockRules.

    Defaults live on the class, so an instance built without ``__init__`` (``cls.__new__`` and
    attributes set by hand, as some tests of the originals do) computes the original loss."""

    mask_duplicates: bool = False
    rules: BlockRules = BlockRules()
    backend: str = "auto"
    _pending_hashes: Optional[list[Tensor]] = None
    _margin_key = "margin"

    def _init_fastneg(self, mask_duplicates: bool, margin: Optional[float], relative_margin: Optional[float],
                      max_score: Optional[float], weighting: object, backend: str) -> None:
        rules = BlockRules(margin, relative_margin, max_score, weighting)
        rules.rules()  # validates the values now
        check_backend(backend)
        # plain attributes: nn.Module's __setattr__ would take a BlockRules for a non-module value anyway
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "mask_duplicates", bool(mask_duplicates))

    def _has_rules(self) -> bool:
        r = self.rules
        return self.mask_duplicates or any(v is not None for v in (r.margin, r.relative_margin, r.max_score, r.weighting))

    def _hashes(self, sentence_features: Sequence[dict[str, Tensor]]) -> Optional[list[Tensor]]:
        return [text_hashes(f) for f in sentence_features] if self.mask_duplicates else None

    def _refuse_rules(self, why: str) -> None:
        if self._has_rules():
            raise ValueError(f"{type(self).__name__}: {why}; fastneg's rules (mask_duplicates, margins, weighting) "
                             "need the fused op, which computes cos_sim or dot_score (similarity_fct)")

    def _fastneg_config(self) -> dict[str, Any]:
        r = self.rules
        extra = {"mask_duplicates": self.mask_duplicates, self._margin_key: r.margin,
                 "relative_margin": r.relative_margin, "max_score": r.max_score, "weighting": _weighting_repr(r.weighting)}
        defaults = {"mask_duplicates": False}
        return {k: v for k, v in extra.items() if v != defaults.get(k)}

    def _fastneg_citation(self, original: type) -> str:
        name = original.__name__
        return (f"\n@misc{{fastneg,\n    title={{fastneg: fused contrastive losses with false-negative masking}},\n"
                f"    note={{fastneg.integrations.sentence_transformers.{type(self).__name__}, a drop-in for "
                f"sentence-transformers' {name} ({_DOCS}{name.lower()})}}\n}}\n")


# --- MultipleNegativesRankingLoss -------------------------------------------------------------------

class _RankingMixin(_FastnegRules):
    scale: float
    similarity_fct: Any
    gather_across_devices: bool
    directions: tuple[str, ...]
    partition_mode: str
    hardness_mode: Optional[str]
    hardness_strength: float

    def _init_ranking_rules(self, mask_duplicates: bool, margin: Optional[float], relative_margin: Optional[float],
                            max_score: Optional[float], weighting: object, backend: str) -> None:
        self._init_fastneg(mask_duplicates, margin, relative_margin, max_score, weighting, backend)
        if self.hardness_mode is not None and self.hardness_strength > 0 and weighting is not None:
            raise ValueError("hardness_mode and weighting are both negative weightings: use one of them")

    def _fused_ranking_loss(self, embeddings: Sequence[Tensor], hashes: Optional[list[Tensor]], kind: str,
                            module: ModuleType) -> Tensor:
        """The original's loss (a mean over the local rows) through the fused op."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = _prepare(embeddings[0], kind), [_prepare(e, kind) for e in embeddings[1:]]
        local = queries.shape[0]
        offset = 0
        if self.gather_across_devices:
            queries = module.all_gather_with_grad(queries)
            docs = [module.all_gather_with_grad(d) for d in docs]
            hashes = _gather_hashes(hashes)
            offset = module.get_rank() * local
        loss = ranking_loss(
            queries, docs, offset=offset, local=local, temperature=1.0 / self.scale, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, rules=self.rules,
            query_hashes=hashes[0] if hashes is not None else None,
            doc_hashes=hashes[1:] if hashes is not None else None, backend=self.backend)
        return loss.mean().to(embeddings[0].dtype)

    def _fused_kind(self) -> Optional[str]:
        kind = fused_similarity(self.similarity_fct)
        if kind is None:
            name = _st_util.similarity_fct_name(self.similarity_fct)
            if self._has_rules() and (tuple(self.directions) != ("query_to_doc",)
                                      or (self.hardness_mode is not None and self.hardness_strength > 0)):
                self._refuse_rules(f"similarity_fct {name!r} is not fused and fastneg's dense form of the rules "
                                   "covers directions=('query_to_doc',) without hardness_mode only")
            _warn_dense(self, f"similarity_fct {name!r} is not a dot product")
        return kind

    def _dense_rules_loss(self, embeddings: Sequence[Tensor], hashes: Optional[list[Tensor]],
                          module: ModuleType) -> Tensor:
        """fastneg's rules on the original's dense scores (``similarity_fct`` not fused; query -> documents
        only): the dense reference's masks and weights over ``similarity_fct(queries, documents)``."""
        from ..reference import rows_from_scores

        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = embeddings[0], list(embeddings[1:])
        local = queries.shape[0]
        offset = 0
        if self.gather_across_devices:
            docs = [module.all_gather_with_grad(d) for d in docs]
            hashes = _gather_hashes(hashes)
            offset = module.get_rank() * local
        scores = self.similarity_fct(queries, torch.cat(docs))  # [B, B_world x columns]
        rows = torch.arange(offset, offset + local, device=queries.device)
        query_labels = key_labels = None
        if hashes is not None:  # keys whose text is the row's positive's
            query_labels, key_labels = hashes[1][rows], torch.cat(hashes[1:])[None, :]
        loss = rows_from_scores(scores, rows[:, None], 1.0 / self.scale, self.rules.rules(), query_labels, key_labels,
                                None)[0]
        return loss.mean().to(embeddings[0].dtype)


_MNRL = _st_losses.MultipleNegativesRankingLoss


class MultipleNegativesRankingLoss(_RankingMixin, _MNRL):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (InfoNCE with in-batch negatives),
    its score stage computed by fastneg's fused op. Same arguments and numbers; see the module
    docstring for fastneg's extra keyword arguments.

    Inputs: (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples;
    labels are unused.
    """

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = _st_util.cos_sim,
        gather_across_devices: bool = False,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        mask_duplicates: bool = False,
        margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        weighting: object = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, scale, _similarity_argument(similarity_fct), gather_across_devices, tuple(directions),
                         partition_mode, hardness_mode, hardness_strength)
        self._init_ranking_rules(mask_duplicates, margin, relative_margin, max_score, weighting, backend)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        hashes = self._hashes(sentence_features)  # before the model sees (and may edit) the features
        embeddings = _embed_columns(_module_of(_MNRL), self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, hashes=hashes)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor] = None, *,
                                     hashes: Optional[list[Tensor]] = None) -> Tensor:
        """The loss from each column's embeddings. ``hashes`` (one [B] int64 per column, e.g. from
        :func:`text_hashes`) masks duplicates as ``mask_duplicates`` does in ``forward``."""
        kind = self._fused_kind()
        if kind is None:
            if self._has_rules():
                return self._dense_rules_loss(embeddings, hashes, _module_of(_MNRL))
            return super().compute_loss_from_embeddings(embeddings, labels)
        return self._fused_ranking_loss(embeddings, hashes, kind, _module_of(_MNRL))

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), **self._fastneg_config()}

    @property
    def citation(self) -> str:
        return super().citation + self._fastneg_citation(_MNRL)


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``: query -> documents and
    document -> queries, one softmax each, averaged (``directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction"``). Not deprecated here: it is a name for that configuration."""

    def __init__(self, model: Any, scale: float = 20.0,
                 similarity_fct: Callable[[Tensor, Tensor], Tensor] = _st_util.cos_sim,
                 gather_across_devices: bool = False, **fastneg_options: Any) -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", **fastneg_options)


_CMNRL = _st_losses.CachedMultipleNegativesRankingLoss


class CachedMultipleNegativesRankingLoss(_RankingMixin, _CMNRL):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss``: the same loss with a gradient
    cache (the original's), so the batch size is bounded by the loss rather than by the encoder's
    activations. ``calculate_loss`` computes the whole batch in one fused call (linear memory)
    instead of the original's mini-batch chunks of B x N scores; its gradients are the same."""

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = _st_util.cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[str] = None,
        hardness_strength: float = 0.0,
        *,
        mask_duplicates: bool = False,
        margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        weighting: object = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        super().__init__(model, scale, _similarity_argument(similarity_fct), mini_batch_size, mini_batch_num_tokens,
                         gather_across_devices, tuple(directions), partition_mode, show_progress_bar, hardness_mode,
                         hardness_strength)
        self._init_ranking_rules(mask_duplicates, margin, relative_margin, max_score, weighting, backend)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from per-mini-batch embeddings; with ``with_backward``,
        back-propagates it to the embeddings and returns it detached."""
        kind = self._fused_kind()
        if kind is None and not self._has_rules():
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(column) for column in reps]
        if kind is None:
            loss = self._dense_rules_loss(embeddings, self._pending_hashes, _module_of(_CMNRL))
        else:
            loss = self._fused_ranking_loss(embeddings, self._pending_hashes, kind, _module_of(_CMNRL))
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        object.__setattr__(self, "_pending_hashes", self._hashes(sentence_features))
        try:
            return super().forward(sentence_features, labels)
        finally:
            object.__setattr__(self, "_pending_hashes", None)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor] = None, *,
                                     hashes: Optional[list[Tensor]] = None) -> Tensor:
        """The loss from each column's full embeddings (no gradient cache), as ``calculate_loss``
        computes it; ``hashes`` as in :meth:`MultipleNegativesRankingLoss.compute_loss_from_embeddings`."""
        object.__setattr__(self, "_pending_hashes", hashes)
        try:
            return self.calculate_loss([[e] for e in embeddings], labels)
        finally:
            object.__setattr__(self, "_pending_hashes", None)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), **self._fastneg_config()}

    @property
    def citation(self) -> str:
        return super().citation + self._fastneg_citation(_CMNRL)


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesSymmetricRankingLoss``: the cached loss with
    ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``."""

    def __init__(self, model: Any, scale: float = 20.0,
                 similarity_fct: Callable[[Tensor, Tensor], Tensor] = _st_util.cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, gather_across_devices: bool = False,
                 show_progress_bar: bool = False, **fastneg_options: Any) -> None:
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         show_progress_bar=show_progress_bar, **fastneg_options)

    @property
    def citation(self) -> str:
        return _st_losses.CachedMultipleNegativesSymmetricRankingLoss.citation.fget(self) + \
            self._fastneg_citation(_st_losses.CachedMultipleNegativesSymmetricRankingLoss)


# --- GISTEmbedLoss -----------------------------------------------------------------------------------

class _GistMixin(_FastnegRules):
    _margin_key = "score_margin"
    temperature: float
    margin_strategy: str
    margin: float
    contrast_anchors: bool
    contrast_positives: bool
    gather_across_devices: bool

    def _fused_gist(self, original: type) -> bool:
        """Whether the fused op computes what this instance's original would: cosine scores through
        the class's own ``sim_matrix`` and a default cross-entropy, at a positive temperature."""
        reasons = []
        sim = getattr(self, "similarity_fct", None)
        if not (type(sim) is nn.CosineSimilarity and sim.dim == -1):
            reasons.append("similarity_fct is not nn.CosineSimilarity(dim=-1)")
        if "sim_matrix" in self.__dict__ or type(self).sim_matrix is not original.sim_matrix:  # type: ignore[attr-defined]
            reasons.append("sim_matrix is overridden")
        ce = getattr(self, "cross_entropy_loss", None)
        if not (type(ce) is nn.CrossEntropyLoss and ce.weight is None and ce.label_smoothing == 0.0
                and ce.reduction == "mean"):
            reasons.append("cross_entropy_loss is not the default nn.CrossEntropyLoss()")
        if not self.temperature > 0:
            reasons.append(f"temperature {self.temperature} is not positive")
        if not reasons:
            return True
        self._refuse_rules("; ".join(reasons))
        _warn_dense(self, "; ".join(reasons))  # type: ignore[arg-type]
        return False

    def _gist_loss(self, embeddings: Sequence[Tensor], guide_embeddings: Sequence[Tensor],
                   hashes: Optional[list[Tensor]], module: ModuleType) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        anchors = _prepare(embeddings[0], "cos")
        candidates = [_prepare(e, "cos") for e in embeddings[1:]]
        anchors_guide = _prepare(guide_embeddings[0].detach(), "cos")
        candidates_guide = [_prepare(g.detach(), "cos") for g in guide_embeddings[1:]]
        offset = 0
        anchor_hashes = hashes[0] if hashes is not None else None
        candidate_hashes = hashes[1:] if hashes is not None else None
        if self.gather_across_devices:
            offset = module.get_rank() * anchors.shape[0]
            candidates = [module.all_gather_with_grad(c) for c in candidates]
            candidates_guide = [module.all_gather_with_grad(c).detach() for c in candidates_guide]
            candidate_hashes = _gather_hashes(candidate_hashes)  # type: ignore[arg-type]
        loss = gist_loss(anchors, candidates, anchors_guide, candidates_guide, offset=offset,
                         temperature=self.temperature, margin_strategy=self.margin_strategy, margin=self.margin,
                         contrast_anchors=self.contrast_anchors, contrast_positives=self.contrast_positives,
                         rules=self.rules, anchor_hashes=anchor_hashes, candidate_hashes=candidate_hashes,
                         backend=self.backend)
        return loss.mean().to(embeddings[0].dtype)


_GIST = _st_losses.GISTEmbedLoss


class GISTEmbedLoss(_GistMixin, _GIST):
    """sentence-transformers' ``GISTEmbedLoss``: in-batch negatives that a guide model scores above
    the positive (minus ``margin``) are masked; anchor-positive, anchor-anchor, positive-positive and
    anchor-negative blocks share one softmax. The guide mask is computed inside the fused op.
    Any number of negative columns (the original takes at most one)."""

    def __init__(
        self,
        model: Any,
        guide: Any,
        temperature: float = 0.01,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        mask_duplicates: bool = False,
        score_margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        weighting: object = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                         gather_across_devices)
        self._init_fastneg(mask_duplicates, score_margin, relative_margin, max_score, weighting, backend)

    def _guide_features(self, sentence_features: list[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """The guide's features, as the original builds them: the model's own (copied before the
        model's forward may edit them) or the decoded texts preprocessed by the guide."""
        if not self.must_retokenize:
            return [dict(f) for f in sentence_features]
        out = []
        for features in sentence_features:
            input_ids = features["input_ids"]
            if "cu_seq_lens_q" in features:
                flat, cu = input_ids[0].tolist(), features["cu_seq_lens_q"].tolist()
                input_ids = [flat[b:e] for b, e in zip(cu[:-1], cu[1:])]
            decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            out.append(_st_util.batch_to_device(self.guide.preprocess(decoded), self.guide.device))
        return out

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        if not self._fused_gist(_GIST):
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        module = _module_of(_GIST)
        hashes = self._hashes(sentence_features)
        with torch.no_grad():
            guide_features = self._guide_features(sentence_features)
        embeddings = _embed_columns(module, self.model, sentence_features)
        with torch.no_grad():
            guide_embeddings = _embed_columns(module, self.guide, guide_features)
        return self._gist_loss(embeddings, guide_embeddings, hashes, module)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), **self._fastneg_config()}

    @property
    def citation(self) -> str:
        return super().citation + self._fastneg_citation(_GIST)


_CGIST = _st_losses.CachedGISTEmbedLoss


class CachedGISTEmbedLoss(_GistMixin, _CGIST):
    """sentence-transformers' ``CachedGISTEmbedLoss``: :class:`GISTEmbedLoss` with the original's
    gradient cache; ``calculate_loss(reps, reps_guided, with_backward=...)`` computes the whole batch
    in one fused call."""

    def __init__(
        self,
        model: Any,
        guide: Any,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        show_progress_bar: bool = False,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        *,
        mask_duplicates: bool = False,
        score_margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        weighting: object = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        super().__init__(model, guide, temperature, mini_batch_size, mini_batch_num_tokens, show_progress_bar,
                         margin_strategy, margin, contrast_anchors, contrast_positives, gather_across_devices)
        self._init_fastneg(mask_duplicates, score_margin, relative_margin, max_score, weighting, backend)

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        if not self._fused_gist(_CGIST):
            return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        loss = self._gist_loss([torch.cat(c) for c in reps], [torch.cat(c) for c in reps_guided],
                               self._pending_hashes, _module_of(_CGIST))
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        object.__setattr__(self, "_pending_hashes", self._hashes(sentence_features))
        try:
            return super().forward(sentence_features, labels)
        finally:
            object.__setattr__(self, "_pending_hashes", None)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), **self._fastneg_config()}

    @property
    def citation(self) -> str:
        return _GIST.citation.fget(self) + _CMNRL.citation.fget(self) + self._fastneg_citation(_CGIST)
