# Cached-embedding linear probing. `make help` lists the targets.
# On a fresh clone: `make demo` runs the offline demo, `make test` the tests; both install first.
# Any config: make features CONFIG=configs/other.toml

VENV ?= .venv
PYTHON ?= python3
PY ?= $(VENV)/bin/python
CONFIG ?= configs/demo.toml
STUDY ?= configs/demo-study.toml
PIPELINE ?= $(PY) -m pipeline
VENV_MIN ?= .venv-min
PY_MIN ?= $(VENV_MIN)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# TORCH=cpu installs PyTorch's CPU-only build (about 1 GB instead of 6 GB of CUDA libraries).
TORCH ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# Written when .venv is installed: targets that run the package install first when it is missing or
# older than pyproject.toml, and never twice. With PY pointing at another interpreter, nothing is installed.
STAMP := $(VENV)/.installed
READY := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))

.DEFAULT_GOAL := help
.PHONY: help install demo features head study info test test-fast test-min bench bench-gpu lint format docs clean

## List the targets with what they do
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-zA-Z_-]+:/{if(doc){split($$0,t,":"); printf "  \033[1m%-10s\033[0m %s\n", t[1], doc}; doc=""}' $(MAKEFILE_LIST)

## Create .venv with the package and its tools, once (TORCH=cpu: the CPU-only PyTorch build)
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
ifeq ($(TORCH),cpu)
	$(PY) -m pip install --index-url $(TORCH_CPU_INDEX) 'torch>=2.1' 'torchvision>=0.16'
endif
	$(PY) -m pip install -e '.[dev]'
	@touch $@
	@echo "installed: run .venv/bin/pipeline --help (or: source .venv/bin/activate, then pipeline --help)"

## The offline demo end to end: install if needed, extract the digits features, train the head
demo: $(READY)
	$(PIPELINE) features --config $(CONFIG)
	$(PIPELINE) head --config $(CONFIG)
	@echo "pipeline is $(VENV)/bin/pipeline (or: source $(VENV)/bin/activate); your own images: see README.md"

## Extract backbone features for CONFIG into cache/ (default: the offline digits demo)
features: $(READY)
	$(PIPELINE) features --config $(CONFIG)

## Train the head of CONFIG on its cache: choose C on val, refit, test once -> results/
head: $(READY)
	$(PIPELINE) head --config $(CONFIG)

## Run STUDY (default: the offline demo study) and write its comparison report under results/
study: $(READY)
	$(PIPELINE) study $(STUDY)

## Describe the cache file that CONFIG writes
info: $(READY)
	$(PIPELINE) info --config $(CONFIG)

## Run the whole offline test suite, installing first if needed (CPU, about nine minutes on 2 cores)
test: $(READY)
	$(PY) -m pytest -q --durations=15

## Run the fast tests only (not marked slow), on every core: about three minutes on 2 idle cores
test-fast: $(READY)
	$(PY) -m pytest -q -m "not slow" -n auto

## Fast tests on the declared lower bounds: a fresh VENV_MIN with exactly those versions (CI runs it; torch hard-linked from VENV)
test-min: $(READY)
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PYTHON) tools/link_torch.py $(VENV) $(VENV_MIN)
	$(PYTHON) tools/min_requirements.py > $(VENV_MIN)/requirements-min.txt
	cat $(VENV_MIN)/requirements-min.txt
	$(PY_MIN) -m pip install --only-binary :all: $(TORCH_PINS) -r $(VENV_MIN)/requirements-min.txt pytest pytest-xdist
	$(PY_MIN) -m pip install --no-deps -e .
	$(PY_MIN) -m pip check
	$(PY_MIN) -m pytest -q -m "not slow" -n auto

## Build the docs site into site/ (mkdocs --strict: a broken link or a stale page fails)
docs: $(READY)
	$(PY) tools/cli_reference.py docs/reference/cli.md
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

## Measure the speed claims side by side (ratios with targets) -> benchmarks/out/bench.json
bench: $(READY)
	$(PY) -m benchmarks.run

## The GPU numbers (forward precisions, decode on the device, utilisation, head sweep) -> benchmarks/out/gpu.json; needs CUDA
bench-gpu: $(READY)
	$(PY) -m benchmarks.gpu

## Lint: ruff check and ruff format --check
lint: $(READY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## Format the code with ruff
format: $(READY)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## Remove cache/ and results/ contents (keeps .venv)
clean:
	find cache results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
