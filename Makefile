# lorabench — the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp
TORCH   ?= torch==2.13.0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-full lint bench clean

setup: $(STAMP)

# torch first (pinned: the CPU wheel on local disk; unpinned pulls a multi-GB CUDA build), then the project.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2

test-full: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2 -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check variants experiments tests

bench: $(STAMP)
	$(BIN)/python -m experiments.bench

clean:
	rm -rf $(VENV) .pytest_cache
