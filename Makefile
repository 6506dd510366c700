# `make demo`: set up and run the offline demo. `make test`: set up and run the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint bench bench-inference bench-coreset bench-speed clean

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

install: $(INSTALLED)

demo: install
	$(PYTHON) train.py experiment=demo

test: install
	$(PYTHON) -m pytest -q

# `make lint`: ruff (style and errors), then the package's layer contracts (import-linter, pyproject.toml).
lint: install
	$(PYTHON) -m ruff check src tests train.py predict.py export.py
	$(PYTHON) -m ruff format --check src tests train.py predict.py export.py
	$(VENV)/bin/lint-imports

# `make bench`: Patch AE, PatchCore, SSL-AE and DAAD (their CPU-sized experiments) on every MVTec AD category
# under data/mvtec_ad, then one table
# (multirun/benchmark_<time>/benchmark.{md,csv,png}). Pick categories, data and settings with BENCH_ARGS:
#   make bench BENCH_ARGS="--categories bottle data.root=../shared/data/mvtec_ad backbone=efficientnet_lite0"
BENCH_ARGS ?= --categories all
bench: install
	$(PYTHON) -m patchae.benchmarks.accuracy run $(BENCH_ARGS)

# `make bench-inference`: images/s and p50/p95 latency (batch 1 and 32), and exact vs IVF/IVF-PQ search on a 1M-vector
# bank. Runs anywhere (untrained offline backbone by default); pass a trained model with INFER_ARGS="ckpt=<model.ckpt>".
INFER_ARGS ?=
bench-inference: install
	$(PYTHON) -m patchae.benchmarks.inference mode=all $(INFER_ARGS)

# `make bench-speed`: Patch AE and PatchCore beside anomalib's PatchCore (same data, backbone, image and bank size):
# coreset and fit seconds, model-time images/s (batch 1, 32; torch and ONNX Runtime), predict images/s, AUROC, peak
# memory and a ratio column (outputs/speed/<time>/speed.md). Installs the `bench` extra (anomalib) first.
SPEED_ARGS ?= root=data/mvtec_ad category=bottle
bench-speed: install
	$(PYTHON) -m pip install -q -e '.[bench]'
	$(PYTHON) -m patchae.benchmarks.speed $(SPEED_ARGS)

# `make bench-coreset`: time and coverage of the coreset methods (exact greedy, partitioned) on 1M vectors: synthetic
# by default; real ones with CORESET_ARGS="data_root=../shared/data/mvtec_ad category=bottle features=/tmp/bottle_8x.pt".
CORESET_ARGS ?=
bench-coreset: install
	$(PYTHON) -m patchae.benchmarks.coreset $(CORESET_ARGS)

clean:
	rm -rf outputs multirun data/synthetic .pytest_cache
