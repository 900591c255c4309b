# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nnsim-installed

.PHONY: demo test lint bench bench-deps mutants clean

$(PY):
	python3 -m venv $(VENV)

# torch is pinned first so that nothing later pulls a CUDA build from the registry.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,examples]"
	touch $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Fashion-MNIST from Debian's package (no downloads at run time), installed only when missing.
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

CHROMIUM := /usr/bin/chromium

# Debian's chromium for the report's browser tests (driven by PyPI's playwright; never `playwright install`).
$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium

demo: $(STAMP)
	$(VENV)/bin/nnsim demo

test: $(STAMP) | $(FASHION_MNIST) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_kernel.py

# Opacus and BackPACK for benchmarks/bench_models.py (pyproject's bench extra), after the pinned torch: --no-deps
# for those that require torch (and torchvision), so that no other torch is pulled; then their other dependencies.
bench-deps: $(STAMP)
	$(PY) -m pip install -q --no-deps "opacus>=1.6" "backpack-for-pytorch>=1.7" "unfoldNd>=0.2,<1"
	$(PY) -m pip install -q "opt_einsum>=3.3" "einops>=0.3,<1" "scipy>=1.2"

# Mutation testing of the math core (docs/testing.md); slow, never part of `make test`.
# GROUP: core (algebra, outputs, denoising, linearized), factors, engine (engine/, density, neighbours) or all,
# each with its own fast tests (benchmarks/mutants.py); MUTANTS selects mutant names (fnmatch), e.g.
# MUTANTS='nnsim.factors.xǁOuterǁgram*'; JOBS the parallel workers.
GROUP ?= all
MUTANTS ?=
JOBS ?= 1
mutants: $(STAMP)
	$(PY) -m pip install -q "mutmut>=3.3"
	env -u PYTHONPATH $(PY) benchmarks/mutants.py $(GROUP) --jobs $(JOBS) $(foreach m,$(MUTANTS),'$(m)')

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis mutants
