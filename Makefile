# `make demo` and `make test` are the README's two set-up commands: each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'

demo: install
	$(VENV)/bin/tvtool demo --output tvtool-demo

test: install
	$(PY) -m ruff check tvtool tests benchmarks scripts
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check tvtool tests benchmarks scripts
	$(PY) -m mypy

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
