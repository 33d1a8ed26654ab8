# cifar-cam: `make install` then `make test`. Uses the active virtualenv, else creates .venv/.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
PY := python
else
PY := .venv/bin/python
endif

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint format bench docs clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## a virtualenv (or the active one) + pip install -e .[dev]
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -e '.[dev]'
	@echo; echo "installed: activate with 'source .venv/bin/activate', then run 'cifar-cam --help'"

test:  ## the fast suite (CPU, synthetic data, a few minutes), then the docs site's strict build
	$(PY) -m pytest -q
	@$(MAKE) --no-print-directory docs

test-full:  ## everything, including slow real-data tests (need ../shared/data)
	$(PY) -m pytest -q -m "slow or not slow"

lint:  ## ruff
	$(PY) -m ruff check src tests scripts

format:  ## ruff format + import sort
	$(PY) -m ruff check --fix --select I src tests scripts
	$(PY) -m ruff format src tests scripts

bench:  ## scripts/bench.py on this machine
	$(PY) scripts/bench.py

docs:  ## build the docs site (mkdocs, strict: a broken link or a page missing from nav fails)
	@# no -q: mkdocs counts a warning only when it is logged, so --strict -q would pass a broken link
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site 2>&1 | grep -v "^INFO" ; exit $${PIPESTATUS[0]}

clean:  ## remove build artefacts and caches (not outputs/ or multirun/)
	rm -rf build dist src/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
