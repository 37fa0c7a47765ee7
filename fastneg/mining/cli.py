"""``fastneg mine``: hard-negative mining on files.

Two kinds of input:

- embeddings: ``--queries Q.npy --corpus C.npy --positives P.npy`` (float ``[Q, D]`` and ``[N, D]``,
  int ``[Q]`` or ``[Q, P]`` with ``-1`` padding; loaded with ``allow_pickle=False``). One output row
  per query: ``query`` (its row), ``positives``, ``negatives`` (corpus rows, best first; fewer
  when the rules leave fewer) and ``scores``.
- a sentence-transformers model and pairs: ``--model PATH_OR_NAME --pairs pairs.jsonl|.parquet``
  (an anchor and a positive column; ``--corpus`` adds a JSONL/Parquet/text file of extra corpus
  texts). Output: sentence-transformers' formats (``--output-format triplet`` ...).

The output (``.parquet`` or ``.jsonl``, by extension) is written to a hidden temporary file
next to it and renamed when complete: an interrupted run leaves no output file (a killed one may
leave the hidden ``.partial`` file; Ctrl-C and SIGTERM remove it). Malformed input ends the
command with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np


class InputError(Exception):
    """A malformed input file or argument: reported on one line, exit status 2."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mine", help="mine hard negatives for queries from a corpus (embeddings or a model + pairs)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("embeddings input")
    src.add_argument("--queries", help="query embeddings, .npy [Q, D]")
    src.add_argument("--corpus", help="corpus embeddings .npy [N, D] (or, with --model, extra corpus texts: "
                                      ".jsonl with a 'text' field, .parquet with a 'text' column, or .txt lines)")
    src.add_argument("--positives", help="positive corpus rows, .npy int [Q] or [Q, P] (-1 padding)")
    st = p.add_argument_group("model input")
    st.add_argument("--model", help="a sentence-transformers model (path or name)")
    st.add_argument("--pairs", help="(anchor, positive) pairs, .jsonl or .parquet")
    st.add_argument("--anchor-column", help="anchor column (default: the first)")
    st.add_argument("--positive-column", help="positive column (default: the second)")
    st.add_argument("--output-format", default="triplet", choices=["triplet", "n-tuple", "labeled-pair", "labeled-list"])
    st.add_argument("--output-scores", action="store_true", help="add the similarity scores")
    st.add_argument("--device", default=None, help="device for the model (default: cuda when available) and, with "
                                                   "embeddings input, for the search (default: cpu)")
    rules = p.add_argument_group("mining")
    rules.add_argument("--out", required=True, help="output file, .parquet or .jsonl")
    rules.add_argument("--num-negatives", type=int, default=3)
    rules.add_argument("--strategy", default="top", choices=["top", "simans", "uniform", "random"])
    rules.add_argument("--simans-a", type=float, default=0.5)
    rules.add_argument("--simans-b", type=float, default=0.0)
    rules.add_argument("--margin", type=float, help="mask s > s+ - margin (s+: the minimum positive score)")
    rules.add_argument("--relative-margin", type=float, help="mask s > s+ - |s+| * r")
    rules.add_argument("--max-score", type=float)
    rules.add_argument("--rules", metavar="JSON",
                       help="the rules as the fields of a fastneg.Rules, e.g. '{\"relative_margin\": 0.05}' (the "
                            "miner reads margin, relative_margin and max_score); instead of the three flags above")
    rules.add_argument("--min-score", type=float)
    rules.add_argument("--range-min", type=int, default=0)
    rules.add_argument("--range-max", type=int)
    rules.add_argument("--index", default="exact", choices=["exact", "flat", "ivf", "hnsw"])
    rules.add_argument("--batch-size", type=int, default=4096, help="queries per step")
    rules.add_argument("--seed", type=int, default=0)
    rules.add_argument("--no-progress", action="store_true", help="no progress bar")
    rules.add_argument("--resume", action="store_true",
                       help="continue an interrupted run (embeddings input) from the batches it kept in .OUT.parts/")


