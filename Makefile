# The README's two commands: `make up` (the whole system on embedded defaults) and `make test`.
# Each creates or refreshes the virtualenv it needs, so both work on a fresh clone with only Python.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up demo test lint venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

up: $(STAMP)  ## API + broker + Ray + embedded PostgreSQL/Valkey, with 3 simulated demo stations
	$(BIN)/powerbank up --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (see README)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
