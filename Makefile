# Every target builds its own virtual environment first (.venv), from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastneg-installed

.PHONY: demo test test-long bench lint clean

$(STAMP): requirements-dev.txt setup.py csrc/fused_info_nce.cpp csrc/row_kernels.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fastneg.demo

test: $(STAMP)
	$(PY) -m pytest tests -q

# the property-based differential tests with the long profile (4000 random problems per test)
test-long: $(STAMP)
	$(PY) -m pytest tests/test_properties.py -q --hypothesis-profile=long

bench: $(STAMP)
	$(VENV)/bin/fastneg bench --quick --out benchmarks/results/quick

lint: $(STAMP)
	$(VENV)/bin/ruff check fastneg tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info fastneg/_C*.so
