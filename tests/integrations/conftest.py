"""Fixtures of the integration tests: the small BERT model (``tiny``) and its guide
(``tiny_guide``, another seed), built once per module. Tests that use them skip themselves
without sentence-transformers (``pytest.importorskip`` at their top)."""

from __future__ import annotations

import pytest
from integrations.st_models import tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return tiny_bert(tmp_path_factory.mktemp("models"), 0).eval()


@pytest.fixture(scope="module")
def tiny_guide(tmp_path_factory: pytest.TempPathFactory):
    return tiny_bert(tmp_path_factory.mktemp("guides"), 1).eval()
