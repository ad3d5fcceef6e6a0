"""The worker's docs/s on one Redis node against a 3-primary Redis Cluster, with the same
workers, with `stream.shards` 1 and 3, and what `redis.wait_replicas = 1` costs, side by side
in one run, rounds interleaved, medians reported.

Servers (all started here, all kept up for the whole run, so every round sees every set-up):
* `single`: one redis-server as bench.py starts it (search + JSON modules, PARTIAL_INDEXED_DOCS 1,
  no persistence);
* `cluster`: 3 primaries, no replicas;
* `replicated`: 3 primaries, each with a replica.
Cluster nodes are the same redis-server with the same modules and `--cluster-enabled yes`, formed
as tests/it/cluster_support.rs forms one (there is no redis-cli here): CLUSTER MYID and
SET-CONFIG-EPOCH, MEET to the first node, ADDSLOTSRANGE in redis-cli's even ranges, REPLICATE
once gossip has told the replica about its primary, then wait until every node reports
cluster_state:ok, all see the same nodes, none is flagged and every replica's link is up. No
persistence on them either (AOF off, no RDB saves), as for the single node.

Set-ups (`--setups`, default all; round r runs them in this order rotated by r, so each set-up
takes every position in turn and none is always the one after a replicated run's FLUSHALL):
  single-s1       one node, stream.shards 1
  single-s3       one node, stream.shards 3 (what shards cost without a cluster)
  cluster-s1      3 primaries, shards 1: the one stream lives on one primary
  cluster-s3      3 primaries, shards 3: a shard per primary
  repl-s3-wait0   3 primaries + 3 replicas, shards 3, redis.wait_replicas 0
  repl-s3-wait1   the same cluster, redis.wait_replicas 1: WAIT 1 on each primary written, then XACK

Each run: --docs real short sentences (bench/corpus.py `short`, CPython's documentation) XADDed to
the shard of their id (zlib.crc32(id) % shards, docs/OPERATIONS.md "Sharded streams") under a
fresh stream, group and index name, then --workers `embed-worker run --drain` processes started
together, each with --threads ORT threads. Shard groups are polled every 25 ms (XINFO GROUPS on
every shard: entries read, pending, lag); acked = read - pending.
* docs/s = documents / (first entry read .. every entry acked: entries read covers every document,
  pending 0 and lag 0 on every shard), so model loading is not counted;
* steady docs/s = 80% of the documents / (10% acked .. 90% acked): the rate with both workers
  busy, without the start (one worker's model still loading) and the end (the last reads in one
  worker's hands);
* then the run waits until the index counts match: FT.INFO num_docs summed over each primary's
  own index names from FT._LIST on that primary equals the hashes under the run's prefix on the
  primaries (a sentence over chunk.size tokens is stored as chunks, each its own hash):
  `indexed +s` after the last ack;
* Redis CPU per document: INFO used_cpu_user + used_cpu_sys of every node, idle to idle, less the
  set's idle rate (cluster cron, measured once at start) over that time, over the documents
  (the replicas' share apart);
* write ms/batch: the workers' write stage (FCALLs, then WAIT when set) per batch, from their
  exit log; with the model busy all the time it is latency, not throughput;
* Redis memory per document: used_memory (MEMORY PURGE first) summed over the primaries, and
  over the replicas, once the documents are indexed and the shard streams deleted, less before
  the run, over the documents.
Every worker reads `stream.read_count` = --read-count (128) entries at most, instead of 1024: a
worker holds about two reads, so with the default two workers would split 4,000 documents into
~2,048 and ~1,952 in a few reads, and the drain's end would be one worker finishing alone; reads
of 128 share the backlog finely (slightly more padding per batch, the same for every set-up).
Between runs every primary is FLUSHALLed (which drops its indexes), so every run starts on empty
indexes.

All the nodes and the workers share this machine's cores: the replicas' own HNSW inserts (a replica
re-indexes what it applies) take CPU from the same cores the workers embed on, which a real
deployment does not; the CPU columns show that share.

    source scripts/env.sh
    .venv/bin/python bench/cluster.py                      # 5 rounds x 6 set-ups, bench/out/cluster.json
    .venv/bin/python bench/cluster.py --smoke              # one round of 300 documents
    .venv/bin/python bench/cluster.py --setups single-s1 repl-s3-wait0 repl-s3-wait1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import redis
import redis.cluster

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402  (BIN, OUT, exit_summary, vm_hwm_mb)
import corpus  # noqa: E402
import hnsw  # noqa: E402  (cpu)
import write_cost  # noqa: E402  (settled_cpu)

SLOTS = 16384
BUS_OFFSET = 10000  # a node's cluster bus port is its port + 10000, so ports stay below 55535
# Formation on a loaded 2-core machine takes seconds; a minute means something is wrong.
SETTLE_S = 60
# How long a node may go unanswered before its peers flag it: longer than the tests' 1 s, as
# a loaded machine's 2 cores embedding and indexing can stall a node for a second, and a
# failover in the middle of a timed run would measure the failover.
NODE_TIMEOUT_MS = 5000


def cluster_port() -> int:
    """A free port below 55535 whose cluster bus port (+10000) is free too."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port >= 65535 - BUS_OFFSET:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + BUS_OFFSET))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port below 55535 with a free port 10000 above it")


