"""HNSW insert rate and recall with real vectors, as the index grows, against one throw-away Redis
(bench.py's Redis: PARTIAL_INDEXED_DOCS 1, as scripts/redis.sh runs it, no persistence).

Vectors: all-MiniLM-L6-v2 (fp32 model.onnx unless --model-file), embedded here with
chunk_quality.Embedder (tokenizers + onnxruntime, mean pooling, L2 normalisation: the worker's
vectors), of real texts drawn from the documentation inside CPython (`pool()`): every prose
sentence of bench/corpus.py's documents and of the docstrings and comment blocks of every stdlib
source file, and every window of consecutive sentences of one such document up to WINDOW_CHARS,
deduplicated, shuffled. The first --queries texts are held out as queries; the documents are
the next --docs. The vectors are cached under bench/out/hnsw-cache/ (git-ignored), so only the
first run embeds (about 66 minutes for 200,200 texts on 2 cores; in a child process at nice 19;
times recorded in the cache's timing.json and the output).

Documents are written as the worker writes them: one hash per document (content, genre, the
vector as 384 little-endian float32), HSETs in redis-py pipelines of --pipeline, into the
product's schema (content TEXT, genre TAG, embedding VECTOR HNSW FLOAT32 384 L2,
config/default.toml [index]) with the M and EF_CONSTRUCTION of the run.

* grow: --grow-rounds (2) rounds, each the control (no index at all), then M 16 /
  EF_CONSTRUCTION 200 (the product defaults), per-step medians over the rounds,
  0 -> --docs in steps of --step. Per step: docs/s until the last reply ("written"), then the
  time until FT.INFO num_docs equals what was written with percent_indexed 1 and the vector
  index's background queue empty ("searchable"; FT.INFO and FT.DEBUG VECSIM_INFO are sampled
  through the step), Redis CPU (INFO used_cpu_user + used_cpu_sys) per document, which machine
  noise moves much less than wall time, and used_memory per document (MEMORY PURGE first, over
  the empty server). At each --recall-at size: recall@10 of KNN 10 for the held-out queries at
  each --ef-runtime, against exact neighbours by brute force (numpy, float64) over the same
  vectors, and the median query time.
* grid: --grid configurations (M:EF_CONSTRUCTION, `none` = no index) to --grid-docs, --rounds
  times interleaved, each into an emptied server: docs/s, Redis CPU and memory per document,
  recall. Medians over rounds.

    source scripts/env.sh
    .venv/bin/python bench/hnsw.py                      # 200k grow x 2 + 50k grid x 3 (~27 min); bench/out/hnsw.json
    .venv/bin/python bench/hnsw.py --docs 2000 --step 500 --recall-at 2000 --grid-docs 1000 \\
        --grid-step 500 --rounds 1 --queries 50          # smoke: a minute or two (embedding included)
    .venv/bin/python bench/hnsw.py --embed-only          # fill the vector cache only
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import chunk_quality  # noqa: E402  (Embedder, require_env)
import corpus  # noqa: E402
import storage  # noqa: E402  (used: MEMORY PURGE, then used_memory)
import write_cost  # noqa: E402  (redis_cpu)

CACHE = bench.OUT / "hnsw-cache"
# A window of consecutive sentences is kept up to this many characters (~150 tokens, under the
# model's 256, so every window is embedded whole and distinct windows give distinct vectors).
WINDOW_CHARS = 600
BLOCK = 1024  # texts per cached vector file: a smoke run embeds only the blocks it needs
DIM = chunk_quality.DIM
SPOT_CHECK = 32  # cached vectors embedded again on every run, spread over the cache


# --- real texts -----------------------------------------------------------------------------

def _source_sentences(path: Path) -> list[str]:
    """The prose sentences of one stdlib source file: its docstrings and its comment blocks
    (consecutive `#` lines), in line order."""
    src = path.read_text(encoding="utf-8")
    parts = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append((node.body[0].lineno, doc))
    block: list[str] = []
    for n, line in enumerate(src.splitlines() + [""], 1):
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            block.append(s.lstrip("#").strip())
        elif block:
            parts.append((n - len(block), " ".join(block)))
            block = []
    parts.sort(key=lambda p: p[0])
    return [s for _, text in parts for s in corpus._prose_sentences(text)]


def documents() -> list[list[str]]:
    """Sentence sequences, one per document: bench/corpus.py's (pydoc topics, its module list's
    docstrings), then every stdlib source file's, in path order."""
    docs = [corpus._prose_sentences(d) for d in corpus._documentation()]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.rglob("*.py")):
        if path.relative_to(lib).parts[0] == "site-packages":
            continue
        try:
            docs.append(_source_sentences(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # test data meant not to parse, files in other encodings
    return docs


def pool(seed: int = 0) -> list[str]:
    """Every sentence and every window of consecutive sentences of one document up to
    WINDOW_CHARS, deduplicated as the uncased tokenizer sees them (case and spacing), in a
    seeded shuffle. ~220,000 texts on CPython 3.11; cached per Python version and seed."""
    path = CACHE / f"pool-py{sys.version.split()[0]}-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    seen: dict[str, str] = {}
    for doc in documents():
        for i in range(len(doc)):
            text = doc[i]
            for j in range(i + 1, len(doc) + 1):
                if len(text) > WINDOW_CHARS:
                    break
                seen.setdefault(" ".join(text.lower().split()), text)
                if j < len(doc):
                    text = f"{text} {doc[j]}"
    texts = list(seen.values())
    random.Random(f"hnsw-{seed}").shuffle(texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


# --- vectors --------------------------------------------------------------------------------

def _vector_dir(texts: list[str], model: Path) -> Path:
    h = hashlib.sha256(model.read_bytes())
    h.update("\n".join(texts).encode())
    return CACHE / f"vectors-{h.hexdigest()[:16]}"


def embed_into_cache(texts: list[str], model: Path, n: int, threads: int) -> None:
    """Embeds the first `n` texts block by block into the cache, skipping blocks already there
    (an interrupted run resumes), with progress."""
    out = _vector_dir(texts, model)
    out.mkdir(parents=True, exist_ok=True)
    todo = [b for b in range(0, n, BLOCK) if not (out / f"block-{b // BLOCK:05}.npy").is_file()]
    if not todo:
        return
    embed = chunk_quality.Embedder(model, threads)
    start, done = time.perf_counter(), 0
    timing = out / "timing.json"
    spent = json.loads(timing.read_text()) if timing.is_file() else {"seconds": 0.0, "texts": 0}
    for b in todo:
        vecs = embed(texts[b:b + BLOCK])
        tmp = out / f"block-{b // BLOCK:05}.tmp.npy"
        np.save(tmp, vecs.astype("<f4"))
        tmp.rename(out / f"block-{b // BLOCK:05}.npy")  # a block is there whole or not at all
        done += len(vecs)
        rate = done / (time.perf_counter() - start)
        timing.write_text(json.dumps({"seconds": spent["seconds"] + time.perf_counter() - start,
                                      "texts": spent["texts"] + done, "threads": threads, "nice": os.nice(0)}))
        left = sum(min(BLOCK, len(texts) - x) for x in todo[todo.index(b) + 1:])
        print(f"embedded {b + len(vecs):,}/{n:,} ({rate:.0f} texts/s, ~{left / rate / 60:.0f} min left)", flush=True)


def vectors(texts: list[str], model: Path, n: int, threads: int, seed: int) -> np.ndarray:
    """The first `n` texts' vectors, [n, 384] float32, from the cache; missing blocks are
    embedded first by a child process that runs at nice 19 (it shares the machine; the timed
    writes that follow do not run niced)."""
    out = _vector_dir(texts, model)
    blocks = range(0, n, BLOCK)
    if not all((out / f"block-{b // BLOCK:05}.npy").is_file() for b in blocks):
        subprocess.run([sys.executable, __file__, "--embed-only", "--embed-texts", str(n), "--model-file", model.name,
                        "--threads", str(threads), "--seed", str(seed)], check=True)
    vecs = np.concatenate([np.load(out / f"block-{b // BLOCK:05}.npy") for b in blocks])[:n]
    # The cache's name covers the model file and the texts, not tokenizer.json or onnxruntime:
    # a few cached vectors are embedded again to show they are still this set-up's vectors.
    probe = list(range(0, n, max(1, n // SPOT_CHECK)))[:SPOT_CHECK]
    fresh = chunk_quality.Embedder(model, threads)([texts[i] for i in probe])
    drift = float(np.abs(fresh - vecs[probe]).max())
    if drift > 1e-4:
        sys.exit(f"{out}: cached vectors differ from a fresh embedding by {drift:.2g}; delete it and run again")
    return vecs


def embedding_cost(texts: list[str], model: Path) -> dict | None:
    """How long filling the cache took (seconds, texts, ORT threads, nice), when it was recorded."""
    timing = _vector_dir(texts, model) / "timing.json"
    return json.loads(timing.read_text()) if timing.is_file() else None


# --- one index, written step by step --------------------------------------------------------

class Config(NamedTuple):
    m: int = 0  # 0: no index at all (the control)
    ef_construction: int = 0

    @property
    def name(self) -> str:
        return f"M{self.m}/EF{self.ef_construction}" if self.m else "none"

    @staticmethod
    def parse(text: str) -> "Config":
        if text == "none":
            return Config()
        m, _, ef = text.partition(":")
        if not (m.isdigit() and ef.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: expected none or M:EF_CONSTRUCTION")
        return Config(int(m), int(ef))


DEFAULT = Config(16, 200)  # config/default.toml [index] m, ef_construction
GENRES = ("a", "b", "c")


def create_index(r, case: bench.Case, cfg: Config) -> None:
    """The worker's schema (config/default.toml [index]) with this run's M and EF_CONSTRUCTION."""
    if cfg.m:
        r.execute_command("FT.CREATE", case.index, "ON", "HASH", "PREFIX", 1, case.prefix, "SCHEMA",
                          "content", "TEXT", "genre", "TAG", "embedding", "VECTOR", "HNSW", 10, "TYPE", "FLOAT32",
                          "DIM", DIM, "DISTANCE_METRIC", "L2", "M", cfg.m, "EF_CONSTRUCTION", cfg.ef_construction)


def _pairs(reply) -> dict:
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in zip(reply[::2], reply[1::2])}


def index_state(r, case: bench.Case) -> dict:
    """What says whether the written documents are searchable: FT.INFO's document count and
    indexing fields, and the vector index's own queue (FT.DEBUG VECSIM_INFO: the tiered index's
    flat front end holds vectors not yet in the HNSW graph; BACKGROUND_INDEXING counts jobs)."""
    info = {k.decode(): v for k, v in r.execute_command("FT.INFO", case.index).items()}
    vec = _pairs(r.execute_command("FT.DEBUG", "VECSIM_INFO", case.index, "embedding"))
    front, back = _pairs(vec.get("FRONTEND_INDEX", [])), _pairs(vec.get("BACKEND_INDEX", []))
    return {"num_docs": int(info["num_docs"]), "percent_indexed": float(info["percent_indexed"]),
            "indexing": int(info["indexing"]), "failures": int(info["hash_indexing_failures"]),
            "vector_index_mb": float(info["vector_index_sz_mb"]),
            "background_indexing": int(vec.get("BACKGROUND_INDEXING", 0)),
            "frontend_size": int(front.get("INDEX_SIZE", 0)), "hnsw_size": int(back.get("INDEX_SIZE", 0))}


def searchable(state: dict, written: int) -> bool:
    return (state["num_docs"] == written and state["percent_indexed"] == 1 and not state["indexing"]
            and not state["background_indexing"] and not state["frontend_size"])


def write_step(rd: bench.Redis, case: bench.Case, cfg: Config, data: dict, start: int, end: int,
               pipeline: int, t0: float, samples: list) -> dict:
    """Writes documents start..end-1, then waits until they are all searchable. FT.INFO is
    sampled about once a second while writing and every 10 ms while waiting."""
    r, vecs, texts = rd.client, data["docs"], data["texts"]
    cpu0 = write_cost.redis_cpu(r)
    began = next_sample = time.perf_counter()
    for s in range(start, end, pipeline):
        pipe = r.pipeline(transaction=False)
        for i in range(s, min(s + pipeline, end)):
            pipe.hset(f"{case.prefix}{i}", mapping={"content": texts[i], "genre": GENRES[i % 3],
                                                    "embedding": vecs[i].tobytes()})
        pipe.execute()
        if cfg.m and time.perf_counter() >= next_sample:
            samples.append(dict(index_state(r, case), t=time.perf_counter() - t0, written=min(s + pipeline, end)))
            next_sample += 1.0
    written_at = time.perf_counter()
    while cfg.m:
        state = index_state(r, case)
        samples.append(dict(state, t=time.perf_counter() - t0, written=end))
        if searchable(state, end):
            break
        if state["failures"] or time.perf_counter() - written_at > 600:
            raise RuntimeError(f"{cfg.name}: {end} written, not searchable: {state}")
        time.sleep(0.01)
    searchable_at = time.perf_counter()
    cpu = write_cost.settled_cpu(r) - cpu0  # background indexing, if any, belongs to the write
    n = end - start
    return {"docs": end, "written_docs_per_s": n / (written_at - began), "write_s": written_at - began,
            "searchable_lag_s": searchable_at - written_at, "searchable_docs_per_s": n / (searchable_at - began),
            "redis_cpu_us_per_doc": cpu / n * 1e6, "loadavg_1m": os.getloadavg()[0]}


# --- recall ---------------------------------------------------------------------------------

def exact_neighbours(docs: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """[queries, k] indices of the k nearest documents by L2: candidates from float32, ranked
    again in float64."""
    out = np.zeros((len(queries), k), np.int64)
    sq = (docs.astype(np.float64) ** 2).sum(1).astype(np.float32)
    for s in range(0, len(queries), 25):
        q = queries[s:s + 25]
        d = sq[None, :] - 2 * q @ docs.T
        cand = np.argpartition(d, 2 * k, axis=1)[:, :2 * k]
        for j, c in enumerate(cand):
            exact = ((docs[c].astype(np.float64) - q[j].astype(np.float64)) ** 2).sum(1)
            out[s + j] = c[np.argsort(exact, kind="stable")[:k]]
    return out


def knn(r, case: bench.Case, query: np.ndarray, k: int, ef: int) -> list[int]:
    reply = r.execute_command("FT.SEARCH", case.index, f"*=>[KNN {k} @embedding $v EF_RUNTIME {ef} AS d]",
                              "PARAMS", 2, "v", query.tobytes(), "SORTBY", "d", "RETURN", 1, "d",
                              "LIMIT", 0, k, "DIALECT", 2)
    # RESP3 (redis-py 8's default here) answers a map; RESP2 [total, key, fields, key, ...].
    keys = [x[b"id"] for x in reply[b"results"]] if isinstance(reply, dict) else reply[1::2]
    return [int(key[len(case.prefix):]) for key in keys]


def recall(r, case: bench.Case, docs: np.ndarray, queries: np.ndarray, exact: np.ndarray, efs: list[int]) -> dict:
    """Per EF_RUNTIME: mean recall@10 against `exact` (ids in common), the same by distance (a
    result counts when it is no farther than the 10th exact neighbour, so a tie with a
    near-duplicate text is not a miss), the worst query's, and the median query time in ms."""
    out = {}
    k = exact.shape[1]
    for ef in efs:
        hits, by_dist, times = [], [], []
        for q, truth in zip(queries, exact):
            t = time.perf_counter()
            found = knn(r, case, q, k, ef)
            times.append((time.perf_counter() - t) * 1000)
            hits.append(len(set(found) & set(truth.tolist())) / k)
            q64 = q.astype(np.float64)
            kth = ((docs[truth[-1]].astype(np.float64) - q64) ** 2).sum()
            dist = ((docs[found].astype(np.float64) - q64) ** 2).sum(1) if found else np.zeros(0)
            by_dist.append(min(k, int((dist <= kth * (1 + 1e-6) + 1e-12).sum())) / k)
        out[str(ef)] = {"recall@10": statistics.mean(hits), "min": min(hits),
                        "recall@10_by_distance": statistics.mean(by_dist), "min_by_distance": min(by_dist),
                        "p50_ms": statistics.median(times)}
    return out


# --- runs -----------------------------------------------------------------------------------

def emptied(rd: bench.Redis) -> int:
    """FLUSHALL (the last run's index and documents), then used_memory once it has stopped
    falling: the Query Engine frees a dropped index on a background thread."""
    rd.client.flushall()
    last, deadline = storage.used(rd), time.perf_counter() + 30
    while time.perf_counter() < deadline:
        time.sleep(0.2)
        now = storage.used(rd)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def run(rd: bench.Redis, cfg: Config, data: dict, size: int, step: int, recall_at: set[int], a) -> dict:
    """One index (or none) into an emptied server, 0 -> size in steps, recall at `recall_at`."""
    r = rd.client
    base = emptied(rd)
    case = bench.Case("hnsw")
    create_index(r, case, cfg)
    steps, samples, recalls = [], [], {}
    t0 = time.perf_counter()
    for start in range(0, size, step):
        end = min(start + step, size)
        row = write_step(rd, case, cfg, data, start, end, a.pipeline, t0, samples)
        row["used_bytes_per_doc"] = (storage.used(rd) - base) / end
        if cfg.m:
            row["vector_index_bytes_per_doc"] = index_state(r, case)["vector_index_mb"] * 2**20 / end
        steps.append(row)
        print(f"  {cfg.name:10} {end:>8,} docs: written {row['written_docs_per_s']:6.0f}/s, searchable "
              f"+{row['searchable_lag_s']:.2f} s, Redis CPU {row['redis_cpu_us_per_doc']:5.0f} us/doc, "
              f"{row['used_bytes_per_doc']:6.0f} B/doc (load {row['loadavg_1m']:.1f})", flush=True)
        if cfg.m and end in recall_at:
            if end not in data["exact"]:
                data["exact"][end] = exact_neighbours(data["docs"][:end], data["queries"])
            exact = data["exact"][end]
            recalls[str(end)] = recall(r, case, data["docs"], data["queries"], exact, a.ef_runtime)
            print(f"  {cfg.name:10} {end:>8,} docs: " + ", ".join(
                f"EF_RUNTIME {ef} recall@10 {x['recall@10']:.3f} ({x['p50_ms']:.2f} ms)" for ef, x in recalls[str(end)].items()),
                flush=True)
    write_s = sum(x["write_s"] for x in steps)
    cpu_s = sum(x["redis_cpu_us_per_doc"] * (x["docs"] - before) / 1e6 for x, before in
                zip(steps, [0] + [y["docs"] for y in steps[:-1]]))
    return {"config": cfg.name, "m": cfg.m, "ef_construction": cfg.ef_construction, "docs": size,
            "written_docs_per_s": size / write_s,
            "searchable_docs_per_s": size / sum(x["write_s"] + x["searchable_lag_s"] for x in steps),
            "redis_cpu_us_per_doc": cpu_s / size * 1e6,
            "used_bytes_per_doc": steps[-1]["used_bytes_per_doc"],
            "vector_index_bytes_per_doc": steps[-1].get("vector_index_bytes_per_doc"),
            "recall": recalls, "steps": steps, "samples": samples}


def summarise(runs: list[dict]) -> dict:
    """Per configuration, the median over rounds of each figure (recall per EF_RUNTIME too),
    with every round's docs/s beside it."""
    out = {}
    for name in dict.fromkeys(x["config"] for x in runs):
        mine = [x for x in runs if x["config"] == name]
        row = {k: statistics.median(x[k] for x in mine) for k in
               ("written_docs_per_s", "searchable_docs_per_s", "redis_cpu_us_per_doc", "used_bytes_per_doc")}
        row["rounds_docs_per_s"] = [round(x["written_docs_per_s"]) for x in mine]
        if mine[0]["m"]:
            row["vector_index_bytes_per_doc"] = statistics.median(x["vector_index_bytes_per_doc"] for x in mine)
            size = str(mine[0]["docs"])
            row["recall"] = {ef: {k: statistics.median(x["recall"][size][ef][k] for x in mine)
                                  for k in ("recall@10", "recall@10_by_distance", "p50_ms")}
                             for ef in mine[0]["recall"][size]}
        out[name] = row
    return out


def table(summary: dict, efs: list[int]) -> str:
    head = ["config", "docs/s", "rounds", "CPU us/doc", "B/doc", "index B/doc"]
    head += [f"recall ef{ef}" for ef in efs] + [f"ms ef{ef}" for ef in efs]
    rows = [head]
    for name, x in summary.items():
        rec = x.get("recall", {})
        rows.append([name, f"{x['written_docs_per_s']:.0f}", "/".join(map(str, x["rounds_docs_per_s"])),
                     f"{x['redis_cpu_us_per_doc']:.0f}", f"{x['used_bytes_per_doc']:.0f}",
                     f"{x.get('vector_index_bytes_per_doc') or 0:.0f}"]
                    + [f"{rec[str(ef)]['recall@10']:.3f}" if rec else "-" for ef in efs]
                    + [f"{rec[str(ef)]['p50_ms']:.2f}" if rec else "-" for ef in efs])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


STEP_KEYS = ("written_docs_per_s", "searchable_lag_s", "redis_cpu_us_per_doc", "used_bytes_per_doc",
             "vector_index_bytes_per_doc")


def grow_steps(rounds: list[dict]) -> list[dict]:
    """Per step, the median over the growing rounds of each figure, with every round's docs/s
    and Redis CPU beside it."""
    out = []
    for i, first in enumerate(rounds[0]["steps"]):
        mine = [x["steps"][i] for x in rounds]
        row = {"docs": first["docs"]}
        row.update({k: statistics.median(x[k] for x in mine) for k in STEP_KEYS if first.get(k) is not None})
        row["rounds_docs_per_s"] = [round(x["written_docs_per_s"]) for x in mine]
        row["rounds_cpu_us_per_doc"] = [round(x["redis_cpu_us_per_doc"]) for x in mine]
        out.append(row)
    return out


def grow_recall(rounds: list[dict]) -> dict:
    """Per size and EF_RUNTIME, the median over the growing rounds (the worst query: the worst)."""
    out: dict = {}
    for size, per_ef in rounds[0]["recall"].items():
        out[size] = {ef: {k: (min if k.startswith("min") else statistics.median)(x["recall"][size][ef][k] for x in rounds)
                          for k in first} for ef, first in per_ef.items()}
    return out


def grow_table(grow: dict) -> str:
    """One row per step: the control's and the default index's rates side by side (medians)."""
    none, hnsw = grow.get("none"), grow[DEFAULT.name]
    rows = [["docs", "none/s", "HNSW/s", "rounds", "lag s", "CPU us/doc", "rounds", "none CPU", "B/doc", "index B/doc"]]
    for i, x in enumerate(hnsw["steps"]):
        c = none["steps"][i] if none and i < len(none["steps"]) else None
        rows.append([f"{x['docs']:,}", f"{c['written_docs_per_s']:.0f}" if c else "-", f"{x['written_docs_per_s']:.0f}",
                     "/".join(map(str, x["rounds_docs_per_s"])), f"{x['searchable_lag_s']:.2f}",
                     f"{x['redis_cpu_us_per_doc']:.0f}", "/".join(map(str, x["rounds_cpu_us_per_doc"])),
                     f"{c['redis_cpu_us_per_doc']:.0f}" if c else "-", f"{x['used_bytes_per_doc']:.0f}",
                     f"{x['vector_index_bytes_per_doc']:.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def cpu() -> dict:
    """The CPU, as `grep -o 'avx512_vnni\\|avx_vnni' /proc/cpuinfo` and the model name tell it."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags, "python": sys.version.split()[0]}


def machine(r) -> dict:
    mods = {m[b"name"].decode(): m[b"ver"] for m in r.execute_command("MODULE", "LIST")}
    return dict(cpu(), redis=r.info("server")["redis_version"], search_module=mods.get("search"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=200_000, help="size the default index grows to")
    p.add_argument("--step", type=int, default=20_000, help="documents per reported step")
    p.add_argument("--recall-at", default="100000,200000",
                   help="sizes of the growing index to measure recall at (step ends; the last size always)")
    p.add_argument("--grid", type=Config.parse, nargs="*", default=[Config(), DEFAULT, Config(16, 100), Config(16, 400),
                                                                   Config(8, 200), Config(32, 200)],
                   help="configurations for the grid, M:EF_CONSTRUCTION or none")
    p.add_argument("--grid-docs", type=int, default=50_000, help="size of each grid run (0: no grid)")
    p.add_argument("--grid-step", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3, help="grid rounds, interleaved; medians are reported")
    p.add_argument("--queries", type=int, default=200, help="held-out real texts used as KNN queries")
    p.add_argument("--ef-runtime", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20, 50, 100, 200],
                   help="EF_RUNTIME values to measure recall at")
    p.add_argument("--grow-rounds", type=int, default=2,
                   help="growing runs of each (the control, then the default index), interleaved; per-step medians")
    p.add_argument("--pipeline", type=int, default=500, help="HSETs per redis-py pipeline")
    p.add_argument("--no-control", action="store_true", help="skip the growing run without an index")
    p.add_argument("--model-file", default="model.onnx")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ORT threads for embedding")
    p.add_argument("--seed", type=int, default=0, help="the text pool's shuffle")
    p.add_argument("--embed-only", action="store_true", help="only fill the vector cache (runs at nice 19)")
    p.add_argument("--embed-texts", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(bench.OUT / "hnsw.json"))
    a = p.parse_args()
    model = Path(os.environ.get("EMBED_WORKER_MODEL_DIR", ROOT / "onnx/all-MiniLM-L6-v2")) / a.model_file
    if not model.is_file():
        sys.exit(f"{model} missing: run `make model`")
    texts = pool(a.seed)
    n = a.queries + max(a.docs, a.grid_docs)
    if n > len(texts):
        sys.exit(f"{n:,} texts asked for, the pool holds {len(texts):,}")
    if a.embed_only:
        os.nice(19)
        embed_into_cache(texts, model, a.embed_texts or n, a.threads)
        return 0
    chunk_quality.require_env()
    vecs = vectors(texts, model, n, a.threads, a.seed)
    distinct = len({hash(v.tobytes()) for v in vecs})
    if distinct != n:
        print(f"note: {n - distinct} of {n:,} vectors are repeats of another")
    data = {"queries": vecs[:a.queries], "docs": vecs[a.queries:], "texts": texts[a.queries:n], "exact": {}}
    ends = set(range(a.step, a.docs, a.step)) | {a.docs}
    recall_at = {int(x) for x in a.recall_at.split(",") if x} | {a.docs}
    if recall_at - ends:
        sys.exit(f"--recall-at {sorted(recall_at - ends)}: not the end of a step of {a.step:,}")
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally below stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rd = bench.Redis()
    result: dict = {"args": {k: v for k, v in vars(a).items() if k != "grid"}, "grid_configs": [c.name for c in a.grid],
                    "pool": {"texts": len(texts), "mean_chars": statistics.mean(map(len, texts[:n])),
                             "window_chars": WINDOW_CHARS},
                    "embedding": embedding_cost(texts, model),
                    "distinct_vectors": distinct, "loadavg_start": os.getloadavg()}
    try:
        result["machine"] = machine(rd.client)
        print(f"{result['machine']}; {n:,} vectors ({a.queries} queries), load {os.getloadavg()[0]:.1f}", flush=True)
        rounds: dict[str, list[dict]] = {}
        for g in range(a.grow_rounds):
            print(f"growing round {g + 1}/{a.grow_rounds}", flush=True)
            for cfg in ([] if a.no_control else [Config()]) + [DEFAULT]:
                rounds.setdefault(cfg.name, []).append(dict(run(rd, cfg, data, a.docs, a.step, recall_at, a), round=g + 1))
        grow = {name: {"config": name, "rounds": runs_of, "steps": grow_steps(runs_of),
                       "recall": grow_recall(runs_of) if runs_of[0]["m"] else {}}
                for name, runs_of in rounds.items()}
        result["grow"] = grow
        runs = []
        for r in range(a.rounds if a.grid_docs else 0):
            print(f"grid round {r + 1}/{a.rounds}", flush=True)
            for cfg in a.grid:
                runs.append(dict(run(rd, cfg, data, a.grid_docs, a.grid_step, {a.grid_docs}, a), round=r + 1))
        result["grid"] = {"runs": runs, "summary": summarise(runs) if runs else {}}
    finally:
        rd.close()
    result["loadavg_end"] = os.getloadavg()
    print(f"\ngrowing to {a.docs:,}, medians of {a.grow_rounds} rounds:")
    print(grow_table(grow))
    for size, rec in grow[DEFAULT.name]["recall"].items():
        print(f"  {DEFAULT.name} at {int(size):,}: " + ", ".join(
            f"EF_RUNTIME {ef} recall@10 {x['recall@10']:.3f} / by distance {x['recall@10_by_distance']:.3f} "
            f"(worst query {x['min']:.1f} / {x['min_by_distance']:.1f}, p50 {x['p50_ms']:.2f} ms)"
            for ef, x in rec.items()))
    if runs:
        print(f"\ngrid at {a.grid_docs:,} docs, medians of {a.rounds} rounds:")
        print(table(result["grid"]["summary"], a.ef_runtime))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
