# `make demo`, `make test` and `make ui` set up a local virtual environment (.venv) on first use, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MIN_VENV ?= .venv-min
# The fast subset `make test-min` runs on the lower bounds: the real diffusers pipelines, training runs and their
# LoRA files, sampling, the web app's API
MIN_TESTS ?= tests/test_lora_files.py tests/test_export.py tests/test_lora_runs.py tests/test_sample.py \
	tests/test_objective.py tests/test_ui_api.py

.PHONY: demo test test-min ui clean

# The exact versions of constraints.txt (pyproject.toml only declares ranges)
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dopsd demo

# 2 processes, each test file whole in one of them (its module fixtures are built once): the tests run torch
# on 1 thread, so the second core would otherwise sit idle
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# pyproject.toml's lower bounds (constraints-min.txt) in a fresh environment of their own, and a fast subset of the
# tests on them. torch 2.11 is PyPI's CUDA build (a download of several GB; it runs on the CPU too).
test-min:
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python -m pip install --quiet -c constraints-min.txt -e '.[dev]'
	$(MIN_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft|accelerate|safetensors) '
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

# The web app on http://127.0.0.1:8765/ (browser tests: apt-get install chromium chromium-driver)
ui: $(STAMP)
	$(BIN)/dopsd ui

clean:
	rm -rf $(VENV) $(MIN_VENV) dist