def module_args() -> list[str]:
    """bench.Redis's modules, with PARTIAL_INDEXED_DOCS 1 as scripts/redis.sh runs it."""
    args = []
    for m in os.environ["EMBED_WORKER_REDIS_MODULES"].split(":"):
        args += ["--loadmodule", m]
        if m.endswith("/redisearch.so"):
            args += ["PARTIAL_INDEXED_DOCS", "1"]
    return args


class Node:
    """One cluster-enabled redis-server in a temp dir of its own."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="embed-cluster-")
        self.port = cluster_port()
        args = [os.environ["EMBED_WORKER_REDIS_SERVER"], "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--logfile", str(Path(self.dir) / "redis.log"),
                "--cluster-enabled", "yes", "--cluster-config-file", str(Path(self.dir) / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-replica-validity-factor", "0",
                "--appendonly", "no", "--save", ""] + module_args()
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)
        self.id = ""

    def wait_up(self) -> None:
        deadline = time.perf_counter() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node on {self.port} exited: {self.log_tail()}")
            try:
                if int(self.client.info("server")["process_id"]) == self.proc.pid:
                    return
            except redis.RedisError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"node on {self.port} did not answer: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return "\n".join((Path(self.dir) / "redis.log").read_text().splitlines()[-10:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def even_slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """redis-cli --cluster create's ranges (3: 0-5460, 5461-10922, 10923-16383)."""
    per = SLOTS / primaries
    out, first = [], 0
    for i in range(primaries):
        last = SLOTS - 1 if i == primaries - 1 else min(SLOTS - 1, round(i * per + per - 1))
        out.append((first, max(first, last)))
        first = max(first, last) + 1
    return out


class Cluster:
    """`primaries` primaries, each with `replicas` replicas, formed and settled."""

    def __init__(self, primaries: int, replicas: int) -> None:
        self.nodes = [Node() for _ in range(primaries * (1 + replicas))]
        try:
            self._form(primaries)
        except BaseException:
            self.close()
            raise
        self.primaries = self.nodes[:primaries]
        self.replicas = self.nodes[primaries:]
        self.url = f"redis://127.0.0.1:{self.primaries[0].port}"
        self.client = redis.cluster.RedisCluster(host="127.0.0.1", port=self.primaries[0].port)

    def _form(self, primaries: int) -> None:
        for n in self.nodes:
            n.wait_up()
        for epoch, n in enumerate(self.nodes, 1):
            n.id = n.client.execute_command("CLUSTER", "MYID").decode()
            # Distinct epochs from the start, as redis-cli gives them: no collisions to resolve.
            n.client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for n in self.nodes[1:]:
            n.client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
        for n, (a, b) in zip(self.nodes, even_slot_ranges(primaries)):
            n.client.execute_command("CLUSTER", "ADDSLOTSRANGE", a, b)
        for k, replica in enumerate(self.nodes[primaries:]):
            primary = self.nodes[k % primaries]
            # Refused ("Unknown node") until gossip has told the replica about its primary.
            self._until(f"{replica.port} to replicate {primary.port}",
                        lambda: replica.client.execute_command("CLUSTER", "REPLICATE", primary.id) and None)
        self._until("the cluster to settle", self._settled)

    def _settled(self) -> None:
        """Raises unless every node reports cluster_state:ok, sees every node, flags none, all
        agree on the slot map, and every replica's link to its primary is up."""
        views = []
        for n in self.nodes:
            info = n.client.execute_command("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info:
                raise RuntimeError(f"{n.port}: not cluster_state:ok")
            lines = [x.split() for x in n.client.execute_command("CLUSTER", "NODES").decode().splitlines() if x]
            if len(lines) != len(self.nodes):
                raise RuntimeError(f"{n.port} knows {len(lines)} nodes")
            for f in lines:
                flags = set(f[2].split(","))
                if flags & {"fail", "fail?", "handshake", "noaddr"}:
                    raise RuntimeError(f"{n.port} sees {f[1]} as {f[2]}")
            views.append(sorted((f[0], f[3], tuple(s for s in f[8:] if not s.startswith("["))) for f in lines))
            if n.client.info("replication")["role"] == "slave" and \
                    n.client.info("replication")["master_link_status"] != "up":
                raise RuntimeError(f"replica {n.port}: link not up")
        if any(v != views[0] for v in views):
            raise RuntimeError("nodes disagree on the slot map")

    @staticmethod
    def _until(what: str, f) -> None:
        deadline, last = time.perf_counter() + SETTLE_S, None
        while time.perf_counter() < deadline:
            try:
                return f()
            except (redis.RedisError, RuntimeError) as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}: {last}")

    def close(self) -> None:
        for n in self.nodes:
            n.close()


