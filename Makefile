# The two set-up commands: `make run` and `make test`. Each creates .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run bookstore test lint typecheck unit bench soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python examples/serve_defaults.py

# The bookstore mesh with real Envoys configured over ADS (docs/mesh.md, walkthrough).
bookstore: $(STAMP)
	$(BIN)/python examples/bookstore/run.py

lint: $(STAMP)
	$(BIN)/ruff check meshca tests bench examples
	$(BIN)/ruff format --check meshca tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict meshca

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

# Benchmarks (not tests): each prints ratios against a baseline measured in the same run.
bench: $(STAMP)
	$(BIN)/python bench/issue_throughput.py
	$(BIN)/python bench/sds_fanout.py
	$(BIN)/python bench/xds_scale.py
	$(BIN)/python bench/vault_issue.py

soak: $(STAMP)
	$(BIN)/python bench/soak_rotation.py

clean:
	rm -rf $(VENV) .meshca .pytest_cache .mypy_cache .ruff_cache
