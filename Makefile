# SLM Fleet Operator: the two commands a newcomer needs are `make setup` and `make test`
# (`make demo` runs the end-to-end demo). Everything runs on 127.0.0.1.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= operator,gateway,trainer,dev

# A bare `make` lists the targets: the demo takes minutes and starts a whole control plane.
.DEFAULT_GOAL := help

help: ## This list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 20

demo: ## The whole loop on this machine: capture, train on CPU, gate, Triton, rollout, fallback
	$(PY) -m slm_e2e.demo

.PHONY: help demo setup venv lock binaries system-deps test unit integration lint typecheck cluster-up cluster-down cluster-status clean

setup: system-deps venv binaries ## Install Python deps into .venv and build the control plane into ~/.cache/slm-fleet

# constraints.txt pins every package at the version the test suite and the benchmarks last
# passed with (pyproject.toml keeps the ranges a user's own install may take): a fresh
# setup then gets the same torch and transformers, whose numerics move the benchmark figures.
venv:
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)  # a half-made one too
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# BFCL's data and AST checker only: its own pins (numpy==1.26.4, vllm...) would
	# downgrade the trainer's stack, so it is installed without dependencies.
	$(PY) -m pip install -q --no-deps 'bfcl-eval==2026.3.23'

lock: ## Re-resolve the newest versions pyproject.toml allows into constraints.txt, install them into .venv
	rm -rf $(VENV).lock
	$(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/python -m pip install -q --upgrade pip
	$(VENV).lock/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	$(VENV).lock/bin/python -m pip install -q --no-deps 'bfcl-eval==2026.3.23'
	# written aside and moved: a failed freeze must not leave a header-only file (no pins)
	{ echo "# Every package of .venv at the versions the tests last passed with; make lock"; \
	  echo "# refreshes it. Used as pip constraints by make setup and the images."; \
	  $(VENV).lock/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(VENV).lock
	$(MAKE) venv
	# pip install never removes: a package the new resolution dropped would stay in .venv
	# and the next test run would pass with it, unlike a fresh make setup
	comm -23 <($(PY) -m pip freeze --exclude-editable | sed -E 's/[ =@].*//' | sort) \
	  <(grep -v '^#' constraints.txt | sed -E 's/[ =@].*//' | sort) \
	  | xargs -r $(PY) -m pip uninstall -y -q
	@echo "constraints.txt re-resolved and installed into $(VENV); run make test before committing it"

binaries:
	bash e2e/build-binaries.sh

# Debian packages the tests need (Prometheus, libpython3.11, python3-venv). Does nothing when
# all are present; otherwise needs root or passwordless sudo, and fails with the apt-get
# command to run without them.
system-deps:
	@bash e2e/install-system-deps.sh

# pytest alone, so that a SIGTERM to make reaches it and its fixtures stop the servers they
# started; "no tests collected" (pytest's exit code 5) becomes 1 in tests/conftest.py.
test: ## Unit, integration and e2e tests against the real local servers
	@test -x $(PY) || { echo "no $(PY): run make setup first" >&2; exit 1; }
	$(PY) -m pytest $(PYTEST_ARGS)

unit:
	$(PY) -m pytest -m 'not integration and not e2e' $(PYTEST_ARGS)

integration:
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy

cluster-up:
	$(PY) -m slm_e2e up

cluster-down:
	$(PY) -m slm_e2e down

cluster-status:
	$(PY) -m slm_e2e status

clean:
	-$(PY) -m slm_e2e down
	rm -rf .cluster .pytest_cache .mypy_cache .ruff_cache
