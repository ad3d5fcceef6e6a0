"""`make bench-memory`: the worker's peak RSS on large entries, against the 600 MB target.

Each case runs in a fresh embedded redis-server (bench.py's Redis): its entries are XADDed to
`embed:docs`, then `embed-worker run --drain` (fp32 model.onnx unless --model-file) indexes them.
Peak RSS = the worker's VmHWM (/proc/<pid>/status), read every 25 ms until it exits;
wait4()'s ru_maxrss is kept beside it but not used: it carries this script's own RSS at spawn
time (see chunk_quality.drain). docs/s and tokens/s count from the first entry read to the last ack, as
bench.py does.

* a) `--entries` (400) entries of ~900 KB of real text each (CPython help pages joined in a
  per-entry shuffled order, bench/long_docs.py big_text(): valid, under stream.max_text_bytes),
  with `chunk.strategy = "none"`: the model sees 256 tokens of each. With a binary that has no
  [chunk] settings this runs without the setting (its only behaviour): today's RSS.
* b) `--long-docs` (3) such documents with chunking on, the defaults (chunk.* untouched). After
  the drain every chunk's text is read back (HGET content) and `embed-worker bench-model` runs on
  those texts (or an evenly spaced --ceiling-chunks of them): the model-only ceiling on the same chunks, in tokens/s (bench.py ceiling()); the
  worker's tokens/s over it is the long-document throughput ratio (target >= 0.9).
* c) `--short` (2000) real sentences (bench/corpus.py short), defaults: the control.
* s) the throughput ratio side by side: one `--speed-kb` (300) document, chunked with the
  defaults, drained, then `bench-model` on exactly its chunks, `--rounds` (3) times; the median
  of the per-round ratios (b's single ratio compares minutes that the shared machine spends
  differently).

    .venv/bin/python bench/memory.py               # all four; table + bench/out/memory.json
    .venv/bin/python bench/memory.py --smoke       # small versions, under a minute
    .venv/bin/python bench/memory.py --cases a --bin target/release/embed-worker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import chunk_quality as cq  # noqa: E402  (require_*, drain, chunking_known)
import corpus  # noqa: E402
import long_docs  # noqa: E402

CASE = cq.CASE
TARGET_MB = 600
TARGET_RATIO = 0.9


def load(rd: bench.Redis, texts) -> int:
    """XADD every text (a generator: 900 KB texts are made one at a time) as id 0, 1, ...;
    returns their total UTF-8 bytes."""
    r = rd.client
    r.xgroup_create(cq.STREAM, cq.GROUP, id="0", mkstream=True)
    pipe, size, n = r.pipeline(transaction=False), 0, 0
    for n, t in enumerate(texts, 1):
        pipe.xadd(cq.STREAM, {"id": str(n - 1), "content": t})
        size += len(t.encode())
        if size // (8 << 20) != (size - len(t.encode())) // (8 << 20):  # one round trip per ~8 MB
            pipe.execute()
    pipe.execute()
    return size


def dead_letters(r) -> list[tuple[str, str]]:
    return [(e[1].get(b"reason", b"?").decode(), e[1].get(b"id", b"?").decode())
            for e in r.xrange(f"{cq.STREAM}:dead")]


def chunk_texts(r) -> list[str]:
    """The stored text of every hash under the prefix, in key order (HGET content)."""
    keys = sorted(k.decode() for k in r.scan_iter(match=f"{cq.PREFIX}*", count=1000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hget(k, "content")
    return [v.decode() for v in pipe.execute()]


def run_case(name: str, texts, n: int, chunk_env: dict, a, tok, ceiling: bool, sample: int = 0) -> dict:
    rd = bench.Redis()
    try:
        t = time.perf_counter()
        size = load(rd, texts)
        load_s = time.perf_counter() - t
        env = {**bench.worker_env(rd, CASE, a.model_file, a.threads), **chunk_env}
        res: dict = {"case": name, "entries": n, "text_bytes": size, "env": chunk_env, "load_s": load_s}
        res["drain"] = cq.drain(rd, CASE, n, [str(bench.BIN), "run", "--drain"], env)
        r = rd.client
        res["dead_letters"] = dead_letters(r)
        stored = chunk_texts(r)
        res["hashes"] = len(stored)
        # Tokens the model saw: each stored text's, at most 256 (a `none` hash holds the whole
        # text, of which the model saw the first 256 tokens).
        res["tokens"] = sum(cq.seen_tokens(tok, stored))
        sec = res["drain"]["seconds"]
        res.update(docs_per_s=n / sec, tokens_per_s=res["tokens"] / sec, text_mb_per_s=size / 2**20 / sec,
                   peak_rss_mb=res["drain"]["peak_rss_mb"], redis_used_memory_mb=int(r.info("memory")["used_memory"]) / 2**20)
        if ceiling:
            # bench-model reads one text per line; a newline is whitespace to the tokenizer. The
            # same chunks, or an evenly spaced sample of them (--ceiling-chunks) to save time:
            # its rate depends on the chunks' lengths, which are alike all through a document.
            flat = [" ".join(s.split()) for s in stored]
            if 0 < sample < len(flat):
                flat = [flat[i * len(flat) // sample] for i in range(sample)]
            c = bench.ceiling(flat, env)
            res["ceiling"] = c
            res["worker_vs_ceiling_tokens"] = res["tokens_per_s"] / c["tokens_per_s"]
        ex = res["drain"]["exit"]
        if ex:
            res["model_busy"] = float(ex["model_busy_s"]) / float(ex["wall_s"])
        res["loadavg"] = os.getloadavg()
        return res
    finally:
        rd.close()


def speed(a, tok) -> dict:
    """Case s: one document of --speed-kb, chunked with the defaults, drained and then run
    through `bench-model` on exactly its chunks, --rounds times; the reported rates are the median
    round's and the ratio is the median of the per-round ratios. On a shared machine a ceiling
    taken minutes after the drain can differ from it by 30%: side by side, both halves of a
    ratio see the same minute."""
    text = long_docs.big_text(20_000, a.speed_kb * 1024)
    rounds = [run_case(f"s{i}", iter([text]), 1, {}, a, tok, ceiling=True) for i in range(a.rounds)]
    ratios = sorted(r["worker_vs_ceiling_tokens"] for r in rounds)
    mid = sorted(rounds, key=lambda r: r["worker_vs_ceiling_tokens"])[(len(rounds) - 1) // 2]
    res = dict(mid)
    res["case"] = f"s: 1 x {a.speed_kb} KB, chunked, {a.rounds} rounds"
    res["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    res["rounds_worker_vs_ceiling"] = ratios
    res["rounds_tokens_per_s"] = [(r["tokens_per_s"], r["ceiling"]["tokens_per_s"]) for r in rounds]
    res["worker_vs_ceiling_tokens"] = ratios[(len(ratios) - 1) // 2] if len(ratios) % 2 else \
        (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    return res


def table(results: list[dict]) -> str:
    rows = [("case", "entries", "text MB", "hashes", "peak RSS MB", "vs 600 MB", "drain s", "docs/s", "tokens/s",
             "ceiling tok/s", "w/ceil", "dead")]
    for r in results:
        c = r.get("ceiling")
        rows.append((r["case"], str(r["entries"]), f"{r['text_bytes'] / 2**20:.1f}", str(r["hashes"]),
                     f"{r['peak_rss_mb']:.0f}", "met" if r["peak_rss_mb"] < TARGET_MB else "MISS",
                     f"{r['drain']['seconds']:.1f}", f"{r['docs_per_s']:.3g}", f"{r['tokens_per_s']:.0f}",
                     f"{c['tokens_per_s']:.0f}" if c else "-",
                     f"{r['worker_vs_ceiling_tokens']:.2f}" if c else "-", str(len(r["dead_letters"]))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", type=Path, default=bench.BIN, help="embed-worker binary (default: EMBED_WORKER_BIN or target/release)")
    p.add_argument("--cases", nargs="*", default=["a", "b", "c", "s"], choices=["a", "b", "c", "s"])
    p.add_argument("--entries", type=int, default=400, help="case a: entries of --entry-kb")
    p.add_argument("--entry-kb", type=int, default=900, help="KiB of text per large entry (a and b)")
    p.add_argument("--long-docs", type=int, default=3, help="case b: chunked documents of --entry-kb")
    p.add_argument("--short", type=int, default=2000, help="case c: short sentences")
    p.add_argument("--speed-kb", type=int, default=300, help="case s: KiB of the document")
    p.add_argument("--rounds", type=int, default=3, help="case s: side-by-side rounds")
    p.add_argument("--ceiling-chunks", type=int, default=0,
                   help="case b: the ceiling on this many of the chunks, evenly spaced (0 = all, -1 = none: "
                        "RSS only, case s measures the ratio)")
    p.add_argument("--model-file", default="model.onnx")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--smoke", action="store_true", help="a: 4 entries, b: one 24 KB document, c: 200 sentences")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.smoke:
        a.entries, a.long_docs, a.short, a.speed_kb, a.rounds = 4, 1, 200, 24, 1
    cq.require_env()
    bench.BIN = a.bin
    cq.require_bin(a.bin)
    cq.require_model(a.model_file)
    tok = long_docs.tokenizer()
    probe_env = bench.worker_env(types.SimpleNamespace(url="redis://127.0.0.1:1"), CASE, a.model_file, a.threads)
    known, why = cq.chunking_known(probe_env)
    if not known:
        print(f"{a.bin} has no [chunk] settings ({why}): case a runs without them (truncation, today's "
              "behaviour); b needs the chunking build", flush=True)
        a.cases = [c for c in a.cases if c in ("a", "c")]
    big = 24 * 1024 if a.smoke else a.entry_kb * 1024
    results = []
    started = time.perf_counter()
    for c in a.cases:
        t = time.perf_counter()
        if c == "a":
            n, texts = a.entries, (long_docs.big_text(i, a.entry_kb * 1024) for i in range(a.entries))
            env = {"EMBED_WORKER__CHUNK__STRATEGY": "none"} if known else {}
            name = f"a: {n} x {a.entry_kb} KB, chunking off"
        elif c == "b":
            n, texts, env = a.long_docs, (long_docs.big_text(10_000 + i, big) for i in range(a.long_docs)), {}
            name = f"b: {n} x {big // 1024} KB, chunked (defaults)"
        elif c == "c":
            n, texts, env = a.short, corpus.texts("short", a.short, seed=11), {}
            name = f"c: {n} short sentences"
        else:
            name = f"s: 1 x {a.speed_kb} KB chunked, worker and ceiling side by side, {a.rounds} rounds"
        print(f"{name} ...", flush=True)
        res = speed(a, tok) if c == "s" else run_case(name, texts, n, env, a, tok,
                                                      ceiling=(c == "b" and a.ceiling_chunks >= 0),
                                                      sample=a.ceiling_chunks)
        res["seconds"] = time.perf_counter() - t
        results.append(res)
        line = (f"  peak RSS {res['peak_rss_mb']:.0f} MB (VmHWM; wait4 ru_maxrss {res['drain']['ru_maxrss_mb']:.0f} MB, "
                f"this script's RSS at spawn {res['drain']['spawner_rss_mb']:.0f} MB), "
                f"{res['docs_per_s']:.3g} docs/s, {res['tokens_per_s']:.0f} tokens/s, drain {res['drain']['seconds']:.1f} s, "
                f"case {res['seconds']:.0f} s, {res['hashes']} hashes, {len(res['dead_letters'])} dead letters")
        if "ceiling" in res:
            line += (f"; ceiling {res['ceiling']['tokens_per_s']:.0f} tokens/s on the same {res['ceiling']['docs']} chunks, "
                     f"worker/ceiling {res['worker_vs_ceiling_tokens']:.2f}")
        if "rounds_worker_vs_ceiling" in res:
            line += " (rounds: " + ", ".join(f"{x:.2f}" for x in res["rounds_worker_vs_ceiling"]) + ")"
        if "model_busy" in res:
            line += f"; model busy {res['model_busy']:.2f} of the worker's wall time"
        print(line, flush=True)
        for reason, doc in res["dead_letters"][:5]:
            print(f"  dead letter: id {doc}: {reason}", flush=True)
    total = time.perf_counter() - started
    print()
    print(table(results))
    print()
    for r in results:
        ok = r["peak_rss_mb"] < TARGET_MB
        print(f"{'met ' if ok else 'MISS'}  {r['case']}: peak RSS {r['peak_rss_mb']:.0f} MB (target < {TARGET_MB} MB)")
        if "worker_vs_ceiling_tokens" in r:
            ok = r["worker_vs_ceiling_tokens"] >= TARGET_RATIO
            print(f"{'met ' if ok else 'MISS'}  {r['case']}: worker / model-only ceiling {r['worker_vs_ceiling_tokens']:.2f}"
                  f" in tokens/s ({r['tokens_per_s']:.0f} / {r['ceiling']['tokens_per_s']:.0f}; target >= {TARGET_RATIO})")
    print(f"{total:.0f} s in all")
    out = a.out or bench.OUT / ("memory_smoke.json" if a.smoke else "memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bin": str(a.bin), "chunking_build": known, "model": a.model_file, "threads": a.threads,
                               "target_mb": TARGET_MB, "seconds": total, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
