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


def _tier_row(**changes) -> dict[str, str]:
    row = dict(arch="sm_90a", kernel="_info_nce_fwd_kernel", mode="plain", dtype="bfloat16", shape="D=768 B=N=256",
               num_warps="8", num_stages="3", registers="114", local="0", stack="0", shared="73728",
               spill_instructions="0", spill_bytes="0", hgmma="16", hmma="0", ffma="64", constexprs="BLOCK_M=128")
    row.update(changes)
    return row


def test_diff_reports_every_changed_measure_and_every_variant_in_one_tree_only() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from compile_tier import MEASURES, diff
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    base = [_tier_row(), _tier_row(num_stages="4", registers="159")]
    lines, differ = diff(base, [dict(r) for r in base])
    assert differ == 0 and lines[-1].endswith(f"0 differ in {', '.join(MEASURES)}")
    for measure in MEASURES:  # one measure changed in one variant: reported by name
        after = [_tier_row(**{measure: "7"}), base[1]]
        lines, differ = diff(base, after)
        assert differ == 1 and f"{measure} {base[0][measure]}->7" in lines[0]
    # a constexpr that differs makes a different variant: one only before, one only after
    lines, differ = diff(base, [_tier_row(constexprs="BLOCK_M=64"), base[1]])
    assert differ == 2 and lines[0].startswith("only before") and lines[1].startswith("only after")
