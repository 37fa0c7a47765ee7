"""The quality benchmark's machinery: planted false-negative rates are what they claim, the
metrics are what they say, and a tiny run of the command works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastneg.tools.demo import SyntheticRetrieval
from fastneg.tools.quality import PlantedBatches, QualityConfig, evaluate


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_planted_rate_is_exact(rate: float) -> None:
    cfg = QualityConfig(num_groups=800, batch_size=200)
    task = SyntheticRetrieval(cfg.task(0), torch.device("cpu"))
    batches = PlantedBatches(task, rate, 0)
    for _ in range(3):
        b = batches.next()
        groups = task.doc_group[b["docs"].cpu()]
        assert torch.equal(groups, b["groups"])  # each positive is a member of its query's group
        # for query i, key j != i is a false negative when both are about the same group: each
        # query sees rate * (B - 1) of them (one topic may be cut short by the batch's end)
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        share = same.sum(1).double() / (200 - 1)
        per_topic = 1 + round(rate * 199)
        full = same.sum(1) == per_topic - 1
        assert int(full.sum()) >= 200 - per_topic
        assert bool((share[full] - rate).abs().max() <= 0.5 / 199)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_pairs_planting_rate_is_exact(rate: float) -> None:
    cfg = QualityConfig(num_groups=800, batch_size=200)
    task = SyntheticRetrieval(cfg.task(0), torch.device("cpu"))
    batches = PlantedBatches(task, rate, 0, planting="pairs")
    for _ in range(3):
        b = batches.next()
        groups = task.doc_group[b["docs"].cpu()]
        assert torch.equal(groups, b["groups"])
        # key j is a false negative of another query when both are about the same topic
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        assert abs(same.any(0).float().mean().item() - rate) <= 1 / 200
        assert int(same.sum(1).max()) <= 1  # one false negative per affected query


def test_unknown_planting() -> None:
    task = SyntheticRetrieval(QualityConfig(num_groups=100).task(0), torch.device("cpu"))
    with pytest.raises(ValueError, match="planting"):
        PlantedBatches(task, 0.1, 0, planting="triples")


def test_metrics_by_hand() -> None:
    cfg = QualityConfig(num_groups=300, held_out_queries=50)
    task = SyntheticRetrieval(cfg.task(1), torch.device("cpu"))
    identity = torch.nn.Identity()
    # queries placed exactly on the first member of their group: that member ranks first
    task.eval_queries = task.doc_features[[task.group_members[g][0] for g in task.eval_groups.tolist()]]
    got = evaluate(task, identity, identity)
    docs = torch.nn.functional.normalize(task.doc_features, dim=-1)
    qs = torch.nn.functional.normalize(task.eval_queries, dim=-1)
    top = (qs @ docs.T).topk(10, dim=1).indices
    recall, ndcg = [], []
    for i, grp in enumerate(task.eval_groups.tolist()):
        rel = [1.0 if int(task.doc_group[j]) == grp else 0.0 for j in top[i].tolist()]
        n = min(10, len(task.group_members[grp]))
        recall.append(sum(rel) / n)
        dcg = sum(r / torch.log2(torch.tensor(p + 2.0)).item() for p, r in enumerate(rel))
        idcg = sum(1 / torch.log2(torch.tensor(p + 2.0)).item() for p in range(n))
        ndcg.append(dcg / idcg)
    assert abs(got["recall@10"] - sum(recall) / len(recall)) < 1e-6
    assert abs(got["ndcg@10"] - sum(ndcg) / len(ndcg)) < 1e-5


def test_tiny_run_of_the_command(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "fastneg.tools.cli", "quality", "--groups", "300", "--batch-size", "64",
                          "--steps", "3", "--seeds", "0", "1", "--rates", "0", "0.3", "--held-out", "50",
                          "--methods", "InfoNCE", "SimANS", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2 and all(0 <= r["recall@10"] <= 1 and 0 <= r["ndcg@10"] <= 1 for r in runs)
    text = (tmp_path / "quality.md").read_text()
    assert "| SimANS |" in text and "delta at 30%" in text
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "fastneg.tools.cli", "quality", "--methods", "DCL?"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "unknown method" in bad.stderr
