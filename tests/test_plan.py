"""The plan: one encoding of the options, the same in Python, C++ and Triton."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastneg
from fastneg.backends import cpu as cpu_backend
from fastneg.backends.cpu import check_layout
from fastneg.plan import KIND_SHIFT, Flag, Plan, RowState, Scalar, Strategy, Weighting, kind, layout

_C = cpu_backend.load()  # the C++ kernels (compiled on first use)


def test_cpp_encoding_is_pythons() -> None:
    cpp = dict(_C.layout())
    assert cpp == layout()
    # every enum member is in the table once, and the table has nothing else
    members = sum(len(e) for e in (Weighting, Strategy, Scalar, Flag, RowState))
    assert len(cpp) == members + 4


def test_a_drifted_encoding_is_refused_at_import() -> None:
    drifted = dict(_C.layout())
    drifted["Scalar.WEIGHT_A"] += 1
    with pytest.raises(ImportError, match="Scalar.WEIGHT_A"):
        check_layout(drifted)


def test_scalars_and_flags_roundtrip_by_name() -> None:
    plan = Plan(margin=0.1, relative_margin=0.2, max_score=0.3, guide_margin=0.4, guide_relative=True,
                weighting=Weighting.GCSE, weight_a=0.5, weight_b=0.6, debias=0.7, soft_temperature=0.8, soft_weight=0.9,
                attract=True)
    scalars = plan.scalars()
    assert len(scalars) == len(Scalar)
    for slot in Scalar:  # each slot holds the field of its name
        field = {"DEBIAS": "debias", "SOFT_TEMPERATURE": "soft_temperature"}.get(slot.name, slot.name.lower())
        assert scalars[slot] == getattr(plan, field)
    flags = plan.flags(symmetric=True, query_grad=True)
    assert kind(flags) == Weighting.GCSE
    assert Flag(flags & ((1 << KIND_SHIFT) - 1)) == Flag(Flag.HAS_MARGIN | Flag.HAS_RELATIVE_MARGIN | Flag.HAS_MAX_SCORE
                                                         | Flag.GUIDE_RELATIVE | Flag.SYMMETRIC | Flag.DEBIAS
                                                         | Flag.SOFT | Flag.ATTRACT | Flag.QUERY_GRAD)
    assert Plan.decode(scalars, flags) == plan
    off = Plan()
    assert off.flags() == 0 and Plan.decode(off.scalars(), off.flags()) == off
    # an unset option decodes as None whatever its slot holds
    assert Plan.decode([9.0] * len(Scalar), 0).margin is None


def test_every_public_option_reaches_the_plan() -> None:
    plan = fastneg.Rules(0.1, 0.2, 0.3, None, "relative", fastneg.SimANS(0.4, 0.5), 0.25,
                         fastneg.SoftLabels(0.5, 0.75), "attract").plan(0.05)
    assert dataclasses.astuple(plan) == (0.1, 0.2, 0.3, float("-inf"), True, Weighting.SIMANS, 0.4, 0.5, 0.25, 0.5,
                                         0.75, True)


def test_triton_reads_the_same_encoding() -> None:
    rules = pytest.importorskip("fastneg.backends.triton.rules")
    for flag in Flag:
        if hasattr(rules, flag.name):
            assert getattr(rules, flag.name).value == int(flag)
    for row in RowState:
        assert getattr(rules, f"ROW_{row.name}").value == int(row)
    for w in Weighting:
        assert getattr(rules, f"WEIGHT_{w.name}").value == int(w)
    assert rules.KIND.value == 1 << KIND_SHIFT


def test_the_row_state_is_named_rows() -> None:
    q, k = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    plan = Plan(margin=0.1)
    loss, state, n_masked, n_neg = torch.ops.fastneg.info_nce_fwd_cpu(
        q, k, torch.arange(5), torch.tensor(0.1, dtype=torch.float64), None, None, None, None, None, plan.scalars(),
        plan.flags())
    assert state.shape == (len(RowState), 5)
    s_pos = (q * k[:5]).sum(1)
    torch.testing.assert_close(state[RowState.POSITIVE_SCORE], s_pos)
    torch.testing.assert_close(state[RowState.THRESHOLD], s_pos - 0.1)
    torch.testing.assert_close(loss, state[RowState.LOGSUMEXP] - s_pos / 0.1)
    assert torch.equal(state[RowState.POSITIVE_COEF], torch.ones(5, dtype=torch.float64))
