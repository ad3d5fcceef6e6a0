"""`make bench`: throughput, latency and memory of embed-worker against the embedded Redis.

For each model file (fp32 model.onnx, and int8 model_int8.onnx when present) and each corpus of
bench/corpus.py (short: real sentences, mean ~24 tokens; long: real documentation passages of
at most 1,000 characters, mean ~186 tokens; uniform and long-uniform: templated sentences of
19-29 tokens and paragraphs of 183-209, where there is almost no padding to save), in one run:

* ceiling: `embed-worker bench-model` (length-sorted batches as the worker cuts them, no Redis,
  model load and a warm-up batch excluded);
* worker: N entries loaded into a fresh stream, then `embed-worker run --drain` with the index in
  place. docs/s = N / (first entry read .. last entry acked), seen by polling XINFO GROUPS every
  25 ms, so process start-up (model load) and the drain's exit check are not counted. Peak RSS of
  the whole process from wait4();
* python: bench/baseline_worker.py (XREADGROUP 32, pad-to-longest, pipelined HSET + XACK), same
  model file, same thread count, timed the same way;
* latency: a fresh worker, ready (its group exists), fed by a producer XADDing at a steady 50% of
  the worker's measured rate. Latency = time the hash is written - time just before its XADD,
  both taken in this process on one clock: the write time is when Redis's keyspace notification
  for that key's HSET (`notify-keyspace-events Kh`) arrives on a subscriber thread, which Redis
  sends as it executes the command, so it is accurate to well under a millisecond.

    .venv/bin/python bench/bench.py              # full run (a few minutes), table + bench/out/bench.json
    .venv/bin/python bench/bench.py --smoke      # seconds; what CI runs
    .venv/bin/python bench/bench.py --soak 600   # fp32 worker under a steady backlog, RSS sampled
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import corpus  # noqa: E402

# EMBED_WORKER_BIN lets CI smoke-test with the debug binary `cargo test` already built.
BIN = Path(os.environ.get("EMBED_WORKER_BIN", ROOT / "target/release/embed-worker"))
OUT = ROOT / "bench/out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A throw-away redis-server with the search module, no persistence, on a free port."""

    def __init__(self) -> None:
        server = os.environ["EMBED_WORKER_REDIS_SERVER"]
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="embed-bench-")
        args = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--notify-keyspace-events", "Kh"]
        for m in os.environ["EMBED_WORKER_REDIS_MODULES"].split(":"):
            args += ["--loadmodule", m]
            if m.endswith("/redisearch.so") and os.environ.get("BENCH_PARTIAL_INDEXED_DOCS", "1") == "1":
                # As scripts/redis.sh runs it: writes outside the schema do not re-index.
                # BENCH_PARTIAL_INDEXED_DOCS=0 measures the module's default instead.
                args += ["PARTIAL_INDEXED_DOCS", "1"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}"
        self.client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class Case:
    """One stream/group/index name set, so runs never see each other's data."""

    n = 0

    def __init__(self, label: str) -> None:
        Case.n += 1
        tag = f"{label}{Case.n}"
        self.stream, self.group, self.index, self.prefix = f"bench:{tag}", "bench", f"idx_{tag}", f"{tag}:"


def worker_env(rd: Redis, case: Case, model_file: str, threads: int) -> dict:
    env = dict(os.environ)
    env.update({
        "EMBED_WORKER__REDIS__URL": rd.url, "EMBED_WORKER__STREAM__NAME": case.stream,
        "EMBED_WORKER__STREAM__GROUP": case.group, "EMBED_WORKER__STREAM__CONSUMER": "bench",
        "EMBED_WORKER__INDEX__NAME": case.index, "EMBED_WORKER__INDEX__PREFIX": case.prefix,
        "EMBED_WORKER__MODEL__FILE": model_file, "EMBED_WORKER__MODEL__INTRA_THREADS": str(threads),
        "EMBED_WORKER__HTTP__LISTEN": "", "EMBED_WORKER__LOG__LEVEL": "warn,embed_worker::pipeline::worker=info",
        "EMBED_WORKER__LOG__FORMAT": "json",
    })
    return env


