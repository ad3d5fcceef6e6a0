"""What skipping unchanged documents buys: a first pass of a corpus against re-feeds of it, side
by side in one run, against one throw-away Redis (PARTIAL_INDEXED_DOCS 1, as scripts/redis.sh
runs it), with the release binary and the fp32 model.

For each corpus and round (interleaved, so machine noise hits every variant alike):

* first     the corpus fed once into a new stream, group and index: every text embedded;
* replay    the same entries again (same ids, texts and fields): no model run, only each
            document's version moves;
* fields    the same texts with one other field changed (`genre`): no model run, the fields
            are replaced (the Query Engine re-indexes each document, its vector included);
* no-skip   the replay again with worker.skip_unchanged = false: the model runs again (control).

Each is timed from the first entry read to the last acked (the worker's start-up excluded) and
reported as docs/s; the ratios are each variant's rate over `first` of the same round, and the
figures are medians over rounds.

    .venv/bin/python bench/unchanged.py                 # 2,000 short + 300 long, 3 rounds
    .venv/bin/python bench/unchanged.py --smoke         # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import corpus  # noqa: E402

VARIANTS = ("first", "replay", "fields", "no-skip")


def feed(r: redis.Redis, case: bench.Case, texts: list[str], genre: str) -> None:
    pipe = r.pipeline(transaction=False)
    for i, t in enumerate(texts):
        pipe.xadd(case.stream, {"id": str(i), "content": t, "genre": genre})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def drain(rd: bench.Redis, case: bench.Case, n_before: int, n: int, env: dict) -> dict:
    """Runs `run --drain` until the group has read and acked `n` entries past `n_before`."""
    poller = redis.Redis(port=rd.port)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([str(bench.BIN), "run", "--drain"], env=env, stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    first = last = None
    while True:
        s = bench.group_state(poller, case)
        now = time.perf_counter()
        if s and first is None and s[0] > n_before:
            first = now
        if s and s[0] >= n_before + n and s[1] == 0 and s[2] == 0:
            last = now
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    status = proc.wait()
    log.seek(0)
    err = log.read()
    if first is None or last is None:
        raise RuntimeError(f"the worker exited ({status}) before draining: {err[-2000:]}")
    return {"seconds": last - first, "docs_per_s": n / max(last - first, 1e-9)}


def stored(rd: bench.Redis, case: bench.Case, n: int) -> int:
    """Documents stored (one hash, or chunk #0 of a long one): a check that every variant left
    them all there."""
    pipe = rd.client.pipeline(transaction=False)
    for i in range(n):
        pipe.exists(f"{case.prefix}{i}", f"{case.prefix}{i}#0")
    return sum(1 for e in pipe.execute() if e)


def round_of(rd: bench.Redis, kind: str, texts: list[str]) -> dict:
    case = bench.Case(f"unch_{kind}")
    rd.client.xgroup_create(case.stream, case.group, id="0", mkstream=True)
    env = bench.worker_env(rd, case, "model.onnx", 0)
    n = len(texts)
    out = {}
    feed(rd.client, case, texts, "a")
    out["first"] = drain(rd, case, 0, n, env)
    feed(rd.client, case, texts, "a")
    out["replay"] = drain(rd, case, n, n, env)
    feed(rd.client, case, texts, "b")
    out["fields"] = drain(rd, case, 2 * n, n, env)
    feed(rd.client, case, texts, "b")
    out["no-skip"] = drain(rd, case, 3 * n, n, dict(env, EMBED_WORKER__WORKER__SKIP_UNCHANGED="false"))
    docs = stored(rd, case, n)
    if docs != n:
        raise RuntimeError(f"{kind}: {docs} documents in the index, expected {n}")
    genres = {rd.client.hget(f"{case.prefix}{i}", "genre") or rd.client.hget(f"{case.prefix}{i}#0", "genre")
              for i in range(0, n, max(1, n // 50))}
    if genres != {b"b"}:
        raise RuntimeError(f"{kind}: the changed field did not land: {genres}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short", type=int, default=2000, help="real sentences (CPython documentation)")
    p.add_argument("--long", type=int, default=300, help="real passages")
    p.add_argument("--uniform", type=int, default=2000, help="templated sentences (control)")
    p.add_argument("--smoke", action="store_true", help="tiny corpora, one round")
    p.add_argument("--out", default=str(bench.OUT / "unchanged.json"))
    a = p.parse_args()
    if a.smoke:
        a.rounds, a.short, a.long, a.uniform = 1, 60, 10, 0
    corpora = {k: corpus.texts(k, n) for k, n in (("short", a.short), ("long", a.long), ("uniform", a.uniform)) if n}
    rd = bench.Redis()
    runs: dict[str, list[dict]] = {k: [] for k in corpora}
    try:
        for r in range(a.rounds):
            for kind, texts in corpora.items():
                res = round_of(rd, kind, texts)
                runs[kind].append(res)
                print(f"round {r + 1} {kind:8}" + "".join(
                    f"  {v} {res[v]['docs_per_s']:8.0f}/s" for v in VARIANTS), flush=True)
    finally:
        rd.close()
    summary = {}
    for kind, rs in runs.items():
        row = {"n": len(corpora[kind])}
        for v in VARIANTS:
            row[f"{v}_docs_per_s"] = statistics.median(x[v]["docs_per_s"] for x in rs)
            row[f"{v}_over_first"] = statistics.median(x[v]["docs_per_s"] / x["first"]["docs_per_s"] for x in rs)
        summary[kind] = row
    print(f"\n{'corpus':8} {'n':>5} {'first/s':>8} " + " ".join(f"{v + ' x':>10}" for v in VARIANTS[1:]))
    for kind, row in summary.items():
        print(f"{kind:8} {row['n']:5} {row['first_docs_per_s']:8.0f} " + " ".join(
            f"{row[f'{v}_over_first']:10.1f}" for v in VARIANTS[1:]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rounds": a.rounds, "summary": summary, "runs": runs}, indent=2) + "\n")
    target = summary.get("short", {}).get("replay_over_first", 0)
    if not a.smoke and target < 4:
        print(f"TARGET MISSED: an unchanged re-feed of short documents is {target:.1f}x the first pass (target 4x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
