#!/usr/bin/env bash
# The container image of deploy/Dockerfile: build it, and check that the built image works.
#   deploy/image.sh build   podman build (docker build where podman is missing)
#   deploy/image.sh check   builds unless IMAGE exists, then runs the image's own entrypoint, user
#                           and environment against the embedded Redis: the Redis docs' example,
#                           UID 10001, exit 0 on SIGTERM (podman image mount + chroot; needs root)
#   deploy/image.sh base    local stand-ins for the registry base images, for a machine that
#                           reaches no registry: debootstrap (Debian's packages) + podman import
# Settings, from the environment (the Makefile's variables of the same names):
#   IMAGE            the tag built and checked (embed-worker:0.1.0)
#   IMAGE_BASE       registry (the Dockerfile's FROM defaults) or local (the stand-ins of `base`,
#                    made first if missing)
#   IMAGE_BINARY     build (cargo in the image's build stage) or prebuilt (copies
#                    target/release/embed-worker as `make build` left it; built on bookworm or older)
#   IMAGE_BUILD_ARGS more arguments for the build, word-split (e.g. "--build-arg RUST_IMAGE=...")
#   IMAGE_ISOLATION  podman's isolation for RUN steps (chroot: needs no working OCI runtime/cgroups)
#   DEBIAN_MIRROR    where `base` gets Debian's packages (http://deb.debian.org/debian)
# Heavy steps inherit the caller's priority: `nice -n 19 make image-check` on a shared machine.
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"
cd "$ROOT"

IMAGE="${IMAGE:-embed-worker:0.1.0}"
IMAGE_BASE="${IMAGE_BASE:-registry}"
IMAGE_BINARY="${IMAGE_BINARY:-build}"
IMAGE_ISOLATION="${IMAGE_ISOLATION:-chroot}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The stand-ins' names: `localhost/` so nothing ever tries to pull them, and one repository with
# the names in the tag, because podman resolves a short name such as `debian:bookworm-slim` to
# any local image whose last path part matches (a `.../debian:bookworm-slim` would silently
# stand in for the registry's on a registry build).
LOCAL_RUNTIME_BASE=localhost/embed-worker-base:debian-bookworm-slim
LOCAL_PYTHON_BASE=localhost/embed-worker-base:python-3.11-bookworm
# The Redis docs page's result (README, tests/it/common.rs EXPECTED); this float32 model agrees to ~2e-7.
EXPECTED_LINES=(
  "ID: doc:0, Distance:0.114169843495, Content:'That is a very happy person'"
  "ID: doc:1, Distance:0.610845327377, Content:'That is a happy dog'"
  "ID: doc:2, Distance:1.48624765873, Content:'Today is a sunny day'"
)

die() { echo "image: $*" >&2; exit 1; }
say() { echo "image: $*"; }
# Seconds since the script started, for the step timings in the log.
elapsed() { echo "$((SECONDS))s"; }

engine() {
  if command -v podman >/dev/null; then echo podman
  elif command -v docker >/dev/null; then echo docker
  else die "neither podman nor docker found. Fix: sudo apt-get install podman (or install Docker)"
  fi
}

base_runtime() {
  command -v podman >/dev/null || die "base: needs podman (podman import). Fix: sudo apt-get install podman"
  command -v debootstrap >/dev/null || die "base: needs debootstrap. Fix: sudo apt-get install debootstrap"
  [ "$(id -u)" = 0 ] || die "base: debootstrap needs root"
  local work rootfs
  work="$(mktemp -d /var/tmp/embed-worker-base.XXXXXX)"
  rootfs="$work/rootfs"
  say "base: debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR ($(elapsed))"
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "base: debootstrap failed (log: $work/debootstrap.log)"; }
  # The sources debian:bookworm-slim has (updates and security too), and none of the cache.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/cache/apt/*.bin "${rootfs:?}"/var/log/*.log
  # The configuration debian:bookworm-slim carries: a PATH and bash as the command.
  tar -C "$rootfs" --numeric-owner -cf - . \
    | podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$LOCAL_RUNTIME_BASE" >/dev/null
  rm -rf "$work"
  say "base: $LOCAL_RUNTIME_BASE imported ($(elapsed))"
}

