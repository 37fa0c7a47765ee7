"""``fastneg quality``: does masking or weighting recover retrieval quality when batches hold
false negatives? A synthetic task where the truth is known.

The task (the demo's, :class:`fastneg.tools.demo.SyntheticRetrieval`): documents come in topic groups
(an original plus exact duplicates, which share a document id, and near-duplicates, which do
not); every member of a group is relevant to a query about the group. Queries and documents are
two noisy views of the group's latent vector, encoded by two small MLP towers trained from
scratch.

Planted false negatives, two ways (``--planting``). Each training batch holds B queries with one
positive document each, every query taking a member of its topic's group as positive (drawn
with replacement: exact duplicates, near-duplicates or the very same document).

- ``per-query`` (default): for every query a share ``rate`` (0 %, 10 %, 30 %) of the other B - 1
  in-batch keys are relevant to it: the batch is drawn as topics of m = 1 + round(rate (B - 1))
  queries each. This is the rate that DCL's and HCL's ``tau_plus`` stands for (the share of a
  query's negatives that are false). It also means fewer distinct topics per batch (B / m: 10 at
  10 %, 3.3 at 30 %), so fewer true negatives; the ``oracle`` row (every same-topic key masked,
  which no method can know) bounds what removing false negatives can recover.
- ``pairs``: a share ``rate`` of the batch's keys are relevant to one other query: pairs of
  queries about the same topic, every other query about a distinct topic (each affected query
  sees one false negative among B - 1 keys).

At 0 % every query of the batch is about a different topic in both.

Methods, all through :func:`fastneg.info_nce` with the same temperature, steps and data:
plain InfoNCE; ``labels`` (document ids: exact duplicates masked); ``relative_margin`` 0.05
(NV-Retriever TopK-PercPos); ``margin`` 0.1; ``SimANS`` (a = 0.5, b = 0, detached weights);
``labels + relative_margin + SimANS``; ``GIST (noisy guide)``: a guide model's scores mask keys
scoring above the positive's (the guide sees the true latent vectors plus noise); ``DCL``
(``debias=0.1``, the paper's default prior); ``HCL`` (beta 1, tau+ 0.1, the authors' defaults);
``GCSE (noisy reference)`` (the guide as reference model, alpha 0.17, the authors' BERT value);
``soft labels (noisy teacher)`` (KL to the guide's softmax at the loss's temperature);
``oracle (topic labels)``: every key of the query's topic masked (the truth, as a bound).
Attraction beside elimination (``false_negatives="attract"``: the flagged keys become positives,
SupCon's outside form): ``labels, attract``, ``relative_margin 0.05, attract``, ``GIST (noisy
guide), attract`` and ``oracle (topic labels), attract`` (every same-topic key a positive:
supervised contrastive learning with the true topics).

Metrics on held-out queries against the whole corpus: recall@10 (share of the query's relevant
documents in the top 10, out of at most 10) and nDCG@10 (binary relevance), mean and standard
deviation over seeds. Every method sees the same corpus, batches and initialisation for a given
seed, so the recovery over plain InfoNCE is also reported as the mean and standard deviation of
the per-seed paired differences. Nothing here is tuned per method; the task's parameters are the
demo's apart from its size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch

import fastneg
from fastneg.tools.demo import SyntheticRetrieval, TaskConfig, tower

RATES = (0.0, 0.1, 0.3)
PLANTINGS = ("per-query", "pairs")
GUIDE_NOISE = 0.5  # the guide's view of the true latents: latent + N(0, GUIDE_NOISE^2) per coordinate


@dataclass(frozen=True)
class QualityConfig:
    num_groups: int = 6000
    batch_size: int = 512
    steps: int = 150
    seeds: tuple[int, ...] = (0, 1, 2)
    rates: tuple[float, ...] = RATES
    planting: str = "per-query"
    held_out_queries: int = 1000

    def task(self, seed: int) -> TaskConfig:
        return TaskConfig(num_groups=self.num_groups, batch_size=self.batch_size, steps=self.steps, seed=seed,
                          held_out_queries=self.held_out_queries)


class PlantedBatches:
    """Training batches with a controlled share of planted false negatives (module docstring)."""

    def __init__(self, task: SyntheticRetrieval, rate: float, seed: int, planting: str = "per-query") -> None:
        if planting not in PLANTINGS:
            raise ValueError(f"planting must be one of {PLANTINGS}, got {planting!r}")
        self.task, self.rate, self.planting = task, rate, planting
        self.g = torch.Generator().manual_seed(10_000 + seed)
        g = torch.Generator().manual_seed(20_000 + seed)
        # the guide: a noisy view of the true latents, for queries (by group) and documents
        cfg = task.cfg
        self.guide_groups = torch.nn.functional.normalize(
            task.latents + GUIDE_NOISE * torch.randn(task.latents.shape, generator=g), dim=-1)
        doc_noise = GUIDE_NOISE * torch.randn(task.doc_group.numel(), cfg.latent_dim, generator=g)
        self.guide_docs = torch.nn.functional.normalize(task.latents[task.doc_group] + doc_noise, dim=-1)

    def next(self) -> dict[str, torch.Tensor]:
        task, g = self.task, self.g
        B = task.cfg.batch_size
        if self.planting == "per-query":
            per_topic = 1 + int(round(self.rate * (B - 1)))  # each query: per_topic - 1 relevant in-batch keys
            topics = torch.randperm(task.cfg.num_groups, generator=g)[: -(-B // per_topic)]
            groups = topics.repeat_interleave(per_topic)[:B]
        else:  # pairs: 2 * pairs = rate * B keys are a false negative of one other query
            pairs = int(round(self.rate * B / 2))
            distinct = torch.randperm(task.cfg.num_groups, generator=g)[: B - pairs]
            groups = torch.cat([distinct[:pairs].repeat_interleave(2), distinct[pairs:]])
        groups = groups[torch.randperm(B, generator=g)]
        docs = task.members(groups, g)
        dev = task.device
        return {"features": task._queries(groups, g).to(dev), "docs": docs.to(dev),
                "doc_ids": task.doc_id[docs].to(dev), "groups": groups.to(dev),
                "guide_query": self.guide_groups[groups].to(dev), "guide_keys": self.guide_docs[docs].to(dev)}


LossFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def methods(temperature: float) -> dict[str, LossFn]:
    t = temperature
    simans = fastneg.SimANS(0.5, 0.0)
    return {
        "InfoNCE": lambda q, k, b: fastneg.info_nce(q, k, temperature=t),
        "labels": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, key_labels=b["doc_ids"]),
        "relative_margin 0.05": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, relative_margin=0.05),
        "margin 0.1": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, margin=0.1),
        "SimANS": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, weighting=simans),
        "labels + relative_margin + SimANS": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, key_labels=b["doc_ids"], relative_margin=0.05, weighting=simans),
        "GIST (noisy guide)": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, guide_query=b["guide_query"], guide_keys=b["guide_keys"], guide_margin=0.0),
        "DCL (tau+ 0.1)": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, debias=0.1),
        "HCL (beta 1, tau+ 0.1)": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, weighting=fastneg.HCL(1.0),
                                                                   debias=0.1),
        "GCSE (noisy reference)": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, guide_query=b["guide_query"], guide_keys=b["guide_keys"], guide_margin=None,
            weighting=fastneg.GCSE(0.17)),
        "soft labels (noisy teacher)": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, guide_query=b["guide_query"], guide_keys=b["guide_keys"], guide_margin=None,
            soft_labels=fastneg.SoftLabels()),
        "oracle (topic labels)": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, key_labels=b["groups"]),
        # attraction: the same flags, the flagged keys as positives instead of removed
        "labels, attract": lambda q, k, b: fastneg.info_nce(q, k, temperature=t, key_labels=b["doc_ids"],
                                                            false_negatives="attract"),
        "relative_margin 0.05, attract": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, relative_margin=0.05, false_negatives="attract"),
        "GIST (noisy guide), attract": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, guide_query=b["guide_query"], guide_keys=b["guide_keys"], guide_margin=0.0,
            false_negatives="attract"),
        "oracle (topic labels), attract": lambda q, k, b: fastneg.info_nce(
            q, k, temperature=t, key_labels=b["groups"], false_negatives="attract"),
    }


@torch.no_grad()
def evaluate(task: SyntheticRetrieval, query_tower: torch.nn.Module, doc_tower: torch.nn.Module) -> dict[str, float]:
    docs = torch.nn.functional.normalize(doc_tower(task.doc_features), dim=-1)
    queries = torch.nn.functional.normalize(query_tower(task.eval_queries), dim=-1)
    top = (queries @ docs.T).topk(10, dim=1).indices.cpu()
    rel = (task.doc_group[top] == task.eval_groups[:, None]).float()  # [Q, 10]
    n_rel = torch.tensor([min(10, len(task.group_members[grp])) for grp in task.eval_groups.tolist()])
    discount = 1.0 / torch.log2(torch.arange(2, 12).float())
    dcg = (rel * discount).sum(1)
    idcg = torch.stack([discount[:n].sum() for n in n_rel.tolist()])
    return {"recall@10": float((rel.sum(1) / n_rel).mean()), "ndcg@10": float((dcg / idcg).mean())}


def train_one(method: str, rate: float, seed: int, cfg: QualityConfig) -> dict:
    task_cfg = cfg.task(seed)
    torch.manual_seed(seed)
    task = SyntheticRetrieval(task_cfg, torch.device("cpu"))
    batches = PlantedBatches(task, rate, seed, cfg.planting)
    query_tower, doc_tower = tower(task_cfg), tower(task_cfg)
    opt = torch.optim.AdamW(list(query_tower.parameters()) + list(doc_tower.parameters()), lr=task_cfg.lr)
    loss_fn = methods(task_cfg.temperature)[method]
    for _ in range(task_cfg.steps):
        b = batches.next()
        q = torch.nn.functional.normalize(query_tower(b["features"]), dim=-1)
        k = torch.nn.functional.normalize(doc_tower(task.doc_features[b["docs"]]), dim=-1)
        loss = loss_fn(q, k, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"method": method, "rate": rate, "seed": seed, **evaluate(task, query_tower, doc_tower)}


def run(cfg: QualityConfig, only: Optional[list[str]] = None, progress: bool = True) -> list[dict]:
    names = [m for m in methods(0.05) if not only or m in only]
    results = []
    for rate in cfg.rates:
        for name in names:
            for seed in cfg.seeds:
                start = time.perf_counter()
                results.append(train_one(name, rate, seed, cfg))
                if progress:
                    r = results[-1]
                    print(f"rate {rate:.0%} {name:<36} seed {seed}: recall@10 {r['recall@10']:.4f} "
                          f"nDCG@10 {r['ndcg@10']:.4f} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
                          flush=True)
    return results


def summarize(results: list[dict]) -> dict[tuple[float, str], dict[str, tuple[float, float]]]:
    table: dict[tuple[float, str], dict[str, list[float]]] = {}
    for r in results:
        cell = table.setdefault((r["rate"], r["method"]), {"recall@10": [], "ndcg@10": []})
        for metric in cell:
            cell[metric].append(r[metric])
    return {key: {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in cell.items()}
            for key, cell in table.items()}


def paired_deltas(results: list[dict], baseline: str = "InfoNCE") -> dict[tuple[float, str], dict[str, tuple[float, float]]]:
    """Per (rate, method): mean and standard deviation over seeds of (method - baseline) on the
    same seed (same corpus, batches and initialisation)."""
    by_key = {(r["rate"], r["method"], r["seed"]): r for r in results}
    out: dict[tuple[float, str], dict[str, tuple[float, float]]] = {}
    for (rate, method, seed), r in by_key.items():
        base = by_key.get((rate, baseline, seed))
        if base is None:
            continue
        cell = out.setdefault((rate, method), {"recall@10": [], "ndcg@10": []})  # type: ignore[arg-type]
        for metric in ("recall@10", "ndcg@10"):
            cell[metric].append(r[metric] - base[metric])  # type: ignore[union-attr]
    return {key: {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)  # type: ignore[arg-type]
                  for m, v in cell.items()} for key, cell in out.items()}


def markdown(results: list[dict], cfg: QualityConfig) -> str:
    summary = summarize(results)
    deltas_by = paired_deltas(results)
    names = list(dict.fromkeys(r["method"] for r in results))
    rates = list(dict.fromkeys(r["rate"] for r in results))
    lines = [f"# Training quality with planted false negatives ({datetime.date.today().isoformat()})", "",
             f"Synthetic retrieval task (`fastneg.tools.quality`, planting `{cfg.planting}`): {cfg.num_groups} topic "
             f"groups, batch {cfg.batch_size}, "
             f"{cfg.steps} steps, seeds {list(cfg.seeds)}, {cfg.held_out_queries} held-out queries against the whole "
             "corpus. Mean +- standard deviation over seeds; delta = method minus plain InfoNCE at the same rate "
             "and seed, mean +- standard deviation of those paired differences over seeds.", ""]
    for metric in ("recall@10", "ndcg@10"):
        lines += [f"## {metric}", "", "| method | " + " | ".join(f"{r:.0%} planted" for r in rates) + " | "
                  + " | ".join(f"delta at {r:.0%}" for r in rates) + " |",
                  "|---" * (1 + 2 * len(rates)) + "|"]
        for name in names:
            cells = [f"{summary[(r, name)][metric][0]:.4f} +- {summary[(r, name)][metric][1]:.4f}" for r in rates]
            deltas = [f"{deltas_by[(r, name)][metric][0]:+.4f} +- {deltas_by[(r, name)][metric][1]:.4f}"
                      if (r, name) in deltas_by else "-" for r in rates]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Left: recall@10 per method and rate; right: the paired recovery over plain InfoNCE
    (mean +- standard deviation of the per-seed differences)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, deltas = summarize(results), paired_deltas(results)
    names = list(dict.fromkeys(r["method"] for r in results))
    rates = list(dict.fromkeys(r["rate"] for r in results))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, name in enumerate(names):
        style = dict(marker=markers[i % len(markers)], color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                     capsize=3, label=name, linestyle="-" if i < 10 else "--")
        x = [100 * r + 0.25 * (i - len(names) / 2) for r in rates]  # small offsets keep error bars apart
        axes[0].errorbar(x, [summary[(r, name)]["recall@10"][0] for r in rates],
                         yerr=[summary[(r, name)]["recall@10"][1] for r in rates], **style)
        if all((r, name) in deltas for r in rates):
            axes[1].errorbar(x, [deltas[(r, name)]["recall@10"][0] for r in rates],
                             yerr=[deltas[(r, name)]["recall@10"][1] for r in rates], **style)
    axes[0].set_ylabel("recall@10")
    axes[1].set_ylabel("recall@10 minus plain InfoNCE (same seed)")
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("planted false negatives (%)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    from . import retrieval

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="fastneg quality", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Training quality per false-negative method. On real pairs (--pairs FILE or --corpus "
                    "python-docstrings): fine-tunes a sentence-transformers model once per method and seed and "
                    "reports nDCG@10, recall@10 and MRR@10 (fastneg.tools.retrieval). Without them: the synthetic "
                    "task with planted false negatives (below).\n\n" + __doc__)
    p.add_argument("--groups", type=int, default=QualityConfig.num_groups, help="synthetic: topic groups")
    p.add_argument("--batch-size", type=int, help=f"default {QualityConfig.batch_size} synthetic, "
                                                  f"{retrieval.RunConfig.batch_size} on real pairs")
    p.add_argument("--steps", type=int, default=QualityConfig.steps)
    p.add_argument("--seeds", type=int, nargs="+", default=list(QualityConfig.seeds))
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    p.add_argument("--planting", choices=PLANTINGS, default=QualityConfig.planting,
                   help="per-query: each query sees rate * (B - 1) relevant keys; pairs: rate * B keys are "
                        "relevant to one other query")
    p.add_argument("--held-out", type=int, default=QualityConfig.held_out_queries)
    p.add_argument("--methods", nargs="+", help="a subset of the methods (names as in the table)")
    p.add_argument("--out", help="folder for quality.md, quality.json and quality.png (real pairs: and runs/, "
                                 "which a rerun resumes from)")
    retrieval.add_arguments(p)
    args = p.parse_args(argv)
    if args.pairs or args.corpus or args.list_methods:
        if args.batch_size is None:
            args.batch_size = retrieval.RunConfig.batch_size
        return retrieval.main(args, argv)
    if args.batch_size is None:
        args.batch_size = QualityConfig.batch_size
    for name in args.methods or []:
        if name not in methods(0.05):
            print(f"fastneg quality: error: --methods: unknown method {name!r}; known: {list(methods(0.05))}",
                  file=sys.stderr)
            return 2
    cfg = QualityConfig(num_groups=args.groups, batch_size=args.batch_size, steps=args.steps, seeds=tuple(args.seeds),
                        rates=tuple(args.rates), held_out_queries=args.held_out, planting=args.planting)
    results = run(cfg, args.methods)
    text = markdown(results, cfg)
    text += "\nReproduce: `fastneg quality " + " ".join(argv) + "`\n"
    print(text)
    if args.out:
        import os
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quality.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "quality.json"), "w") as f:
            json.dump({"config": asdict(cfg), "runs": results}, f, indent=1)
        plot(results, os.path.join(args.out, "quality.png"))
    return 0



if __name__ == "__main__":
    sys.exit(main())
