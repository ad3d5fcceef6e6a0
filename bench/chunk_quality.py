"""`make bench-chunks`: document-level retrieval quality of long documents per chunk setting.

Corpus and queries: bench/long_docs.py (whole CPython help pages of at least 600 tokens; queries
are sentences from past the first 256 tokens of one page, shortened by a third and verbatim).

For each configuration (`none`, and `tokens` with each chunk size x overlap), in a fresh
embedded redis-server (bench.py's Redis): every page is XADDed to `embed:docs` (id = page id,
content = page text), `embed-worker run --drain` indexes them with that `[chunk]` setting, then
each query, embedded here with the same model (onnxruntime + tokenizers, mean pooling, L2
normalisation: baseline_worker.py's code, checked against `embed-worker embed`), is answered
with FT.SEARCH KNN K. Hits are grouped by document (the `parent` field when present, else the
key without `doc:`), each document ranked by its best chunk: recall@1/5/10 and MRR at document
level. The same metrics from an exact brute-force search over every stored vector sit beside
them (a gap means HNSW, not chunking, lost the answer).

Also per configuration: chunks per document, Redis memory per document (INFO used_memory after
the drain minus before it, over the documents; it includes the HNSW index's first block, ~2 MB
for up to 1,024 vectors whatever their number, so beside it: the hashes' MEMORY USAGE and
FT.INFO's index sizes, per document), the drain's docs/s and tokens/s, and checks of
the worker's output (every page indexed once, chunk fields and spans, chunk token lengths,
stored vectors = this script's embedding of the stored text).

    .venv/bin/python bench/chunk_quality.py            # the grid; table + bench/out/chunk_quality.json
    .venv/bin/python bench/chunk_quality.py --smoke    # a few pages, two configurations (< 1 minute)
    .venv/bin/python bench/chunk_quality.py --configs none tokens:256:32 --bin /tmp/ew-chunk/embed-worker

The best configuration: highest recall@5 on the shortened queries, ties to fewer chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import long_docs  # noqa: E402

DIM = 384
STREAM, GROUP, INDEX, PREFIX = "embed:docs", "embedders", "vector_idx", "doc:"
CASE = types.SimpleNamespace(stream=STREAM, group=GROUP, index=INDEX, prefix=PREFIX)
SETS = ("shortened", "verbatim")
# A page of 17,520 tokens cut at 128 with an overlap of 64 makes ~280 chunks; this run measures
# quality, so the cap is set out of the way (and the setting named in the report).
MAX_CHUNKS = 1024


def require_env() -> None:
    """The variables scripts/env.sh sets (the Makefile sources it); one line with the fix."""
    missing = [v for v in ("EMBED_WORKER_REDIS_SERVER", "EMBED_WORKER_REDIS_MODULES", "ORT_DYLIB_PATH",
                           "EMBED_WORKER_MODEL_DIR") if not os.environ.get(v)]
    if missing:
        sys.exit(f"{', '.join(missing)} not set: run through make (make bench-chunks / bench-memory) or "
                 "`source scripts/env.sh` first")
    server = Path(os.environ["EMBED_WORKER_REDIS_SERVER"])
    if not server.is_file():
        sys.exit(f"{server} missing: run `make setup`")


def require_bin(path: Path) -> None:
    if not path.is_file():
        sys.exit(f"{path} missing: run `make build`, or pass --bin / EMBED_WORKER_BIN")


def require_model(model_file: str) -> Path:
    path = Path(os.environ["EMBED_WORKER_MODEL_DIR"]) / model_file
    if not path.is_file():
        sys.exit(f"{path} missing: run `make model`" + (" and `make model-int8`" if "int8" in model_file else ""))
    return path


@dataclasses.dataclass(frozen=True)
class Config:
    strategy: str  # "none" or "tokens"
    size: int = 0
    overlap: int = 0

    @property
    def name(self) -> str:
        return "none" if self.strategy == "none" else f"tokens:{self.size}:{self.overlap}"

    @staticmethod
    def parse(text: str) -> "Config":
        parts = text.split(":")
        if parts == ["none"]:
            return Config("none")
        if parts[0] == "tokens" and len(parts) == 3 and all(p.isdigit() for p in parts[1:]):
            return Config("tokens", int(parts[1]), int(parts[2]))
        raise argparse.ArgumentTypeError(f"{text!r}: expected none or tokens:SIZE:OVERLAP")

    def env(self, chunking_known: bool) -> dict:
        if self.strategy == "none":
            # A binary from before [chunk] rejects the key; its only behaviour is "none".
            return {"EMBED_WORKER__CHUNK__STRATEGY": "none"} if chunking_known else {}
        return {"EMBED_WORKER__CHUNK__STRATEGY": "tokens", "EMBED_WORKER__CHUNK__SIZE": str(self.size),
                "EMBED_WORKER__CHUNK__OVERLAP": str(self.overlap), "EMBED_WORKER__CHUNK__MAX_CHUNKS": str(MAX_CHUNKS)}


class Embedder:
    """baseline_worker.py's embedding: tokenizers (truncation at 256, pad to longest),
    onnxruntime, mean pooling over the attention mask, L2 normalisation."""

    def __init__(self, model_path: Path, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.sess.get_inputs()}
        self.tok = Tokenizer.from_file(str(model_path.parent / "tokenizer.json"))
        self.tok.enable_truncation(long_docs.MAX_LEN)
        self.tok.enable_padding()

    def __call__(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding, same vectors
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            enc = self.tok.encode_batch([texts[i] for i in idx])
            ids = np.array([e.ids for e in enc], np.int64)
            mask = np.array([e.attention_mask for e in enc], np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self.sess.run(None, {k: v for k, v in feeds.items() if k in self.names})[0]
            m = mask[..., None].astype(np.float32)
            v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            out[idx] = v
        return out


def worker_embed(texts: list[str], env: dict) -> tuple[np.ndarray | None, str]:
    """`embed-worker embed TEXT...`: one JSON array per text; (None, stderr) when it fails."""
    p = subprocess.run([str(bench.BIN), "embed", *texts], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr
    return np.array([json.loads(line) for line in p.stdout.splitlines() if line.strip()], np.float32), ""


def chunking_known(env: dict) -> tuple[bool, str]:
    """Whether this binary knows the [chunk] settings (an older one rejects unknown keys)."""
    vec, err = worker_embed(["probe"], {**env, "EMBED_WORKER__CHUNK__STRATEGY": "none"})
    return vec is not None, err.strip().splitlines()[-1] if err.strip() else ""


def vector_check(embed: Embedder, env: dict, docs: list[long_docs.Page]) -> dict:
    """This script's vectors against the worker's own for the same texts (a sentence, the docs'
    example, a page longer than 256 tokens: truncated alike)."""
    texts = ["That is a very happy person", "Today is a sunny day", docs[0].text]
    theirs, err = worker_embed(texts, env)
    if theirs is None:
        sys.exit(f"`{bench.BIN} embed` failed: {err[-1500:]}")
    ours = embed(texts)
    return {"texts": len(texts), "max_l2": float(np.linalg.norm(theirs - ours, axis=1).max()),
            "max_abs": float(np.abs(theirs - ours).max())}


def drain(rd, case, n: int, cmd: list[str], env: dict) -> dict:
    """bench.timed_drain (kept under this name for memory.py)."""
    return bench.timed_drain(rd, case, n, cmd, env)


def seen_tokens(tok, texts: list[str]) -> list[int]:
    """Tokens the model sees of each text: its own count, at most the model's 256 ([CLS]/[SEP]
    counted). A prefix is tokenised first, so 900 KB texts cost no more than short ones."""
    head = [len(e.ids) for e in tok.encode_batch([t[:8192] for t in texts])]
    long_ones = [i for i, (t, n) in enumerate(zip(texts, head)) if n < long_docs.MAX_LEN and len(t) > 8192]
    for i, e in zip(long_ones, tok.encode_batch([texts[i] for i in long_ones])):
        head[i] = len(e.ids)
    return [min(n, long_docs.MAX_LEN) for n in head]


def used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def read_index(r) -> dict[str, dict]:
    """Every indexed hash: key -> its fields (bytes values; embedding as float32)."""
    keys = sorted(k.decode() for k in r.scan_iter(match=f"{PREFIX}*", count=1000))
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
    out = {}
    for k, h in zip(keys, pipe.execute()):
        f = {a.decode(): b for a, b in h.items()}
        f["embedding"] = np.frombuffer(f["embedding"], np.float32) if "embedding" in f else None
        out[k] = f
    return out


def document_of(key: str, fields: dict) -> str:
    """The rule a client uses: the parent TAG when present, else the key without the prefix."""
    parent = fields.get("parent")
    if parent is not None:
        return parent.decode() if isinstance(parent, bytes) else parent
    return key[len(PREFIX):]


def check_output(cfg: Config, docs: list[long_docs.Page], stored: dict[str, dict], tok) -> dict:
    """What the worker wrote, against the chunk contract; every deviation is listed."""
    problems: list[str] = []
    by_doc: dict[str, list[tuple[str, dict]]] = {}
    for k, f in stored.items():
        by_doc.setdefault(document_of(k, f), []).append((k, f))
    chunk_tokens, overlaps, span_kind = [], [], set()
    for page in docs:
        doc = str(page.id)
        parts = by_doc.pop(doc, [])
        if not parts:
            problems.append(f"page {doc}: no hash")
            continue
        if len(parts) == 1 and parts[0][0] == f"{PREFIX}{doc}":
            content = parts[0][1].get("content", b"").decode()
            if content != page.text:
                problems.append(f"{PREFIX}{doc}: content is not the page text ({len(content)} vs {len(page.text)} chars)")
            if cfg.strategy == "tokens" and page.tokens > cfg.size:
                problems.append(f"{PREFIX}{doc}: one hash for a page of {page.tokens} tokens (size {cfg.size})")
            continue
        expected = [f"{PREFIX}{doc}#{i}" for i in range(len(parts))]
        got = sorted((k for k, _ in parts), key=lambda k: (len(k), k))
        if got != expected:
            problems.append(f"page {doc}: keys {got[:3]}... not {expected[:3]}...")
            continue
        prev_end = 0
        text_bytes = page.text.encode()
        for i, key in enumerate(expected):
            f = dict(parts)[key]
            try:
                chunk, start, end = (int(f[n]) for n in ("chunk", "chunk_start", "chunk_end"))
            except (KeyError, ValueError) as e:
                problems.append(f"{key}: chunk/chunk_start/chunk_end missing or not integers ({e})")
                continue
            content = f.get("content", b"").decode()
            if chunk != i:
                problems.append(f"{key}: chunk = {chunk}")
            if page.text[start:end] == content:
                span_kind.add("characters")
            elif text_bytes[start:end].decode("utf-8", "replace") == content:
                span_kind.add("bytes")
                problems.append(f"{key}: chunk_start/chunk_end are byte offsets, not character offsets")
            else:
                problems.append(f"{key}: content != text[{start}:{end}] (content {content[:40]!r}..., "
                                f"span {page.text[start:start + 40]!r}...)")
            gap = page.text[prev_end:start] if start > prev_end else ""
            if gap.strip():
                problems.append(f"{key}: text between the previous chunk and this one is in no chunk: {gap[:60]!r}")
            if i > 0 and start < prev_end:
                overlaps.append(len(tok.encode(page.text[start:prev_end], add_special_tokens=False).ids))
            elif i > 0:
                overlaps.append(0)
            prev_end = max(prev_end, end)
            chunk_tokens.append(len(tok.encode(content).ids))
        if page.text[prev_end:].strip():
            problems.append(f"page {doc}: its tail is in no chunk: {page.text[prev_end:prev_end + 60]!r}")
    for doc, parts in by_doc.items():
        problems.append(f"document {doc!r} is no page ({len(parts)} hashes, e.g. {parts[0][0]})")
    over = [n for n in chunk_tokens if cfg.strategy == "tokens" and n > cfg.size]
    return {"problems": problems[:50], "problem_count": len(problems), "span_offsets": sorted(span_kind),
            "chunk_tokens_retokenised": long_docs.percentiles(chunk_tokens) if chunk_tokens else None,
            "chunks_over_size_retokenised": len(over), "overlap_tokens_mean": statistics.fmean(overlaps) if overlaps else None}


def stored_vector_check(embed: Embedder, stored: dict[str, dict], n: int = 24) -> dict:
    """Stored vectors against this script's embedding of the stored `content` (a chunk's own
    text): ~0 when the worker embedded exactly that text."""
    keys = random.Random(5).sample(sorted(stored), min(n, len(stored)))
    ours = embed([stored[k]["content"].decode() for k in keys])
    d = [float(np.linalg.norm(stored[k]["embedding"] - v)) for k, v in zip(keys, ours)]
    worst = int(np.argmax(d))
    return {"sampled": len(keys), "median_l2": statistics.median(d), "max_l2": max(d), "max_key": keys[worst]}


def knn(r, vec: np.ndarray, k: int, ef: int) -> list[tuple[str, str, float]]:
    """(key, document, distance) of the K nearest chunks, nearest first: FT.SEARCH
    "*=>[KNN k @embedding $vec EF_RUNTIME ef AS dist]" SORTBY dist RETURN parent dist."""
    from redis.commands.search.query import Query

    q = (Query(f"*=>[KNN {k} @embedding $vec EF_RUNTIME {ef} AS dist]").sort_by("dist")
         .return_fields("parent", "dist").paging(0, k).dialect(2))
    hits = []
    for d in r.ft(INDEX).search(q, query_params={"vec": vec.astype(np.float32).tobytes()}).docs:
        fields = {"parent": d.parent} if getattr(d, "parent", None) is not None else {}
        hits.append((d.id, document_of(d.id, fields), float(d.dist)))
    return hits


def doc_ranking(hits: list[tuple[str, str, float]]) -> list[str]:
    """Documents in order of their best chunk."""
    seen: dict[str, None] = {}
    for _, doc, _ in sorted(hits, key=lambda h: h[2]):
        seen.setdefault(doc)
    return list(seen)


def metrics(rankings: list[list[str]], answers: list[str]) -> dict:
    ranks = [(r.index(a) + 1) if a in r else None for r, a in zip(rankings, answers)]
    n = len(ranks)
    out = {f"recall@{k}": sum(1 for x in ranks if x and x <= k) / n for k in (1, 5, 10)}
    out["mrr"] = sum(1 / x for x in ranks if x) / n
    out["not_found"] = sum(1 for x in ranks if x is None)
    out["fewer_than_10_docs"] = sum(1 for r in rankings if len(r) < 10)
    out["ranks"] = ranks  # per query, in query order (None = not among the K chunks' documents)
    return out


def paired(results: list[dict], b: dict, k: int = 5) -> list[str]:
    """Each configuration against the best, query by query on the shortened set: how many
    queries only one of the two has in its top k. With ~200 queries one query is 0.005 of
    recall, so a gap of a few queries is no evidence either way."""
    inside = lambda r: [x is not None and x <= k for x in r["sets"]["shortened"]["ranks"]]  # noqa: E731
    best_in = inside(b)
    lines = []
    for r in results:
        if r is b:
            continue
        mine = inside(r)
        gained = sum(1 for x, y in zip(mine, best_in) if x and not y)
        lost = sum(1 for x, y in zip(mine, best_in) if y and not x)
        lines.append(f"  {r['config']:>14}: top-{k} for {gained} queries the best misses, misses {lost} it finds")
    return lines


def exact_rankings(stored: dict[str, dict], qvecs: np.ndarray) -> list[list[str]]:
    """Documents by their nearest stored vector, brute force over all of them (squared L2)."""
    keys = sorted(stored, key=lambda k: document_of(k, stored[k]))
    docs = [document_of(k, stored[k]) for k in keys]
    mat = np.stack([stored[k]["embedding"] for k in keys])
    starts = [i for i in range(len(docs)) if i == 0 or docs[i] != docs[i - 1]]
    names = [docs[i] for i in starts]
    dist = (qvecs ** 2).sum(1)[:, None] + (mat ** 2).sum(1)[None, :] - 2 * qvecs @ mat.T
    best = np.minimum.reduceat(dist, starts, axis=1)  # [queries, documents]
    return [[names[j] for j in np.argsort(row, kind="stable")] for row in best]


def run_config(cfg: Config, docs: list[long_docs.Page], qsets: dict[str, np.ndarray], answers: list[str],
               embed: Embedder, known: bool, a, tok) -> dict:
    rd = bench.Redis()
    try:
        r = rd.client
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        pipe = r.pipeline(transaction=False)
        for page in docs:
            pipe.xadd(STREAM, {"id": str(page.id), "content": page.text})
        pipe.execute()
        before = used_memory(r)
        env = {**bench.worker_env(rd, CASE, a.model_file, a.threads), **cfg.env(known)}
        started = time.perf_counter()
        drain_res = drain(rd, CASE, len(docs), [str(bench.BIN), "run", "--drain"], env)
        wall = time.perf_counter() - started
        after = used_memory(r)
        dead = [(e[1].get(b"reason", b"?").decode(), e[1].get(b"id", b"?").decode())
                for e in r.xrange(f"{STREAM}:dead")]
        stored = read_index(r)
        info = r.ft(INDEX).info()
        num_docs = int(info["num_docs"])
        pipe = r.pipeline(transaction=False)
        for k in stored:
            pipe.memory_usage(k, samples=0)
        hash_bytes = sum(pipe.execute())
        index_bytes = (float(info["vector_index_sz_mb"]) + float(info["total_index_memory_sz_mb"])) * 2**20
        res: dict = {"config": cfg.name, "env": cfg.env(known), "docs": len(docs), "hashes": len(stored),
                     "index_num_docs": num_docs, "chunks_per_doc": len(stored) / len(docs),
                     "dead_letters": dead, "redis_bytes_per_doc": (after - before) / len(docs),
                     "hash_bytes_per_doc": hash_bytes / len(docs), "index_bytes_per_doc": index_bytes / len(docs),
                     "drain": drain_res, "run_wall_s": wall}
        # Tokens the model saw: each stored text's, at most the model's 256 (`none` truncates).
        res["chunk_tokens"] = sum(seen_tokens(tok, [f["content"].decode() for f in stored.values()]))
        res["docs_per_s"] = drain_res["docs_per_s"]
        res["chunk_tokens_per_s"] = res["chunk_tokens"] / drain_res["seconds"]
        res["checks"] = check_output(cfg, docs, stored, tok)
        res["stored_vectors"] = stored_vector_check(embed, stored)
        res["sets"] = {}
        for name, qv in qsets.items():
            t = time.perf_counter()
            rankings = [doc_ranking(knn(r, v, a.k, a.ef_runtime)) for v in qv]
            m = metrics(rankings, answers)
            m["search_s"] = time.perf_counter() - t
            m["exact"] = metrics(exact_rankings(stored, qv), answers)
            res["sets"][name] = m
        return res
    finally:
        rd.close()


def table(results: list[dict]) -> str:
    rows = [("config", "queries", "R@1", "R@5", "R@10", "MRR", "exact R@5", "chunks", "chunks/doc",
             "Redis KB/doc", "hash+idx KB/doc", "drain s", "docs/s", "chunk tok/s")]
    for r in results:
        for name, m in r["sets"].items():
            rows.append((r["config"], name, f"{m['recall@1']:.3f}", f"{m['recall@5']:.3f}", f"{m['recall@10']:.3f}",
                         f"{m['mrr']:.3f}", f"{m['exact']['recall@5']:.3f}", str(r["hashes"]),
                         f"{r['chunks_per_doc']:.1f}", f"{r['redis_bytes_per_doc'] / 1024:.1f}",
                         f"{(r['hash_bytes_per_doc'] + r['index_bytes_per_doc']) / 1024:.1f}",
                         f"{r['drain']['seconds']:.1f}", f"{r['docs_per_s']:.2f}", f"{r['chunk_tokens_per_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def best(results: list[dict]) -> dict:
    return max(results, key=lambda r: (r["sets"]["shortened"]["recall@5"], -r["hashes"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", type=Path, default=bench.BIN, help="embed-worker binary (default: EMBED_WORKER_BIN or target/release)")
    p.add_argument("--configs", nargs="*", type=Config.parse, help="none and/or tokens:SIZE:OVERLAP (default: the grid)")
    p.add_argument("--sizes", nargs="*", type=int, default=[128, 192, 256])
    p.add_argument("--overlaps", nargs="*", type=int, default=[0, 32, 64])
    p.add_argument("--k", type=int, default=100, help="chunks per KNN query")
    p.add_argument("--ef-runtime", type=int, default=400, help="HNSW EF_RUNTIME of the queries")
    p.add_argument("--per-page", type=int, default=10, help="queries per page at most")
    p.add_argument("--min-tokens", type=int, default=long_docs.MIN_TOKENS)
    p.add_argument("--model-file", default="model.onnx")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--smoke", action="store_true", help="4 pages, none + tokens:128:32, under a minute")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    require_env()
    bench.BIN = a.bin
    require_bin(a.bin)
    model_path = require_model(a.model_file)
    tok = long_docs.tokenizer()

    docs = long_docs.pages(a.min_tokens)
    qs = long_docs.queries(docs, a.per_page)
    if a.smoke:
        with_queries = sorted({q.page_id for q in qs}, key=lambda i: docs[i].tokens)[:4]
        docs = [dataclasses.replace(docs[i], id=n) for n, i in enumerate(with_queries)]
        renumber = {old: new for new, old in enumerate(with_queries)}
        qs = [dataclasses.replace(q, page_id=renumber[q.page_id]) for q in qs if q.page_id in renumber]
        qs = [q for q in qs if sum(1 for x in qs[:qs.index(q)] if x.page_id == q.page_id) < 3]
    configs = a.configs or ([Config("none"), Config("tokens", 128, 32)] if a.smoke else
                            [Config("none")] + [Config("tokens", s, o) for s in a.sizes for o in a.overlaps
                                                 if o <= (s - 2) // 2])  # the worker's rule
    print(long_docs.describe(docs, qs), flush=True)

    probe_env = bench.worker_env(types.SimpleNamespace(url="redis://127.0.0.1:1"), CASE, a.model_file, a.threads)
    known, why = chunking_known(probe_env)
    if not known and any(c.strategy != "none" for c in configs):
        sys.exit(f"{a.bin} does not know the [chunk] settings ({why}): use the chunking build (--bin) "
                 "or --configs none")
    embed = Embedder(model_path, a.threads)
    vcheck = vector_check(embed, probe_env, docs)
    print(f"vectors here vs `embed-worker embed`: max L2 distance {vcheck['max_l2']:.2e} over {vcheck['texts']} texts"
          f" ({'chunking build' if known else 'binary without [chunk]: none only, run without CHUNK settings'})",
          flush=True)
    answers = [str(q.page_id) for q in qs]
    qsets = {"shortened": embed([q.text for q in qs]), "verbatim": embed([q.verbatim for q in qs])}

    results = []
    started = time.perf_counter()
    for cfg in configs:
        t = time.perf_counter()
        res = run_config(cfg, docs, qsets, answers, embed, known, a, tok)
        res["seconds"] = time.perf_counter() - t
        res["loadavg"] = os.getloadavg()
        results.append(res)
        s = res["sets"]["shortened"]
        c = res["checks"]
        print(f"{cfg.name}: {res['hashes']} hashes ({res['chunks_per_doc']:.1f} per document), "
              f"R@5 {s['recall@5']:.3f} shortened / {res['sets']['verbatim']['recall@5']:.3f} verbatim, "
              f"drain {res['drain']['seconds']:.1f} s, config {res['seconds']:.0f} s; "
              f"{c['problem_count']} output problems, {len(res['dead_letters'])} dead letters, "
              f"stored-vector max L2 {res['stored_vectors']['max_l2']:.2e}"
              + (f"; chunk tokens median {c['chunk_tokens_retokenised']['median']:.0f}, max "
                 f"{c['chunk_tokens_retokenised']['max']}, overlap mean {c['overlap_tokens_mean']:.1f} tokens"
                 if c["chunk_tokens_retokenised"] and c["overlap_tokens_mean"] is not None else ""), flush=True)
        for line in c["problems"][:5]:
            print(f"  problem: {line}", flush=True)
    total = time.perf_counter() - started
    print()
    print(table(results))
    b = best(results)
    print(f"\nbest: {b['config']} (recall@5 {b['sets']['shortened']['recall@5']:.3f} on the shortened queries, "
          f"{b['hashes']} chunks, {b['chunks_per_doc']:.1f} per document); query by query against it:")
    print("\n".join(paired(results, b)))
    print(f"{len(docs)} documents, {len(qs)} queries per set, K = {a.k} chunks per query, EF_RUNTIME {a.ef_runtime}; "
          f"{total:.0f} s for {len(results)} configurations")
    out = a.out or bench.OUT / ("chunk_quality_smoke.json" if a.smoke else "chunk_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bin": str(a.bin), "chunking_build": known, "model": a.model_file, "threads": a.threads, "k": a.k,
        "ef_runtime": a.ef_runtime, "max_chunks": MAX_CHUNKS, "vector_check": vcheck, "seconds": total,
        "pages": [{"id": d.id, "topic": d.topic, "tokens": d.tokens} for d in docs],
        "queries": [dataclasses.asdict(q) for q in qs], "results": results, "best": b["config"]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