class Single:
    """bench.Redis, with the same interface as Cluster."""

    def __init__(self) -> None:
        self.rd = bench.Redis()
        self.url, self.client = self.rd.url, self.rd.client
        self.primaries, self.replicas = [self], []
        self.port = self.rd.port

    def close(self) -> None:
        self.rd.close()


class Setup(NamedTuple):
    name: str
    servers: str  # "single", "cluster" or "replicated"
    shards: int
    wait_replicas: int


SETUPS = [Setup("single-s1", "single", 1, 0), Setup("single-s3", "single", 3, 0),
          Setup("cluster-s1", "cluster", 1, 0), Setup("cluster-s3", "cluster", 3, 0),
          Setup("repl-s3-wait0", "replicated", 3, 0), Setup("repl-s3-wait1", "replicated", 3, 1)]


def shard_keys(stream: str, shards: int) -> list[str]:
    return [stream] if shards == 1 else [f"{stream}{{{i}-ew}}" for i in range(shards)]


def shard_of(doc_id: str, shards: int) -> int:
    return zlib.crc32(doc_id.encode()) % shards


class Names:
    n = 0

    def __init__(self) -> None:
        Names.n += 1
        tag = f"cl{Names.n}"
        self.stream, self.group, self.index, self.prefix = f"bench:{tag}", "bench", f"idx_{tag}", f"{tag}:"


def load(servers, names: Names, texts: list[str], shards: int) -> list[str]:
    """The group on every shard (from 0, as the worker makes it), then every text XADDed to its
    id's shard; the shard keys."""
    keys = shard_keys(names.stream, shards)
    for k in keys:
        servers.client.xgroup_create(k, names.group, id="0", mkstream=True)
    pipe = servers.client.pipeline(transaction=False)
    for i, t in enumerate(texts):
        pipe.xadd(keys[shard_of(str(i), shards)], {"id": str(i), "content": t})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    return keys


def group_totals(servers, names: Names, keys: list[str]) -> tuple[int, int, int]:
    """(entries read, pending, lag) summed over the shards."""
    read = pending = lag = 0
    for k in keys:
        for g in servers.client.xinfo_groups(k):
            if g["name"] in (names.group, names.group.encode()):
                read += g["entries-read"] or 0
                pending += g["pending"]
                lag += g["lag"] or 0
    return read, pending, lag


def indexed(servers, names: Names) -> int:
    """num_docs summed over each primary's own indexes of this run (FT._LIST on each primary:
    `idx` on the primary serving its slot, `idx{n}` on the others)."""
    total = 0
    for p in servers.primaries:
        for name in p.client.execute_command("FT._LIST"):
            name = name.decode()
            if name == names.index or name.startswith(names.index + "{"):
                info = p.client.execute_command("FT.INFO", name)
                info = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2]))  # RESP3 / RESP2
                total += int(info[b"num_docs"])
    return total


def stored_keys(servers, names: Names) -> int:
    """The hashes under this run's prefix on every primary (a document, or each of a long
    document's chunks): what the indexes must count once they have caught up."""
    return sum(sum(1 for _ in p.client.scan_iter(match=f"{names.prefix}*", count=1000)) for p in servers.primaries)


def all_nodes(servers) -> list:
    return list(servers.primaries) + list(servers.replicas)


