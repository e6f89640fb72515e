# The two set-up commands: `make run` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python examples/serve_defaults.py

lint: $(STAMP)
	$(BIN)/ruff check meshca tests bench examples
	$(BIN)/ruff format --check meshca tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict meshca

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/issue_throughput.py

soak: $(STAMP)
	$(BIN)/python bench/soak_rotation.py

clean:
	rm -rf $(VENV) .meshca .pytest_cache .mypy_cache .ruff_cache
