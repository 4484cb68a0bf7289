# Converge: every target bootstraps the virtualenv it needs; only python3 and make are assumed.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
BENCH_OUT ?= bench-results.json
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one test waits on PostgreSQL, its gRPC peers
# and child processes about half of its time, so two workers on two cores
# finish the suite in about two thirds of the time of one. `loadfile` keeps a
# module on one worker (its module fixtures are built once). PYTEST_WORKERS=0
# runs in one process.
PYTEST_WORKERS ?= 2
# The images the Dockerfile builds: a service each, `models` for the training
# job and `tracking` for the MLflow server.
IMAGE_ROLES := identity interactions scoring recommendation models tracking
LINT_PATHS := services tests protos/generate.py $(if $(wildcard models/converge),models)
TYPED_PATHS := services protos/generate.py $(if $(wildcard models/converge),models)

.PHONY: help venv demo test protos lint bench lock clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	@test -x $(UV) || $(VENV)/bin/pip install --quiet --disable-pip-version-check 'uv>=0.5,<1'
	# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on
	# this project's machines) every process otherwise compiled MLflow,
	# scikit-learn and LightGBM from source at each start (15 of the 27 s a
	# `converge models list` took).
	$(UV) pip sync --quiet --compile-bytecode --python $(PY) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP) ## Create or update the virtualenv (.venv) from the lock file

demo: $(STAMP) ## Start PostgreSQL and every service; Ctrl-C stops them all
	$(PY) -m converge.demo $(DEMO_ARGS)

test: $(STAMP) ## Run the whole test suite
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

protos: $(STAMP) ## Regenerate Python code from protos/ (never edit the output)
	$(PY) protos/generate.py

lint: $(STAMP) ## ruff and mypy on the project's own code
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(TYPED_PATHS)

bench: $(STAMP) ## Run the benchmarks; prints a table and writes $(BENCH_OUT)
	BENCH_OUT=$(BENCH_OUT) $(PY) -m tests.benchmarks $(BENCH_ARGS)

lock: ## Re-resolve requirements.lock from pyproject.toml
	@test -x $(UV) || { $(PYTHON3) -m venv $(VENV) && $(VENV)/bin/pip install --quiet 'uv>=0.5,<1'; }
	$(UV) pip compile --quiet --python $(PY) --extra dev --universal --python-version 3.11 pyproject.toml -o requirements.lock
	@# One lock per image role (the Dockerfile installs it), held to the versions above;
	@# tracking (the MLflow server, not in the dev environment) is resolved on its own.
	@mkdir -p requirements
	@for role in $(IMAGE_ROLES); do \
	  held=$$([ $$role = tracking ] || echo "--constraint requirements.lock"); \
	  $(UV) pip compile --quiet --python $(PY) --extra $$role --universal --python-version 3.11 \
	    $$held --no-emit-package converge pyproject.toml -o requirements/$$role.lock || exit 1; \
	done

clean: ## Remove the virtualenv and local state (embedded PostgreSQL, MLflow store)
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
