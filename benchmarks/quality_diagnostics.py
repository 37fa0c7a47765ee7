"""Two diagnostics behind the quality benchmark's discussion (docs/quality.md), on its task (fastneg.tools.quality):

1. DCL's clamp: for ``DCL (tau+ 0.1)`` at a planted rate, the share of rows whose debiased
   negative term sits at the floor ``n e^{-1/t}`` (and so gives their negatives no gradient), per
   training step, computed from the same batch embeddings the loss sees.
2. Fused against dense: one method trained with the fused kernels and with the dense reference
   (``backend="reference"``) from the same seed; the metrics should agree.

    python benchmarks/quality_diagnostics.py --out benchmarks/results/quality_diagnostics_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import sys

import torch

import fastneg
import fastneg.tools.quality as quality
from fastneg.tools.benchmark import device_name


def dcl_clamped_share(rate: float, seed: int, cfg: quality.QualityConfig) -> tuple[list[float], dict]:
    """Per step, the share of rows whose DCL term is clamped (in-batch positives on the diagonal,
    no masking rule, as the benchmark's DCL row)."""
    shares: list[float] = []
    fused = fastneg.info_nce

    def spy(q: torch.Tensor, k: torch.Tensor, *args, **kw):  # noqa: ANN002, ANN003, ANN202
        if kw.get("debias") is not None and kw.get("weighting") is None:
            with torch.no_grad():
                t, tau_plus = kw["temperature"], kw["debias"]
                logits = q @ k.T / t
                n = logits.shape[1] - 1
                positive = logits.diagonal()
                negatives = logits.masked_fill(torch.eye(*logits.shape, dtype=torch.bool), float("-inf"))
                raw = (torch.logsumexp(negatives, 1).exp() - n * tau_plus * positive.exp()) / (1 - tau_plus)
                shares.append(float((raw < n * math.exp(-1 / t)).float().mean()))
        return fused(q, k, *args, **kw)

    fastneg.info_nce = spy
    try:
        result = quality.train_one("DCL (tau+ 0.1)", rate, seed, cfg)
    finally:
        fastneg.info_nce = fused
    return shares, result


def fused_vs_reference(method: str, rate: float, seed: int, cfg: quality.QualityConfig) -> tuple[dict, dict]:
    fused_run = quality.train_one(method, rate, seed, cfg)
    fused = fastneg.info_nce
    fastneg.info_nce = functools.partial(fused, backend="reference")
    try:
        dense_run = quality.train_one(method, rate, seed, cfg)
    finally:
        fastneg.info_nce = fused
    return fused_run, dense_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    cfg = quality.QualityConfig()
    lines = [f"# Quality benchmark diagnostics ({datetime.date.today().isoformat()}, "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__})", "",
             f"Task: `fastneg.tools.quality` defaults (planting `{cfg.planting}`, batch {cfg.batch_size}, {cfg.steps} steps), "
             f"seed {args.seed}.", "", "## DCL (tau+ 0.1): share of rows at the clamp's floor", "",
             "| planted rate | first step | step 75 | last step | recall@10 |", "|---|---|---|---|---|"]
    for rate in quality.RATES:
        shares, result = dcl_clamped_share(rate, args.seed, cfg)
        lines.append(f"| {rate:.0%} | {shares[0]:.1%} | {shares[len(shares) // 2]:.1%} | {shares[-1]:.1%} | "
                     f"{result['recall@10']:.4f} |")
    lines += ["", "## Fused kernels against the dense reference, same training", "",
              "| method | rate | fused recall@10 | dense recall@10 | fused nDCG@10 | dense nDCG@10 |",
              "|---|---|---|---|---|---|"]
    for method, rate in (("labels", 0.1), ("HCL (beta 1, tau+ 0.1)", 0.1), ("soft labels (noisy teacher)", 0.1)):
        f, d = fused_vs_reference(method, rate, args.seed, cfg)
        lines.append(f"| {method} | {rate:.0%} | {f['recall@10']:.4f} | {d['recall@10']:.4f} | {f['ndcg@10']:.4f} | "
                     f"{d['ndcg@10']:.4f} |")
    text = "\n".join(lines) + "\n\nReproduce: `python benchmarks/quality_diagnostics.py " + " ".join(sys.argv[1:]) + "`\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
