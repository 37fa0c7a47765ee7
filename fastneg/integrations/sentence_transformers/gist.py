"""GISTEmbedLoss and CachedGISTEmbedLoss: the guide's masks and the student's scores in fused
calls (:mod:`.scores`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...rules import Rules
from ._common import (
    _embed_columns,
    _FastnegRules,
    _gather_hashes,
    _module_of,
    _prepare,
    _st_losses,
    _st_util,
    _warn_dense,
)
from .scores import gist_loss

__all__ = ["GISTEmbedLoss", "CachedGISTEmbedLoss"]


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
        rules: Optional[Rules] = None,
    ) -> None:
        super().__init__(model, guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                         gather_across_devices)
        self._init_fastneg(mask_duplicates, rules, backend, margin=score_margin, relative_margin=relative_margin,
                           max_score=max_score, weighting=weighting)

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
        rules: Optional[Rules] = None,
    ) -> None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}")
        super().__init__(model, guide, temperature, mini_batch_size, mini_batch_num_tokens, show_progress_bar,
                         margin_strategy, margin, contrast_anchors, contrast_positives, gather_across_devices)
        self._init_fastneg(mask_duplicates, rules, backend, margin=score_margin, relative_margin=relative_margin,
                           max_score=max_score, weighting=weighting)

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
        return (_GIST.citation.fget(self) + _st_losses.CachedMultipleNegativesRankingLoss.citation.fget(self)
                + self._fastneg_citation(_CGIST))