def cpu_seconds(servers) -> tuple[float, float, float]:
    """(primaries', replicas') Redis CPU seconds, each node read once idle, and when (the middle
    of the reads)."""
    t = time.perf_counter()
    p = sum(write_cost.settled_cpu(n.client) for n in servers.primaries)
    r = sum(write_cost.settled_cpu(n.client) for n in servers.replicas)
    return p, r, (t + time.perf_counter()) / 2


def idle_rate(servers, seconds: float = 5.0) -> tuple[float, float]:
    """CPU seconds per second the set's (primaries', replicas') nodes burn doing nothing."""
    p0, r0, t0 = cpu_seconds(servers)
    time.sleep(seconds)
    p1, r1, t1 = cpu_seconds(servers)
    return (p1 - p0) / (t1 - t0), (r1 - r0) / (t1 - t0)


def used_memory(nodes) -> int:
    """used_memory summed over `nodes`, MEMORY PURGE first (as bench/storage.py)."""
    total = 0
    for n in nodes:
        n.client.execute_command("MEMORY", "PURGE")
        total += int(n.client.info("memory")["used_memory"])
    return total


def worker_env(servers, names: Names, setup: Setup, consumer: str, a) -> dict:
    env = dict(os.environ)
    env.update({
        "EMBED_WORKER__REDIS__URL": servers.url, "EMBED_WORKER__REDIS__CLUSTER": "auto",
        "EMBED_WORKER__REDIS__WAIT_REPLICAS": str(setup.wait_replicas),
        "EMBED_WORKER__STREAM__NAME": names.stream, "EMBED_WORKER__STREAM__SHARDS": str(setup.shards),
        "EMBED_WORKER__STREAM__GROUP": names.group, "EMBED_WORKER__STREAM__CONSUMER": consumer,
        "EMBED_WORKER__STREAM__READ_COUNT": str(a.read_count),
        "EMBED_WORKER__INDEX__NAME": names.index, "EMBED_WORKER__INDEX__PREFIX": names.prefix,
        "EMBED_WORKER__MODEL__FILE": a.model_file, "EMBED_WORKER__MODEL__INTRA_THREADS": str(a.threads),
        "EMBED_WORKER__HTTP__LISTEN": "", "EMBED_WORKER__LOG__LEVEL": "warn,embed_worker::pipeline::worker=info",
        "EMBED_WORKER__LOG__FORMAT": "json",
    })
    return env


