# The two quickstart commands of README.md. Both install into .venv in the repo root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install train test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

train: install
	$(BIN)/accelerate launch --cpu --num_processes 1 recipes/train_vit.py

test: install
	$(BIN)/ruff check nmsparse_hf tests recipes bench examples
	$(BIN)/python -m pytest -q -rs tests
