"""``python -m fastneg.tools.demo --synthetic``: train a small dual encoder on a synthetic retrieval
task with planted false negatives, with plain InfoNCE and with fastneg's masking + SimANS weighting.
(``python -m fastneg.tools.demo`` without ``--synthetic``, what ``make demo`` runs, is the demo on
real text with a real model: :mod:`fastneg.tools.real_demo`.) The task and its towers also serve
``fastneg quality``'s synthetic benchmark.

The task. Each document is a latent topic vector seen through a fixed random "document view";
each query sees the same latent through a different "query view", plus noise. The corpus
plants false negatives: many documents come in groups of exact duplicates (same text, same
id hash) and near-duplicates (same latent, a little noise). All members of a group are
relevant to a query about any of them. Batches are drawn so that group members often meet,
as they do in real mined or scraped data; plain InfoNCE then pushes relevant documents away.

Runs compared, each on the same data, initialisation and number of steps:

- ``naive InfoNCE``: cross-entropy over the dense ``q @ k.T / t`` matrix (what most code does);
- ``fastneg plain``: the fused op with no rules (same loss, no B x N matrix);
- ``fastneg masked+SimANS``: duplicate ids masked through ``key_labels``, near-duplicates through
  ``relative_margin``, remaining negatives weighted by ``SimANS``: what a user who knows only the
  texts' hashes can do;
- ``fastneg group labels (oracle)``: every in-batch document of the query's group masked through
  ``key_labels`` (the group id, which a real corpus does not give): how much false-negative
  handling can recover on this task at all, the bar the rules are measured against.

Each run reports recall@10 on held-out queries (fraction of the query's relevant documents
found in the top 10, over the whole corpus), the time spent in the loss (forward + backward,
measured around the loss alone) and the peak memory of the loss step (CUDA: allocator peak;
CPU: peak resident-set growth, see ``fastneg.tools.profiling``; each method runs in a fresh process).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass

import torch

import fastneg
from fastneg.tools.profiling import peak_memory


@dataclass(frozen=True)
class TaskConfig:
    latent_dim: int = 32
    feature_dim: int = 128
    embed_dim: int = 64
    num_groups: int = 30000
    group_size_max: int = 5  # 1 original + up to 4 exact/near duplicates
    feature_noise: float = 1.4
    near_duplicate_noise: float = 0.15
    held_out_queries: int = 2000
    batch_size: int = 4096
    steps: int = 80
    lr: float = 2e-3
    temperature: float = 0.05
    relative_margin: float = 0.05  # NV-Retriever TopK-PercPos 95 %
    simans_a: float = 0.5
    simans_b: float = 0.0
    seed: int = 0


class SyntheticRetrieval:
    """Corpus, training pairs and held-out queries with known relevance (see module docstring)."""

    def __init__(self, cfg: TaskConfig, device: torch.device) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        self.cfg = cfg
        latents = torch.randn(cfg.num_groups, cfg.latent_dim, generator=g)
        sizes = torch.randint(1, cfg.group_size_max + 1, (cfg.num_groups,), generator=g)
        self.doc_group = torch.repeat_interleave(torch.arange(cfg.num_groups), sizes)
        n_docs = self.doc_group.numel()
        first = torch.ones(n_docs, dtype=torch.bool)
        first[1:] = self.doc_group[1:] != self.doc_group[:-1]
        # duplicates: half exact copies (same id hash), half near-duplicates (noisy latent, new id)
        exact = ~first & (torch.rand(n_docs, generator=g) < 0.5)
        self.doc_id = torch.arange(n_docs)
        originals = torch.nonzero(first).squeeze(1)
        self.doc_id[exact] = originals[self.doc_group[exact]]
        doc_latent = latents[self.doc_group].clone()
        near = ~first & ~exact
        doc_latent[near] += cfg.near_duplicate_noise * torch.randn(int(near.sum()), cfg.latent_dim, generator=g)
        self.doc_view = torch.randn(cfg.latent_dim, cfg.feature_dim, generator=g) / cfg.latent_dim**0.5
        self.query_view = torch.randn(cfg.latent_dim, cfg.feature_dim, generator=g) / cfg.latent_dim**0.5
        doc_noise = cfg.feature_noise * torch.randn(n_docs, cfg.feature_dim, generator=g)
        doc_noise[exact] = doc_noise[originals[self.doc_group[exact]]]  # exact copies: identical text
        self.doc_features = (doc_latent @ self.doc_view + doc_noise).to(device)
        self.latents = latents
        # held-out queries: about random groups, scored against every member of the group
        self.eval_groups = torch.randint(0, cfg.num_groups, (cfg.held_out_queries,), generator=g)
        self.eval_queries = self._queries(self.eval_groups, g).to(device)
        self.generator = g
        self.device = device
        self.group_members = [[] for _ in range(cfg.num_groups)]
        for d, grp in enumerate(self.doc_group.tolist()):
            self.group_members[grp].append(d)

    def _queries(self, groups: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        noise = self.cfg.feature_noise * torch.randn(groups.numel(), self.cfg.feature_dim, generator=g)
        return self.latents[groups] @ self.query_view + noise

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query features, positive document indices, duplicate-id labels of those documents).
        Half the batch is drawn as pairs of queries about the same group, so that every such
        query meets another member of its group as an in-batch "negative"."""
        B = self.cfg.batch_size
        g = self.generator
        groups = torch.randint(0, self.cfg.num_groups, (B // 2,), generator=g)
        groups = torch.cat([groups[: B // 4].repeat_interleave(2), groups[B // 4:]])
        groups = torch.cat([groups, torch.randint(0, self.cfg.num_groups, (B - groups.numel(),), generator=g)])
        docs = self.members(groups, g)
        return self._queries(groups, g).to(self.device), docs.to(self.device), self.doc_id[docs].to(self.device)

    def members(self, groups: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One document drawn uniformly from each group's members."""
        return torch.tensor([self.group_members[grp][int(torch.randint(0, len(self.group_members[grp]), (1,),
                                                                        generator=g))]
                             for grp in groups.tolist()])

    @torch.no_grad()
    def recall_at_10(self, query_tower: torch.nn.Module, doc_tower: torch.nn.Module) -> float:
        docs = torch.nn.functional.normalize(doc_tower(self.doc_features), dim=-1)
        queries = torch.nn.functional.normalize(query_tower(self.eval_queries), dim=-1)
        top = (queries @ docs.T).topk(10, dim=1).indices.cpu()
        hits = (self.doc_group[top] == self.eval_groups[:, None]).sum(1).float()
        relevant = torch.tensor([min(10, len(self.group_members[grp])) for grp in self.eval_groups.tolist()])
        return float((hits / relevant).mean())


def tower(cfg: TaskConfig) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(cfg.feature_dim, 256), torch.nn.GELU(), torch.nn.Linear(256, cfg.embed_dim))


def make_loss(method: str, cfg: TaskConfig):  # noqa: ANN201 - (q, k, doc_ids, groups) -> scalar loss
    if method == "naive InfoNCE":
        return lambda q, k, ids, groups: torch.nn.functional.cross_entropy(
            q @ k.T / cfg.temperature, torch.arange(q.shape[0], device=q.device))
    if method == "fastneg plain":
        return lambda q, k, ids, groups: fastneg.info_nce(q, k, temperature=cfg.temperature)
    if method == "fastneg group labels (oracle)":
        return lambda q, k, ids, groups: fastneg.info_nce(q, k, temperature=cfg.temperature, key_labels=groups)
    # exact duplicates share a document id (a text hash): masked by label; near-duplicates have
    # their own ids and are caught by the margin rule; the rest are weighted by SimANS
    return lambda q, k, ids, groups: fastneg.info_nce(q, k, temperature=cfg.temperature, key_labels=ids,
                                                      relative_margin=cfg.relative_margin,
                                                      weighting=fastneg.SimANS(a=cfg.simans_a, b=cfg.simans_b))


def train(method: str, cfg: TaskConfig, device_name: str, on_step=None) -> dict:  # noqa: ANN001
    device = torch.device(device_name)
    torch.manual_seed(cfg.seed)
    task = SyntheticRetrieval(cfg, device)
    query_tower, doc_tower = tower(cfg).to(device), tower(cfg).to(device)
    params = list(query_tower.parameters()) + list(doc_tower.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    loss_fn = make_loss(method, cfg)
    loss_seconds, peak = 0.0, 0.0
    for step in range(cfg.steps):
        feats, docs, labels = task.batch()
        groups = task.doc_group[docs.cpu()].to(device)
        q = torch.nn.functional.normalize(query_tower(feats), dim=-1)
        k = torch.nn.functional.normalize(doc_tower(task.doc_features[docs]), dim=-1)
        # the loss step alone, timed and measured: forward and backward to the embeddings
        q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
        with peak_memory(device) as step_peak:
            start = time.perf_counter()
            loss = loss_fn(q_leaf, k_leaf, labels, groups)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            loss_seconds += time.perf_counter() - start
        peak = max(peak, step_peak.mib)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward([q, k], [q_leaf.grad, k_leaf.grad])
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    return {"method": method, "recall@10": task.recall_at_10(query_tower, doc_tower),
            "loss_seconds": loss_seconds, "peak_loss_mib": peak, "final_loss": float(loss.detach())}


def _worker(method: str, cfg: TaskConfig, device: str, queue: mp.Queue) -> None:
    try:
        queue.put(("result", train(method, cfg, device, on_step=lambda i: queue.put(("step", i)))))
    except Exception as exc:  # reported by the parent as one line
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


METHODS = ("naive InfoNCE", "fastneg plain", "fastneg masked+SimANS", "fastneg group labels (oracle)")
STALL_SECONDS = 900  # a worker silent this long (no step finished) is stopped


class DemoError(Exception):
    """A worker crashed or stalled: the demo ends with one line on stderr and exit status 1."""


def _run_method(ctx, method: str, cfg: TaskConfig, device: str) -> dict:  # noqa: ANN001
    from fastneg.tools.progress import progress_bar

    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(method, cfg, device, queue))
    proc.start()
    step, close = progress_bar(cfg.steps, "step")
    waited = 0.0
    try:
        while True:
            try:
                kind, value = queue.get(timeout=2.0)
            except Exception:  # queue.Empty: is the worker still there?
                waited += 2.0
                if not proc.is_alive():
                    raise DemoError(f"demo: the {method!r} worker exited with status {proc.exitcode} "
                                    "before reporting a result") from None
                if waited > STALL_SECONDS:
                    proc.terminate()
                    raise DemoError(f"demo: the {method!r} worker finished no step in {STALL_SECONDS} s; stopped") from None
                continue
            waited = 0.0
            if kind == "step":
                step(method)
            elif kind == "error":
                raise DemoError(f"demo: {method!r} failed: {value}")
            else:
                return value
    finally:
        close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()


def synthetic_main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m fastneg.tools.demo --synthetic",
                                     description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=TaskConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TaskConfig.batch_size)
    parser.add_argument("--groups", type=int, default=TaskConfig.num_groups)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--groups", args.groups)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    cfg = TaskConfig(steps=args.steps, batch_size=args.batch_size, num_groups=args.groups)
    print(f"fastneg {fastneg.__version__} demo on {args.device}: {cfg.num_groups} topic groups with planted "
          f"duplicates, batch {cfg.batch_size}, {cfg.steps} steps per method, {len(METHODS)} methods")
    print("Measured per method (same data, initialisation and steps): recall@10 on held-out queries (share of\n"
          "each query's relevant documents in its top 10 over the corpus); loss time (forward+backward of the\n"
          "loss alone, summed over the steps); peak memory of the loss step (each method in a fresh process).",
          flush=True)
    ctx = mp.get_context("spawn")  # each method in a fresh process, so peak memory is its own
    results = []
    for method in METHODS:
        try:
            res = _run_method(ctx, method, cfg, args.device)
        except DemoError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(1) from None
        results.append(res)
        print(f"  {method:<30} recall@10 {res['recall@10']:.4f}   loss time {res['loss_seconds']:6.2f} s   "
              f"loss peak memory {res['peak_loss_mib']:8.1f} MiB", flush=True)
    by = {r["method"]: r for r in results}
    naive, rules, oracle = by["naive InfoNCE"], by["fastneg masked+SimANS"], by["fastneg group labels (oracle)"]
    print(f"Against plain InfoNCE, recall@10: masking every false negative (the oracle) "
          f"{oracle['recall@10'] - naive['recall@10']:+.4f}; the hash + margin + SimANS rules "
          f"{rules['recall@10'] - naive['recall@10']:+.4f}.\n"
          "The rules only see what a real corpus gives (exact-duplicate hashes, scores): near-duplicates below the\n"
          "margin and relevant documents that are not duplicates stay negatives. Where the oracle gains little, false\n"
          "negatives cost little at this batch and corpus; `fastneg quality` measures the effect with seeds and spread\n"
          "and with more false negatives per batch.")
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m fastneg.tools.demo``: the real-data demo (``--synthetic``: the synthetic one). Large
    buffers come straight from mmap and go back on free, so the loss stage's peak-memory readings
    see every buffer a call allocates."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--synthetic" in argv:
        synthetic_main([a for a in argv if a != "--synthetic"])
        return 0
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, "-m", "fastneg.tools.demo", *argv], env)
    from .real_demo import main as real_main

    return real_main(argv)


if __name__ == "__main__":
    sys.exit(main())
