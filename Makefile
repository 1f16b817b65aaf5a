# Cached-embedding linear probing. `make help` lists the targets.
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

.DEFAULT_GOAL := help
.PHONY: help install features head study info test test-fast test-min bench bench-gpu lint format clean

## List the targets with what they do
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-zA-Z_-]+:/{if(doc){split($$0,t,":"); printf "  \033[1m%-10s\033[0m %s\n", t[1], doc}; doc=""}' $(MAKEFILE_LIST)

## Create .venv and install the package with its test tools (one command on a fresh machine)
install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'

## Extract backbone features for CONFIG into cache/ (default: the offline digits demo)
features:
	$(PIPELINE) features --config $(CONFIG)

## Train the linear head of CONFIG on its cache: sweep C on val, refit, test once -> results/
head:
	$(PIPELINE) head --config $(CONFIG)

## Run STUDY (default: the offline demo study) and write its comparison report under results/
study:
	$(PIPELINE) study $(STUDY)

## Describe the cache file that CONFIG writes
info:
	$(PIPELINE) info --config $(CONFIG)

## Run the whole offline test suite (CPU, about seven minutes on 2 cores)
test:
	$(PY) -m pytest -q

## Run the fast tests only (not marked slow), on every core: about two and a half minutes on 2 cores
test-fast:
	$(PY) -m pytest -q -m "not slow" -n auto

## Fast tests on the declared lower bounds: a fresh VENV_MIN with exactly those versions (CI runs it; torch hard-linked from VENV)
test-min:
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PYTHON) tools/link_torch.py $(VENV) $(VENV_MIN)
	$(PYTHON) tools/min_requirements.py > $(VENV_MIN)/requirements-min.txt
	cat $(VENV_MIN)/requirements-min.txt
	$(PY_MIN) -m pip install --only-binary :all: $(TORCH_PINS) -r $(VENV_MIN)/requirements-min.txt pytest pytest-xdist
	$(PY_MIN) -m pip install --no-deps -e .
	$(PY_MIN) -m pip check
	$(PY_MIN) -m pytest -q -m "not slow" -n auto

## Measure the speed claims side by side (ratios with targets) -> benchmarks/out/bench.json
bench:
	$(PY) -m benchmarks.run

## The GPU numbers (forward precisions, decode on the device, utilisation, head sweep) -> benchmarks/out/gpu.json; needs CUDA
bench-gpu:
	$(PY) -m benchmarks.gpu

## Lint: ruff check and ruff format --check
lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

## Format the code with ruff
format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## Remove cache/ and results/ contents (keeps .venv)
clean:
	find cache results -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
