"""Sampling and mining over keys spread across ranks, on real gloo process groups (1, 2 and 3
CPU processes, uneven shards, a rank with an empty shard and no queries): the output of every
strategy, with rules, labels, several positives, windows and a FAISS flat index, is the
one-process output over the whole corpus, bit for bit (an IVF index: at least 95 % of the rows,
its k-means rounding by thread count)."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastneg
from fastneg.parallel.sharded import KEY_ALIGN, merge_top, shard_bounds

N, Q, D, K = 1100, 70, 16, 6
# key shards start at multiples of KEY_ALIGN (one empty); query shares uneven (one empty)
KEY_SHARDS = {1: [(0, N)], 2: [(0, 768), (768, N)], 3: [(0, 256), (256, 256), (256, N)]}
QUERY_SHARES = {1: [(0, Q)], 2: [(0, 50), (50, Q)], 3: [(0, 9), (9, 9), (9, Q)]}


def _data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    corpus[5] = corpus[900]  # exact duplicates: ties broken by the smaller id in every layout
    corpus[300] = corpus[901]
    first = torch.randint(0, N, (Q,), generator=g)
    second = torch.randint(0, N, (Q,), generator=g)
    q = torch.nn.functional.normalize(corpus[first] + 0.7 * torch.randn(Q, D, generator=g), dim=-1)
    positives = [[int(a)] if i % 3 else [int(a), int(b)] for i, (a, b) in enumerate(zip(first, second))]
    labels = torch.randint(0, 40, (N,), generator=g)
    return {"q": q, "corpus": corpus, "positives": positives, "corpus_labels": labels,
            "query_labels": labels[first], "guide": torch.randn(N, 8, generator=g),
            "guide_q": torch.randn(Q, 8, generator=g), "exclude": torch.randint(-1, N, (Q, 2), generator=g)}


MINING: dict[str, dict[str, Any]] = {
    "top-labels-margin": dict(strategy="top", margin=0.05, labels=True),
    "simans-relative": dict(strategy=fastneg.SimANS(a=2.0, b=0.1), relative_margin=0.1, seed=7),
    "uniform": dict(strategy="uniform", seed=11, max_score=0.6),
    "window-simans": dict(strategy="simans", range_min=2, range_max=40, min_score=-0.2, seed=3, labels=True),
    "flat-top": dict(strategy="top", index="flat", margin=0.0),
    "flat-simans-labels": dict(strategy="simans", index="flat", seed=5, labels=True, relative_margin=0.05),
    # per-shard IVF lists under the quantizer one process trains: the same probed lists
    "ivf-top": dict(strategy="top", index="ivf"),
}
SAMPLING: dict[str, dict[str, Any]] = {
    "top-guide": dict(strategy="top", guide=True, margin=0.1),
    "simans-labels-exclude": dict(strategy="simans", labels=True, exclude=True, seed=4),
    "uniform-labels": dict(strategy="uniform", labels=True, max_score=0.5, seed=9),
}


def _mine(data: dict[str, Any], q: torch.Tensor, corpus: torch.Tensor, positives: list, rows: slice, keys: slice,
          options: dict[str, Any], group: Any) -> fastneg.MinedNegatives:
    options = dict(options)
    labels = options.pop("labels", False)
    if labels:
        options.update(query_labels=data["query_labels"][rows], corpus_labels=data["corpus_labels"][keys])
    return fastneg.mine_hard_negatives(q, corpus, positives, K, batch_size=16, process_group=group, **options)


def _sample(data: dict[str, Any], rows: slice, keys: slice, options: dict[str, Any], group: Any) -> torch.Tensor:
    options = dict(options)
    if options.pop("labels", False):
        options["key_labels"] = data["corpus_labels"][keys]
    if options.pop("guide", False):
        options.update(guide_query=data["guide_q"][rows], guide_keys=data["guide"][keys])
    if options.pop("exclude", False):
        options["exclude"] = data["exclude"][rows]
    positives = torch.tensor([p[0] for p in data["positives"]])[rows]
    return fastneg.sample_negatives(data["q"][rows], data["corpus"][keys], positives, K, process_group=group, **options)


def _alone(data: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    mined = fastneg.mine_hard_negatives(data["q"][:20], data["corpus"][:300], torch.arange(20), K, strategy="simans",
                                        seed=2, relative_margin=0.05, batch_size=8)
    drawn = fastneg.sample_negatives(data["q"][:20], data["corpus"][:300], None, K, strategy="uniform", seed=2)
    return mined.indices, mined.scores, drawn


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        data = _data()
        rows, keys = slice(*QUERY_SHARES[world][rank]), slice(*KEY_SHARDS[world][rank])
        result: dict[str, Any] = {}
        for name, options in MINING.items():
            m = _mine(data, data["q"][rows], data["corpus"][keys], data["positives"][rows], rows, keys, options,
                      dist.group.WORLD)
            result[name] = (m.indices, m.scores, m.positive_scores)
        for name, options in SAMPLING.items():
            result["sample-" + name] = _sample(data, rows, keys, options, dist.group.WORLD)
        if rank == 0:  # without process_group inside a distributed program: one process, no collective
            result["alone"] = _alone(data)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _run(world: int) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(world, port, out_dir), nprocs=world)
        except Exception:
            errors = [open(os.path.join(out_dir, f)).read() for f in os.listdir(out_dir) if f.startswith("error")]
            pytest.fail("a rank failed:\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    data = _data()
    everything = slice(0, None)
    result: dict[str, Any] = {}
    for name, options in MINING.items():
        m = _mine(data, data["q"], data["corpus"], data["positives"], everything, everything, options, None)
        result[name] = (m.indices, m.scores, m.positive_scores)
    for name, options in SAMPLING.items():
        result["sample-" + name] = _sample(data, everything, everything, options, None)
    return result


@pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups on Linux/macOS")
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_output_is_the_one_process_output(world: int, one_process: dict[str, Any]) -> None:
    pytest.importorskip("faiss")
    ranks = _run(world)
    for a, b in zip(ranks[0]["alone"], _alone(_data())):
        assert torch.equal(a, b)
    for name, want in one_process.items():
        got = [r[name] for r in ranks]
        if name.startswith("sample-"):
            assert torch.equal(torch.cat(got), want), name
            continue
        for part, (a, b) in enumerate(zip((torch.cat([g[i] for g in got]) for i in range(3)), want)):
            if name.startswith("ivf"):  # k-means may round by thread count: (nearly) every row the same
                assert (a == b).reshape(a.shape[0], -1).all(1).float().mean() >= 0.95, name
                continue
            assert torch.equal(a, b), (name, ("indices", "scores", "positive_scores")[part])
    # the draws are not trivial: most rows found all k, and the strategies differ
    assert (one_process["top-labels-margin"][0] >= 0).float().mean() > 0.9
    assert not torch.equal(one_process["simans-relative"][0], one_process["uniform"][0])


def test_shard_bounds_align_and_cover() -> None:
    for n in (0, 1, 255, 256, 257, 1100, 10**5 + 3):
        for world in (1, 2, 3, 8):
            bounds = shard_bounds(n, world)
            assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a <= b and (a % KEY_ALIGN == 0 or a == b == n) for a, b in bounds)
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) < 2 * KEY_ALIGN  # whole blocks, the last one partial


def test_merge_top_orders_by_value_then_smaller_id() -> None:
    values = torch.tensor([[[3.0, 1.0, float("-inf")]], [[3.0, 2.0, 1.0]]])
    ids = torch.tensor([[[7, 2, -1]], [[4, 9, 1]]])
    v, i = merge_top(values, ids, 5)
    assert i.tolist() == [[4, 7, 9, 1, 2]] and v.tolist() == [[3.0, 3.0, 2.0, 1.0, 1.0]]
    v, i = merge_top(values[:1], ids[:1], 4)
    assert i.tolist() == [[7, 2, -1, -1]]


# --- the merge in one process: shards drawn apart and merged against one draw, every backend ----

SAMPLER_RULES = ["plain", "labels", "label_levels", "margin", "relative_margin", "max_score", "guide_absolute",
                 "guide_relative"]


def _one_and_sharded(backend: str, rule: str, strategy: str, cuts: list[int], dtype: torch.dtype, B: int, N: int,
                     exclude: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_negatives`` over all keys, and the same draw assembled from ``shard_draw`` on the
    key shards between ``cuts`` and :func:`merge_top` (what every rank does with a process group)."""
    import sys as _sys
    _sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from fastneg.backends.operands import normalized_operands
    from fastneg.parallel.sharded import shard_draw
    from fastneg.sampling import parse_strategy
    from helpers import TRITON_DEVICE, build

    problem, options = build(rule, B, N, 16, seed=seed, peaked=True, duplicates=3)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, keys = problem.query.to(device, dtype), problem.keys.to(device, dtype)
    pos = problem.positives.to(device)
    extra = {n: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for n, v in problem.extra.items()}
    g = torch.Generator().manual_seed(seed)
    ex = torch.randint(-1, N, (B, 2), generator=g).to(device) if exclude else None
    one = fastneg.sample_negatives(q, keys, pos, K, strategy=strategy, seed=seed, backend=backend, exclude=ex,
                                   **extra, **options)
    code, simans = parse_strategy(strategy)
    plan = fastneg.Rules(**options).masking_plan(simans)
    pos, ql, kl, gq, gk = normalized_operands(q, pos, extra.get("query_labels"), extra.get("key_labels"),
                                              extra.get("guide_query"), extra.get("guide_keys"))
    values, ids = [], []
    for a, b in zip([0, *cuts], [*cuts, N]):
        i, v = shard_draw(backend, q, keys[a:b], a, pos, keys[pos], K, code, plan, seed & 0xFFFFFFFF, ql,
                          None if kl is None else kl[a:b], gq, None if gk is None else gk[a:b],
                          None if gk is None else gk[pos], ex)
        ids.append(i)
        values.append(v)
    _, merged = merge_top(torch.stack(values), torch.stack(ids), K)
    return one.cpu(), merged.cpu()


