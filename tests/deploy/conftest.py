"""The redis-server fixtures for tests/deploy: started on a free port in a temporary directory."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

import pytest

from deploy_support import (ACL_FILE, RedisServer, free_cluster_port, free_port, redis_modules,
                            redis_server_binary)


@contextlib.contextmanager
def acl_server(tmp, extra_args: list[str], pick_port=free_port):
    """A redis-server with the search module, started with --aclfile on a copy of
    deploy/redis-acl.conf, plus `extra_args`; stopped on exit.

    The file leaves the `default` user as Redis creates it (on, nopass, all), which the tests use
    as the administrator. Skipped only when no redis-server binary exists; a missing search module
    is a failure, since the ACL file names FT.* commands and cannot load without it.
    """
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary (set EMBED_WORKER_REDIS_SERVER or run `make setup`)")
    modules = redis_modules()
    missing = [str(m) for m in modules if not m.is_file()]
    assert not missing, f"Redis modules missing: {missing} (the ACL file needs the search module)"

    acl_copy = tmp / "users.acl"
    shutil.copyfile(ACL_FILE, acl_copy)
    log = tmp / "redis.log"

    last_error = ""
    for _attempt in range(3):  # the free port can be taken between probing and binding
        port = pick_port()
        args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                "--aclfile", str(acl_copy), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(log), *extra_args]
        for m in modules:
            args += ["--loadmodule", str(m)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = RedisServer(port, acl_copy, log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if server.client().ping():
                    break
            except Exception as e:  # noqa: BLE001 - still starting
                last_error = str(e)
                time.sleep(0.05)
        else:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            last_error = log.read_text() if log.exists() else last_error
            if "Address already in use" in last_error:
                continue
            pytest.fail(f"redis-server did not start with {ACL_FILE.name}:\n{last_error[-3000:]}")
        try:
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    pytest.fail(f"redis-server could not bind a free port:\n{last_error[-3000:]}")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> RedisServer:
    """One server, as the base manifests deploy it."""
    with acl_server(tmp_path_factory.mktemp("redis-acl"), []) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster_node(tmp_path_factory) -> RedisServer:
    """A Redis Cluster of one primary that owns every slot: a real cluster node (CLUSTER SLOTS,
    hash slots, CROSSSLOT) with the same ACL file, as each node of deploy/kubernetes/cluster's
    cluster loads it."""
    tmp = tmp_path_factory.mktemp("redis-cluster-acl")
    cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(tmp / "nodes.conf")]
    with acl_server(tmp, cluster, pick_port=free_cluster_port) as node:
        admin = node.client()
        assert admin.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        deadline = time.monotonic() + 15
        while "cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, admin.execute_command("CLUSTER", "INFO")
            time.sleep(0.05)
        yield node
