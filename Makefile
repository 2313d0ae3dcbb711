# Two commands for a fresh machine (see README):  make demo  |  make test
# CPU-only machines elsewhere: TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu" make test
PYTHON ?= python3
VENV ?= .venv
TORCH_INSTALL ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

.PHONY: setup setup-test demo test
setup: $(BIN)/activate
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INSTALL)
	$(BIN)/python -m pip install -q -e .

setup-test: setup
	$(BIN)/python -m pip install -q -e ".[test]"

demo: setup
	$(BIN)/python examples/quickstart.py --out out/quickstart

test: setup-test
	$(BIN)/python -m pytest -q
