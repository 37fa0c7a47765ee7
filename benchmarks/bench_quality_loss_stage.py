"""The loss stage of the quality study's trainings, dense against fused, at each batch it trains.

For each batch size: B (query, code) pairs of the python-docstrings corpus embedded by the
StaticEmbedding the study starts from (D = 384), then one forward + backward of
sentence-transformers' ``MultipleNegativesRankingLoss`` (its B x B score matrix) and of
fastneg's drop-in of it, from the same embeddings: median time of 3 (after a warm-up) and peak
memory (resident-set growth, buffers from mmap so that every one is seen), in one process with
2 threads. Writes a markdown table.

    python benchmarks/bench_quality_loss_stage.py --sizes 4096 16384 --out DIR/loss_stage.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large buffers from mmap, returned on free
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))

import torch  # noqa: E402

from fastneg.tools import retrieval  # noqa: E402
from fastneg.tools.benchmark import device_name  # noqa: E402
from fastneg.tools.corpora import python_docstrings  # noqa: E402
from fastneg.tools.real_demo import loss_stage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--model", default="static:all-MiniLM-L6-v2")
    p.add_argument("--out")
    args = p.parse_args()
    pairs, _ = python_docstrings()
    split = retrieval.split_pairs(pairs)
    model = retrieval.load_model(args.model, 128)
    lines = [f"# Loss stage, dense against fused ({datetime.date.today().isoformat()})", "",
             f"{device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{platform.python_version()}; {args.model} embeddings (D = 384) of the first B training pairs; one "
             "forward + backward from the embeddings, median of 3 after a warm-up; peak = resident-set growth.", "",
             "| B | loss | time (ms) | peak memory (MiB) | loss value |", "|---|---|---|---|---|"]
    for B in args.sizes:
        batch = split.train[:B]
        for row in loss_stage(model, ([x.query for x in batch], [x.positive for x in batch])):
            lines.append(f"| {B} | {row['loss']} | {1000 * row['seconds']:.0f} | {row['peak_mib']:.1f} | "
                         f"{row['value']:.6f} |")
            print(lines[-1], flush=True)
    lines += ["", "Reproduce: `python benchmarks/bench_quality_loss_stage.py " + " ".join(sys.argv[1:]) + "`", ""]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
