# The two quickstart commands of README.md. Both install into .venv in the repo root.
.PHONY: train test

train:
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/accelerate launch --cpu recipes/train_vit.py

test:
	python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/ruff check nmsparse_hf tests recipes bench examples && .venv/bin/python -m pytest -q -rs tests