# python:3.11-slim-bookworm's part that the model stage uses: `python` 3.11 with venv (ensurepip).
# It also trusts this host's own extra CAs (/usr/local/share/ca-certificates, e.g. an egress proxy
# that re-signs TLS, as in this project's sandboxes), or pip could not reach PyPI. Only the model
# stage runs on it, and only the ONNX Runtime library and the model files leave it: those CAs never
# reach the final image.
base_python() {
  local work
  work="$(mktemp -d /var/tmp/embed-worker-base.XXXXXX)"
  mkdir "$work/ca"
  cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true
  printf '%s\n' "FROM $LOCAL_RUNTIME_BASE" \
    'RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates && rm -rf /var/lib/apt/lists/*' \
    'COPY ca/ /usr/local/share/ca-certificates/' \
    'RUN update-ca-certificates' \
    'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    >"$work/Containerfile"
  podman build --isolation "$IMAGE_ISOLATION" -q -f "$work/Containerfile" -t "$LOCAL_PYTHON_BASE" "$work" >/dev/null
  rm -rf "$work"
  say "base: $LOCAL_PYTHON_BASE built ($(elapsed))"
}

base() { base_runtime; base_python; }

build() {
  local eng args=()
  eng="$(engine)"
  if [ "$IMAGE_BASE" = local ]; then
    [ "$eng" = podman ] || die "build: IMAGE_BASE=local needs podman (the stand-ins are podman images)"
    podman image exists "$LOCAL_RUNTIME_BASE" || base_runtime
    podman image exists "$LOCAL_PYTHON_BASE" || base_python
    args+=(--build-arg "RUNTIME_IMAGE=$LOCAL_RUNTIME_BASE" --build-arg "PYTHON_IMAGE=$LOCAL_PYTHON_BASE")
    [ "$IMAGE_BINARY" = prebuilt ] || case "${IMAGE_BUILD_ARGS:-}" in *RUST_IMAGE=*) ;; *)
      die "build: IMAGE_BASE=local has no Rust base (Debian's rustc is older than Cargo.toml's 1.92). Fix: IMAGE_BINARY=prebuilt, or IMAGE_BUILD_ARGS='--build-arg RUST_IMAGE=...'" ;; esac
  elif [ "$IMAGE_BASE" = registry ]; then
    # The Dockerfile's default, given explicitly: podman 4.3 ignores the default of an ARG that
    # names a stage (see the Dockerfile), and BINARY_FROM below is given for the same reason.
    args+=(--build-arg RUNTIME_IMAGE=debian-slim)
  else
    die "build: IMAGE_BASE=$IMAGE_BASE; it is registry or local"
  fi
  local bin_ctx=""
  case "$IMAGE_BINARY" in
    build) args+=(--build-arg BINARY_FROM=build) ;;
    prebuilt)
      # Taken as it is (not rebuilt here, which would wait on a cargo build running beside).
      [ -x target/release/embed-worker ] || die "build: IMAGE_BINARY=prebuilt needs target/release/embed-worker. Fix: make build"
      say "build: prebuilt target/release/embed-worker of $(date -u -r target/release/embed-worker '+%F %T UTC')"
      # A context holding the binary alone: target/ is gigabytes.
      bin_ctx="$(mktemp -d /var/tmp/embed-worker-bin.XXXXXX)"
      cp target/release/embed-worker "$bin_ctx/"
      args+=(--build-arg BINARY_FROM=prebuilt --build-context "bin=$bin_ctx") ;;
    *) die "build: IMAGE_BINARY=$IMAGE_BINARY; it is build or prebuilt" ;;
  esac
  # shellcheck disable=SC2206 # word-split on purpose: several arguments in one variable
  args+=(${IMAGE_BUILD_ARGS:-})
  say "build: $eng build $IMAGE (IMAGE_BASE=$IMAGE_BASE IMAGE_BINARY=$IMAGE_BINARY) ($(elapsed))"
  local rc=0
  if [ "$eng" = podman ]; then
    podman build --isolation "$IMAGE_ISOLATION" -f deploy/Dockerfile \
      --ignorefile deploy/Dockerfile.dockerignore -t "$IMAGE" "${args[@]}" . || rc=$?
  else
    DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile -t "$IMAGE" "${args[@]}" . || rc=$?
  fi
  [ -z "$bin_ctx" ] || rm -rf "$bin_ctx"
  [ "$rc" = 0 ] || die "build: $eng build failed ($rc)"
  say "build: $IMAGE built ($(elapsed))"
}

# -------------------------------------------------------------------------------------------------
# check: the image's filesystem, entered with chroot as the image's user with the image's
# environment and working directory, the way `podman run --network host` would start it (podman run
# itself needs a working OCI runtime and cgroups, which this check does not assume).

