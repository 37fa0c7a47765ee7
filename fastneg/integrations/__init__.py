"""Integrations with training libraries. Each submodule imports its library lazily:
``fastneg.integrations.sentence_transformers`` needs ``pip install fastneg[sentence-transformers]``."""
