"""Published recipes as bundles of fastneg rules and defaults.

Each function returns a :class:`Preset`: the keyword arguments of the loss (``info_nce`` /
``InfoNCE``), those of negative selection (``sample_negatives`` / ``mine_hard_negatives``), the
per-call tensors the recipe needs, and where every value comes from::

    preset = fastneg.presets.nv_retriever()
    mined = fastneg.mine_hard_negatives(q_emb, corpus_emb, positives, preset.num_negatives, **preset.negatives)
    loss = fastneg.info_nce(query, keys, **preset.loss)

Only what the cited paper or the authors' code states is set; everything else is fastneg's
default, and each docstring says which is which. Every argument can be overridden:
``fastneg.info_nce(q, k, **{**preset.loss, "temperature": 0.02})``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from .options import SimANS

__all__ = ["Preset", "nv_retriever", "gist", "simans", "qwen3_embedding", "unime"]


@dataclass(frozen=True)
class Preset:
    """A published recipe. ``loss``: keyword arguments of :func:`fastneg.info_nce`;
    ``negatives``: keyword arguments of :func:`fastneg.sample_negatives` and
    :func:`fastneg.mine_hard_negatives` (strategy and mask rules); ``num_negatives``: how many
    negatives per query the recipe selects (None: it does not select, the batch is the
    negatives); ``needs``: tensors to pass per call (``"guide"``: ``guide_query`` /
    ``guide_keys``; ``"key_labels"``: ids of duplicate texts, and for the corpus miner
    ``corpus_labels`` / ``query_labels``). A recipe that needs a guide selects in-batch negatives
    only (``sample_negatives``; the corpus miner takes no guide)."""

    name: str
    citation: str
    loss: Mapping[str, Any] = field(default_factory=dict)
    negatives: Mapping[str, Any] = field(default_factory=dict)
    num_negatives: Optional[int] = None
    needs: tuple[str, ...] = ()
    notes: str = ""


def nv_retriever(relative_margin: float = 0.05, num_negatives: int = 4) -> Preset:
    """NV-Retriever's positive-aware mining, TopK-PercPos (Moreira et al., 2024, "NV-Retriever:
    Improving text embedding models with effective hard-negative mining", arXiv:2407.15831).

    From the paper: negatives are the top-k candidates scoring below 95 % of the positive's
    score (``relative_margin=0.05``; TopK-MarginPos is ``margin=0.05`` instead), mined with a
    teacher model, and the same rule removes false negatives. fastneg's choices, not the paper's:
    ``num_negatives=4`` and the temperature (the library default, 0.05)."""
    rules = {"relative_margin": relative_margin}
    return Preset(
        name="nv_retriever",
        citation="Moreira et al. 2024, arXiv:2407.15831 (TopK-PercPos)",
        loss=dict(rules),
        negatives={"strategy": "top", **rules},
        num_negatives=num_negatives,
        notes="Mine with a teacher's embeddings (mine_hard_negatives on the teacher's vectors).",
    )


def gist(temperature: float = 0.01, guide_margin: float = 0.0, guide_strategy: str = "absolute") -> Preset:
    """GISTEmbed (Solatorio, 2024, "GISTEmbed: Guided In-sample Selection of Training Negatives for
    Text Embedding Fine-tuning", arXiv:2402.16829): a guide model's scores remove in-batch
    negatives that the guide ranks above the positive.

    Defaults as sentence-transformers' ``GISTEmbedLoss``: temperature 0.01, absolute strategy,
    margin 0. Pass ``guide_query`` / ``guide_keys`` (the guide's embeddings of the same texts)
    per call."""
    return Preset(
        name="gist",
        citation="Solatorio 2024, arXiv:2402.16829; sentence-transformers GISTEmbedLoss defaults",
        loss={"temperature": temperature, "guide_margin": guide_margin, "guide_strategy": guide_strategy},
        negatives={"strategy": "top", "guide_margin": guide_margin, "guide_strategy": guide_strategy},
        needs=("guide",),
    )


def simans(a: float = 0.5, b: float = 0.0, num_negatives: int = 8) -> Preset:
    """SimANS (Zhou et al., 2022, "SimANS: Simple Ambiguous Negatives Sampling for Dense Text
    Retrieval", EMNLP industry track, arXiv:2210.11773): negatives sampled with probability
    ``exp(-a (s_ij - s_i+ - b)^2)``, favouring those scoring near the positive, neither the
    easiest nor the (likely false) hardest.

    ``a``, ``b``: fastneg's SPEC defaults (section 3); the paper tunes them per dataset. The
    loss weights the in-batch negatives the same way (``weighting=SimANS(a, b)``).
    ``num_negatives=8`` is fastneg's choice."""
    return Preset(
        name="simans",
        citation="Zhou et al. 2022, arXiv:2210.11773",
        loss={"weighting": SimANS(a, b)},
        negatives={"strategy": SimANS(a, b)},
        num_negatives=num_negatives,
    )


def qwen3_embedding() -> Preset:
    """Qwen3-Embedding's false-negative mask (Zhang et al., 2025, "Qwen3 Embedding: Advancing Text
    Embedding and Reranking Through Foundation Models", arXiv:2506.05176): a key leaves the
    denominator when it scores more than 0.1 above the positive (``margin=-0.1``) or is the
    positive's own text (pass ``key_labels`` with text ids).

    The report's denominator also holds query-query and document-document terms: pass the
    queries and documents concatenated as ``keys`` to include them. Temperature: fastneg's
    default (0.05), not from the report."""
    return Preset(
        name="qwen3_embedding",
        citation="Zhang et al. 2025, arXiv:2506.05176",
        loss={"margin": -0.1},
        negatives={"strategy": "top", "margin": -0.1},
        needs=("key_labels",),
    )


def unime(temperature: float = 0.02, num_negatives: int = 8, threshold: float = 0.1) -> Preset:
    """UniME's hard-negative-enhanced instruction tuning (Gu et al., 2025, "Breaking the Modality
    Barrier: Universal Embedding Learning with Multimodal LLMs", arXiv:2504.17432; deepglint/UniME
    ``loss.py``): in the (gathered) batch, keys scoring more than ``threshold`` above the
    positive are removed as false negatives, and each query is contrasted with its positive and
    its ``num_negatives`` highest-scoring remaining keys.

    Defaults as the authors' ``DistributedContrastiveLossBatchRank``: temperature 0.02, top 8,
    threshold 0.1 (``margin=-0.1``). fastneg's version: ``sample_negatives(..., **negatives)``
    then ``info_nce(..., negatives=idx, **loss)``; where fewer than 8 keys remain, the row is
    padded with -1 (the original's ``topk`` would pick removed keys back up)."""
    rules = {"margin": -threshold}
    return Preset(
        name="unime",
        citation="Gu et al. 2025, arXiv:2504.17432; deepglint/UniME loss.py",
        loss={"temperature": temperature, **rules},
        negatives={"strategy": "top", **rules},
        num_negatives=num_negatives,
    )
