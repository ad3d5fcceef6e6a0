"""Hash against JSON storage, side by side in one run (`index.storage`), against one throw-away
Redis (PARTIAL_INDEXED_DOCS 1, as scripts/redis.sh runs it), release binary, fp32 model.

For each round and storage (interleaved): 2,000 real sentences (bench/corpus.py short) into a new
stream, index and prefix, drained by `run --drain` (docs/s from first read to last ack); the
same entries again (an unchanged re-feed, docs/s); Redis memory per document (used_memory after
the stream is deleted, over the empty baseline, MEMORY PURGE first); and KNN 10 latency through
FT.SEARCH with 300 query vectors taken from the corpus (the same vectors for both), p50 and p99.
Medians over rounds.

    .venv/bin/python bench/storage.py            # 2 rounds
    .venv/bin/python bench/storage.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import corpus  # noqa: E402
import unchanged  # noqa: E402


def used(rd: bench.Redis) -> int:
    rd.client.execute_command("MEMORY", "PURGE")
    return int(rd.client.info("memory")["used_memory"])


def knn_ms(rd: bench.Redis, index: str, queries: list[bytes]) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        rd.client.execute_command("FT.SEARCH", index, "*=>[KNN 10 @embedding $v AS d]", "PARAMS", 2, "v", q,
                                  "SORTBY", "d", "RETURN", 1, "d", "DIALECT", 2)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def one(rd: bench.Redis, storage: str, texts: list[str], queries: list[bytes] | None) -> dict:
    case = bench.Case(f"st_{storage}")
    rd.client.xgroup_create(case.stream, case.group, id="0", mkstream=True)
    env = dict(bench.worker_env(rd, case, "model.onnx", 0), EMBED_WORKER__INDEX__STORAGE=storage)
    n = len(texts)
    before = used(rd)
    unchanged.feed(rd.client, case, texts, "a")
    first = unchanged.drain(rd, case, 0, n, env)
    unchanged.feed(rd.client, case, texts, "a")
    replay = unchanged.drain(rd, case, n, n, env)
    rd.client.delete(case.stream)
    per_doc = (used(rd) - before) / n
    if queries is None:
        # The query vectors: stored vectors of every 7th document (hash storage).
        queries = [rd.client.hget(f"{case.prefix}{i}", "embedding") for i in range(0, n, 7)][:300]
    p50, p99 = knn_ms(rd, case.index, queries)
    kind = rd.client.type(f"{case.prefix}0").decode()
    return {"storage": storage, "key_type": kind, "first_docs_per_s": first["docs_per_s"],
            "replay_docs_per_s": replay["docs_per_s"], "bytes_per_doc": per_doc, "knn10_p50_ms": p50,
            "knn10_p99_ms": p99, "queries": queries}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(bench.OUT / "storage.json"))
    a = p.parse_args()
    if a.smoke:
        a.rounds, a.n = 1, 60
    texts = corpus.texts("short", a.n)
    rd = bench.Redis()
    runs: list[dict] = []
    queries = None
    try:
        for r in range(a.rounds):
            for storage in ("hash", "json"):
                res = one(rd, storage, texts, queries)
                queries = res.pop("queries")
                runs.append(dict(res, round=r + 1))
                print(f"round {r + 1} {storage:4} ({res['key_type']}): first {res['first_docs_per_s']:.0f}/s, "
                      f"replay {res['replay_docs_per_s']:.0f}/s, {res['bytes_per_doc']:.0f} B/doc, "
                      f"KNN 10 p50 {res['knn10_p50_ms']:.2f} ms p99 {res['knn10_p99_ms']:.2f} ms", flush=True)
    finally:
        rd.close()
    keys = ("first_docs_per_s", "replay_docs_per_s", "bytes_per_doc", "knn10_p50_ms", "knn10_p99_ms")
    summary = {s: {k: statistics.median(x[k] for x in runs if x["storage"] == s) for k in keys} for s in ("hash", "json")}
    print(f"\n{'':24} {'hash':>10} {'json':>10} {'json/hash':>10}")
    for k in keys:
        h, j = summary["hash"][k], summary["json"][k]
        print(f"{k:24} {h:10.2f} {j:10.2f} {j / h:10.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"n": a.n, "rounds": a.rounds, "summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