def load(rd: Redis, case: Case, texts: list[str], group: bool = True) -> None:
    r = rd.client
    if group:
        r.xgroup_create(case.stream, case.group, id="0", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i, t in enumerate(texts):
        pipe.xadd(case.stream, {"id": str(i), "content": t})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def create_index(rd: Redis, case: Case) -> None:
    """The schema the worker creates (config/default.toml), for the Python baseline."""
    rd.client.execute_command(
        "FT.CREATE", case.index, "ON", "HASH", "PREFIX", 1, case.prefix, "SCHEMA", "content", "TEXT",
        "genre", "TAG", "embedding", "VECTOR", "HNSW", 10, "TYPE", "FLOAT32", "DIM", 384,
        "DISTANCE_METRIC", "L2", "M", 16, "EF_CONSTRUCTION", 200)


def group_state(r: redis.Redis, case: Case) -> tuple[int, int, int] | None:
    """(entries read, pending, lag) of the bench group, or None before it exists."""
    try:
        for g in r.xinfo_groups(case.stream):
            if g["name"] in (case.group, case.group.encode()):
                return g["entries-read"] or 0, g["pending"], g["lag"] or 0
    except redis.ResponseError:
        pass
    return None


def exit_summary(log: str) -> dict:
    """The fields of embed-worker's JSON "worker stopped" line (model busy seconds, padded
    tokens, ...), or {} for a process that logs no such line (the Python baseline)."""
    for line in reversed(log.splitlines()):
        try:
            rec = json.loads(line)  # the worker logs flattened JSON events (log.format = "json")
        except ValueError:
            continue
        if rec.get("message") == "worker stopped":
            return {k: v for k, v in rec.items() if k not in ("message", "timestamp", "level", "target")}
    return {}


def vm_hwm_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return None


def own_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def timed_drain(rd: Redis, case: Case, n: int, cmd: list[str], env: dict) -> dict:
    """Runs `cmd` until it exits; docs/s over first-read..last-ack (XINFO GROUPS every 25 ms),
    peak RSS, and the worker's own exit summary. A process that exits before draining, or
    non-zero, raises with its exit status and its log's tail.

    Peak RSS is the worker's VmHWM, read every 25 ms while it runs (the last read at most 25 ms
    before it exits). Not wait4()'s ru_maxrss: Linux carries the RSS of the process that spawned
    it into that figure (the exec inherits the spawning memory map's high-water mark), so it
    reads at least this Python process's own RSS at spawn time, which here holds the texts and
    a model; both are kept in the result."""
    poller = redis.Redis(port=rd.port)
    log = tempfile.TemporaryFile("w+")
    parent_rss = own_rss_mb()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    first = last = None
    hwm = 0.0
    while True:
        s = group_state(poller, case)
        now = time.perf_counter()
        if s and first is None and s[0] > 0:
            first = now
        if s and last is None and s[0] >= n and s[1] == 0 and s[2] == 0:
            last = now
        hwm = max(hwm, vm_hwm_mb(proc.pid) or 0.0)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.025)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    log.seek(0)
    err = log.read()
    log.close()
    if last is None or first is None or proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with status {proc.returncode} "
                           f"{'after' if last else 'before'} draining the stream: {err[-2000:]}")
    return {"docs_per_s": n / max(last - first, 1e-9), "seconds": last - first, "peak_rss_mb": hwm,
            "ru_maxrss_mb": usage.ru_maxrss / 1024, "spawner_rss_mb": parent_rss, "exit": exit_summary(err)}


def ceiling(texts: list[str], env: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts) + "\n")
    try:
        out = subprocess.run([str(BIN), "bench-model", "--file", f.name], env=env, check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])


