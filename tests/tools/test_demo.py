"""`make demo` at a tiny size: every method reports, a failing worker ends the demo with one
line and exit status 1 instead of hanging."""

import subprocess
import sys


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastneg.tools.demo", "--synthetic", *args], capture_output=True,
                          text=True, timeout=600)


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


def test_real_demo_at_a_tiny_size():
    """`make demo` itself (real corpus, StaticEmbedding, the real trainer) on a few hundred pairs."""
    proc = subprocess.run([sys.executable, "-m", "fastneg.tools.demo", "--batch-size", "64", "--train-pairs", "256",
                           "--eval-queries", "50", "--eval-corpus", "400", "--seeds", "0", "1", "--methods",
                           "MNRL (sentence-transformers)", "fastneg plain", "mask_labels"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    for line in ("sentence-transformers MNRL (dense B x B)", "fastneg MNRL (fused)", "mask_labels", "demo finished"):
        assert line in out
    dense, fused = (float(line.rsplit("loss", 1)[1]) for line in out.splitlines()
                   if line.lstrip().startswith(("sentence-transformers MNRL", "fastneg MNRL")))
    assert dense == fused  # the same loss value, to the 6 printed decimals
    assert "fastneg plain" in out and "identical" in out  # the drop-in trains the same model as the original


def test_the_loss_stage_summary_survives_peaks_below_resolution():
    """At a small batch both loss stages may grow the resident set by nothing measurable: the
    summary says so instead of dividing by zero (a tiny demo run once did)."""
    from fastneg.tools.real_demo import _memory_ratio

    assert _memory_ratio(0.0, 0.0) == "peak memory below the measurement's resolution for both"
    assert _memory_ratio(255.9, 24.4) == "10.5x less peak memory"
    assert _memory_ratio(0.0, 5.0) == "50.0x more peak memory"
    assert _memory_ratio(3.0, 0.0) == "30.0x less peak memory"
