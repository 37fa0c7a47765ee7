"""pytest-benchmark suite set-up: ``pytest benchmarks/ --benchmark-only``."""

import os

import torch

if not torch.cuda.is_available():
    # Triton is not benchmarked on CPU (its interpreter is a test device); keep it off
    os.environ.pop("TRITON_INTERPRET", None)
