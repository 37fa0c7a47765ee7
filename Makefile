# Every target builds its own virtual environment first (.venv), from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastneg-installed

.PHONY: demo test test-long bench lint clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@echo "[1/4] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[2/4] installing the pinned dependencies (torch CPU build, triton, test tools; about 1 min)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	@echo "[3/4] installing fastneg (pure Python, a few seconds)"
	$(PY) -m pip install --quiet -e .
	@echo "[4/4] compiling fastneg's C++ CPU kernels into ~/.cache/fastneg (once per torch version: 1.5 min on 2 cores; a line every 30 s)"
	@start=$$(date +%s); $(VENV)/bin/fastneg build-cpu & pid=$$!; \
		while kill -0 $$pid 2>/dev/null; do sleep 5; elapsed=$$(( $$(date +%s) - start )); \
			if kill -0 $$pid 2>/dev/null && [ $$(( elapsed % 30 )) -lt 5 ]; then echo "      still compiling ($$elapsed s)"; fi; done; \
		wait $$pid
	touch $(STAMP)

demo: $(STAMP)
	@echo "running the demo (python -m fastneg.tools.demo): a real model fine-tuned on real code-search pairs, 3 methods x 3 seeds, one progress bar"
	$(PY) -m fastneg.tools.demo

test: $(STAMP)
	@echo "running the test suite (python -m pytest tests -q)"
	$(PY) -m pytest tests -q

# the property-based differential tests with the long profile (4000 random problems per test)
test-long: $(STAMP)
	$(PY) -m pytest tests/functional/test_properties.py -q --hypothesis-profile=long

bench: $(STAMP)
	$(VENV)/bin/fastneg bench --quick --out benchmarks/results/quick

lint: $(STAMP)
	$(VENV)/bin/ruff check fastneg tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info fastneg/_csrc
