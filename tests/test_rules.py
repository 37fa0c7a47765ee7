"""fastneg.Rules: one validated object from the public call to the kernel.

Every field of :class:`fastneg.Rules` must reach every backend and entry point that takes it:
for each field a value that changes the result on the problem below, and each entry point
given ``rules=Rules(field=value)`` must compute what the keyword form computes (and not what
plain InfoNCE computes). A field added to ``Rules`` without an entry in ``EXAMPLES`` fails
``test_every_field_has_an_example``; one that some layer drops fails the others.
tests/integrations/test_rules_carried.py does the same for the integrations.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fastneg
from fastneg.rules import MASKING_FIELDS, RULE_FIELDS

# a value per field that changes the loss of ``_problem()`` (masks, weights or estimator)
EXAMPLES = {
    "margin": 0.05,
    "relative_margin": 0.1,
    "max_score": 0.3,
    "guide_margin": 0.3,
    "guide_strategy": "relative",
    "weighting": fastneg.SimANS(0.5, 0.0),
    "debias": 0.1,
    "soft_labels": fastneg.SoftLabels(0.5),
    "false_negatives": "attract",
}
# the other fields set where a field changes nothing alone (a relative guide margin of 0 is an absolute one)
BASES = {"guide_strategy": {"guide_margin": 0.3}}


def _with(field: str) -> tuple[dict, dict]:
    """(the rules with ``field`` set, the same without it)."""
    base = BASES.get(field, {})
    return {**base, field: EXAMPLES[field]}, base
BACKENDS = ["reference", "cpu", "portable", "triton"]


def _problem(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, N, D = 6, 14, 8
    keys = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    query = torch.nn.functional.normalize(keys[:B] + 0.6 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    keys[B] = keys[0]  # a copy of row 0's positive: flagged by most rules
    gk = torch.nn.functional.normalize(keys + 0.2 * torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    gq = torch.nn.functional.normalize(query + 0.2 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    return dict(query=query.to(dtype), keys=keys.to(dtype), guide_query=gq.to(dtype), guide_keys=gk.to(dtype))


def test_every_field_has_an_example() -> None:
    assert set(EXAMPLES) == set(RULE_FIELDS), "a Rules field without an example: add one (and carry it everywhere)"
    assert set(MASKING_FIELDS) <= set(RULE_FIELDS)
    for name, value in EXAMPLES.items():
        rules = fastneg.Rules(**{name: value})
        assert rules.changed() == {name: value} and not rules.is_plain


@pytest.mark.parametrize("field", RULE_FIELDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_carries_every_field_to_every_backend(field: str, backend: str) -> None:
    dtype = torch.float32 if backend == "triton" else torch.float64
    p = _problem(dtype)
    on, off = _with(field)
    guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"], reduction="none", backend=backend)
    by_object = fastneg.info_nce(p["query"], p["keys"], rules=fastneg.Rules(**on), **guide)
    by_keyword = fastneg.info_nce(p["query"], p["keys"], **on, **guide)
    without = fastneg.info_nce(p["query"], p["keys"], rules=fastneg.Rules(**off), **guide)
    assert torch.equal(by_object, by_keyword)
    assert not torch.allclose(by_object, without), f"{on} changes nothing on {backend}: not carried"
    # and the dense float64 reference agrees with the backend
    d = _problem()
    want = fastneg.info_nce(d["query"], d["keys"], rules=fastneg.Rules(**on), backend="reference",
                            guide_query=d["guide_query"], guide_keys=d["guide_keys"], reduction="none")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(by_object.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("field", RULE_FIELDS)
def test_the_module_carries_every_field(field: str) -> None:
    p = _problem()
    on, off = _with(field)
    guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"])
    want = fastneg.info_nce(p["query"], p["keys"], **guide, **on)
    assert not torch.equal(want, fastneg.info_nce(p["query"], p["keys"], **guide, **off))
    assert torch.equal(fastneg.InfoNCE(rules=fastneg.Rules(**on))(p["query"], p["keys"], **guide), want)
    assert torch.equal(fastneg.InfoNCE(**on)(p["query"], p["keys"], **guide), want)
    # a per-call override of one field on a module built with rules
    assert torch.equal(fastneg.InfoNCE(rules=fastneg.Rules(**off))(p["query"], p["keys"], **guide,
                                                                   **{field: EXAMPLES[field]}), want)
    assert f"{field}=" in repr(fastneg.InfoNCE(rules=fastneg.Rules(**on)))


def test_the_gathered_path_carries_every_field() -> None:
    """process_group=: one gloo process; the loss equals the local one for every field."""
    p = _problem()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            for field in RULE_FIELDS:
                on, off = _with(field)
                rules = fastneg.Rules(**on)
                guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"])
                local = fastneg.info_nce(p["query"], p["keys"], rules=rules, **guide)
                gathered = fastneg.info_nce(p["query"], p["keys"], rules=rules, process_group=dist.group.WORLD, **guide)
                plain = fastneg.info_nce(p["query"], p["keys"], rules=fastneg.Rules(**off),
                                         process_group=dist.group.WORLD, **guide)
                torch.testing.assert_close(gathered, local, rtol=1e-12, atol=1e-12)
                assert not torch.allclose(gathered, plain), field
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("field", MASKING_FIELDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampler_carries_the_masking_fields(field: str, backend: str) -> None:
    p = _problem(torch.float32)
    on, off = _with(field)
    guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"])
    kw = dict(strategy="top", backend=backend, **guide)
    by_object = fastneg.sample_negatives(p["query"], p["keys"], None, 13, rules=fastneg.Rules(**on), **kw)
    by_keyword = fastneg.sample_negatives(p["query"], p["keys"], None, 13, **on, **kw)
    plain = fastneg.sample_negatives(p["query"], p["keys"], None, 13, rules=fastneg.Rules(**off), **kw)
    assert torch.equal(by_object, by_keyword)
    assert not torch.equal(by_object, plain), f"{field} changes no draw on {backend}"


@pytest.mark.parametrize("field", [f for f in RULE_FIELDS if f not in MASKING_FIELDS])
def test_the_sampler_ignores_the_loss_fields(field: str) -> None:
    """One rules object serves a loss and its sampler: the loss's own fields do not change a draw."""
    p = _problem(torch.float32)
    guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"])
    rules = fastneg.Rules(**{field: EXAMPLES[field]})
    a = fastneg.sample_negatives(p["query"], p["keys"], None, 5, strategy="top", rules=rules, **guide)
    assert torch.equal(a, fastneg.sample_negatives(p["query"], p["keys"], None, 5, strategy="top", **guide))