def one_run(servers, setup: Setup, texts: list[str], a) -> dict:
    names = Names()
    n = len(texts)
    mem0 = used_memory(servers.primaries), used_memory(servers.replicas)
    keys = load(servers, names, texts, setup.shards)
    cpu0 = cpu_seconds(servers)
    procs = []
    for w in range(a.workers):
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([str(a.bin), "run", "--drain"], env=worker_env(servers, names, setup, f"w{w}", a),
                                stdout=subprocess.DEVNULL, stderr=log, text=True)
        procs.append((proc, log))
    first = acked = done = None
    expected = 0
    curve: list[tuple[float, int]] = []
    hwm = [0.0] * len(procs)
    deadline = time.perf_counter() + a.timeout
    try:
        while done is None:
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError(f"{setup.name}: not done after {a.timeout} s: "
                                   f"read/pending/lag {group_totals(servers, names, keys)}, indexed {indexed(servers, names)}"
                                   f" of {expected or '?'} keys")
            read, pending, lag = group_totals(servers, names, keys)
            curve.append((now, read - pending))
            if first is None and read > 0:
                first = now
            if acked is None and read >= n and pending == 0 and lag == 0:
                acked = now
                # Every write is done before its entry is acked, so the keys are all there now.
                expected = stored_keys(servers, names)
            if acked is not None and indexed(servers, names) == expected:
                done = time.perf_counter()
            for i, (proc, _) in enumerate(procs):
                hwm[i] = max(hwm[i], bench.vm_hwm_mb(proc.pid) or 0.0)
            exited = [(p, log) for p, log in procs if p.poll() not in (None, 0)]
            if exited:
                p, log = exited[0]
                log.seek(0)
                raise RuntimeError(f"{setup.name}: a worker exited {p.returncode}:\n{log.read()[-3000:]}")
            time.sleep(0.025)
        for proc, _ in procs:
            proc.wait(timeout=a.timeout)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    cpu1 = cpu_seconds(servers)
    for k in keys:
        servers.client.delete(k)  # the entries stay in the stream after XACK; the documents are what is measured
    if servers.replicas:
        for p in servers.primaries:
            p.client.execute_command("WAIT", len(servers.replicas) // len(servers.primaries), 10_000)
    mem = (used_memory(servers.primaries) - mem0[0]) / n, (used_memory(servers.replicas) - mem0[1]) / n
    summaries = []
    for proc, log in procs:
        log.seek(0)
        summaries.append(bench.exit_summary(log.read()))
        if proc.returncode != 0:
            raise RuntimeError(f"{setup.name}: a worker exited {proc.returncode}")
    for p in servers.primaries:
        p.client.flushall()  # drops this run's indexes too; replicas follow
    t10 = next(t for t, x in curve if x >= 0.1 * n)
    t90 = next(t for t, x in curve if x >= 0.9 * n)
    span = cpu1[2] - cpu0[2]
    primary = (cpu1[0] - cpu0[0] - servers.idle[0] * span) / n * 1e6
    replica = (cpu1[1] - cpu0[1] - servers.idle[1] * span) / n * 1e6
    busy = [float(x.get("model_busy_s", 0)) / max(float(x.get("wall_s", 1)), 1e-9) for x in summaries]
    # The write stage's seconds per batch (the worker's exit log): where WAIT shows when the model
    # hides it from docs/s.
    write_ms = sum(float(x.get("write_s", 0)) for x in summaries) / max(1, sum(int(x.get("batches", 0)) for x in summaries)) * 1000
    return {"setup": setup.name, "docs": n, "docs_per_s": n / (acked - first), "drain_s": acked - first,
            "steady_docs_per_s": 0.8 * n / (t90 - t10), "indexed_after_ack_s": done - acked, "keys": expected,
            "redis_cpu_us_per_doc": primary + replica, "primary_cpu_us_per_doc": primary,
            "replica_cpu_us_per_doc": replica, "write_ms_per_batch": write_ms, "primary_bytes_per_doc": mem[0], "replica_bytes_per_doc": mem[1],
            "worker_acked": [x.get("acked") for x in summaries],
            "worker_model_busy": busy, "worker_vm_hwm_mb": hwm, "workers": summaries,
            "loadavg_1m": os.getloadavg()[0]}


def summarise(runs: list[dict], setups: list[Setup]) -> dict:
    """Per set-up: medians over rounds; against the first set-up, the median of the per-round
    ratios (both measured in the same round, minutes apart at most)."""
    base = setups[0].name
    out = {}
    for s in setups:
        mine = [x for x in runs if x["setup"] == s.name]
        row = {k: statistics.median(x[k] for x in mine) for k in
               ("docs_per_s", "steady_docs_per_s", "redis_cpu_us_per_doc", "primary_cpu_us_per_doc",
                "replica_cpu_us_per_doc", "indexed_after_ack_s", "primary_bytes_per_doc", "replica_bytes_per_doc",
                "write_ms_per_batch")}
        row["model_busy"] = statistics.median(b for x in mine for b in x["worker_model_busy"])
        row["rounds_docs_per_s"] = [round(x["docs_per_s"]) for x in mine]
        for key, label in (("docs_per_s", f"vs_{base}"), ("steady_docs_per_s", f"steady_vs_{base}")):
            ratios = [x[key] / b[key] for x in mine for b in runs if b["setup"] == base and b["round"] == x["round"]]
            row[label] = statistics.median(ratios)
            row[f"{label}_rounds"] = [round(r, 3) for r in ratios]
        out[s.name] = row
    # The cost of WAIT, side by side on one cluster: wait1 over wait0 of the same round.
    w0 = {x["round"]: x for x in runs if x["setup"] == "repl-s3-wait0"}
    w1 = [x for x in runs if x["setup"] == "repl-s3-wait1" and x["round"] in w0]
    if w1:
        out["wait1_vs_wait0"] = {}
        for key in ("docs_per_s", "steady_docs_per_s"):
            ratios = [x[key] / w0[x["round"]][key] for x in w1]
            out["wait1_vs_wait0"][key] = {"median": statistics.median(ratios), "rounds": [round(r, 3) for r in ratios]}
    return out


def table(summary: dict, setups: list[Setup]) -> str:
    base = setups[0].name
    rows = [["setup", "docs/s", "rounds", f"vs {base}", "ratio rounds", "steady/s", "steady vs", "ratio rounds",
             "busy", "write ms/batch", "Redis CPU us/doc", "primaries", "replicas", "indexed +s", "B/doc",
             "replicas B/doc"]]
    for s in setups:
        x = summary[s.name]
        rows.append([s.name, f"{x['docs_per_s']:.0f}", "/".join(map(str, x["rounds_docs_per_s"])),
                     f"{x[f'vs_{base}']:.3f}", "/".join(f"{r:.2f}" for r in x[f"vs_{base}_rounds"]),
                     f"{x['steady_docs_per_s']:.0f}", f"{x[f'steady_vs_{base}']:.3f}",
                     "/".join(f"{r:.2f}" for r in x[f"steady_vs_{base}_rounds"]), f"{x['model_busy']:.2f}",
                     f"{x['write_ms_per_batch']:.1f}",
                     f"{x['redis_cpu_us_per_doc']:.0f}", f"{x['primary_cpu_us_per_doc']:.0f}",
                     f"{x['replica_cpu_us_per_doc']:.0f}", f"{x['indexed_after_ack_s']:.2f}",
                     f"{x['primary_bytes_per_doc']:.0f}", f"{x['replica_bytes_per_doc']:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=4000, help="real short sentences per run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="embed-worker processes per run, started together")
    p.add_argument("--threads", type=int, default=1, help="ORT threads per worker")
    p.add_argument("--read-count", type=int, default=128, help="stream.read_count of every worker (see above)")
    p.add_argument("--setups", nargs="*", default=[s.name for s in SETUPS], choices=[s.name for s in SETUPS])
    p.add_argument("--model-file", default="model.onnx")
    p.add_argument("--bin", type=Path, default=bench.BIN)
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--smoke", action="store_true", help="one round of 300 documents")
    p.add_argument("--out", default=str(bench.OUT / "cluster.json"))
    a = p.parse_args()
    if a.smoke:
        a.docs, a.rounds = 300, 1
    if not a.bin.is_file():
        sys.exit(f"{a.bin} missing: run `make build`, or pass --bin / EMBED_WORKER_BIN")
    setups = [s for s in SETUPS if s.name in a.setups]
    texts = corpus.texts("short", a.docs)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: dict = {}
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                    "machine": hnsw.cpu(), "loadavg_start": os.getloadavg(), "bin_sha256": sha256(a.bin)}
    runs: list[dict] = []
    try:
        for kind in dict.fromkeys(s.servers for s in setups):
            t = time.perf_counter()
            servers[kind] = {"single": Single, "cluster": lambda: Cluster(3, 0),
                             "replicated": lambda: Cluster(3, 1)}[kind]()
            servers[kind].idle = idle_rate(servers[kind])
            print(f"{kind}: up in {time.perf_counter() - t:.1f} s, ports {[n.port for n in all_nodes(servers[kind])]}, "
                  f"idle CPU {sum(servers[kind].idle) * 1000:.1f} ms/s", flush=True)
        some = next(iter(servers.values()))
        mods = {m[b"name"].decode(): m[b"ver"] for m in some.primaries[0].client.execute_command("MODULE", "LIST")}
        result["machine"].update(redis=some.primaries[0].client.info("server")["redis_version"],
                                 search_module=mods.get("search"))
        print(f"{result['machine']}; {a.docs} docs, {a.workers} workers x {a.threads} ORT threads, {a.bin}", flush=True)
        for r in range(a.rounds):
            for s in setups[r % len(setups):] + setups[:r % len(setups)]:
                res = dict(one_run(servers[s.servers], s, texts, a), round=r + 1)
                runs.append(res)
                print(f"round {r + 1} {s.name:14} {res['docs_per_s']:6.0f} docs/s (steady {res['steady_docs_per_s']:4.0f}, "
                      f"acked {res['worker_acked']}, busy {'/'.join(f'{b:.2f}' for b in res['worker_model_busy'])}), Redis CPU "
                      f"{res['redis_cpu_us_per_doc']:5.0f} us/doc (replicas {res['replica_cpu_us_per_doc']:4.0f}), "
                      f"indexed +{res['indexed_after_ack_s']:.2f} s, load {res['loadavg_1m']:.1f}", flush=True)
    finally:
        for s in servers.values():
            s.close()
    result["loadavg_end"] = os.getloadavg()
    result["runs"] = runs
    result["summary"] = summarise(runs, setups)
    print(f"\n{a.docs} real short sentences, {a.workers} workers x {a.threads} ORT threads, medians of {a.rounds} rounds:")
    print(table(result["summary"], setups))
    if "wait1_vs_wait0" in result["summary"]:
        w = result["summary"]["wait1_vs_wait0"]
        for key, x in w.items():
            print(f"wait_replicas 1 / 0 ({key}), same cluster, per round: {x['rounds']}, median {x['median']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
