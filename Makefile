# Targets create .venv on first use. On a CPU-only machine torch is pinned to the CPU build that pip
# finds locally; on a GPU machine whose Python already has torch, use `scripts/gpu-setup.sh` instead.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-gpu lint bench-graphs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/wrap_model.py

test: setup
	$(PY) -m ruff check tessera tests benchmarks examples
	$(PY) -m pytest -q

test-gpu:
	$(PYTHON) -m pytest -q -m gpu

lint: setup
	$(PY) -m ruff check tessera tests benchmarks examples
	$(PY) -m ruff format --check tessera tests benchmarks examples

bench-graphs:
	$(PYTHON) -m tessera bench graphs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
