# Two commands: `make prepare MODEL=<hub id>` and `make test`. Each sets up
# .venv on first use (and again when pyproject.toml changes), then runs.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13 admits the CPU wheel these machines hold on disk; on a GPU box
# PyPI's 2.13 wheel is the CUDA build. Override e.g. TORCH="torch>=2.4".
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
MODEL ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: prepare test setup bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

prepare: $(STAMP)
	@if [ -z "$(MODEL)" ]; then echo "error: MODEL is not set; run: make prepare MODEL=<org>/<name> [ARGS='--revision <sha> ...']" >&2; exit 2; fi
	$(BIN)/lora-prep prepare "$(MODEL)" $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench.py --runs $(or $(N),3)

clean-venv:
	rm -rf $(VENV)
