"""Mining past one process: ``fastneg mine`` under torchrun against one process, and the recall of
per-shard approximate indexes.

    python benchmarks/bench_sharded_mining.py --out DIR [--queries 20000 --corpus 200000 --dim 384]

Sections (each written to DIR as it finishes):

1. ``time_memory.md``: one process (all cores) against ``--ranks`` gloo processes (the cores
   split between them) on ``Q x N x D`` float32 embeddings, exact top-k and SimANS: wall time,
   the peak resident memory of every process (``ru_maxrss``), and whether the files are identical.
2. ``memory_growth.md``: the peak memory of one rank (of 2) as the corpus grows, the queries fixed.
3. ``recall.md``: IVF and HNSW built per shard (1, 2, 3 ranks) against the exact top-k: recall@k of
   the mined negatives, and a flat index's output against one process (identical or not).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RSS_WRAPPER = """
import resource, sys, os
from fastneg.tools.cli import main
code = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"\\nPEAK_RSS rank={os.environ.get('RANK', '0')} mib={peak:.0f}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def _write_inputs(folder: str, Q: int, N: int, D: int, seed: int = 0) -> tuple[str, str, str]:
    rng = np.random.default_rng(seed)
    corpus = np.lib.format.open_memmap(os.path.join(folder, "corpus.npy"), mode="w+", dtype=np.float32, shape=(N, D))
    for r in range(0, N, 50_000):
        x = rng.standard_normal((min(N, r + 50_000) - r, D)).astype(np.float32)
        corpus[r:r + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    corpus.flush()
    pos = rng.integers(0, N, Q)
    q = np.asarray(corpus[pos]) + 0.5 * rng.standard_normal((Q, D)).astype(np.float32) / np.sqrt(D)
    np.save(os.path.join(folder, "queries.npy"), q / np.linalg.norm(q, axis=1, keepdims=True))
    np.save(os.path.join(folder, "positives.npy"), pos)
    del corpus
    return tuple(os.path.join(folder, f) for f in ("queries.npy", "corpus.npy", "positives.npy"))  # type: ignore[return-value]


def _mine(files: tuple[str, str, str], out: str, ranks: int, threads: int, extra: list[str]) -> dict[str, Any]:
    q, c, p = files
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    args = ["mine", "--no-progress", "--queries", q, "--corpus", c, "--positives", p, "--out", out, *extra]
    wrapper = os.path.join(os.path.dirname(out), "rss_wrapper.py")
    with open(wrapper, "w") as f:
        f.write(RSS_WRAPPER)
    cmd = [sys.executable, wrapper, *args] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", wrapper, *args]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    # (the ranks' stderr lines may interleave)
    peaks = sorted((int(r), int(m)) for r, m in re.findall(r"PEAK_RSS rank=(\d+) mib=(\d+)", res.stderr))
    # each rank's own search time ("rank r of W: n batches in s"), printed with several processes
    search = sorted((int(r), float(t)) for r, t in re.findall(r"rank (\d+) of \d+: \d+ batches in ([\d.]+) s",
                                                               res.stderr))
    return {"seconds": seconds, "peaks": [m for _, m in peaks], "search": [t for _, t in search]}


def _header(args: argparse.Namespace) -> str:
    import torch
    return (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, `{' '.join(sys.argv)}`\n\n")


def time_memory(args: argparse.Namespace, folder: str) -> None:
    files = _write_inputs(folder, args.queries, args.corpus, args.dim)
    cores = os.cpu_count() or 1
    lines = [f"# fastneg mine: {args.ranks} processes against 1 ({args.queries} x {args.corpus} x {args.dim}, "
             f"float32, k = 10, batch 4096)\n\n", _header(args),
             "| strategy | processes x threads | wall s | each rank's search s | peak RSS per process (MiB) | "
             "file identical to 1 process |\n", "|---|---|---|---|---|---|\n"]
    for strategy in ("top", "simans"):
        extra = ["--num-negatives", "10", "--batch-size", "4096", "--strategy", strategy, "--seed", "1",
                 "--relative-margin", "0.05"]
        one = os.path.join(folder, f"one-{strategy}.jsonl")
        base = _mine(files, one, 1, cores, extra)
        many = os.path.join(folder, f"many-{strategy}.jsonl")
        sharded = _mine(files, many, args.ranks, max(1, cores // args.ranks), extra)
        same = open(one, "rb").read() == open(many, "rb").read()
        single = _mine(files, os.path.join(folder, f"single-{strategy}.jsonl"), 1, 1, extra)
        os.remove(os.path.join(folder, f"single-{strategy}.jsonl"))
        lines.append(f"| {strategy} | 1 x {cores} | {base['seconds']:.1f} | | {base['peaks']} | |\n")
        lines.append(f"| {strategy} | 1 x 1 | {single['seconds']:.1f} | | {single['peaks']} | |\n")
        lines.append(f"| {strategy} | {args.ranks} x {max(1, cores // args.ranks)} | {sharded['seconds']:.1f} | "
                     f"{sharded['search']} | {sharded['peaks']} | {same} |\n")
        for f in (one, many):
            os.remove(f)
        with open(os.path.join(args.out, "time_memory.md"), "w") as f:
            f.writelines(lines)
    for f in files:
        os.remove(f)


def memory_growth(args: argparse.Namespace, folder: str) -> None:
    lines = [f"# One rank's peak memory as the corpus grows (2 gloo processes, {args.growth_queries} queries, "
             f"D = {args.dim}, float32)\n\n", _header(args),
             "| corpus rows | shard MiB (N/2 x D x 4) | peak RSS rank 0 / rank 1 (MiB) | wall s |\n", "|---|---|---|---|\n"]
    for n in args.growth:
        files = _write_inputs(folder, args.growth_queries, n, args.dim)
        r = _mine(files, os.path.join(folder, "g.jsonl"), 2, 1, ["--num-negatives", "10", "--batch-size", "4096"])
        lines.append(f"| {n} | {n // 2 * args.dim * 4 / 2**20:.0f} | {r['peaks']} | {r['seconds']:.1f} |\n")
        for f in files:
            os.remove(f)
        os.remove(os.path.join(folder, "g.jsonl"))
        with open(os.path.join(args.out, "memory_growth.md"), "w") as f:
            f.writelines(lines)


def _recall_worker(rank: int, world: int, port: int, folder: str, index: str) -> None:
    import datetime as dt

    import torch
    import torch.distributed as dist

    import fastneg
    from fastneg.parallel.sharded import shard_bounds

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=600))
    q = torch.from_numpy(np.load(os.path.join(folder, "queries.npy")))
    corpus = torch.from_numpy(np.load(os.path.join(folder, "corpus.npy")))
    pos = torch.from_numpy(np.load(os.path.join(folder, "positives.npy")))
    lo, hi = shard_bounds(corpus.shape[0], world)[rank]
    a, b = q.shape[0] * rank // world, q.shape[0] * (rank + 1) // world
    m = fastneg.mine_hard_negatives(q[a:b], corpus[lo:hi], pos[a:b], 10, index=index, batch_size=1024,
                                    process_group=dist.group.WORLD)
    torch.save(m.indices, os.path.join(folder, f"{index}-{world}-{rank}.pt"))
    dist.destroy_process_group()


def recall(args: argparse.Namespace, folder: str) -> None:
    import torch
    import torch.multiprocessing as mp

    import fastneg

    files = _write_inputs(folder, args.recall_queries, args.recall_corpus, 64, seed=1)
    q, c, p = (torch.from_numpy(np.load(f)) for f in files)
    exact = fastneg.mine_hard_negatives(q, c, p, 10).indices
    lines = [f"# Per-shard FAISS indexes: recall@10 of the mined negatives against the exact top-10 "
             f"({args.recall_queries} x {args.recall_corpus} x 64)\n\n", _header(args),
             "| index | ranks | recall@10 | identical to 1 process |\n", "|---|---|---|---|\n"]
    # the index's own variance: one process over the same corpus in other row orders (other IVF
    # training samples and lists, other HNSW graphs)
    for index in ("ivf", "hnsw"):
        for order in (1, 2, 3):
            perm = torch.from_numpy(np.random.default_rng(order).permutation(c.shape[0]))
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.shape[0])
            got = fastneg.mine_hard_negatives(q, c[perm], inverse[p], 10, index=index, batch_size=1024).indices
            got = torch.where(got >= 0, perm[got.clamp(min=0)], -1)
            hits = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(got, exact))
            lines.append(f"| {index}, corpus order {order} | 1 | {hits / exact.numel():.4f} | |\n")
    for index in ("flat", "ivf", "hnsw"):
        outputs = {}
        for world in (1, 2, 3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_recall_worker, args=(world, port, folder, index), nprocs=world)
            got = torch.cat([torch.load(os.path.join(folder, f"{index}-{world}-{r}.pt")) for r in range(world)])
            outputs[world] = got
            hits = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(got, exact))
            lines.append(f"| {index} | {world} | {hits / exact.numel():.4f} | "
                         f"{'' if world == 1 else torch.equal(got, outputs[1])} |\n")
            with open(os.path.join(args.out, "recall.md"), "w") as f:
                f.writelines(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--corpus", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--growth", type=int, nargs="*", default=[50_000, 100_000, 200_000, 400_000])
    parser.add_argument("--growth-queries", type=int, default=4096)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--recall-corpus", type=int, default=30_000)
    parser.add_argument("--sections", nargs="*", default=["time_memory", "memory_growth", "recall"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for section in args.sections:
            start = time.perf_counter()
            {"time_memory": time_memory, "memory_growth": memory_growth, "recall": recall}[section](args, folder)
            print(f"{section}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
