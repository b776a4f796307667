# One command each: install, run, test. Everything lives in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install run test test-db lint chaos bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the project's torch range is already met (no multi-GB CUDA wheel).
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q 'torch>=2.4'
	$(PY) -m pip install -q -e '.[dev]'

run:
	VRAMQ_AUTH=disabled $(VENV)/bin/vramq serve --host 127.0.0.1

test:
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The database-facing tests only, e.g. against a server: VRAMQ_TEST_DATABASE_URL=postgresql://... make test-db
test-db:
	$(VENV)/bin/pytest -q tests/integration $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy api scheduler workers db core vramq
	$(VENV)/bin/lint-imports

chaos:
	VRAMQ_CHAOS=full $(VENV)/bin/pytest -q -s tests/reliability -m "chaos or not chaos" -p no:randomly $(PYTEST_ARGS)

bench:
	$(PY) -m bench.run

clean:
	rm -rf .vramq-test .pytest_cache .mypy_cache .ruff_cache
