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
# pytest-xdist workers for make test (0: one process). tests/conftest.py orders the modules and keeps
# the tests that assert a time bound alone.
JOBS ?= 2

.PHONY: prepare test setup bench lint clean-venv

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
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# Lint, format and types of the product code (lora_prep/, flows/, tasks/, deployments/); .ci/run runs it before the tests.
# mypy reads a package by its folders: build/typecheck/lora_prep lays the installed layout out with symlinks.
PRODUCT := lora_prep flows tasks deployments
lint: $(STAMP)
	$(BIN)/ruff check $(PRODUCT) tests bench
	$(BIN)/ruff format --check $(PRODUCT)
	@rm -rf build/typecheck && mkdir -p build/typecheck/lora_prep
	@for f in lora_prep/*.py; do ln -s ../../../$$f build/typecheck/lora_prep/; done
	@for d in flows tasks deployments; do ln -s ../../../$$d build/typecheck/lora_prep/$$d; done
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench.py --runs $(or $(N),3) $(if $(SIZES),--sizes $(SIZES))

clean-venv:
	rm -rf $(VENV)