def latency(rd: Redis, texts: list[str], model_file: str, threads: int, rate: float, seconds: float) -> dict:
    """p50/p99 of XADD -> hash written at a steady `rate` docs/s (see the module doc)."""
    case = Case("lat")
    env = worker_env(rd, case, model_file, threads)
    proc = subprocess.Popen([str(BIN), "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written: dict[str, float] = {}
    ps = redis.Redis(port=rd.port).pubsub()
    ps.psubscribe(f"__keyspace@0__:{case.prefix}*")

    def listen() -> None:
        for msg in ps.listen():
            if msg["type"] == "pmessage" and msg["data"] == b"hset":
                key = msg["channel"].decode()[len("__keyspace@0__:"):]
                # A long document's chunks (<key>#<n>) are written together, in one call.
                written.setdefault(re.sub(r"#\d+$", "", key), time.perf_counter())

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        deadline = time.time() + 120
        while group_state(rd.client, case) is None or not index_exists(rd.client, case):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.5)  # the reader's first blocking read is in place
        sent: dict[str, float] = {}
        n = max(int(rate * seconds), 20)
        start = time.perf_counter()
        for i in range(n):
            target = start + i / rate
            while (now := time.perf_counter()) < target:
                time.sleep(min(target - now, 0.002))
            key = f"{case.prefix}{i}"
            sent[key] = time.perf_counter()
            rd.client.xadd(case.stream, {"id": str(i), "content": texts[i % len(texts)]})
        wait_until = time.time() + 60
        while len(written) < n and time.time() < wait_until:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        ps.punsubscribe()
    lat = sorted((written[k] - sent[k]) * 1000 for k in sent if k in written)
    if len(lat) < n:
        raise RuntimeError(f"latency run: only {len(lat)} of {n} documents were written")
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    # Every document's latency too (sorted), for bench/plots.py's CDF.
    return {"offered_docs_per_s": rate, "docs": n, "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": lat[-1],
            "latencies_ms": [round(x, 3) for x in lat]}


def index_exists(r: redis.Redis, case: Case) -> bool:
    try:
        r.execute_command("FT.INFO", case.index)
        return True
    except redis.ResponseError:
        return False


def median_run(runs: list[dict]) -> dict:
    """The run with the median docs/s (the lower middle one for an even count), with the peak
    RSS of all runs and every run's docs/s beside it."""
    ordered = sorted(runs, key=lambda r: r["docs_per_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    if "peak_rss_mb" in pick:
        pick["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    pick["runs_docs_per_s"] = [round(r["docs_per_s"], 1) for r in runs]
    return pick


def run_case(rd: Redis, kind: str, texts: list[str], tokens: int, model_file: str, threads: int,
             lat_seconds: float, rounds: int) -> dict:
    """Ceiling, worker and Python baseline, `rounds` times interleaved (so a noisy minute on the
    shared machine hits all three alike); each reported figure is the median round."""
    model_dir = Path(os.environ["EMBED_WORKER_MODEL_DIR"])
    res: dict = {"corpus": kind, "model": model_file, "docs": len(texts), "tokens": tokens, "threads": threads,
                 "rounds": rounds}
    runs: dict[str, list[dict]] = {"ceiling": [], "worker": [], "python": []}
    for _ in range(rounds):
        runs["ceiling"].append(ceiling(texts, worker_env(rd, Case("ceil"), model_file, threads)))

        case = Case("w")
        load(rd, case, texts)
        runs["worker"].append(timed_drain(rd, case, len(texts), [str(BIN), "run", "--drain"],
                                          worker_env(rd, case, model_file, threads)))

        case = Case("py")
        create_index(rd, case)
        load(rd, case, texts)
        runs["python"].append(timed_drain(rd, case, len(texts), [
            sys.executable, str(ROOT / "bench/baseline_worker.py"), "--redis-url", rd.url, "--stream", case.stream,
            "--group", case.group, "--prefix", case.prefix, "--model", str(model_dir / model_file),
            "--tokenizer", str(model_dir / "tokenizer.json"), "--threads", str(threads)], dict(os.environ)))
        rd.client.flushall()  # each round indexes into an empty Redis, as the first did
    for k, v in runs.items():
        res[k] = median_run(v)
    # Ratios round by round: the three runs of one round sit side by side in time, so a noisy
    # minute on the shared machine moves both sides of a ratio; the median round is reported.
    per_round = lambda a, b: sorted(x["docs_per_s"] / y["docs_per_s"] for x, y in zip(runs[a], runs[b]))  # noqa: E731
    res["ratios"] = {"worker_vs_ceiling": per_round("worker", "ceiling"), "worker_vs_python": per_round("worker", "python")}
    res["ratio"] = {k: statistics.median(v) for k, v in res["ratios"].items()}
    for k in ("worker", "python"):
        res[k]["tokens_per_s"] = res[k]["docs_per_s"] * tokens / len(texts)
    if lat_seconds > 0:
        res["latency"] = latency(rd, texts, model_file, threads, 0.5 * res["worker"]["docs_per_s"], lat_seconds)
    return res


def soak(rd: Redis, seconds: float, threads: int) -> dict:
    """fp32 worker under a steady backlog of mixed short/long texts; RSS sampled every second."""
    case = Case("soak")
    texts = corpus.texts("short", 2000, seed=7) + corpus.texts("long", 200, seed=7)
    proc = subprocess.Popen([str(BIN), "run"], env=worker_env(rd, case, "model.onnx", threads),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, i, start = [], 0, time.time()
    try:
        while time.time() - start < seconds:
            s = group_state(rd.client, case)
            backlog = s[2] if s else 0
            if backlog < 500:  # keep it busy; ids cycle so the hash count stays bounded
                pipe = rd.client.pipeline(transaction=False)
                for _ in range(500):
                    pipe.xadd(case.stream, {"id": str(i % 5000), "content": texts[i % len(texts)]}, maxlen=20000)
                    i += 1
                pipe.execute()
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
            samples.append((round(time.time() - start, 1), round(rss, 1)))
            time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    s = group_state(rd.client, case) or (0, 0, 0)
    steady = [r for t, r in samples if t >= min(30, seconds / 4)]
    half = len(steady) // 2
    return {"seconds": seconds, "docs": s[0], "rss_first_mb": samples[0][1], "rss_max_mb": max(r for _, r in samples),
            "rss_steady_first_half_max_mb": max(steady[:half] or [0]), "rss_steady_second_half_max_mb": max(steady[half:] or [0]),
            "rss_end_mb": samples[-1][1], "samples": samples}


def table(results: list[dict]) -> str:
    """One row per case: docs/s are the median rounds; w/ceil and w/py are the median of the
    per-round ratios. pad = padded tokens the worker fed the model / real tokens; busy = the
    worker's model-busy seconds / its wall seconds (both from its exit log)."""
    rows = [("model", "corpus", "ceiling/s", "worker/s", "tok/s", "w/ceil", "python/s", "w/py", "pad", "busy",
             "p50ms", "p99ms", "RSS MB", "py RSS")]
    for r in results:
        lat = r.get("latency", {})
        ex = r["worker"].get("exit", {})
        pad = int(ex.get("padded_tokens", 0)) / r["tokens"] if ex else float("nan")
        busy = float(ex.get("model_busy_s", "nan")) / float(ex.get("wall_s", "nan")) if ex else float("nan")
        rows.append((r["model"], r["corpus"], f"{r['ceiling']['docs_per_s']:.0f}", f"{r['worker']['docs_per_s']:.0f}",
                     f"{r['worker']['tokens_per_s']:.0f}", f"{r['ratio']['worker_vs_ceiling']:.2f}",
                     f"{r['python']['docs_per_s']:.0f}", f"{r['ratio']['worker_vs_python']:.2f}",
                     f"{pad:.2f}", f"{busy:.2f}",
                     f"{lat.get('p50_ms', float('nan')):.0f}", f"{lat.get('p99_ms', float('nan')):.0f}",
                     f"{r['worker']['peak_rss_mb']:.0f}", f"{r['python']['peak_rss_mb']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def targets(results: list[dict]) -> list[str]:
    get = {(r["model"], r["corpus"]): r for r in results}
    lines = []

    def check(name: str, value: float, goal: float) -> None:
        lines.append(f"{'met ' if value >= goal else 'MISS'}  {name}: {value:.3f} (target >= {goal})")

    fp = "model.onnx"
    if (fp, "short") in get:
        r = get[(fp, "short")]
        check("fp32 short worker / ceiling", r["ratio"]["worker_vs_ceiling"], 0.9)
        check("fp32 short worker / python", r["ratio"]["worker_vs_python"], 1.5)
    if (fp, "long") in get:
        r = get[(fp, "long")]
        check("fp32 long worker / python", r["ratio"]["worker_vs_python"], 1.2)
    if ("model_int8.onnx", "short") in get and (fp, "short") in get:
        # Two cases, run minutes apart: medians of each, so this one is noisier than the others.
        check("int8 short worker / python fp32", get[("model_int8.onnx", "short")]["worker"]["docs_per_s"]
              / get[(fp, "short")]["python"]["docs_per_s"], 3.0)
    for corpus_kind in ("uniform", "long-uniform"):
        if (fp, corpus_kind) in get:
            r = get[(fp, corpus_kind)]
            lines.append(f"info  fp32 {corpus_kind} worker / python: {r['ratio']['worker_vs_python']:.3f}"
                         " (no target: near-equal lengths leave no padding to save)")
    for r in results:
        if r["model"] == fp:
            ok = r["worker"]["peak_rss_mb"] < 400
            lines.append(f"{'met ' if ok else 'MISS'}  fp32 {r['corpus']} peak RSS: {r['worker']['peak_rss_mb']:.0f} MB (target < 400)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few hundred documents, seconds (CI)")
    p.add_argument("--short", type=int, default=2000, help="short sentences per run")
    p.add_argument("--long", type=int, default=300, help="long paragraphs per run")
    p.add_argument("--uniform", type=int, default=1500,
                   help="templated sentences of near-equal length per run (0 to skip); reported, no target")
    p.add_argument("--long-uniform", type=int, default=300,
                   help="templated paragraphs of near-equal length per run (0 to skip); reported, no target")
    p.add_argument("--latency-seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions per case; medians are reported")
    p.add_argument("--models", nargs="*", default=["model.onnx", "model_int8.onnx"])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="only the memory soak, this long")
    a = p.parse_args()
    if a.smoke:
        a.short, a.long, a.uniform, a.long_uniform, a.latency_seconds, a.rounds = 200, 24, 0, 0, 2, 1
    if not BIN.is_file():
        sys.exit(f"{BIN} missing: run `make build`")
    model_dir = Path(os.environ["EMBED_WORKER_MODEL_DIR"])
    OUT.mkdir(parents=True, exist_ok=True)
    rd = Redis()
    try:
        if a.soak:
            res = soak(rd, a.soak, a.threads)
            (OUT / "soak.json").write_text(json.dumps(res, indent=1))
            print({k: v for k, v in res.items() if k != "samples"})
            return 0
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(256)
        results = []
        for model_file in a.models:
            if not (model_dir / model_file).is_file():
                print(f"skipping {model_file}: not built (make model-int8)")
                continue
            for kind, n in (("short", a.short), ("uniform", a.uniform), ("long", a.long),
                            ("long-uniform", a.long_uniform)):
                if n == 0:
                    continue
                texts = corpus.texts(kind, n, seed=11)
                tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
                print(f"{model_file} {kind}: {n} docs, {tokens / n:.0f} tokens each ...", flush=True)
                results.append(run_case(rd, kind, texts, tokens, model_file, a.threads,
                                        a.latency_seconds if kind == "short" or not a.smoke else 0, a.rounds))
    finally:
        rd.close()
    print()
    print(table(results))
    print()
    print("\n".join(targets(results)))
    (OUT / ("smoke.json" if a.smoke else "bench.json")).write_text(json.dumps(
        {"threads": a.threads, "cpus": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
