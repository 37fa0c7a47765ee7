"""Drop-in replacements for sentence-transformers' in-batch-negative losses.

::

    from fastneg.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)                      # same numbers as the original
    loss = MultipleNegativesRankingLoss(model, mask_duplicates=True,  # and what it lacks
                                        margin=0.05, weighting=fastneg.SimANS())

Each class takes the constructor arguments of the sentence-transformers (5.x / 6.x) loss of the
same name, plus fastneg's own keyword arguments:

- ``mask_duplicates``: hash each column's token ids before embedding and mask keys whose text is
  identical to the row's positive (document columns) or to the row's query (query columns), so
  batches need no de-duplicating sampler. Needs ``forward`` (the hashes come from the features);
  ``compute_loss_from_embeddings`` has no texts to hash.
- ``margin``, ``relative_margin``, ``max_score`` (SPEC section 2; on GIST the first is called
  ``score_margin``, since GIST's ``margin`` is the guide's): compared with each row's positive
  score in every block, raw similarities (cosine by default).
- ``weighting``: ``None``, ``"simans"``, :class:`fastneg.SimANS` or :class:`fastneg.Hardness`
  over every block (not together with ``hardness_mode``, which is itself a weighting).
- ``backend``: as in :func:`fastneg.info_nce`.

The loss is computed by the fused op (memory linear in the batch); all score blocks of a row
are one fused call (see ``fastneg/integrations/_losses.py``). The cached variants implement the
gradient-cache contract sentence-transformers uses (``calculate_loss(reps, ..., with_backward=)``,
``uses_gradient_cache``), so they also work inside ``MatryoshkaLoss``; their loss stage is not
chunked since it needs no B x N memory.

Nothing here imports a sentence-transformers module path: the model is used through
``model(features)["sentence_embedding"]``, ``model.tokenizer`` and ``model.preprocess`` /
``model.tokenize``, which both major versions provide.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..cached import RandState, batch_rows, chunk_ranges, slice_rows
from ..options import Hardness, SimANS, check_backend
from ._losses import DIRECTIONS, HARDNESS_MODES, BlockRules, gist_loss, ranking_loss
from ._mining import mine_hard_negatives

__all__ = [
    "mine_hard_negatives",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "GISTEmbedLoss",
    "CachedGISTEmbedLoss",
    "text_hashes",
]

_HASH_BASE = 1_000_003
_HASH_MASK = (1 << 63) - 1
_HASH_LENGTH = 0x9E3779B97F4A7C15 % (1 << 62)


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


def _similarity_kind(similarity_fct: Union[Callable, str]) -> str:
    """"cos" or "dot": the fused op computes dot products of (optionally normalised) embeddings."""
    if isinstance(similarity_fct, str):
        name = similarity_fct
    elif isinstance(similarity_fct, partial):
        name = getattr(similarity_fct.func, "__name__", "")
    else:
        name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    name = name.lower()
    if name in ("cos_sim", "cosine", "cos", "cosinesimilarity"):
        return "cos"
    if name in ("dot_score", "dot", "dot_product", "mm"):
        return "dot"
    raise ValueError(
        f"similarity_fct must be sentence_transformers.util.cos_sim or dot_score (or 'cos' / 'dot'), got {name!r}: "
        "the fused op computes dot products of the (normalised, for cosine) embeddings")


def _prepare(x: Tensor, kind: str) -> Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=-1) if kind == "cos" else x


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(t: Tensor, with_grad: bool = True) -> Tensor:
    """All-gather along dim 0 across the default process group (autograd-aware), identity when
    not distributed. Every rank must hold the same number of rows, as in sentence-transformers."""
    if not _is_distributed():
        return t
    if with_grad and t.requires_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(t))
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out)


def _rank() -> int:
    return torch.distributed.get_rank() if _is_distributed() else 0


def _embed(model: Any, features: dict[str, Tensor]) -> Tensor:
    return model(features)["sentence_embedding"]


def _similarity_name(kind: str) -> str:
    return "cos_sim" if kind == "cos" else "dot_score"


def _weighting_repr(w: object) -> object:
    if isinstance(w, (SimANS, Hardness)):
        return repr(w)
    return w


# --- gradient cache (GradCache, Gao et al. 2021) ---------------------------------------------------

def _ranges(features: dict[str, Any], mini_batch_size: int, mini_batch_num_tokens: Optional[int]) -> list[tuple[int, int]]:
    """Mini-batch row ranges: ``mini_batch_size`` rows each, or greedily packed to at most
    ``mini_batch_num_tokens`` attended tokens (a longer single row gets a range of its own)."""
    n = batch_rows(features)
    if mini_batch_num_tokens is None:
        return chunk_ranges(n, mini_batch_size)
    if not isinstance(features.get("attention_mask"), Tensor):
        raise ValueError("mini_batch_num_tokens needs an 'attention_mask' in the features")
    cumulative = features["attention_mask"].sum(1).cumsum(0).tolist()
    out, begin = [], 0
    while begin < n:
        before = cumulative[begin - 1] if begin else 0
        end = max(bisect.bisect_right(cumulative, before + mini_batch_num_tokens), begin + 1)
        out.append((begin, end))
        begin = end
    return out


def _slice(features: dict[str, Any], begin: int, end: int) -> dict[str, Any]:
    if "cu_seq_lens_q" in features:
        raise ValueError("the cached fastneg losses take padded features, not flattened (cu_seq_lens) batches")
    out = slice_rows(features, begin, end)
    assert isinstance(out, dict)
    mask = out.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] > 0:
        # drop the trailing padding columns this mini-batch does not use (leading padding is kept)
        width = mask.shape[1]
        active = mask.bool().any(0).nonzero()
        end_col = int(active.max()) + 1 if len(active) else width
        if end_col < width:
            out = {k: (v[:, :end_col] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v)
                   for k, v in out.items()}
    return out


class _GradientCache:
    """The three GradCache steps for a loss with ``model``, ``mini_batch_size``,
    ``mini_batch_num_tokens``, ``show_progress_bar`` and ``calculate_loss``."""

    model: Any
    mini_batch_size: int
    mini_batch_num_tokens: Optional[int]
    show_progress_bar: bool
    uses_gradient_cache = True  # read by sentence-transformers' MatryoshkaLoss

    def _init_cache(self, mini_batch_size: int, mini_batch_num_tokens: Optional[int], show_progress_bar: bool) -> None:
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
            raise ValueError(f"mini_batch_num_tokens must be a positive integer or None, got {mini_batch_num_tokens}")
        self.mini_batch_size = int(mini_batch_size)
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = bool(show_progress_bar)
        self._pending_hashes: Optional[list[Tensor]] = None

    def _progress(self, items: Sequence[Any], desc: str) -> Iterable[Any]:
        if not self.show_progress_bar:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc)

    def _embed_iter(self, model: Any, features: dict[str, Any], ranges: list[tuple[int, int]], with_grad: bool,
                    states: Optional[list[RandState]] = None, save_states: bool = False
                    ) -> Iterator[tuple[Tensor, Optional[RandState]]]:
        for index, (begin, end) in enumerate(self._progress(ranges, "Embed mini-batches")):
            mb = _slice(features, begin, end)
            replay = states[index] if states is not None else nullcontext()
            with replay, (nullcontext() if with_grad else torch.no_grad()):
                state = RandState(*mb.values()) if save_states else None
                yield _embed(model, mb), state

    def _cached_forward(self, sentence_features: list[dict[str, Any]], extra: Any) -> Tensor:
        grad_enabled = torch.is_grad_enabled()
        ranges = [_ranges(f, self.mini_batch_size, self.mini_batch_num_tokens) for f in sentence_features]
        reps: list[list[Tensor]] = []
        states: list[list[RandState]] = []
        for features, column_ranges in zip(sentence_features, ranges):
            column, column_states = [], []
            for rep, state in self._embed_iter(self.model, features, column_ranges, False, save_states=grad_enabled):
                column.append(rep.detach().requires_grad_(grad_enabled))
                column_states.append(state)
            reps.append(column)
            states.append(column_states)
        if not grad_enabled:
            return self.calculate_loss(reps, extra)  # type: ignore[attr-defined]
        loss = self.calculate_loss(reps, extra, with_backward=True)  # type: ignore[attr-defined]
        cache = [[r.grad if r.grad is not None else torch.zeros_like(r) for r in column] for column in reps]
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(self._replay, sentence_features=sentence_features, ranges=ranges, cache=cache,
                                   states=states))
        return loss

    def _replay(self, grad_output: Tensor, *, sentence_features: list[dict[str, Any]],
                ranges: list[list[tuple[int, int]]], cache: list[list[Tensor]], states: list[list[RandState]]) -> None:
        """Backward hook: re-embed each mini-batch with a graph, RNG replayed, and back-propagate
        its cached embedding gradient (scaled by the outer gradient of the loss)."""
        with torch.enable_grad():
            for features, column_ranges, grads, column_states in zip(sentence_features, ranges, cache, states):
                it = self._embed_iter(self.model, features, column_ranges, True, states=column_states)
                for (rep, _), grad in zip(it, grads):
                    if rep.requires_grad:
                        surrogate = torch.dot(rep.flatten().float(), grad.flatten().float()) * grad_output
                        surrogate.backward()


# --- MultipleNegativesRankingLoss -------------------------------------------------------------------

class _RankingOptions:
    """Validation and config shared by the (cached) ranking losses."""

    def _init_ranking(self, scale: float, similarity_fct: Union[Callable, str], gather_across_devices: bool,
                      directions: Sequence[str], partition_mode: str, hardness_mode: Optional[str],
                      hardness_strength: float, mask_duplicates: bool, margin: Optional[float],
                      relative_margin: Optional[float], max_score: Optional[float], weighting: object,
                      backend: str) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self._kind = _similarity_kind(similarity_fct)
        self.gather_across_devices = bool(gather_across_devices)
        directions = tuple(directions)
        if not directions:
            raise ValueError("directions must name at least one direction")
        unknown = set(directions) - set(DIRECTIONS)
        if unknown:
            raise ValueError(f"directions: unknown {sorted(unknown)}; valid: {DIRECTIONS}")
        if "query_to_doc" not in directions:
            raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
        self.directions = directions
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
            raise ValueError("partition_mode='per_direction' needs every direction to contain the positive pair: "
                             "'query_to_query' and 'doc_to_doc' do not; use partition_mode='joint'")
        self.partition_mode = partition_mode
        if hardness_mode not in HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {hardness_mode!r}")
        if hardness_strength < 0:
            raise ValueError(f"hardness_strength must be >= 0, got {hardness_strength}")
        self.hardness_mode = hardness_mode
        self.hardness_strength = float(hardness_strength)
        self.mask_duplicates = bool(mask_duplicates)
        self.rules = BlockRules(margin, relative_margin, max_score, weighting)
        self.rules.rules()  # validates the values now
        if hardness_mode is not None and hardness_strength > 0 and weighting is not None:
            raise ValueError("hardness_mode and weighting are both negative weightings: use one of them")
        check_backend(backend)
        self.backend = backend

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def _ranking_loss(self, embeddings: Sequence[Tensor], hashes: Optional[list[Tensor]]) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"expected at least 2 embedding columns (anchor, positive, ...), got {len(embeddings)}")
        queries, docs = _prepare(embeddings[0], self._kind), [_prepare(e, self._kind) for e in embeddings[1:]]
        local = queries.shape[0]
        offset = 0
        if self.gather_across_devices and _is_distributed():
            queries = _gather(queries)
            docs = [_gather(d) for d in docs]
            hashes = [_gather(h, with_grad=False) for h in hashes] if hashes is not None else None
            offset = _rank() * local
        loss = ranking_loss(
            queries, docs, offset=offset, local=local, temperature=self.temperature, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, rules=self.rules,
            query_hashes=hashes[0] if hashes is not None else None,
            doc_hashes=hashes[1:] if hashes is not None else None, backend=self.backend)
        return loss.mean().to(embeddings[0].dtype)

    def _ranking_config(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self._kind),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "mask_duplicates": self.mask_duplicates,
            "margin": self.rules.margin,
            "relative_margin": self.rules.relative_margin,
            "max_score": self.rules.max_score,
            "weighting": _weighting_repr(self.rules.weighting),
            "implementation": "fastneg",
        }

    def _hashes(self, sentence_features: Sequence[dict[str, Tensor]]) -> Optional[list[Tensor]]:
        return [text_hashes(f) for f in sentence_features] if self.mask_duplicates else None


_MNRL_CITATION = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""

_GTE_CITATION = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""

_GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

_GIST_CITATION = """
@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


