"""The command line as a core install sees it: torch, numpy and fastneg, and none of the optional
packages (tqdm, faiss, pyarrow, matplotlib, sentence-transformers, datasets, triton). Each command
runs in a fresh interpreter in which importing any of those fails exactly as it does when the
package is absent; it must give a result or one line of error with exit status 2, never a
traceback, and leave no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

OPTIONAL = ["tqdm", "faiss", "pyarrow", "matplotlib", "mpl_toolkits", "sentence_transformers", "datasets", "triton",
            "transformers", "accelerate", "hypothesis"]


@pytest.fixture(scope="module")
def core_site(tmp_path_factory) -> str:  # noqa: ANN001
    """A site-packages folder holding every installed distribution but the optional ones (links to
    the real ones): with ``python -S`` and this on the path, they are as absent as in a core install."""
    import sysconfig

    folder = tmp_path_factory.mktemp("core_site")
    source = sysconfig.get_paths()["purelib"]
    blocked = {name.lower() for name in OPTIONAL}
    for entry in os.listdir(source):
        top = entry.split("-")[0].split(".")[0].lower()
        if top in blocked or top.replace("_", "-") in blocked or entry.endswith(".pth") or top == "__editable__":
            continue
        os.symlink(os.path.join(source, entry), folder / entry)
    return str(folder)


def fastneg(*argv: str, cwd: str, site: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # `fastneg bench` would re-exec itself to set this
    env["PYTHONPATH"] = os.pathsep.join([REPO, site])
    code = f"import sys; from fastneg.tools.cli import main; sys.argv = ['fastneg', *{list(argv)!r}]; sys.exit(main())"
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def embeddings(tmp_path):  # noqa: ANN001, ANN201
    g = np.random.default_rng(0)
    q = g.standard_normal((20, 8)).astype(np.float32)
    c = g.standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "c.npy", c)
    np.save(tmp_path / "p.npy", np.arange(20))
    return tmp_path


def test_version(tmp_path, core_site: str) -> None:  # noqa: ANN001
    from fastneg.version import __version__

    r = fastneg("--version", cwd=str(tmp_path), site=core_site)
    assert r.returncode == 0 and r.stdout.strip() == f"fastneg {__version__}", (r.stdout, r.stderr)


def test_mine_exact_without_tqdm_writes_and_reports(embeddings, core_site: str) -> None:  # noqa: ANN001
    r = fastneg("mine", "--queries", "q.npy", "--corpus", "c.npy", "--positives", "p.npy", "--out", "out.jsonl",
                "--num-negatives", "3", cwd=str(embeddings), site=core_site)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "wrote 20 rows to out.jsonl" in r.stderr.splitlines()[-1]
    rows = [json.loads(line) for line in (embeddings / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(row["negatives"]) == 3 for row in rows)


def test_mine_reports_rows_with_fewer_negatives(embeddings, core_site: str) -> None:  # noqa: ANN001
    r = fastneg("mine", "--queries", "q.npy", "--corpus", "c.npy", "--positives", "p.npy", "--out", "out.jsonl",
                "--num-negatives", "3", "--max-score", "-4.0", "--no-progress", cwd=str(embeddings), site=core_site)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (embeddings / "out.jsonl").read_text().splitlines()]
    short = sum(len(row["negatives"]) < 3 for row in rows)
    assert short > 0
    assert f"{short} got fewer than 3" in r.stderr


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_mine_faiss_index_without_faiss(embeddings, index: str, core_site: str) -> None:  # noqa: ANN001
    r = fastneg("mine", "--queries", "q.npy", "--corpus", "c.npy", "--positives", "p.npy", "--out", "out.jsonl",
                "--index", index, cwd=str(embeddings), site=core_site)
    one_line_error(r, "faiss", "mining")
    assert sorted(os.listdir(embeddings)) == ["c.npy", "p.npy", "q.npy"]


def test_mine_model_without_sentence_transformers(tmp_path, core_site: str) -> None:  # noqa: ANN001
    (tmp_path / "pairs.jsonl").write_text('{"a": "x", "b": "y"}\n')
    r = fastneg("mine", "--model", "some-model", "--pairs", "pairs.jsonl", "--out", "out.jsonl", cwd=str(tmp_path),
                site=core_site)
    one_line_error(r, "sentence", "'sentence-transformers' extra")


def test_mine_parquet_without_pyarrow(embeddings, core_site: str) -> None:  # noqa: ANN001
    r = fastneg("mine", "--queries", "q.npy", "--corpus", "c.npy", "--positives", "p.npy", "--out", "out.parquet",
                cwd=str(embeddings), site=core_site)
    one_line_error(r, "pyarrow", "mining")


@pytest.mark.parametrize("which", ["q", "c"])
def test_mine_refuses_nan_rows(embeddings, which: str, core_site: str) -> None:  # noqa: ANN001
    arr = np.load(embeddings / f"{which}.npy")
    arr[7, 2] = np.nan
    np.save(embeddings / f"{which}.npy", arr)
    r = fastneg("mine", "--queries", "q.npy", "--corpus", "c.npy", "--positives", "p.npy", "--out", "out.jsonl",
                cwd=str(embeddings), site=core_site)
    one_line_error(r, "--queries" if which == "q" else "--corpus", "row 7")
    assert not (embeddings / "out.jsonl").exists()


def test_bench_without_matplotlib_fails_before_the_sweep(tmp_path, core_site: str) -> None:  # noqa: ANN001
    r = fastneg("bench", "--quick", "--device", "cpu", "--out", "res", cwd=str(tmp_path), site=core_site)
    one_line_error(r, "matplotlib", "--no-plots")
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("argv, words", [
    (["--dtypes", "float8"], ["--dtypes", "float8"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--sizes", "0"], ["--sizes", ">= 1"]),
    (["--dims", "-3"], ["--dims"]),
    (["--rounds", "0"], ["--rounds"]),
    (["--impls", "nosuch"], ["--impls", "nosuch"]),
    (["--out", "a_file"], ["--out", "not a folder"]),
])
def test_bench_bad_arguments(tmp_path, argv: list, words: list, core_site: str) -> None:  # noqa: ANN001
    if argv[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    (tmp_path / "a_file").write_text("")
    base = ["bench", "--sizes", "8", "--dims", "4", "--no-plots", "--out", "res"]
    r = fastneg(*base, *argv, cwd=str(tmp_path), site=core_site)
    one_line_error(r, *words)
    assert not (tmp_path / "res").exists()


def test_bench_tiny_sweep_without_optional_packages(tmp_path, core_site: str) -> None:  # noqa: ANN001
    """Without tqdm (plain progress lines whose total counts only what runs) and without plots."""
    r = fastneg("bench", "--sizes", "8", "--dims", "4", "--rules", "plain", "--impls", "fastneg-cpu", "naive",
                "--rounds", "1", "--no-plots", "--device", "cpu", "--out", "res", cwd=str(tmp_path), site=core_site)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    progress = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert progress and progress[-1].startswith("[3/3]"), progress  # fastneg-cpu, naive, floor
    assert (tmp_path / "res" / "bench.csv").exists()
