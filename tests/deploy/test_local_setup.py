"""The README's local commands as a new user meets them: one port setting (`REDIS_PORT`) for the
embedded Redis and the commands that dial it, a busy port that fails in seconds with one line,
and a second worker on the host that is told which setting to change.

Real processes only: the embedded redis-server (with and without its modules), plain TCP
listeners, scripts/redis.sh, scripts/demo.sh and `make run`, all on free ports below 55535, each
stopped and its data directory removed at the end. The worker is the debug binary `make test`
has already built (no release build here).
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from deploy_support import ROOT, redis_server_binary

DEBUG_BIN = ROOT / "target" / "debug" / "embed-worker"
# The Redis docs page's result, as README shows it: `ID: doc:0, Distance:0.114169843495, ...`.
DOCS = [(0.114169843495, "That is a very happy person"), (0.610845327377, "That is a happy dog"),
        (1.48624765873, "Today is a sunny day")]


def free_port() -> int:
    """A port nothing listens on, below 55535 (clear of the ephemeral range's top)."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def clean_env(**extra: str) -> dict:
    """The environment as a user's shell has it: nothing of the worker's configuration inherited
    (an EMBED_WORKER__REDIS__URL from outside would win over REDIS_PORT), no parent make."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EMBED_WORKER__") and k not in ("REDIS_PORT", "REDIS_DIR", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(extra)
    return env


def sh(cmd: list[str], env: dict, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `cmd` from the repository root with scripts/env.sh sourced, as the Makefile does."""
    start = time.monotonic()
    p = subprocess.run(["bash", "-c", 'source scripts/env.sh && exec "$@"', "_", *cmd], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - start


def assert_docs_lines(stdout: str) -> None:
    """The last three lines are the docs' three results in order, distances within 1e-4 (the
    float32 model agrees to ~2e-7; tests/it and onnx/export.py use the same bound)."""
    lines = stdout.splitlines()[-3:]
    assert len(lines) == 3, stdout
    for i, (line, (distance, content)) in enumerate(zip(lines, DOCS)):
        m = re.fullmatch(rf"ID: doc:{i}, Distance:([0-9.]+), Content:'(.*)'", line)
        assert m, f"not the docs' line {i}: {line!r}\n{stdout}"
        assert abs(float(m.group(1)) - distance) < 1e-4, f"{line}: expected Distance:{distance}"
        assert m.group(2) == content, line


def redis_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("redis:")]


@pytest.fixture
def plain_redis(tmp_path):
    """The embedded redis-server started without --loadmodule: a Redis without the search module,
    as on a machine that already runs its own Redis."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary (run `make setup`)")
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail("redis-server without modules did not start")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Listener:
    """A TCP listener that is not Redis: silent (accepts, never answers) or an HTTP server's 400."""

    def __init__(self, reply: bytes | None):
        self.reply = reply
        self.sock = socket.socket()
        for _ in range(50):
            self.port = free_port()
            try:
                self.sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                continue
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def assert_fails_fast_with_one_line(p: subprocess.CompletedProcess, elapsed: float, port: int) -> str:
    assert p.returncode != 0, p.stdout + p.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    lines = redis_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert f"port {port} is taken by" in line, line
    assert "search module" in line, line
    assert "Fix: use another port, e.g. REDIS_PORT=" in line, line
    assert "Traceback" not in p.stderr and "did not come up" not in p.stderr, p.stderr
    return line


def test_a_redis_without_search_on_the_port_fails_make_run_in_seconds(plain_redis, tmp_path):
    """`make run` checks the port before set-up, model export and the release build."""
    env = clean_env(REDIS_PORT=str(plain_redis), REDIS_DIR=str(tmp_path / "data"))
    p, elapsed = sh(["make", "--no-print-directory", "run"], env, timeout=120)
    line = assert_fails_fast_with_one_line(p, elapsed, plain_redis)
    assert "a Redis 8" in line and "without the search module" in line, line
    assert "load the search module" in line, line
    assert "cargo" not in p.stdout + p.stderr, "went past the check into the build"
    assert not (tmp_path / "data").exists(), "a second server was started"


def test_a_redis_without_search_fails_redis_start(plain_redis, tmp_path):
    """The `redis` target itself (scripts/redis.sh start) says the same and starts nothing."""
    env = clean_env(REDIS_PORT=str(plain_redis), REDIS_DIR=str(tmp_path / "data"))
    p, elapsed = sh(["scripts/redis.sh", "start"], env)
    assert_fails_fast_with_one_line(p, elapsed, plain_redis)
    assert not (tmp_path / "data").exists(), "a second server was started"


@pytest.mark.parametrize("reply", [None, b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"],
                         ids=["silent", "http"])
def test_a_listener_that_is_not_redis_fails_redis_start(reply, tmp_path):
    listener = Listener(reply)
    try:
        env = clean_env(REDIS_PORT=str(listener.port), REDIS_DIR=str(tmp_path / "data"))
        p, elapsed = sh(["scripts/redis.sh", "start"], env)
        line = assert_fails_fast_with_one_line(p, elapsed, listener.port)
        assert "something that is not Redis" in line, line
        assert not (tmp_path / "data").exists(), "a server was started"
    finally:
        listener.close()


def test_redis_port_drives_the_embedded_server_and_the_demo(tmp_path):
    """REDIS_PORT=<free port>: the embedded server starts there, a second start reuses it, and the
    demo (enqueue, drain, search) dials it and prints the Redis docs' three lines. An explicit
    EMBED_WORKER__REDIS__URL still wins over REDIS_PORT."""
    if not DEBUG_BIN.is_file():
        pytest.skip(f"{DEBUG_BIN} missing (make test builds it with cargo test)")
    port = free_port()
    data = tmp_path / "data"
    env = clean_env(REDIS_PORT=str(port), REDIS_DIR=str(data), BIN=str(DEBUG_BIN))
    try:
        p, _ = sh(["scripts/redis.sh", "start"], env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"redis: started on 127.0.0.1:{port}" in p.stdout, p.stdout
        assert (data / f"redis-{port}.pid").is_file()

        p, _ = sh(["scripts/redis.sh", "start"], env)
        assert p.returncode == 0 and "with the search module" in p.stdout and "using it" in p.stdout, p.stdout + p.stderr

        p, _ = sh(["scripts/demo.sh"], env, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        assert_docs_lines(p.stdout)

        # REDIS_PORT pointing nowhere, the URL at the server: the URL wins.
        url_env = dict(env, REDIS_PORT=str(free_port()), EMBED_WORKER__REDIS__URL=f"redis://127.0.0.1:{port}")
        p, _ = sh(["scripts/demo.sh"], url_env, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        assert_docs_lines(p.stdout)
        p, _ = sh(["scripts/redis.sh", "start"], url_env)
        assert p.returncode == 0 and "(EMBED_WORKER__REDIS__URL)" in p.stdout, p.stdout + p.stderr
    finally:
        p, _ = sh(["scripts/redis.sh", "stop"], env)
        assert f"redis: stopped (port {port})" in p.stdout, p.stdout + p.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_make_run_and_demo_dial_redis_port():
    """The Makefile passes REDIS_PORT to the worker of `make run` and `make demo` (dry run: the
    recipes as make would execute them), and never exports a Redis URL to `make test`."""
    port = free_port()
    p = subprocess.run(["make", "-n", "--no-print-directory", "run", "demo", "test", f"REDIS_PORT={port}"],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    worker = [l for l in lines if "exec target/release/embed-worker run" in l or "scripts/demo.sh" in l]
    assert len(worker) == 2, p.stdout
    for l in worker:
        assert f'EMBED_WORKER__REDIS__URL="${{EMBED_WORKER__REDIS__URL:-redis://127.0.0.1:{port}}}"' in l, l
    tests = [l for l in lines if "cargo test" in l or "pytest" in l or "bench.py" in l]
    assert tests and not any("EMBED_WORKER__REDIS__URL" in l for l in tests), tests
    assert "EMBED_WORKER__REDIS__URL" not in (ROOT / "scripts" / "env.sh").read_text()


def test_a_second_worker_on_the_metrics_port_is_told_what_to_set():
    """Two workers on one host: the second finds http.listen's port taken and exits at once with
    one line naming EMBED_WORKER__HTTP__LISTEN and a port to use, before it touches Redis."""
    if not DEBUG_BIN.is_file():
        pytest.skip(f"{DEBUG_BIN} missing (make test builds it with cargo test)")
    listener = Listener(None)
    try:
        env = clean_env(EMBED_WORKER__HTTP__LISTEN=f"127.0.0.1:{listener.port}",
                        EMBED_WORKER__REDIS__URL=f"redis://127.0.0.1:{free_port()}")
        p, elapsed = sh([str(DEBUG_BIN), "run"], env, timeout=120)
    finally:
        listener.close()
    assert p.returncode == 1, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("embed-worker: error:")]
    assert len(errors) == 1, p.stderr
    assert errors[0] == p.stderr.rstrip("\n").splitlines()[-1], p.stderr
    assert f"http.listen 127.0.0.1:{listener.port}: the port is already in use" in errors[0], errors[0]
    assert f"EMBED_WORKER__HTTP__LISTEN=127.0.0.1:{listener.port + 1}" in errors[0], errors[0]
    assert "redis unavailable" not in p.stderr, "it dialled Redis before binding its port"
