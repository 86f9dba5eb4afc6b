# attnkit: `make demo` runs the toolkit offline on a tiny model, `make test` runs the test suite.
# Both create .venv and install into it first (torch first, so the resolver keeps its build), with
# constraints.txt: the newest transformers release attnkit is tested on.
# `make test-oldest` runs the suite again in .venv-tf<MIN> on the oldest transformers release
# pyproject.toml accepts; `make test-transformers V=5.20.0` on any other release.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.attnkit-installed
PYTEST_ARGS ?=
# the lower bound of transformers in pyproject.toml (the one place it is written)
TRANSFORMERS_MIN := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
V ?= $(TRANSFORMERS_MIN)

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-oldest test-transformers bench bench-prune bench-width clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnkit demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-oldest:
	@test -n "$(TRANSFORMERS_MIN)" || { echo "no transformers lower bound found in pyproject.toml"; exit 2; }
	$(MAKE) test-transformers V=$(TRANSFORMERS_MIN)

# the suite on transformers==$(V), in its own virtual environment (.venv-tf$(V))
test-transformers:
	@if [ ! -f .venv-tf$(V)/.attnkit-installed ] || [ pyproject.toml -nt .venv-tf$(V)/.attnkit-installed ]; then \
		set -e; $(PYTHON) -m venv .venv-tf$(V); \
		.venv-tf$(V)/bin/python -m pip install --quiet --upgrade pip; \
		.venv-tf$(V)/bin/python -m pip install --quiet "$(TORCH)"; \
		.venv-tf$(V)/bin/python -m pip install --quiet "transformers==$(V)" -e ".[test]"; \
		touch .venv-tf$(V)/.attnkit-installed; \
	fi
	.venv-tf$(V)/bin/python -c "import transformers; v = transformers.__version__; assert v == '$(V)', v; print('transformers', v)"
	.venv-tf$(V)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench.py --preset llava15-mini

bench-prune: $(STAMP)
	$(PY) scripts/bench_prune.py --preset llava15-mini --repeats 3

bench-width: $(STAMP)
	$(PY) scripts/bench_width.py

clean:
	rm -rf $(VENV) .venv-tf* build *.egg-info .pytest_cache
