"""The install itself: a pure-Python wheel and sdist, installed into a fresh virtual environment
that has torch and no C++ compiler, computing a loss and its gradient on the portable backend;
and the C++ kernels' just-in-time build, compiled once and reused by a second process.

The fresh environment sees the test environment's torch and numpy through a ``.pth`` line (a
folder named in a ``.pth`` file is not itself scanned for ``.pth`` files, so the test
environment's editable fastneg stays invisible); fastneg comes from the wheel, installed with
``--no-index`` (nothing downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = (REPO / "fastneg" / "version.py").read_text().split('"')[1]
SNIPPET = """
import torch, fastneg
g = torch.Generator().manual_seed(0)
q = torch.randn(16, 8, generator=g, requires_grad=True)
k = torch.randn(24, 8, generator=g, requires_grad=True)
loss, stats = fastneg.info_nce(q, k, key_labels=torch.arange(24) % 5, weighting="simans", margin=0.1,
                               return_stats=True)
loss.backward()
ref = fastneg.info_nce(q.detach(), k.detach(), key_labels=torch.arange(24) % 5, weighting="simans", margin=0.1,
                       backend="reference")
assert abs(float(loss.detach()) - float(ref)) < 1e-5 * max(1.0, abs(float(ref))), (float(loss.detach()), float(ref))
assert q.grad is not None and k.grad is not None and bool(torch.isfinite(q.grad).all())
print(stats.backend, fastneg.__file__)
"""


def run(*argv: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FASTNEG_BACKEND", "CXX", "CC", "VIRTUAL_ENV")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist (setuptools' PEP 517 hook, offline) and the wheel built from it."""
    out = tmp_path_factory.mktemp("dist")
    r = run(sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))",
            cwd=REPO, env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    sdist = out / r.stdout.strip().splitlines()[-1]
    start = time.perf_counter()
    r = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
            str(sdist), env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nwheel from the sdist in {time.perf_counter() - start:.1f} s")
    wheel = out / f"fastneg-{VERSION}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in out.iterdir())
    return {"sdist": sdist, "wheel": wheel}


def test_the_wheel_is_pure_python_and_carries_the_sources(dist: dict[str, Path]) -> None:
    names = zipfile.ZipFile(dist["wheel"]).namelist()
    assert "fastneg/_csrc/register.cpp" in names and "fastneg/_csrc/plan.h" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))], names
    assert "Root-Is-Purelib: true" in zipfile.ZipFile(dist["wheel"]).read(f"fastneg-{VERSION}.dist-info/WHEEL").decode()
    with tarfile.open(dist["sdist"]) as tar:
        members = tar.getnames()
    assert f"fastneg-{VERSION}/csrc/register.cpp" in members and f"fastneg-{VERSION}/pyproject.toml" in members


@pytest.fixture(scope="module")
def fresh_venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the test environment's torch and numpy visible, the wheel installed."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    # without its own pip and setuptools (they would shadow the test environment's); pip runs from there
    r = run(sys.executable, "-m", "venv", "--without-pip", str(venv), env=clean_env())
    assert r.returncode == 0, r.stderr
    python = venv / "bin" / "python"
    site = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "test_environment_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    start = time.perf_counter()
    r = run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--quiet", str(dist["wheel"]),
            env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nwheel installed in {time.perf_counter() - start:.1f} s (dependencies present)")
    return venv


def test_installs_and_runs_without_a_compiler(fresh_venv: Path, tmp_path: Path) -> None:
    """No compiler on PATH: ``auto`` runs the portable backend, silently; ``fastneg --version`` works."""
    bin_dir = fresh_venv / "bin"
    env = clean_env(PATH=str(bin_dir), FASTNEG_CACHE_DIR=str(tmp_path / "cache"))
    r = run(str(bin_dir / "python"), "-c", SNIPPET, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    backend, location = r.stdout.split()
    assert backend == "portable"
    assert location.startswith(str(fresh_venv)), location  # the wheel's fastneg, not the checkout's
    assert r.stderr.strip() == "", r.stderr
    v = run(str(bin_dir / "fastneg"), "--version", env=env, cwd=tmp_path)
    assert v.returncode == 0 and v.stdout.strip() == f"fastneg {VERSION}", (v.stdout, v.stderr)
    # asking for the C++ kernels there: one line of error, exit status 2
    b = run(str(bin_dir / "fastneg"), "build-cpu", env=env, cwd=tmp_path)
    assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr
    assert len(b.stderr.strip().splitlines()) == 1 and "no C++ compiler" in b.stderr, b.stderr


def test_a_failing_compiler_falls_back_with_one_warning(fresh_venv: Path, tmp_path: Path) -> None:
    """CXX names a program that fails: the build fails, ``auto`` says so once and runs the portable backend."""
    bin_dir = fresh_venv / "bin"
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", CXX="false",
                    FASTNEG_CACHE_DIR=str(tmp_path / "cache"))
    r = run(str(bin_dir / "python"), "-c", SNIPPET + "\nfastneg.info_nce(q, k)\n", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.split()[0] == "portable"
    assert r.stderr.count("RuntimeWarning") == 1 and "using the portable backend" in r.stderr, r.stderr


def test_the_just_in_time_build_compiles_once(tmp_path: Path) -> None:
    """An empty cache: the first process compiles (and says so, with the time), a second one loads."""
    env = clean_env(FASTNEG_CACHE_DIR=str(tmp_path / "cache"))
    code = "import fastneg.backends.cpu as c; c.load(); print(c.build_directory())"
    first = run(sys.executable, "-c", code, env=env, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compiling the C++ CPU kernels" in first.stderr and "compiled the C++ CPU kernels in" in first.stderr
    directory = Path(first.stdout.strip())
    assert directory.is_relative_to(tmp_path / "cache")
    library = directory / "fastneg_cpu.so"
    built = library.stat().st_mtime_ns
    second = run(sys.executable, "-c", code + "\nimport torch, fastneg\n"
                 "print(fastneg.info_nce(torch.randn(4, 3), torch.randn(6, 3), return_stats=True)[1].backend)",
                 env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "compiling" not in second.stderr, second.stderr
    assert second.stdout.split() == [str(directory), "cpu"]
    assert library.stat().st_mtime_ns == built
    print(f"\n{first.stderr.strip().splitlines()[-1]}")


def test_each_installation_has_its_own_cache_folder(fresh_venv: Path, tmp_path: Path) -> None:
    """The same sources in another place (the wheel's fastneg/_csrc, this checkout's csrc/) get another
    cache folder: torch's build files name the sources by path, and would otherwise rebuild in place
    (silently, for as long as a compile takes) each time a process from the other installation ran."""
    code = "import fastneg.backends.cpu as c; print(c.build_directory())"
    env = clean_env(FASTNEG_CACHE_DIR=str(tmp_path))
    wheel = run(str(fresh_venv / "bin" / "python"), "-c", code, env=env, cwd=tmp_path)
    checkout = run(sys.executable, "-c", code, env=env, cwd=REPO)
    assert wheel.returncode == 0 and checkout.returncode == 0, (wheel.stderr, checkout.stderr)
    assert wheel.stdout.strip() != checkout.stdout.strip()
    assert Path(wheel.stdout.strip()).parent == Path(checkout.stdout.strip()).parent == tmp_path / "cpu"