def require(module: str, what: str, extra: str) -> None:
    """Raise an :class:`InputError` naming the package and the extra that provides it when ``module``
    cannot be imported (a core install has none of the optional packages)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{what} needs the {module.split('.')[0]} package: install the '{extra}' extra "
                         f"(pip install --no-build-isolation '.[{extra}]' from a clone)") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_npy(path: Optional[str], name: str, kind: str, mmap: bool = False) -> np.ndarray:
    if not path:
        raise InputError(f"--{name} is required with embeddings input")
    if not os.path.isfile(path):
        raise InputError(f"--{name}: no such file: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"--{name}: empty file: {path}")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"--{name}: cannot read {path} as a .npy array ({_one_line(exc)})") from exc
    if not isinstance(arr, np.ndarray):
        raise InputError(f"--{name}: {path} is not a single .npy array")
    if kind == "float":
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"--{name}: expected a 2-D float array [rows, dim], got {arr.dtype} {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise InputError(f"--{name}: empty array {arr.shape}")
    else:
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"--{name}: expected an integer array [Q] or [Q, P], got {arr.dtype} {arr.shape}")
    return arr


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """A temporary path next to ``path``, renamed to it when the block completes; removed on an
    exception, Ctrl-C or SIGTERM."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"--out: no such directory: {directory}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.close(fd)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


