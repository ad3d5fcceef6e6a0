"""What the versioned write costs: the worker's FCALL ew_upsert (check the writer's model against
the index's model record, check the stored version, DEL, HSET, drop the tombstone, atomically)
against the plain pipelined HSET it replaced, side by side
in one Redis, rounds interleaved, medians reported.

Redis side (`redis_cost`): N documents of random 384-dim unit vectors, written in pipelines of 32
(what the worker sends per batch) as
  hset-new / hset-replace    plain HSET of content + vector (the old write), of documents not
                             there yet (first indexing), then of new vectors for them (updates),
  fcall-new / fcall-replace  the same through FCALL ew_upsert, as newer versions (library v4:
                             the case's model record is created first with ew_adopt, as the
                             worker does at start-up, so the writes are accepted),
each with the HNSW index in place and with none (no index isolates the function's own cost).
Redis CPU per document = the delta of INFO's used_cpu_user + used_cpu_sys from an idle Redis to
an idle Redis again (the Query Engine can index on background threads after a command returns),
divided by N; docs/s = N / the time to the last reply.

Worker side (`worker_cost`, with --compare-bin): the same corpus drained by the old binary (plain
HSET) and the current one, interleaved, docs/s and Redis CPU per document of each round.

    .venv/bin/python bench/write_cost.py                                   # Redis side only
    .venv/bin/python bench/write_cost.py --compare-bin /tmp/embed-worker-hset
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import corpus  # noqa: E402

LIBRARY = (ROOT / "src" / "store" / "documents.lua").read_text()
BATCH = 32
# The writer's model fingerprint (16 hex digits, as the worker's); any value works once the
# case's model record names it.
FINGERPRINT = "00000000be0c4c05"


def record_key(index: str) -> str:
    """The index's model record (src/store/generation.rs)."""
    return f"embed:index:{{{index}}}"


def adopt(r, index: str) -> None:
    """Records FINGERPRINT as the index's model, as the first worker of an index does; without it
    ew_upsert refuses every write ("model none")."""
    r.fcall("ew_adopt_v5", 1, record_key(index), FINGERPRINT, "bench", index, "embedding")


def redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def settled_cpu(r, quiet: float = 0.3) -> float:
    """Redis's CPU seconds once it has stopped working: the Query Engine may index vectors on
    background threads after the command returned, and that work belongs to the write too."""
    last = redis_cpu(r)
    while True:
        time.sleep(quiet)
        now = redis_cpu(r)
        if now - last < 0.002:
            return now
        last = now


def write_docs(r, method: str, case: bench.Case, vectors: np.ndarray, entry_ms: int) -> tuple[float, float]:
    """Writes every vector under the case's prefix with `method`; (seconds until the last reply,
    Redis CPU seconds until Redis is idle again)."""
    prefix, record = case.prefix, record_key(case.index)
    cpu0, t0 = settled_cpu(r), time.perf_counter()
    replies = []
    for s in range(0, len(vectors), BATCH):
        pipe = r.pipeline(transaction=False)
        for i in range(s, min(s + BATCH, len(vectors))):
            key = f"{prefix}{i}"
            blob = vectors[i].tobytes()
            if method == "hset":
                pipe.hset(key, mapping={"content": f"document {i}", "embedding": blob})
            else:
                # Library v4 (src/store/documents.lua). KEYS: the document, its tombstone, the
                # model record, its chunk 0. ARGV: version, entry ID, the writer's fingerprint,
                # the text's digest, 1 chunk, 0 shared pairs, then the chunk's 2 field pairs.
                pipe.fcall("ew_upsert_v5", 4, key, f"embed:tomb:{{{key}}}", record, f"{key}#0",
                           "0", f"{entry_ms}-{i}", FINGERPRINT, f"digest {entry_ms}-{i}", "1", "0", "2",
                           "content", f"document {i}", "embedding", blob)
        replies += pipe.execute()
    seconds = time.perf_counter() - t0
    if method != "hset":
        # A refused or stale write costs far less than a real one: a silent refusal would make
        # the function look cheap.
        wrong = [x for x in replies if x not in ("written", b"written")]
        if wrong:
            raise SystemExit(f"ew_upsert did not write {len(wrong)} of {len(replies)} documents, e.g. {wrong[0]!r}")
    return seconds, settled_cpu(r) - cpu0


