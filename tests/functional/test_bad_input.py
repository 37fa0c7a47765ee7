"""SPEC section 7: bad input raises a TypeError/ValueError naming the argument, before any kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastneg
from fastneg.backends import cpu as cpu_backend
from fastneg.plan import Plan

q = torch.randn(4, 8)
k = torch.randn(6, 8)


def call(**overrides):
    args = {"query": q, "keys": k}
    args.update(overrides)
    return fastneg.info_nce(args.pop("query"), args.pop("keys"), **args)


CASES = [
    # (overrides, exception, text the message must contain)
    ({"query": torch.randn(4)}, ValueError, "query"),
    ({"query": torch.randn(2, 4, 8)}, ValueError, "query"),
    ({"keys": torch.randn(6)}, ValueError, "keys"),
    ({"keys": torch.randn(6, 5)}, ValueError, "keys"),
    ({"keys": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "keys"),
    ({"query": torch.randint(0, 3, (4, 8))}, TypeError, "query"),
    ({"keys": torch.randn(6, 8, device="meta")}, ValueError, "keys"),
    ({"query": torch.randn(0, 8)}, ValueError, "query"),
    ({"keys": torch.randn(0, 8)}, ValueError, "keys"),
    ({"positives": torch.tensor([0, 1, 2, 6])}, ValueError, "positives"),
    ({"positives": torch.tensor([0, 1, 2, -1])}, ValueError, "positives"),
    ({"positives": torch.tensor([0, 1, 2])}, ValueError, "positives"),
    ({"positives": torch.tensor([0.0, 1.0, 2.0, 3.0])}, TypeError, "positives"),
    ({"positives": [0, 1, 2, 3]}, TypeError, "positives"),
    ({"query": torch.randn(7, 8)}, ValueError, "positives"),  # default arange(B) needs N >= B
    ({"key_labels": torch.zeros(5, dtype=torch.long)}, ValueError, "key_labels"),
    ({"key_labels": torch.zeros(6)}, TypeError, "key_labels"),
    ({"key_labels": torch.zeros(6, dtype=torch.long), "query_labels": torch.zeros(3, dtype=torch.long)},
     ValueError, "query_labels"),
    ({"query_labels": torch.zeros(4, dtype=torch.long)}, ValueError, "query_labels"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -0.1}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": torch.tensor(-1.0)}, ValueError, "temperature"),
    ({"temperature": torch.tensor([0.1, 0.2])}, ValueError, "temperature"),
    ({"temperature": "0.1"}, TypeError, "temperature"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"weighting": "hard"}, ValueError, "weighting"),
    ({"weighting": 0.5}, TypeError, "weighting"),
    ({"guide_strategy": "ratio"}, ValueError, "guide_strategy"),
    ({"guide_query": torch.randn(4, 3)}, ValueError, "guide_query and guide_keys"),
    ({"guide_query": torch.randn(3, 3), "guide_keys": torch.randn(6, 3)}, ValueError, "guide_query"),
    ({"guide_query": torch.randn(4, 3), "guide_keys": torch.randn(5, 3)}, ValueError, "guide_keys"),
    ({"guide_query": torch.randn(4, 3), "guide_keys": torch.randn(6, 2)}, ValueError, "guide_keys"),
    ({"margin": float("nan")}, ValueError, "margin"),
    ({"margin": "0.1"}, TypeError, "margin"),
    ({"relative_margin": float("inf")}, ValueError, "relative_margin"),
    ({"max_score": None, "guide_margin": float("nan")}, ValueError, "guide_margin"),
    ({"negatives": torch.zeros(3, 2, dtype=torch.long)}, ValueError, "negatives"),
    ({"negatives": torch.zeros(4, dtype=torch.long)}, ValueError, "negatives"),
    ({"negatives": torch.zeros(4, 2)}, TypeError, "negatives"),
    ({"negatives": torch.full((4, 2), 6)}, ValueError, "negatives"),
    ({"negatives": torch.full((4, 2), -2)}, ValueError, "negatives"),
]


@pytest.mark.parametrize("overrides,exc,needle", CASES, ids=[f"{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(overrides, exc, needle) -> None:
    with pytest.raises(exc, match=needle):
        call(**overrides)


@pytest.mark.parametrize("bad", [lambda: fastneg.SimANS(a=-1.0), lambda: fastneg.SimANS(b=float("nan")),
                                 lambda: fastneg.Hardness(float("inf"))])
def test_bad_weighting_parameters(bad) -> None:
    with pytest.raises(ValueError, match=r"SimANS\.|Hardness\."):
        bad()


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error() -> None:
    # in a fresh process: the interpreter setting is read when triton is first imported
    code = ("import torch, fastneg\n"
            "try:\n"
            "    fastneg.info_nce(torch.randn(4, 8), torch.randn(6, 8), backend='triton')\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ValueError:" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stdout + out.stderr


def test_triton_backend_refuses_float64() -> None:
    """The Triton kernels compute in float32 at most: float64 is refused (as the sampler refuses
    it), not computed in float32 and returned as if it were float64's."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1")
    with pytest.raises(TypeError, match="query: backend='triton'.*float64"):
        fastneg.info_nce(q.double(), k.double(), backend="triton")


def test_cpu_backend_rejects_cuda_tensors_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="backend='cpu'"):
        fastneg.info_nce(q.to("meta"), k.to("meta"), backend="cpu")


def test_module_validates_options_at_construction() -> None:
    with pytest.raises(ValueError, match="reduction"):
        fastneg.InfoNCE(reduction="avg")
    with pytest.raises(TypeError, match="margin"):
        fastneg.InfoNCE(margin="large")


def test_inputs_are_not_modified() -> None:
    query, keys = q.clone(), k.clone()
    labels = torch.arange(6)
    fastneg.info_nce(query, keys, key_labels=labels, weighting="simans", margin=0.1)
    assert torch.equal(query, q) and torch.equal(keys, k) and torch.equal(labels, torch.arange(6))


def test_cpu_op_checks_positives_itself() -> None:
    # torch.compile skips the Python range check (it would sync); the C++ op checks again
    cpu_backend.load()
    op = torch.ops.fastneg.info_nce_fwd_cpu.default
    plain, attract = Plan(), Plan(attract=True)
    with pytest.raises(ValueError, match="positives"):
        op(q, k, torch.tensor([0, 1, 2, 99]), torch.tensor(0.1), None, None, None, None, None, plain.scalars(),
           plain.flags())
    with pytest.raises(ValueError, match="exclude"):
        op(q, k, torch.tensor([0, 1, 2, 3]), torch.tensor(0.1), None, None, None, None, torch.tensor([1, 1, 2, 0]),
           attract.scalars(), attract.flags())
    with pytest.raises(ValueError, match="scalars"):  # a packed block of the wrong length names the argument
        op(q, k, torch.tensor([0, 1, 2, 3]), torch.tensor(0.1), None, None, None, None, None, [0.0] * 3, 0)


def test_hardness_on_the_guide_needs_a_guide() -> None:
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="on='guide'"):
        fastneg.info_nce(q, k, weighting=fastneg.Hardness(1.0, on="guide"))
    with pytest.raises(ValueError, match="Hardness.on"):
        fastneg.Hardness(1.0, on="keys")