class _RowWriter:
    """Rows to .jsonl or .parquet, batch by batch."""

    def __init__(self, path: str, fmt: str) -> None:
        self.fmt, self.path, self.writer, self.file = fmt, path, None, None
        if fmt == "jsonl":
            self.file = open(path, "w")  # noqa: SIM115

    def write(self, columns: dict[str, list]) -> None:
        if self.fmt == "jsonl":
            n = len(next(iter(columns.values())))
            for i in range(n):
                self.file.write(json.dumps({k: v[i] for k, v in columns.items()}) + "\n")
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.table(columns)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _output_format(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise InputError("--out: Parquet output needs the pyarrow package: install the 'mining' extra "
                             "(pip install --no-build-isolation '.[mining]' from a clone), or write .jsonl") from exc
        return "parquet"
    raise InputError(f"--out must end in .parquet or .jsonl, got {path}")


def _rules(args: argparse.Namespace) -> Any:
    """The run's :class:`fastneg.Rules`: ``--rules JSON`` or the three rule flags, not both."""
    from ..rules import RULE_FIELDS, Rules, check_carried, resolve_rules
    given = None
    if args.rules is not None:
        try:
            fields = json.loads(args.rules)
        except json.JSONDecodeError as exc:
            raise InputError(f"--rules: not JSON ({exc.msg}); pass an object such as '{{\"relative_margin\": 0.05}}'") from exc
        if not isinstance(fields, dict):
            raise InputError("--rules: pass a JSON object such as '{\"relative_margin\": 0.05}'")
        unknown = sorted(set(fields) - set(RULE_FIELDS))
        if unknown:
            raise InputError(f"--rules: unknown field {unknown[0]!r} (fastneg.Rules has {', '.join(RULE_FIELDS)})")
        try:
            given = Rules(**fields)
        except (TypeError, ValueError) as exc:
            raise InputError(f"--rules: {exc}") from exc
    try:
        rules = resolve_rules("fastneg mine", given, margin=args.margin, relative_margin=args.relative_margin,
                              max_score=args.max_score)
    except TypeError as exc:
        raise InputError("--rules cannot be combined with --margin, --relative-margin or --max-score") from exc
    if rules.weighting is not None:
        raise InputError("--rules: the miner draws with --strategy (e.g. --strategy simans), not a weighting")
    try:  # the command line is the miner's alone: a field it would not read is an error, not ignored
        check_carried("--rules", rules, ("margin", "relative_margin", "max_score"))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return rules


def _strategy(args: argparse.Namespace) -> Any:
    from ..options import SimANS
    if args.strategy == "simans":
        return SimANS(args.simans_a, args.simans_b)
    return args.strategy


def _read_rows(arr: np.ndarray, path: str, lo: int, hi: int, out: np.ndarray) -> None:
    """Rows ``[lo, hi)`` of the memory-mapped ``.npy`` array ``arr`` (from ``path``) into ``out``
    (float32), by plain reads where the file is C-ordered: the pages then stay in the page cache
    rather than in this process's resident memory."""
    if arr.flags.c_contiguous and isinstance(arr, np.memmap) and hi > lo:
        row_bytes = arr.shape[1] * arr.dtype.itemsize
        step = max(1, (16 << 20) // row_bytes)
        with open(path, "rb") as f:
            f.seek(arr.offset + lo * row_bytes)
            for r in range(lo, hi, step):
                n = min(hi, r + step) - r
                if arr.dtype == out.dtype and out.flags.c_contiguous:  # straight into the buffer
                    view = memoryview(out[r - lo:r - lo + n]).cast("B")
                    if f.readinto(view) != view.nbytes:
                        raise InputError(f"{path}: the file ends before row {hi}")
                    continue
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise InputError(f"{path}: the file ends before row {hi}")
                out[r - lo:r - lo + n] = np.frombuffer(data, dtype=arr.dtype).reshape(n, arr.shape[1])
        return
    for r in range(lo, hi, 65536):
        out[r - lo:min(hi, r + 65536) - lo] = arr[r:min(hi, r + 65536)]


def _process_group(args: argparse.Namespace, device: str) -> tuple[Any, int, int]:
    """``(group, rank, world)``: torch.distributed from torchrun's environment (``WORLD_SIZE`` > 1;
    NCCL on CUDA, gloo on CPU), else one process. A group this command opens is marked in ``args``
    (``run`` destroys it on the way out); a group the caller had open is left to the caller."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        args.opened_process_group = True
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def _mine_embeddings(args: argparse.Namespace, fmt: str) -> int:  # noqa: C901
    import torch

    from ..parallel.gather import fail_together
    from ..parallel.sharded import KEY_ALIGN, shard_bounds
    from .miner import Mining

    device = args.device or "cpu"
    group, rank, world = _process_group(args, device)
    if device.startswith("cuda") and world > 1 and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    with fail_together(group, (InputError,)):
        queries = _load_npy(args.queries, "queries", "float", mmap=True)
        corpus = _load_npy(args.corpus, "corpus", "float", mmap=True)
        positives = _load_npy(args.positives, "positives", "int")
        if corpus.shape[1] != queries.shape[1]:
            raise InputError(f"--corpus has dim {corpus.shape[1]}, --queries has dim {queries.shape[1]}")
        if positives.shape[0] != queries.shape[0]:
            raise InputError(f"--positives has {positives.shape[0]} rows, --queries has {queries.shape[0]}")
        if positives.size and (positives.max() >= corpus.shape[0] or positives.min() < -1):
            bad = int(positives.max()) if positives.max() >= corpus.shape[0] else int(positives.min())
            raise InputError(f"--positives: id {bad} is not a corpus row (the corpus has {corpus.shape[0]} rows)")
        if (positives.reshape(positives.shape[0], -1)[:, 0] < 0).any():
            raise InputError("--positives: every query needs a positive in its first column")
    Q, N, D = queries.shape[0], corpus.shape[0], corpus.shape[1]
    # this rank's shard of the corpus (starting at a multiple of the kernels' key tile) and share of the queries
    lo, hi = shard_bounds(N, world)[rank]
    q_lo, q_hi = Q * rank // world, Q * (rank + 1) // world
    # the shard goes straight into a buffer with room for one batch of positives (the sharded draw's)
    room = torch.zeros((max(hi - lo + args.batch_size, KEY_ALIGN) if world > 1 else hi - lo, D), dtype=torch.float32)
    q_share = torch.zeros((q_hi - q_lo, D), dtype=torch.float32)
    with fail_together(group, (InputError,)):
        for flag, arr, path, a, b, dst in (("--queries", queries, args.queries, q_lo, q_hi, q_share),
                                           ("--corpus", corpus, args.corpus, lo, hi, room)):
            _read_rows(arr, path, a, b, dst[:b - a].numpy())
            for r in range(0, b - a, 16384):  # in slices: no temporary the size of the shard
                bad = ~torch.isfinite(dst[r:min(b - a, r + 16384)]).all(1)
                if bool(bad.any()):
                    row = int(bad.nonzero()[0, 0]) + a + r
                    raise InputError(f"{flag}: row {row} holds NaN or infinity; no negatives can be mined for it")
    room, q_share = room.to(device), q_share.to(device)
    p_share = torch.from_numpy(positives[q_lo:q_hi].astype(np.int64)).to(device)
    del queries, corpus  # unmap the files: what stays resident is the shard, the share and the positives
    run = Mining(q_share, room[:hi - lo], p_share, args.num_negatives, strategy=_strategy(args), rules=args.rule_set,
                 min_score=args.min_score,
                 range_min=args.range_min, range_max=args.range_max, index=args.index, batch_size=args.batch_size,
                 seed=args.seed, process_group=group, corpus_room=room)
    if world > 1:
        print(f"fastneg mine: rank {rank} of {world}: corpus rows {lo}-{hi - 1}, queries {q_lo}-{q_hi - 1}",
              file=sys.stderr, flush=True)
    steps = list(run.steps())
    parts = None
    with fail_together(group, (InputError,)):
        if rank == 0:
            parts = _Parts(args, fmt, Q, len(steps))
    done: list[Any] = [parts.done() if parts is not None else None]
    if group is not None:
        import torch.distributed as dist
        dist.broadcast_object_list(done, src=0, group=group)
    todo = [(step, start) for step, start in steps if step not in done[0]]
    short = 0
    started = time.perf_counter()
    from ..tools.progress import progress_bar

    advance, close = (progress_bar(len(steps), unit="batch") if rank == 0 and not args.no_progress
                      else (None, lambda: None))
    if advance is not None:
        for _ in range(len(steps) - len(todo)):
            advance("fastneg mine: resumed")

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        for step, start in todo:
            idx, scores, _ = run.mine(step, start)
            if parts is None:
                continue
            found = idx >= 0
            short += int((found.sum(1) < args.num_negatives).sum())
            pos_rows = torch.from_numpy(positives[start:start + idx.shape[0]].astype(np.int64)).reshape(idx.shape[0], -1)
            parts.write(step, {
                "query": list(range(start, start + idx.shape[0])),
                "positives": [[int(p) for p in row if p >= 0] for row in pos_rows.tolist()],
                "negatives": [row[ok].tolist() for row, ok in zip(idx.cpu(), found.cpu())],
                "scores": [row[ok].tolist() for row, ok in zip(scores.cpu(), found.cpu())],
            })
            if advance is not None:
                advance(f"fastneg mine: rows {start}-{start + idx.shape[0] - 1}")
    except KeyboardInterrupt:
        if parts is not None:
            print(f"fastneg mine: interrupted; {len(parts.done())} of {len(steps)} batches kept in {parts.directory}: "
                  "run the same command with --resume to continue", file=sys.stderr)
        raise _Interrupted from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        close()
    if world > 1:
        print(f"fastneg mine: rank {rank} of {world}: {len(todo)} batches in {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
    if parts is not None:
        parts.assemble()
    if group is not None:
        import torch.distributed as dist
        dist.barrier(group)
    if rank == 0:
        note = (f"; {short} got fewer than {args.num_negatives} (the rules or the index's candidate pool left fewer"
                f"{': try --index exact' if args.index != 'exact' else ''})") if short else ""
        print(f"fastneg mine: wrote {Q} rows to {args.out}{note}", file=sys.stderr)
    return 0


def _on_term(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM after the parts written so far were kept."""


class _Parts:
    """The output in batches: ``.<out>.parts/`` next to ``--out`` holds a manifest (the options and
    the inputs' sizes and modification times) and one file per finished batch, each renamed into
    place when complete, so a batch file exists only whole, whatever signal ends the run. When
    every batch is there, they are joined into ``--out`` (atomically) and the folder is removed.
    ``--resume`` continues from the batches present; without it an existing folder is an error."""

    FIELDS = ("num_negatives", "strategy", "simans_a", "simans_b", "margin", "relative_margin", "max_score",
              "min_score", "range_min", "range_max", "index", "batch_size", "seed")

    def __init__(self, args: argparse.Namespace, fmt: str, rows: int, steps: int) -> None:
        out = os.path.abspath(args.out)
        if not os.path.isdir(os.path.dirname(out)):
            raise InputError(f"--out: no such directory: {os.path.dirname(out)}")
        self.out, self.fmt, self.steps = out, fmt, steps
        self.directory = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.parts")
        inputs = {}
        for flag in ("queries", "corpus", "positives"):
            st = os.stat(getattr(args, flag))
            inputs[flag] = {"path": os.path.realpath(getattr(args, flag)), "bytes": st.st_size,
                            "mtime_ns": st.st_mtime_ns}
        self.manifest = {"format": 1, "rows": rows, "batches": steps, "output": fmt, "inputs": inputs,
                         "options": {f: getattr(args, f) for f in self.FIELDS}}
        path = os.path.join(self.directory, "manifest.json")
        if os.path.isdir(self.directory):
            if not args.resume:
                raise InputError(f"--out: an interrupted run's batches are in {self.directory}: add --resume to continue "
                                 "it, or remove that folder to start over")
            try:
                with open(path) as f:
                    previous = json.load(f)
            except (OSError, ValueError) as exc:
                raise InputError(f"--resume: cannot read {path} ({_one_line(exc)}); remove {self.directory}") from exc
            if previous != self.manifest:
                changed = sorted(k for k in set(previous) | set(self.manifest) if previous.get(k) != self.manifest.get(k))
                raise InputError(f"--resume: the run in {self.directory} had other {', '.join(changed)}; "
                                 "use the same options and inputs, or remove that folder to start over")
        else:
            os.makedirs(self.directory)
            self._atomic_write(path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    def _name(self, step: int) -> str:
        return os.path.join(self.directory, f"batch-{step:08d}.{self.fmt}")

    def done(self) -> set[int]:
        return {s for s in range(self.steps) if os.path.exists(self._name(s))}

    @staticmethod
    def _atomic_write(path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write(self, step: int, columns: dict[str, list]) -> None:
        tmp = self._name(step) + ".tmp"
        writer = _RowWriter(tmp, self.fmt)
        try:
            writer.write(columns)
        finally:
            writer.close()
        os.replace(tmp, self._name(step))

    def assemble(self) -> None:
        missing = sorted(set(range(self.steps)) - self.done())
        if missing:
            raise InputError(f"{len(missing)} batches missing from {self.directory} (first: {missing[0]})")
        with atomic_output(self.out) as tmp:
            if self.fmt == "jsonl":
                with open(tmp, "wb") as dst:
                    for s in range(self.steps):
                        with open(self._name(s), "rb") as src:
                            dst.write(src.read())
            else:
                import pyarrow.parquet as pq
                writer = None
                try:
                    for s in range(self.steps):
                        table = pq.read_table(self._name(s))
                        if writer is None:
                            writer = pq.ParquetWriter(tmp, table.schema)
                        writer.write_table(table)
                finally:
                    if writer is not None:
                        writer.close()
        # the batches first and the manifest last: a run killed in between still resumes
        for name in sorted(os.listdir(self.directory), key=lambda n: n == "manifest.json"):
            os.remove(os.path.join(self.directory, name))
        os.rmdir(self.directory)


def _read_table(path: str, flag: str) -> dict[str, list]:
    if not os.path.isfile(path):
        raise InputError(f"{flag}: no such file: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"{flag}: empty file: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pydict()
        except Exception as exc:  # noqa: BLE001 - any reader failure is a malformed file
            raise InputError(f"{flag}: cannot read {path} as Parquet ({_one_line(exc)})") from exc
    if path.endswith(".jsonl"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{flag}: line {n} of {path} is not JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise InputError(f"{flag}: line {n} of {path} is not a JSON object")
                rows.append(row)
        if not rows:
            raise InputError(f"{flag}: no rows in {path}")
        keys = list(rows[0])
        for n, row in enumerate(rows, 1):
            if list(row) != keys:
                raise InputError(f"{flag}: row {n} of {path} has fields {list(row)}, the first row {keys}")
        return {k: [r[k] for r in rows] for k in keys}
    if path.endswith(".txt") and flag == "--corpus":
        with open(path) as f:
            return {"text": [line.rstrip("\n") for line in f if line.strip()]}
    raise InputError(f"{flag} must be .jsonl or .parquet{' or .txt' if flag == '--corpus' else ''}, got {path}")


def _mine_model(args: argparse.Namespace, fmt: str) -> int:
    if args.resume:
        raise InputError("--resume continues embeddings input (--queries/--corpus/--positives); with --model the "
                         "output is written once, at the end")
    if not args.pairs:
        raise InputError("--pairs is required with --model")
    pairs = _read_table(args.pairs, "--pairs")
    columns = list(pairs)
    anchor = args.anchor_column or (columns[0] if columns else None)
    positive = args.positive_column or (columns[1] if len(columns) > 1 else None)
    for flag, name in (("--anchor-column", anchor), ("--positive-column", positive)):
        if name is None or name not in pairs:
            raise InputError(f"{flag}: column {name!r} not in {args.pairs} (columns: {columns})")
        if not all(isinstance(v, str) and v for v in pairs[name]):
            raise InputError(f"{flag}: column {name!r} must hold non-empty strings")
    corpus = None
    if args.corpus:
        table = _read_table(args.corpus, "--corpus")
        if "text" not in table:
            raise InputError(f"--corpus: {args.corpus} needs a 'text' field")
        corpus = [str(t) for t in table["text"]]
    require("sentence_transformers", "--model", "sentence-transformers")
    require("datasets", "--model", "sentence-transformers")
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from ..integrations.sentence_transformers import mine_hard_negatives

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    group, rank, world = _process_group(args, device)
    if device.startswith("cuda") and world > 1 and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        model = SentenceTransformer(args.model, device=device)
    except (OSError, ValueError) as exc:
        raise InputError(f"--model: cannot load {args.model} ({_one_line(exc)})") from exc
    data = Dataset.from_dict({anchor: pairs[anchor], positive: pairs[positive]})
    if world > 1:
        print(f"fastneg mine: rank {rank} of {world}: encoding and searching its shard of the corpus", file=sys.stderr,
              flush=True)
    out = mine_hard_negatives(
        data, model, anchor_column_name=anchor, positive_column_name=positive, corpus=corpus,
        range_min=args.range_min, range_max=args.range_max, rules=args.rule_set, min_score=args.min_score,
        num_negatives=args.num_negatives,
        sampling_strategy=_strategy(args), output_format=args.output_format, output_scores=args.output_scores,
        faiss_batch_size=args.batch_size, index=args.index, seed=args.seed, verbose=not args.no_progress,
        process_group=group)
    if rank != 0:
        return 0
    with atomic_output(args.out) as tmp:
        writer = _RowWriter(tmp, fmt)
        try:
            writer.write(out.to_dict())
        finally:
            writer.close()
    print(f"fastneg mine: wrote {len(out)} rows to {args.out}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        fmt = _output_format(args.out)
        if args.num_negatives < 1:
            raise InputError(f"--num-negatives must be >= 1, got {args.num_negatives}")
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.index != "exact":
            require("faiss", f"--index {args.index}", "mining")
        args.rule_set = _rules(args)
        args.margin, args.relative_margin, args.max_score = (args.rule_set.margin, args.rule_set.relative_margin,
                                                             args.rule_set.max_score)
        if args.model:
            return _mine_model(args, fmt)
        return _mine_embeddings(args, fmt)
    except InputError as exc:
        print(f"fastneg mine: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # the library's own argument checks
        print(f"fastneg mine: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except _Interrupted:
        return 130
    except KeyboardInterrupt:
        print("fastneg mine: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "opened_process_group", False):
            _close_process_group()


def _close_process_group() -> None:
    """Destroy the torchrun process group this command opened (``_process_group``), so that its
    communication threads are joined before the interpreter exits (left to the exit, gloo's threads
    may abort the process after the output is written)."""
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the command's own result (or error) is what is reported
        pass