@pytest.mark.parametrize("field", ["margin", "relative_margin", "max_score"])
def test_the_miner_carries_its_fields(field: str) -> None:
    p = _problem(torch.float32)
    value = EXAMPLES[field]
    positives = torch.arange(6)
    by_object = fastneg.mine_hard_negatives(p["query"], p["keys"], positives, 13, rules=fastneg.Rules(**{field: value}))
    by_keyword = fastneg.mine_hard_negatives(p["query"], p["keys"], positives, 13, **{field: value})
    plain = fastneg.mine_hard_negatives(p["query"], p["keys"], positives, 13)
    assert torch.equal(by_object.indices, by_keyword.indices)
    assert not torch.equal(by_object.indices, plain.indices)


def test_rules_or_keywords_not_both() -> None:
    p = _problem()
    rules = fastneg.Rules(margin=0.1)
    with pytest.raises(TypeError, match="rules= and relative_margin="):
        fastneg.info_nce(p["query"], p["keys"], rules=rules, relative_margin=0.2)
    with pytest.raises(TypeError, match="rules= and max_score="):
        fastneg.sample_negatives(p["query"], p["keys"], None, 2, strategy="top", rules=rules, max_score=0.5)
    with pytest.raises(TypeError, match="rules= and margin="):
        fastneg.mine_hard_negatives(p["query"], p["keys"], torch.arange(6), 2, rules=rules, margin=0.2)
    with pytest.raises(TypeError, match="rules= and margin="):
        fastneg.InfoNCE(rules=rules, margin=0.2)
    with pytest.raises(TypeError, match="rules must be a fastneg.Rules"):
        fastneg.info_nce(p["query"], p["keys"], rules={"margin": 0.1})
    # a keyword at its default is not a conflict
    assert torch.equal(fastneg.info_nce(p["query"], p["keys"], rules=rules, margin=None, false_negatives="mask"),
                       fastneg.info_nce(p["query"], p["keys"], margin=0.1))


