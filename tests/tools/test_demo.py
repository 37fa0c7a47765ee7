"""`make demo` at a tiny size: every method reports, a failing worker ends the demo with one
line and exit status 1 instead of hanging."""

import subprocess
import sys


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastneg.tools.demo", *args], capture_output=True, text=True, timeout=600)


def test_tiny_demo_reports_every_method():
    proc = _demo("--steps", "2", "--batch-size", "64", "--groups", "300")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("naive InfoNCE", "fastneg plain", "fastneg masked+SimANS", "fastneg group labels (oracle)"):
        assert method in proc.stdout
    assert "Against plain InfoNCE" in proc.stdout and "Traceback" not in proc.stdout


def test_a_failing_worker_ends_the_demo_with_one_line():
    proc = _demo("--steps", "2", "--batch-size", "64", "--groups", "300", "--device", "no-such-device")
    assert proc.returncode == 1
    assert "demo: 'naive InfoNCE' failed" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_sizes_are_refused():
    proc = _demo("--steps", "0")
    assert proc.returncode == 2 and "--steps must be >= 1" in proc.stderr