def redis_cost(rd: bench.Redis, n: int, rounds: int) -> list[dict]:
    r = rd.client
    r.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((n, 384)).astype("<f4")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for indexed in (False, True):
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in ("hset-new", "fcall-new", "hset-replace", "fcall-replace")}
        for rnd in range(rounds):
            for method in ("hset", "fcall"):
                case = bench.Case("wc")
                if indexed:
                    bench.create_index(rd, case)
                if method == "fcall":
                    adopt(r, case.index)
                runs[f"{method}-new"].append(write_docs(r, method, case, vectors, 1000 + rnd))
                # The same documents again with other vectors, as newer versions: the update path.
                runs[f"{method}-replace"].append(write_docs(r, method, case, vectors[::-1].copy(), 2000 + rnd))
            r.flushall()
            r.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY)
        for method, v in runs.items():
            rows.append({"index": indexed, "method": method, "docs": n, "rounds": rounds,
                         "docs_per_s": statistics.median(n / s for s, _ in v),
                         "redis_cpu_us_per_doc": statistics.median(c / n * 1e6 for _, c in v)})
    return rows


def worker_cost(rd: bench.Redis, old_bin: Path, n: int, rounds: int, threads: int) -> dict:
    texts = corpus.texts("short", n, seed=11)
    runs: dict[str, list[dict]] = {"hset (old)": [], "fcall": []}
    for _ in range(rounds):
        for label, binary in (("hset (old)", old_bin), ("fcall", bench.BIN)):
            case = bench.Case("wk")
            bench.load(rd, case, texts)
            cpu0 = settled_cpu(rd.client)
            res = bench.timed_drain(rd, case, n, [str(binary), "run", "--drain"],
                                    bench.worker_env(rd, case, "model.onnx", threads))
            res["redis_cpu_us_per_doc"] = (settled_cpu(rd.client) - cpu0) / n * 1e6
            runs[label].append(res)
            rd.client.flushall()
    ratios = sorted(b["docs_per_s"] / a["docs_per_s"] for a, b in zip(runs["hset (old)"], runs["fcall"]))
    return {"docs": n, "rounds": rounds,
            "docs_per_s": {k: statistics.median(x["docs_per_s"] for x in v) for k, v in runs.items()},
            "redis_cpu_us_per_doc": {k: statistics.median(x["redis_cpu_us_per_doc"] for x in v) for k, v in runs.items()},
            "fcall_vs_hset_per_round": ratios, "fcall_vs_hset": statistics.median(ratios)}


def table(rows: list[dict]) -> str:
    out = [f"{'index':>6}  {'method':>13}  {'docs/s':>8}  {'Redis CPU us/doc':>16}"]
    for r in rows:
        out.append(f"{'HNSW' if r['index'] else 'none':>6}  {r['method']:>13}  {r['docs_per_s']:8.0f}  "
                   f"{r['redis_cpu_us_per_doc']:16.1f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compare-bin", type=Path, help="an embed-worker built before versioned writes (plain HSET)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    rd = bench.Redis()
    try:
        print(table(redis_cost(rd, a.docs, a.rounds)))
        if a.compare_bin:
            w = worker_cost(rd, a.compare_bin, a.docs, a.rounds, a.threads)
            print(f"\nworker, {w['docs']} real short sentences, fp32, {w['rounds']} interleaved rounds:")
            for k in w["docs_per_s"]:
                print(f"  {k:>10}: {w['docs_per_s'][k]:6.0f} docs/s, Redis CPU {w['redis_cpu_us_per_doc'][k]:.0f} us/doc")
            print(f"  fcall / hset per round: {[round(x, 3) for x in w['fcall_vs_hset_per_round']]}, "
                  f"median {w['fcall_vs_hset']:.3f}")
    finally:
        rd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
