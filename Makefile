# blockrl: `make demo` and `make test` each set up .venv (CPU torch pinned via constraints.txt) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export MPLCONFIGDIR := $(CURDIR)/.mplconfig
export HF_HOME := $(CURDIR)/.hf_home
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.inductor_cache
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: demo test lint format install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: any looser request would pull a multi-GB CUDA build (shared/ENV.md)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blockrl demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest tests

clean:
	rm -rf runs .pytest_cache .ruff_cache .mplconfig .hf_home
