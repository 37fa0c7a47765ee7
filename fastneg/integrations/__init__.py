"""Integrations with training libraries.

``fastneg.integrations.sentence_transformers`` needs the ``sentence-transformers`` extra
(``pip install --no-build-isolation '.[sentence-transformers]'`` from a clone)."""
