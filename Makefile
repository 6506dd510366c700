# `make demo`: set up and run the offline demo. `make test`: set up and run the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

install: $(INSTALLED)

demo: install
	$(PYTHON) train.py experiment=demo

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check src tests train.py
	$(PYTHON) -m ruff format --check src tests train.py

# `make bench`: Patch AE and PatchCore on every MVTec AD category under data/mvtec_ad, then one table
# (multirun/benchmark_<time>/benchmark.{md,csv,png}). Pick categories, data and settings with BENCH_ARGS:
#   make bench BENCH_ARGS="--categories bottle data.root=../shared/data/mvtec_ad backbone=efficientnet_lite0"
BENCH_ARGS ?= --categories all
bench: install
	$(PYTHON) -m patchae.benchmark run $(BENCH_ARGS)

clean:
	rm -rf outputs multirun data/synthetic .pytest_cache