class MultipleNegativesRankingLoss(_RankingOptions, nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (InfoNCE with in-batch negatives),
    computed by fastneg's fused op. Same arguments and numbers; see the module docstring for
    fastneg's extra keyword arguments.

    Inputs: (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples;
    labels are unused.
    """

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Union[Callable, str] = "cos_sim",
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
        super().__init__()
        self.model = model
        self._init_ranking(scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
                           hardness_strength, mask_duplicates, margin, relative_margin, max_score, weighting, backend)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        hashes = self._hashes(sentence_features)
        embeddings = [_embed(self.model, f) for f in sentence_features]
        return self._ranking_loss(embeddings, hashes)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor] = None, *,
                                     hashes: Optional[list[Tensor]] = None) -> Tensor:
        """The loss from each column's embeddings. ``hashes`` (one [B] int64 per column, e.g. from
        :func:`text_hashes`) masks duplicates as ``mask_duplicates`` does in ``forward``."""
        return self._ranking_loss(embeddings, hashes)

    def get_config_dict(self) -> dict[str, Any]:
        return self._ranking_config()

    @property
    def citation(self) -> str:
        if set(self.directions) == set(DIRECTIONS) and self.partition_mode == "joint":
            return _GTE_CITATION
        return _MNRL_CITATION


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``: query -> documents and
    document -> queries, one softmax each, averaged (``directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction"``)."""

    def __init__(self, model: Any, scale: float = 20.0, similarity_fct: Union[Callable, str] = "cos_sim",
                 gather_across_devices: bool = False, **fastneg_options: Any) -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", **fastneg_options)


class CachedMultipleNegativesRankingLoss(_GradientCache, _RankingOptions, nn.Module):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss``: the same loss with a gradient
    cache, so the batch size is bounded by the loss (linear in the batch here) rather than by the
    encoder's activations, which live for one mini-batch at a time."""

    def __init__(
        self,
        model: Any,
        scale: float = 20.0,
        similarity_fct: Union[Callable, str] = "cos_sim",
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
        super().__init__()
        self.model = model
        self._init_cache(mini_batch_size, mini_batch_num_tokens, show_progress_bar)
        self._init_ranking(scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
                           hardness_strength, mask_duplicates, margin, relative_margin, max_score, weighting, backend)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        """The loss over the whole batch from per-mini-batch embeddings; with ``with_backward``,
        back-propagates it to the embeddings and returns it detached."""
        loss = self._ranking_loss([torch.cat(column) for column in reps], self._pending_hashes)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"expected at least 2 input columns, got {len(sentence_features)}")
        self._pending_hashes = self._hashes(sentence_features)
        try:
            return self._cached_forward(sentence_features, labels)
        finally:
            self._pending_hashes = None

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor] = None, *,
                                     hashes: Optional[list[Tensor]] = None) -> Tensor:
        """The loss from each column's embeddings. ``hashes`` (one [B] int64 per column, e.g. from
        :func:`text_hashes`) masks duplicates as ``mask_duplicates`` does in ``forward``."""
        return self._ranking_loss(embeddings, hashes)

    def get_config_dict(self) -> dict[str, Any]:
        return {**self._ranking_config(), "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens}

    @property
    def citation(self) -> str:
        return _GRADCACHE_CITATION


# --- GISTEmbedLoss -----------------------------------------------------------------------------------

class _GistOptions:
    model: Any
    guide: Any

    def _init_gist(self, guide: Any, temperature: float, margin_strategy: str, margin: float,
                   contrast_anchors: bool, contrast_positives: bool, gather_across_devices: bool,
                   mask_duplicates: bool, score_margin: Optional[float], relative_margin: Optional[float],
                   max_score: Optional[float], weighting: object, backend: str) -> None:
        self.guide = guide
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        if margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"margin_strategy must be 'absolute' or 'relative', got {margin_strategy!r}")
        self.margin_strategy = margin_strategy
        self.margin = float(margin)
        self.contrast_anchors = bool(contrast_anchors)
        self.contrast_positives = bool(contrast_positives)
        self.gather_across_devices = bool(gather_across_devices)
        self.mask_duplicates = bool(mask_duplicates)
        self.rules = BlockRules(score_margin, relative_margin, max_score, weighting)
        self.rules.rules()
        check_backend(backend)
        self.backend = backend
        model_tok, guide_tok = getattr(self.model, "tokenizer", None), getattr(guide, "tokenizer", None)
        if model_tok is None or guide_tok is None:
            raise ValueError("GISTEmbedLoss: the model and the guide must both have a tokenizer attribute")
        self.must_retokenize = (
            model_tok.get_vocab() != guide_tok.get_vocab()
            or getattr(guide, "max_seq_length", 0) < getattr(self.model, "max_seq_length", 0))

    def _guide_features(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The features the guide sees: the model's own when the tokenizers agree, else the
        decoded texts tokenized by the guide (``preprocess`` in sentence-transformers 6, ``tokenize`` in 5)."""
        if not self.must_retokenize:
            return dict(features)
        texts = self.model.tokenizer.batch_decode(features["input_ids"], skip_special_tokens=True)
        tokenize = getattr(self.guide, "preprocess", None) or self.guide.tokenize
        device = next(self.guide.parameters()).device
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in tokenize(texts).items()}

    def _gist_loss(self, embeddings: Sequence[Tensor], guide_embeddings: Sequence[Tensor],
                   hashes: Optional[list[Tensor]]) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"expected at least 2 embedding columns (anchor, positive, ...), got {len(embeddings)}")
        anchors = _prepare(embeddings[0], "cos")
        candidates = [_prepare(e, "cos") for e in embeddings[1:]]
        anchors_guide = _prepare(guide_embeddings[0].detach(), "cos")
        candidates_guide = [_prepare(g.detach(), "cos") for g in guide_embeddings[1:]]
        offset = 0
        anchor_hashes = hashes[0] if hashes is not None else None
        candidate_hashes = hashes[1:] if hashes is not None else None
        if self.gather_across_devices and _is_distributed():
            offset = _rank() * anchors.shape[0]
            candidates = [_gather(c) for c in candidates]
            candidates_guide = [_gather(c, with_grad=False) for c in candidates_guide]
            if candidate_hashes is not None:
                candidate_hashes = [_gather(h, with_grad=False) for h in candidate_hashes]
        loss = gist_loss(anchors, candidates, anchors_guide, candidates_guide, offset=offset,
                         temperature=self.temperature, margin_strategy=self.margin_strategy, margin=self.margin,
                         contrast_anchors=self.contrast_anchors, contrast_positives=self.contrast_positives,
                         rules=self.rules, anchor_hashes=anchor_hashes, candidate_hashes=candidate_hashes,
                         backend=self.backend)
        return loss.mean().to(embeddings[0].dtype)

    def _gist_config(self) -> dict[str, Any]:
        return {
            "guide": self.guide,
            "temperature": self.temperature,
            "margin_strategy": self.margin_strategy,
            "margin": self.margin,
            "contrast_anchors": self.contrast_anchors,
            "contrast_positives": self.contrast_positives,
            "gather_across_devices": self.gather_across_devices,
            "mask_duplicates": self.mask_duplicates,
            "score_margin": self.rules.margin,
            "relative_margin": self.rules.relative_margin,
            "max_score": self.rules.max_score,
            "weighting": _weighting_repr(self.rules.weighting),
            "implementation": "fastneg",
        }

    @property
    def citation(self) -> str:
        return _GIST_CITATION


class GISTEmbedLoss(_GistOptions, nn.Module):
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
        super().__init__()
        self.model = model
        self._init_gist(guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                        gather_across_devices, mask_duplicates, score_margin, relative_margin, max_score, weighting,
                        backend)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        hashes = [text_hashes(f) for f in sentence_features] if self.mask_duplicates else None
        guide_features = [self._guide_features(f) for f in sentence_features]
        embeddings = [_embed(self.model, f) for f in sentence_features]
        with torch.no_grad():
            guide_embeddings = [_embed(self.guide, f) for f in guide_features]
        return self._gist_loss(embeddings, guide_embeddings, hashes)

    def get_config_dict(self) -> dict[str, Any]:
        return self._gist_config()


class CachedGISTEmbedLoss(_GradientCache, _GistOptions, nn.Module):
    """sentence-transformers' ``CachedGISTEmbedLoss``: :class:`GISTEmbedLoss` with a gradient cache.
    ``calculate_loss(reps, reps_guided, with_backward=...)`` as in sentence-transformers."""

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
        super().__init__()
        self.model = model
        self._init_cache(mini_batch_size, mini_batch_num_tokens, show_progress_bar)
        self._init_gist(guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                        gather_across_devices, mask_duplicates, score_margin, relative_margin, max_score, weighting,
                        backend)

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        loss = self._gist_loss([torch.cat(c) for c in reps], [torch.cat(c) for c in reps_guided],
                               self._pending_hashes)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Optional[Tensor] = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"expected at least 2 input columns, got {len(sentence_features)}")
        self._pending_hashes = [text_hashes(f) for f in sentence_features] if self.mask_duplicates else None
        guided: list[list[Tensor]] = []
        with torch.no_grad():  # the guide embeddings, mini-batch by mini-batch, once
            for features in sentence_features:
                gf = self._guide_features(features)
                guided.append([_embed(self.guide, _slice(gf, b, e))
                               for b, e in _ranges(gf, self.mini_batch_size, None)])
        try:
            return self._cached_forward(sentence_features, guided)
        finally:
            self._pending_hashes = None

    def get_config_dict(self) -> dict[str, Any]:
        return {**self._gist_config(), "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens}

    @property
    def citation(self) -> str:
        return _GIST_CITATION + _GRADCACHE_CITATION
