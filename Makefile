# Developer entry points. Everything installs into .venv; no root needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint fmt bench infra-up infra-down infra-status clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not chaos"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/request_plane.py

infra-up: $(STAMP)
	$(BIN)/sglmesh infra up

infra-down: $(STAMP)
	$(BIN)/sglmesh infra down

infra-status: $(STAMP)
	$(BIN)/sglmesh infra status

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
