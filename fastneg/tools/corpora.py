"""Retrieval pairs for ``fastneg quality``: a user's file, or the built-in ``python-docstrings`` corpus.

A pair is ``{"query", "positive", "group", "negatives"}``: ``group`` names a relevance group
(every positive of a group is relevant to every query of it; default: the query's normalised
text, so rows that repeat a query share their positives), ``negatives`` a list of hard
negatives (possibly empty).

``python-docstrings``: a code-search task (as CodeSearchNet in MTEB) built offline from the
Python sources of installed packages (:data:`PACKAGES`), parsed with :mod:`ast` and never
imported. Each function or method with a docstring of at least two words gives the pair
(summary -> code): the query is the docstring's first paragraph with whitespace collapsed, the
positive the function's source with its docstring removed (signature and decorators-free
body, dedented, cut at :data:`MAX_CODE_CHARS`); functions whose body is the docstring alone
are skipped, as are ``tests`` / ``testing`` folders and ``test_*.py`` files. The relevance group
is the summary lower-cased without its final period: every function with that summary is
relevant to it. Copied functions (``rotate_half`` in 190 transformers models), aliases and
generic summaries ("Initialize the weights") make groups of up to a few hundred: the natural
false negatives of in-batch training. The corpus depends only on the installed versions of
the packages (recorded beside it), the Python version (``ast``) and :data:`CORPUS_VERSION`; it
is cached as JSON lines under ``$FASTNEG_CACHE_DIR/corpora`` (default ``~/.cache/fastneg``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Pair", "PACKAGES", "BUILTIN", "load_pairs", "python_docstrings", "group_key", "corpus_path"]

# import name -> distribution name (the version recorded for reproducibility)
PACKAGES = {"numpy": "numpy", "scipy": "scipy", "sympy": "sympy", "pandas": "pandas", "sklearn": "scikit-learn",
            "networkx": "networkx", "torch": "torch", "transformers": "transformers"}
BUILTIN = ("python-docstrings",)
CORPUS_VERSION = 1
MAX_CODE_CHARS = 2000
_SKIP_DIRS = {"tests", "test", "testing", "__pycache__"}


@dataclass
class Pair:
    query: str
    positive: str
    group: str
    negatives: list[str] = field(default_factory=list)


def group_key(text: str) -> str:
    """A query's default relevance group: lower-cased, whitespace collapsed, final period dropped."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def _summary(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _functions(path: str) -> Iterator[tuple[str, str]]:
    """(summary, code) of every documented function in one source file (none if it does not parse)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        summary = _summary(doc)
        if len(summary.split()) < 2:
            continue
        first = node.body[0]  # the docstring expression: its lines leave the code
        assert first.end_lineno is not None and node.end_lineno is not None
        code = lines[node.lineno - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        yield summary, textwrap.dedent("\n".join(code))[:MAX_CODE_CHARS]


def _package_root(name: str) -> Optional[str]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _versions() -> dict[str, str]:
    out = {}
    for module, dist in PACKAGES.items():
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "missing"
    return out


def corpus_path(cache_dir: Optional[str] = None) -> str:
    """Where the built corpus for the installed versions lives (a file name keyed by them)."""
    versions = _versions()
    key = json.dumps({"corpus": CORPUS_VERSION, "python": sys.version_info[:2], "versions": versions}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = cache_dir or os.environ.get("FASTNEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastneg")
    return os.path.join(root, "corpora", f"python-docstrings-{digest}.jsonl")


def python_docstrings(cache_dir: Optional[str] = None, progress: bool = False) -> tuple[list[Pair], dict[str, Any]]:
    """The built-in corpus (module docstring) and its description (versions, counts, path); built
    on first use (about 40 s on 2 cores), then read from the cache."""
    path = corpus_path(cache_dir)
    versions = _versions()
    missing = [PACKAGES[m] for m, v in versions.items() if v == "missing"]
    if missing:
        raise ValueError(f"--corpus python-docstrings: the corpus is built from installed packages and "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                         f"(pip install {' '.join(missing)})")
    if not os.path.exists(path):
        pairs: list[Pair] = []
        for module in PACKAGES:
            root = _package_root(module)
            assert root is not None
            before = len(pairs)
            for dirpath, dirnames, files in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                for name in sorted(files):
                    if name.endswith(".py") and not name.startswith("test_"):
                        for summary, code in _functions(os.path.join(dirpath, name)):
                            pairs.append(Pair(summary, code, group_key(summary)))
            if progress:
                print(f"  {module} {versions[module]}: {len(pairs) - before} functions", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps({"query": p.query, "positive": p.positive}) + "\n")
        os.replace(tmp, path)
    pairs = _read_jsonl(path, "--corpus python-docstrings")
    return pairs, {"name": "python-docstrings", "versions": versions, "path": path,
                   "python": ".".join(map(str, sys.version_info[:2]))}


def _row(obj: Any, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each row must be an object with 'query' and 'positive'")
    for name in ("query", "positive"):
        if not isinstance(obj.get(name), str) or not obj[name]:
            raise ValueError(f"{where}: '{name}' must be a non-empty string")
    negatives = obj.get("negatives", obj.get("negative", []))
    if isinstance(negatives, str):
        negatives = [negatives]
    if negatives is None:
        negatives = []
    if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"{where}: 'negatives' must be a list of strings")
    group = obj.get("group")
    if group is None:
        group = group_key(obj["query"])
    elif not isinstance(group, (str, int)) or isinstance(group, bool):
        raise ValueError(f"{where}: 'group' must be a string or an integer")
    return Pair(obj["query"], obj["positive"], str(group), list(negatives))


def _read_jsonl(path: str, flag: str) -> list[Pair]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{flag} {path}: line {number} is not JSON ({exc.msg})") from None
            pairs.append(_row(obj, f"{flag} {path}: line {number}"))
    return pairs


def load_pairs(path: str) -> list[Pair]:
    """Pairs from a JSON-lines file (``.jsonl`` / ``.json``) or a Parquet file (``.parquet``), with
    the columns ``query``, ``positive`` and optionally ``group`` and ``negatives`` (or ``negative``)."""
    if not os.path.isfile(path):
        raise ValueError(f"--pairs: no such file: {path}")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("--pairs: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's own errors: one line
            raise ValueError(f"--pairs {path}: not a readable Parquet file ({exc})") from None
        pairs = [_row(r, f"--pairs {path}: row {i}") for i, r in enumerate(rows)]
    else:
        pairs = _read_jsonl(path, "--pairs")
    if len(pairs) < 2:
        raise ValueError(f"--pairs {path}: needs at least 2 pairs, found {len(pairs)}")
    return pairs