@pytest.mark.parametrize("backend", ["cpu", "portable", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shards_merged_are_one_draw(backend: str, dtype: torch.dtype) -> None:
    """Every rule, strategy and shard layout (shards at multiples of the key tile, empty ones
    included), duplicates of positives, excluded keys: the merged draw is the one draw, bit for bit."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(rule=st.sampled_from(SAMPLER_RULES), strategy=st.sampled_from(["top", "simans", "uniform"]),
                      blocks=st.integers(1, 4), raw_cuts=st.lists(st.integers(0, 4), max_size=3),
                      exclude=st.booleans(), seed=st.integers(0, 2**40))
    def check(rule: str, strategy: str, blocks: int, raw_cuts: list[int], exclude: bool, seed: int) -> None:
        N = blocks * KEY_ALIGN - 37  # a ragged last tile
        cuts = sorted(min(c, blocks) * KEY_ALIGN for c in raw_cuts)
        cuts = [min(c, N) for c in cuts]
        one, merged = _one_and_sharded(backend, rule, strategy, cuts, dtype, 20, N, exclude, seed)
        assert torch.equal(one, merged), (rule, strategy, cuts)

    check()


def test_shards_merged_are_one_draw_triton() -> None:
    """The Triton sampler (interpreter on CPU): the noise keyed by first_key + j, the values returned."""
    pytest.importorskip("triton")
    for rule, strategy, cuts in (("labels", "simans", [256]), ("max_score", "uniform", [256, 256]),
                                 ("guide_absolute", "top", [512])):
        one, merged = _one_and_sharded("triton", rule, strategy, cuts, torch.float32, 8, 600, True, 5)
        assert torch.equal(one, merged), (rule, strategy)


def _bad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    data = _data()
    rows, keys = slice(*QUERY_SHARES[world][rank]), slice(*KEY_SHARDS[world][rank])
    q, corpus = data["q"][rows], data["corpus"][keys]
    positives = data["positives"][rows]
    errors = []
    cases = {
        "dim": lambda: fastneg.mine_hard_negatives(q[:, :8] if rank == 1 else q, corpus[:, :8] if rank == 1 else corpus,
                                                   positives, K, process_group=dist.group.WORLD),
        "positive id": lambda: fastneg.mine_hard_negatives(q, corpus, [[N + 5]] * len(positives) if rank == 0
                                                           else positives, K, process_group=dist.group.WORLD),
        "sampler positive": lambda: fastneg.sample_negatives(
            q, corpus, torch.full((q.shape[0],), N if rank == 1 else 0), K, strategy="top",
            process_group=dist.group.WORLD),
        "sampler labels": lambda: fastneg.sample_negatives(
            q, corpus, torch.zeros(q.shape[0], dtype=torch.long), K, strategy="top",
            key_labels=data["corpus_labels"][keys] if rank == 0 else None, process_group=dist.group.WORLD),
    }
    for name, call in cases.items():
        try:
            call()
            errors.append(f"{name}: no error")
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
    with open(os.path.join(out_dir, f"bad{rank}.txt"), "w") as f:
        f.write("\n".join(errors))
    dist.destroy_process_group()


def test_a_rank_with_bad_input_fails_every_rank() -> None:
    """A rank whose inputs are wrong raises its own error and the others a ValueError naming it,
    instead of waiting in a collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_bad_worker, args=(2, port, out_dir), nprocs=2)
        lines = [open(os.path.join(out_dir, f"bad{r}.txt")).read().splitlines() for r in range(2)]
    for rank_lines in lines:
        assert len(rank_lines) == 4 and not any("no error" in line for line in rank_lines), rank_lines
        assert "ranks disagree on the label levels" in rank_lines[3]
    assert "disagree on the embedding dim" in lines[0][0] and "disagree on the embedding dim" in lines[1][0]
    assert "corpus ids in [0, 1100)" in lines[0][1] and "rank(s) [0]" in lines[1][1]
    assert "global key indices in [0, 1100)" in lines[1][2] and "rank(s) [1]" in lines[0][2]
