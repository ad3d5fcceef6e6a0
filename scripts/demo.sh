#!/usr/bin/env bash
# The Redis docs page "Index and query vectors", end to end through the stream:
# enqueue the three documents with their genres, drain, search "That is a happy person".
set -euo pipefail
BIN="${BIN:-target/release/embed-worker}"
printf '%s\n' \
  '{"id":"0","content":"That is a very happy person","genre":"persons"}' \
  '{"id":"1","content":"That is a happy dog","genre":"pets"}' \
  '{"id":"2","content":"Today is a sunny day","genre":"weather"}' \
  | "$BIN" enqueue -
"$BIN" run --drain
"$BIN" search "That is a happy person"
