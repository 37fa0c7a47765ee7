"""The ranking losses: (Cached)MultipleNegatives(Symmetric)RankingLoss, each one fused call per
score block (:mod:`.scores`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor

from ...rules import Rules
from ._common import (
    _embed_columns,
    _FastnegRules,
    _gather_hashes,
    _module_of,
    _prepare,
    _similarity_argument,
    _st_losses,
    _st_util,
    _warn_dense,
    fused_similarity,
)
from .scores import ranking_loss

__all__ = ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesRankingLoss",
           "CachedMultipleNegativesSymmetricRankingLoss"]


class _RankingMixin(_FastnegRules):
    scale: float
    similarity_fct: Any
    gather_across_devices: bool
    directions: tuple[str, ...]
    partition_mode: str
    hardness_mode: Optional[str]
    hardness_strength: float

    _rule_fields = ("margin", "relative_margin", "max_score", "weighting", "false_negatives")

    def _init_ranking_rules(self, mask_duplicates: bool, rules: Optional[Rules], backend: str, mask_labels: bool,
                            **keywords: object) -> None:
        self._init_fastneg(mask_duplicates, rules, backend, **keywords)
        if self.hardness_mode is not None and self.hardness_strength > 0 and self.rules.weighting is not None:
            raise ValueError("hardness_mode and weighting are both negative weightings: use one of them")
        if not isinstance(mask_labels, bool):
            raise TypeError(f"mask_labels must be True or False, got {mask_labels!r}")
        object.__setattr__(self, "mask_labels", mask_labels)

    def _row_labels(self, labels: Optional[Tensor], rows: int) -> Optional[Tensor]:
        """The dataset's label column as the rows' relevance groups (``mask_labels``), else None."""
        if not self.mask_labels:
            return None
        if labels is None:
            raise ValueError(f"{type(self).__name__}: mask_labels=True needs the labels: a 'label' column in the "
                             "dataset (one integer group per row), or labels= in compute_loss_from_embeddings")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != rows:
            raise ValueError(f"labels: mask_labels needs one integer per row ([{rows}]), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels: mask_labels needs integer group ids, got {labels.dtype}")
        if rows and int(labels.min()) < 0:
            raise ValueError("labels: mask_labels needs group ids >= 0")
        return labels.long()

    def _fused_ranking_loss(self, embeddings: Sequence[Tensor], hashes: Optional[list[Tensor]], kind: str,
                            module: ModuleType, labels: Optional[Tensor] = None) -> Tensor:
        """The original's loss (a mean over the local rows) through the fused op."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = _prepare(embeddings[0], kind), [_prepare(e, kind) for e in embeddings[1:]]
        local = queries.shape[0]
        labels = self._row_labels(labels, local)
        offset = 0
        if self.gather_across_devices:
            queries = module.all_gather_with_grad(queries)
            docs = [module.all_gather_with_grad(d) for d in docs]
            hashes = _gather_hashes(hashes)
            if labels is not None:
                labels = _gather_hashes([labels])[0]  # type: ignore[index]
            offset = module.get_rank() * local
        loss = ranking_loss(
            queries, docs, offset=offset, local=local, temperature=1.0 / self.scale, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, rules=self.rules,
            query_hashes=hashes[0] if hashes is not None else None,
            doc_hashes=hashes[1:] if hashes is not None else None, labels=labels, backend=self.backend)
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
                          module: ModuleType, labels: Optional[Tensor] = None) -> Tensor:
        """fastneg's rules on the original's dense scores (``similarity_fct`` not fused; query -> documents
        only): the dense reference's masks and weights over ``similarity_fct(queries, documents)``."""
        from ...reference import rows_from_scores
        from .scores import NO_LABEL

        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        queries, docs = embeddings[0], list(embeddings[1:])
        local = queries.shape[0]
        labels = self._row_labels(labels, local)
        offset = 0
        if self.gather_across_devices:
            docs = [module.all_gather_with_grad(d) for d in docs]
            hashes = _gather_hashes(hashes)
            if labels is not None:
                labels = _gather_hashes([labels])[0]  # type: ignore[index]
            offset = module.get_rank() * local
        scores = self.similarity_fct(queries, torch.cat(docs))  # [B, B_world x columns]
        rows = torch.arange(offset, offset + local, device=queries.device)
        q_levels, k_levels = [], []
        if hashes is not None:  # keys whose text is the row's positive's
            q_levels.append(hashes[1][rows])
            k_levels.append(torch.cat(hashes[1:]))
        if labels is not None:  # the positives of rows with the row's label
            q_levels.append(labels[rows])
            k_levels.append(torch.cat([labels] + [torch.full_like(labels, NO_LABEL)] * (len(docs) - 1)))
        query_labels = key_labels = None
        if q_levels:
            query_labels, key_labels = torch.stack(q_levels, 1), torch.stack(k_levels, 1)[None]
        loss = rows_from_scores(scores, rows[:, None], 1.0 / self.scale, self.rules.plan(), query_labels, key_labels,
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
        mask_labels: bool = False,
        false_negatives: str = "mask",
        rules: Optional[Rules] = None,
    ) -> None:
        super().__init__(model, scale, _similarity_argument(similarity_fct), gather_across_devices, tuple(directions),
                         partition_mode, hardness_mode, hardness_strength)
        self._init_ranking_rules(mask_duplicates, rules, backend, mask_labels, margin=margin,
                                 relative_margin=relative_margin, max_score=max_score, weighting=weighting,
                                 false_negatives=false_negatives)

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
                return self._dense_rules_loss(embeddings, hashes, _module_of(_MNRL), labels)
            return super().compute_loss_from_embeddings(embeddings, labels)
        return self._fused_ranking_loss(embeddings, hashes, kind, _module_of(_MNRL), labels)

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
        mask_labels: bool = False,
        false_negatives: str = "mask",
        rules: Optional[Rules] = None,
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        super().__init__(model, scale, _similarity_argument(similarity_fct), mini_batch_size, mini_batch_num_tokens,
                         gather_across_devices, tuple(directions), partition_mode, show_progress_bar, hardness_mode,
                         hardness_strength)
        self._init_ranking_rules(mask_duplicates, rules, backend, mask_labels, margin=margin,
                                 relative_margin=relative_margin, max_score=max_score, weighting=weighting,
                                 false_negatives=false_negatives)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from per-mini-batch embeddings; with ``with_backward``,
        back-propagates it to the embeddings and returns it detached."""
        kind = self._fused_kind()
        if kind is None and not self._has_rules():
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(column) for column in reps]
        if kind is None:
            loss = self._dense_rules_loss(embeddings, self._pending_hashes, _module_of(_CMNRL), labels)
        else:
            loss = self._fused_ranking_loss(embeddings, self._pending_hashes, kind, _module_of(_CMNRL), labels)
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
