# The two set-up commands of the README. Both create .venv, install the CPU
# build of torch on this kind of machine, then the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint format

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The test extras include the optional ones (export, distributed, napari with
# a Qt binding) so their tests run too. A torch already in the venv (a CUDA
# build a user chose) is kept.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,export,distributed,napari]" PyQt5 pytest-qt

demo: install
	$(BIN)/unetile demo --out demo_out

test: install lint
	$(BIN)/python -m pytest

# The quick lane (tiling, metrics, CLI errors, ...: the modules marked fast) in
# under a minute; like lint it installs nothing, so run make install once first.
test-fast:
	$(BIN)/python -m pytest -m "fast and not slow"

lint:
	$(BIN)/ruff check src tests benchmarks docs/screenshots.py
	$(BIN)/ruff format --check src tests benchmarks docs/screenshots.py

format:
	$(BIN)/ruff format src tests benchmarks docs/screenshots.py
	$(BIN)/ruff check --fix src tests benchmarks docs/screenshots.py