MNT="" REDIS_UP="" TMP="" WORKER_PID="" PORT=""
cleanup() {
  [ -z "$WORKER_PID" ] || kill -KILL "$WORKER_PID" 2>/dev/null || true
  if [ -n "$MNT" ]; then
    umount "$MNT/proc" "$MNT/dev" "$MNT/sys" 2>/dev/null || true
    podman image unmount "$IMAGE" >/dev/null || true
  fi
  [ -z "$REDIS_UP" ] || env -u EMBED_WORKER__REDIS__URL REDIS_PORT="$PORT" REDIS_DIR="$TMP/redis" scripts/redis.sh stop >/dev/null || true
  [ -z "$TMP" ] || rm -rf "$TMP"
}

check() {
  [ "$(id -u)" = 0 ] || die "check: needs root (podman image mount, chroot)"
  command -v podman >/dev/null || die "check: needs podman (podman image mount). Fix: sudo apt-get install podman"
  [ -x "$EMBED_WORKER_PYTHON" ] || die "check: no project virtualenv (the embedded Redis). Fix: make setup"
  if podman image exists "$IMAGE"; then say "check: using the built $IMAGE"; else build; fi
  TMP="$(mktemp -d /var/tmp/embed-worker-check.XXXXXX)"
  trap cleanup EXIT

  # The image's configuration, as podman run would apply it.
  podman image inspect "$IMAGE" --format '{{json .Config}}' | "$EMBED_WORKER_PYTHON" -c '
import json, shlex, sys
c = json.load(sys.stdin)
env = c.get("Env") or []
# What podman and docker add when the image sets none.
if not any(e.startswith("PATH=") for e in env):
    env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
user = c.get("User") or "0:0"
print("IMG_USER=" + shlex.quote(user))
print("IMG_WORKDIR=" + shlex.quote(c.get("WorkingDir") or "/"))
for name, items in (("IMG_ENV", env), ("IMG_ENTRYPOINT", c.get("Entrypoint") or []), ("IMG_CMD", c.get("Cmd") or [])):
    print(name + "=(" + " ".join(shlex.quote(i) for i in items) + ")")
' >"$TMP/config.sh"
  source "$TMP/config.sh"
  say "check: image user $IMG_USER, workdir $IMG_WORKDIR, entrypoint ${IMG_ENTRYPOINT[*]}, cmd ${IMG_CMD[*]}, env ${IMG_ENV[*]}"
  [[ "$IMG_USER" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "check: USER $IMG_USER is not numeric (runAsNonRoot needs a number)"
  local uid="${IMG_USER%%:*}" gid="${IMG_USER#*:}"
  [ "$gid" != "$IMG_USER" ] || gid="$uid"

  MNT="$(podman image mount "$IMAGE")"
  # What a container gets: /proc, /dev and a read-only /sys (ONNX Runtime reads the CPU topology).
  mount -t proc proc "$MNT/proc"
  mount --bind /dev "$MNT/dev"
  mount --bind -o ro /sys "$MNT/sys"
  say "check: $IMAGE mounted at $MNT"

  # The embedded Redis (scripts/redis.sh, as `make run` starts it) on a free port, data in TMP.
  PORT="$("$EMBED_WORKER_PYTHON" scripts/redis_probe.py --free-near 26400)"
  local http_port
  http_port="$("$EMBED_WORKER_PYTHON" scripts/redis_probe.py --free-near $((PORT + 1)))"
  env -u EMBED_WORKER__REDIS__URL REDIS_PORT="$PORT" REDIS_DIR="$TMP/redis" scripts/redis.sh start
  REDIS_UP=1

  # The image's entrypoint as the image's user, with nothing of this shell's environment but the
  # image's own and the two settings a deployment gives it (127.0.0.1 is this host's, shared).
  local run_in_image=(/usr/bin/env -i "${IMG_ENV[@]}" HOME=/
    "EMBED_WORKER__REDIS__URL=redis://127.0.0.1:$PORT" "EMBED_WORKER__HTTP__LISTEN=127.0.0.1:$http_port"
    /usr/sbin/chroot --userspec="$uid:$gid" --groups="$gid" "$MNT"
    /bin/sh -c 'cd "$0" && exec "$@"' "$IMG_WORKDIR" "${IMG_ENTRYPOINT[@]}")

  # 1. The worker: the image's CMD, the process a pod runs.
  say "check: starting the image's worker: ${IMG_ENTRYPOINT[*]} ${IMG_CMD[*]} ($(elapsed))"
  "${run_in_image[@]}" "${IMG_CMD[@]}" >"$TMP/worker.log" 2>&1 &
  WORKER_PID=$!
  local ready=""
  for _ in $(seq 1 600); do
    kill -0 "$WORKER_PID" 2>/dev/null || { cat "$TMP/worker.log" >&2; die "check: the worker exited at start-up"; }
    if curl -fsS -o /dev/null "http://127.0.0.1:$http_port/readyz" 2>/dev/null; then ready=1; break; fi
    sleep 0.1
  done
  [ -n "$ready" ] || { cat "$TMP/worker.log" >&2; die "check: /readyz not 200 within 60s"; }
  say "check: /readyz 200 ($(elapsed))"

  # 2. Its identity: the process itself, seen from the host.
  local exe ids
  exe="$(readlink "/proc/$WORKER_PID/exe")"
  ids="$(grep -E '^(Uid|Gid|Groups):' "/proc/$WORKER_PID/status" | tr -s '\t ' ' ')"
  say "check: worker pid $WORKER_PID exe $exe root $(readlink "/proc/$WORKER_PID/root")"
  say "check: $(tr '\n' ';' <<<"$ids")"
  [ "$exe" = "$MNT/usr/local/bin/embed-worker" ] || die "check: the worker is not the image's binary ($exe)"
  grep -qx "Uid: 10001 10001 10001 10001" <<<"$ids" || die "check: the worker does not run as UID 10001"
  grep -qx "Gid: 10001 10001 10001 10001" <<<"$ids" || die "check: the worker does not run as GID 10001"

  # 3. The Redis docs' example (scripts/demo.sh's documents) through the stream, with the image's
  # binary for the producer and the query too.
  printf '%s\n' \
    '{"id":"0","content":"That is a very happy person","genre":"persons"}' \
    '{"id":"1","content":"That is a happy dog","genre":"pets"}' \
    '{"id":"2","content":"Today is a sunny day","genre":"weather"}' \
    | "${run_in_image[@]}" --config /etc/embed-worker/config.toml enqueue -
  local out="" found=""
  for _ in $(seq 1 120); do
    out="$("${run_in_image[@]}" --config /etc/embed-worker/config.toml search "That is a happy person" 2>&1 || true)"
    if [ "$(grep -c '^ID: ' <<<"$out")" = 3 ]; then found=1; break; fi
    sleep 0.5
  done
  [ -n "$found" ] || { echo "$out" >&2; cat "$TMP/worker.log" >&2; die "check: the three documents were not searchable within 60s"; }
  say "check: search \"That is a happy person\" ($(elapsed)):"
  grep '^ID: ' <<<"$out" | sed 's/^/  /'
  grep '^ID: ' <<<"$out" | "$EMBED_WORKER_PYTHON" -c '
import re, sys
expected = sys.argv[1:]
got = sys.stdin.read().splitlines()
pattern = r"ID: (\S+), Distance:([0-9.]+), Content:(.*)"
for line, want in zip(got, expected, strict=True):
    g, w = re.fullmatch(pattern, line), re.fullmatch(pattern, want)
    assert g and (g[1], g[3]) == (w[1], w[3]), f"{line!r} is not the docs line {want!r}"
    assert abs(float(g[2]) - float(w[2])) < 1e-6, f"{line!r}: Distance {w[2]} expected (within 1e-6)"
print("image: check: the three lines are the docs page'"'"'s, distances within 1e-6")
' "${EXPECTED_LINES[@]}" || die "check: not the docs' result"
  local acked
  acked="$(curl -fsS "http://127.0.0.1:$http_port/metrics" | grep -E '^embed_worker_documents_acked_total ' || true)"
  say "check: /metrics: ${acked:-no embed_worker_documents_acked_total}"

  # 4. SIGTERM, as Kubernetes stops a pod: the worker is PID 1 there and has to exit 0 by itself.
  local rc=0 t0=$SECONDS
  kill -TERM "$WORKER_PID"
  wait "$WORKER_PID" || rc=$?
  WORKER_PID=""
  say "check: SIGTERM -> exit status $rc after $((SECONDS - t0))s; the worker's last log lines:"
  tail -n 3 "$TMP/worker.log" | sed 's/^/  /'
  [ "$rc" = 0 ] || { cat "$TMP/worker.log" >&2; die "check: exit status $rc on SIGTERM, not 0"; }
  say "check: OK: $IMAGE runs as UID 10001, reproduces the docs' example, exits 0 on SIGTERM ($(elapsed))"
}

case "${1:-}" in
  base) base ;;
  build) build ;;
  check) check ;;
  *) echo "usage: $0 base|build|check" >&2; exit 2 ;;
esac
