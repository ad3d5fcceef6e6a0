"""What a model change costs: `embed-worker reindex` from fp32 (model.onnx) to int8
(model_int8.onnx) on a corpus the fp32 worker indexed, against one throw-away Redis
(PARTIAL_INDEXED_DOCS 1, as scripts/redis.sh runs it), with the release binary.

Reported, per corpus size:

* the first pass's docs/s (the fp32 worker draining the corpus), for scale;
* the reindex's wall time and documents re-embedded per second (one process, as the command
  runs), and the same run again (resumable, nothing left to do);
* Redis `used_memory` per document: before the reindex, its peak during it (both indexes and
  both models' vectors), after the switch (both vectors, the new index), after `--drop-old`.

    .venv/bin/python bench/reindex.py                # 5,000 real sentences
    .venv/bin/python bench/reindex.py --n 500        # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import corpus  # noqa: E402


def used_memory(rd: bench.Redis) -> int:
    rd.client.execute_command("MEMORY", "PURGE")
    return int(rd.client.info("memory")["used_memory"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--kind", default="short", choices=corpus.KINDS)
    p.add_argument("--out", default=str(bench.OUT / "reindex.json"))
    a = p.parse_args()
    texts = corpus.texts(a.kind, a.n)
    rd = bench.Redis()
    try:
        case = bench.Case("reindex")
        empty = used_memory(rd)
        bench.load(rd, case, texts)
        env = bench.worker_env(rd, case, "model.onnx", 0)
        first = bench.timed_drain(rd, case, a.n, [str(bench.BIN), "run", "--drain"], env)
        before = used_memory(rd)
        env_int8 = dict(env, EMBED_WORKER__LOG__LEVEL="warn")
        # The peak: while both indexes and both models' vectors exist (before the switch drops
        # the first model's index), sampled every 100 ms.
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            poller = redis.Redis(port=rd.port)
            while not stop.is_set():
                peak[0] = max(peak[0], int(poller.info("memory")["used_memory"]))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        run = subprocess.run([str(bench.BIN), "reindex", "--model-file", "model_int8.onnx"], env=env_int8,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if run.returncode != 0:
            raise RuntimeError(f"reindex failed: {run.stderr[-2000:]}")
        both = used_memory(rd)
        t0 = time.perf_counter()
        again = subprocess.run([str(bench.BIN), "reindex", "--model-file", "model_int8.onnx"], env=env_int8,
                               capture_output=True, text=True, check=True)
        again_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([str(bench.BIN), "reindex", "--model-file", "model_int8.onnx", "--drop-old"], env=env_int8,
                       capture_output=True, text=True, check=True)
        drop_wall = time.perf_counter() - t0
        after = used_memory(rd)
    finally:
        rd.close()
    per_doc = lambda m: (m - empty) / a.n  # noqa: E731
    result = {
        "n": a.n, "kind": a.kind,
        "first_pass_docs_per_s": first["docs_per_s"],
        "reindex_wall_s": wall, "reindex_docs_per_s": a.n / wall,
        "second_run_wall_s": again_wall, "second_run_said": again.stdout.strip(),
        "drop_old_wall_s": drop_wall,
        "bytes_per_doc": {"fp32 only": per_doc(before), "peak during the reindex": per_doc(peak[0]),
                          "both vectors, int8 index (after the switch)": per_doc(both),
                          "int8 only (after --drop-old)": per_doc(after)},
        "reindex_log": run.stderr.strip().splitlines()[-8:],
    }
    print(json.dumps(result, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
