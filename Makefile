# `make demo`, `make test` and `make ui` set up a local virtual environment (.venv) on first use, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dopsd demo

# 2 processes, each test file whole in one of them (its module fixtures are built once): the tests run torch
# on 1 thread, so the second core would otherwise sit idle
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The web app on http://127.0.0.1:8765/ (browser tests: apt-get install chromium chromium-driver)
ui: $(STAMP)
	$(BIN)/dopsd ui

clean:
	rm -rf $(VENV)
