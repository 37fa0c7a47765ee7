"""Test set-up: without CUDA, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton (imported lazily by fastneg) is first imported.
"""

import os
import sys

import pytest
import torch

# the tests mirror the package's folders; their shared helpers (helpers.py, oracle.py) live here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the sentence-transformers tests load models from local paths only; never ask a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# sentence-transformers' own tests (vendored) run in a subprocess of their own, twice:
# tests/integrations/test_sentence_transformers_upstream.py
collect_ignore = ["integrations/upstream"]


try:  # the property tests' profiles: `ci` by default, `--hypothesis-profile=long` on demand
    from hypothesis import HealthCheck, settings

    _quiet = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=120, derandomize=True, **_quiet)
    settings.register_profile("long", max_examples=4000, **_quiet)
    settings.load_profile("ci")
except ImportError:  # a core install without hypothesis: tests/functional/test_properties.py skips itself
    pass


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
