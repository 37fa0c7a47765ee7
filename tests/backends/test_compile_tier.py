"""The compile tier: every Triton kernel variant the host code launches, compiled for sm_90a and
sm_80 without a GPU (a stand-in driver), with no spills and with tensor-core products
(benchmarks/compile_tier.py, run in a fresh process: it must not run under the interpreter)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_hopper_and_ampere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile, whatever an earlier run cached
    out = tmp_path / "tier"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_tier.py"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=3600)
    failures = (out / "failures.txt").read_text() if (out / "failures.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:] + failures
    with open(out / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    kernels = {"_info_nce_fwd_kernel", "_info_nce_bwd_ds_kernel", "_panel_dq_kernel", "_panel_dk_kernel",
               "_info_nce_row_state_kernel", "_info_nce_columns_kernel", "_sample_negatives_kernel",
               "_panel_positive_kernel"}
    no_products = {"_info_nce_columns_kernel", "_panel_positive_kernel"}  # per-row work, no tl.dot
    for arch in ("sm_90a", "sm_80"):
        mine = [r for r in rows if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == kernels
        assert all(int(r["spill_bytes"]) == 0 for r in mine)  # ptxas's count of spill stores and loads
        # tensor cores in every 16-bit product: the warpgroup MMA on sm_90a (the sampler's row blocks of
        # 16 to 64 rows may take the warp-level one), HMMA on sm_80
        sixteen = [r for r in mine if r["dtype"] in ("float16", "bfloat16") and r["kernel"] not in no_products]
        assert sixteen
        for r in sixteen:
            mma = int(r["hgmma"]) if arch == "sm_90a" else int(r["hmma"])
            if arch == "sm_90a" and r["kernel"] == "_sample_negatives_kernel":
                mma += int(r["hmma"])
            assert mma > 0, r
        # every autotune config of the fused forward was compiled
        assert {r["num_stages"] for r in mine if r["kernel"] == "_info_nce_fwd_kernel"} == {"2", "3", "4"}
    assert failures == ""
