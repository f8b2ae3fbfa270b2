# Two commands for a fresh machine (see README.md):
#   make pipeline   train InstDisc on the embedded synthetic dataset end to end and print the metrics
#   make test       run the test suite
# Both create the virtual environment in .venv on first use (torch comes from the local wheels).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: pipeline test test-all bench venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

pipeline: venv
	$(BIN)/python -m flows.pipeline
	$(BIN)/python -m flows.metrics
	@echo "curves: plots/pretrain_history.png; runs: mlflow ui"

test: venv
	$(BIN)/python -m pytest

test-all: venv
	$(BIN)/python -m pytest -m ''
