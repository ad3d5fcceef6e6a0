#!/usr/bin/env bash
# The Redis docs page "Index and query vectors", end to end through the stream:
# enqueue the three documents with their genres, drain, search "That is a happy person".
# Dials 127.0.0.1:$REDIS_PORT (default 6379) unless EMBED_WORKER__REDIS__URL says otherwise.
set -euo pipefail
BIN="${BIN:-target/release/embed-worker}"
export EMBED_WORKER__REDIS__URL="${EMBED_WORKER__REDIS__URL:-redis://127.0.0.1:${REDIS_PORT:-6379}}"
# The drain below is a second worker beside a running `make run`: no metrics listener of its own,
# or it would clash with that worker's http.listen port (unless one is asked for explicitly).
export EMBED_WORKER__HTTP__LISTEN="${EMBED_WORKER__HTTP__LISTEN-}"
printf '%s\n' \
  '{"id":"0","content":"That is a very happy person","genre":"persons"}' \
  '{"id":"1","content":"That is a happy dog","genre":"pets"}' \
  '{"id":"2","content":"Today is a sunny day","genre":"weather"}' \
  | "$BIN" enqueue -
"$BIN" run --drain
"$BIN" search "That is a happy person"
