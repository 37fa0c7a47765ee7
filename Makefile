# Every target builds its own virtual environment first (.venv), from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastneg-installed

.PHONY: demo test test-long bench lint clean

$(STAMP): requirements-dev.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@echo "[1/3] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[2/3] installing the pinned dependencies (torch CPU build, triton, test tools; about 1 min)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	@echo "[3/3] building fastneg's C++ kernels (about 2.5 min on 2 cores; a line every 30 s)"
	@start=$$(date +%s); PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install --quiet --no-build-isolation -e . & pid=$$!; \
		while kill -0 $$pid 2>/dev/null; do sleep 5; elapsed=$$(( $$(date +%s) - start )); \
			if kill -0 $$pid 2>/dev/null && [ $$(( elapsed % 30 )) -lt 5 ]; then echo "      still building ($$elapsed s)"; fi; done; \
		wait $$pid && echo "      built in $$(( $$(date +%s) - start )) s"
	touch $(STAMP)

demo: $(STAMP)
	@echo "running the demo (python -m fastneg.tools.demo): four trainings of 80 steps, a progress bar each"
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
	rm -rf $(VENV) build *.egg-info fastneg/_C*.so
