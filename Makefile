# Both targets set up .venv on first use: torch 2.13.0 first (the local CPU wheel;
# a bare `torch` requirement would pull a multi-GB CUDA build), then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf-prune-installed

export HF_HUB_OFFLINE ?= 1
export HF_EVALUATE_OFFLINE ?= 1

.PHONY: demo test test-fast lint mutation setup

setup: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-prune demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The quick loop while developing: everything but the tests marked slow (fresh processes, testbed builds).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Mutation testing of the core math (not part of CI: tens of minutes). GROUPS="depth visual" picks groups;
# tests/mutation/run_mutation.py --help tells the rest.
mutation: $(STAMP)
	$(BIN)/pip install --quiet mutmut==3.8.1
	$(BIN)/python tests/mutation/run_mutation.py $(GROUPS)
