# Each target makes its own .venv; nothing needs to be installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
DEMO_ORDERS ?= 6

.PHONY: run test test-fast lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/edge-agent run --config $(CONFIG) --demo $(DEMO_ORDERS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# Everything but the slow and chaos tests, on two workers: under a minute, for every change.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 -m "not slow and not chaos"

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.bench

# A simulated year: months of orders through the simulated cell with retention on (README: "Retention").
SOAK_ORDERS ?= 100000
soak: $(VENV)/.installed
	$(BIN)/python -m tests.support.soak --orders $(SOAK_ORDERS)

lint: $(VENV)/.installed
	$(BIN)/ruff check edge_agent tests benchmarks
	$(BIN)/ruff format --check edge_agent tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis .bench-tmp
