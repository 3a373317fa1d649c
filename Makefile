# vk-provider: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint unit integration controlplane system-deps venv bench clean

## demo: bring up a local control plane, run the agent on it, show the result, tear down
demo: venv controlplane
	$(PY) -m vk_provider demo

## test: create the environment, build the control plane when not cached, lint, run every test
test: venv controlplane lint
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check vk_provider tests migrations bench
	$(VENV)/bin/ruff format --check vk_provider tests migrations bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: venv
	$(PY) -m pytest tests/unit

integration: venv controlplane
	$(PY) -m pytest tests/integration

system-deps:
	bash hack/system-deps.sh

controlplane: system-deps
	bash hack/controlplane.sh build

venv: $(STAMP)

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