@pytest.mark.parametrize("field, bad, error", [
    ("margin", "0.1", TypeError), ("relative_margin", float("nan"), ValueError), ("max_score", True, TypeError),
    ("guide_strategy", "both", ValueError), ("weighting", "hcl", ValueError), ("debias", 1.0, ValueError),
    ("soft_labels", 0.5, TypeError), ("false_negatives", "drop", ValueError), ("guide_margin", float("inf"), ValueError),
])
def test_a_bad_field_fails_where_it_is_written(field: str, bad: object, error: type) -> None:
    with pytest.raises(error, match=field):
        fastneg.Rules(**{field: bad})
    with pytest.raises(error, match=field):
        fastneg.Rules().replace(**{field: bad})


def test_rules_are_frozen_and_hashable() -> None:
    rules = fastneg.Rules(margin=0.1, weighting=fastneg.SimANS())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.margin = 0.2  # type: ignore[misc]
    assert hash(rules) == hash(fastneg.Rules(margin=0.1, weighting=fastneg.SimANS()))


@pytest.mark.parametrize("field, bad, error", [
    ("margin", True, TypeError), ("margin", [0.1], TypeError), ("relative_margin", float("nan"), ValueError),
    ("weighting", "hcl", ValueError), ("debias", 1.0, ValueError),
])
def test_a_bad_keyword_fails_even_after_an_equal_good_one(field: str, bad: object, error: type) -> None:
    """The keyword path keeps the rules of recent calls: a bad value equal to a good one (True == 1)
    or unhashable still fails, naming its argument."""
    p = _problem()
    good = {"margin": 1, "relative_margin": 0.05, "weighting": "simans", "debias": 0.1}[field]
    fastneg.info_nce(p["query"], p["keys"], **{field: good})
    for _ in range(2):
        with pytest.raises(error, match=field):
            fastneg.info_nce(p["query"], p["keys"], **{field: bad})


def test_a_call_plans_once_and_soft_labels_take_each_calls_temperature() -> None:
    rules = fastneg.Rules(margin=0.1, weighting=fastneg.SimANS())
    assert rules.plan(0.05) is rules.plan(0.2)  # validated and planned at construction
    soft = fastneg.Rules(soft_labels=fastneg.SoftLabels(weight=0.5))
    assert soft.plan(0.05).soft_temperature == 0.05 and soft.plan(0.2).soft_temperature == 0.2
    fixed = fastneg.Rules(soft_labels=fastneg.SoftLabels(weight=0.5, temperature=0.1))
    assert fixed.plan(0.05).soft_temperature == fixed.plan(0.2).soft_temperature == 0.1
    # the same loss through the keyword path at two temperatures: the teacher's follows the loss's
    p = _problem()
    guide = dict(guide_query=p["guide_query"], guide_keys=p["guide_keys"])
    for t in (0.05, 0.2):
        got = fastneg.info_nce(p["query"], p["keys"], temperature=t, soft_labels=fastneg.SoftLabels(weight=0.5),
                               backend="reference", **guide)
        want = fastneg.info_nce(p["query"], p["keys"], temperature=t, backend="reference", **guide,
                                soft_labels=fastneg.SoftLabels(weight=0.5, temperature=t))
        assert torch.equal(got, want)
