"""The per-element work of the Triton hot loops, counted in their machine code for Hopper (sm_90a)
without a GPU (benchmarks/sass_cost.py, in a fresh process: it compiles, it must not run under
the interpreter). A change that doubles the work per score element fails here before anyone
times it on a GPU.

Budgets, SASS instructions per score element of an interior tile, outside the loop of
tensor-core products, bfloat16 at D = 768: the plain loss <= 10, labels + margin + SimANS <= 20
(forward and dS kernels); and the modelled H200 forward+backward of the plain loss at
B = N = 32768 within 1.25x of the four-product tensor-core bound at D = 768 and 1.6x at D = 384."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
BUDGET = {"plain": 10.0, "labels+margin+SimANS": 20.0, "HCL+DCL": 32.0}


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # really compile
    out = tmp / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_cost.py"), "--modes", *BUDGET,
                           "--dtypes", "bfloat16", "--dims", "768", "--model-dims", "384", "768",
                           "--model-modes", "plain", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", list(BUDGET))
@pytest.mark.parametrize("kernel", ["_info_nce_fwd_kernel", "_info_nce_bwd_ds_kernel"])
def test_instructions_per_score_element_within_budget(counted, mode, kernel):
    row = next(r for r in counted["kernels"] if r["kernel"] == kernel and r["mode"] == mode)
    # the count is of a real tile loop: one loop of tensor-core products inside it, no branch
    # other than that loop's own
    assert row["mma_loops"] >= 1 and row["conditional"] == 0, row
    assert 0 < row["per_element"] <= BUDGET[mode], row
    assert row["by_class"]["mufu"] >= 1.0, row  # at least the exponential of every element is there


def test_modelled_forward_backward_near_the_tensor_core_bound(counted):
    model = {r["D"]: r for r in counted["model"] if r["mode"] == "plain"}
    assert model[768]["total"] <= 1.25 * model[768]["bound"], model[768]
    assert model[384]["total"] <= 1.6 * model[384]["bound"], model[384]
    for r in model.values():
        assert r["total"] >= r["bound"]  # the model never beats the tensor cores
