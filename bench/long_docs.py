"""Long real documents and deep queries for the chunking benchmarks (no downloads).

* pages(): whole help pages of the CPython documentation that ships with every Python
  (`pydoc_data.topics.topics`, one value = one page, e.g. "Assignment statements"), those of at
  least MIN_TOKENS tokens (all-MiniLM-L6-v2's WordPiece from tokenizer.json, [CLS]/[SEP]
  counted, no truncation), in sorted topic order. Page ids are 0, 1, 2, ... in that order.
* queries(): prose sentences (prose_sentences(): no code lines, tables, grammar or
  markup-heavy sentences, no version notes) that start past what the model sees of the page when it truncates at 256 tokens,
  a seeded choice of up to `per_page` per page. Each becomes two queries that know their page:
  `verbatim` (the sentence as written) and `text` (about a third of its words dropped by a
  seeded RNG, order kept), so a hit needs more than an exact copy. A sentence that also occurs
  in another page is skipped (its answer would be ambiguous).
* big_text(): ~900 KB of real text for the memory benchmark: pages joined in a per-entry
  shuffled order, so no two entries are equal.

    .venv/bin/python bench/long_docs.py          # stats: pages, token lengths, queries
    .venv/bin/python bench/long_docs.py --show 3 # and a few queries
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MIN_TOKENS = 600  # a page shorter than this is not "long" (2.3 windows of 256 tokens)
MAX_LEN = 256  # the model's max_seq_length: what `chunk.strategy = "none"` sees
MIN_QUERY_WORDS = 8  # shorter sentences are too generic to have one answer page
MAX_QUERY_WORDS = 60
# Version notes repeat one template on many pages: no answer page of their own.
BOILERPLATE = ("New in version", "Changed in version", "Deprecated since version", "Added in version")


@dataclasses.dataclass(frozen=True)
class Page:
    id: int
    topic: str
    text: str
    tokens: int
    visible_chars: int  # characters of `text` the model sees when it truncates at MAX_LEN tokens


@dataclasses.dataclass(frozen=True)
class Query:
    page_id: int
    verbatim: str  # the sentence as it is in the page (whitespace normalised)
    text: str  # the same with ~1/3 of its words dropped, order kept
    char_start: int  # where the sentence starts in the page text
    token_start: int  # index of its first token in the page's encoding ([CLS] = 0)


def tokenizer():
    """all-MiniLM-L6-v2's tokenizer, no padding, no truncation. Exits with the fix if missing."""
    from tokenizers import Tokenizer

    path = Path(os.environ.get("EMBED_WORKER_MODEL_DIR", ROOT / "onnx/all-MiniLM-L6-v2")) / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"{path} missing: run `make model` (or set EMBED_WORKER_MODEL_DIR)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


@functools.cache
def _encodings() -> tuple[tuple[str, str, object], ...]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    encs = tokenizer().encode_batch([topics[k] for k in keys])
    return tuple((k, topics[k], e) for k, e in zip(keys, encs))


def pages(min_tokens: int = MIN_TOKENS) -> list[Page]:
    """The help pages of at least `min_tokens` tokens, ids 0.. in sorted topic order."""
    out = []
    for topic, text, enc in _encodings():
        if len(enc.ids) < min_tokens:
            continue
        # offsets[MAX_LEN - 2] is the last content token kept under truncation ([CLS] + 254 + [SEP]).
        visible = enc.offsets[min(MAX_LEN - 2, len(enc.ids) - 2)][1]
        out.append(Page(len(out), topic, text, len(enc.ids), visible))
    return out


def _indent(para: str) -> int:
    line = para.lstrip("\n")
    return len(line) - len(line.lstrip(" "))


def prose_sentences(text: str) -> list[str]:
    """The prose sentences of one page, in order, whitespace normalised. Unlike corpus.py's rule
    an indented paragraph counts (pydoc indents every description under a signature, e.g.
    "str.center(width)"), except a literal block: one indented deeper than the paragraph before
    it when that one ends with ":" (reST "::"), an interpreter session, a table or a grammar."""
    out, prev = [], None
    for para in re.split(r"\n\s*\n", text):
        body = para.strip()
        if not body:
            continue
        literal = prev is not None and prev[0].endswith(":") and _indent(para) > prev[1]
        if literal or body.startswith((">>>", "...", "|", "+-", "==", "-", "#")) or "::=" in body:
            continue
        prev = (body, _indent(para))
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(body.split())):
            if (len(s.split()) >= 4 and s[-1] in ".!?" and not re.search(r"[{}=<>\[\]]|::|\\\\|>>>", s)
                    and not s.startswith(BOILERPLATE)):
                out.append(s)
    return out


def _locate(sentence: str, text: str, start: int) -> int | None:
    """Character offset of `sentence` (whitespace normalised) in `text`, searching from `start`."""
    pattern = r"\s+".join(re.escape(w) for w in sentence.split())
    m = re.compile(pattern).search(text, start)
    return m.start() if m else None


def _token_index(enc, char: int) -> int:
    """Index of the first token that starts at or after `char`."""
    for i, (s, e) in enumerate(enc.offsets):
        if i > 0 and e > s and s >= char:
            return i
    return len(enc.ids)


def _shorten(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    drop = set(rng.sample(range(len(words)), len(words) // 3))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


def queries(docs: list[Page], per_page: int = 10, seed: int = 0) -> list[Query]:
    """Up to `per_page` deep sentences per page (see the module doc), seeded, in page order."""
    encs = {topic: enc for topic, _, enc in _encodings()}
    candidates: dict[int, list[tuple[str, int]]] = {}
    owners: dict[str, set[int]] = {}
    for page in docs:
        found, cursor = [], 0
        for s in prose_sentences(page.text):
            at = _locate(s, page.text, cursor)
            if at is None:  # normalisation moved it; never guess an offset
                continue
            cursor = at + 1
            owners.setdefault(s, set()).add(page.id)
            if at >= page.visible_chars and MIN_QUERY_WORDS <= len(s.split()) <= MAX_QUERY_WORDS:
                found.append((s, at))
        candidates[page.id] = found
    out = []
    for page in docs:
        rng = random.Random(f"long-docs-{seed}-{page.topic}")
        unique = [(s, at) for s, at in candidates[page.id] if owners[s] == {page.id}]
        picked = sorted(rng.sample(unique, min(per_page, len(unique))), key=lambda x: x[1])
        for s, at in picked:
            out.append(Query(page.id, s, _shorten(s, rng), at, _token_index(encs[page.topic], at)))
    return out


def big_text(i: int, target_bytes: int = 900 * 1024) -> str:
    """Entry `i`'s ~`target_bytes` of real text (UTF-8 bytes, never more): every help page,
    reshuffled on each pass with a seed of its own, joined by blank lines; the last page is cut
    at a word boundary."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    rng = random.Random(f"big-{i}")
    parts = [f"Document {i}."]
    size = len(parts[0])
    while True:
        rng.shuffle(keys)
        for k in keys:
            part = topics[k].strip().encode()
            room = target_bytes - size - 2
            if len(part) >= room:
                parts.append(part[:max(room, 0)].decode("utf-8", "ignore").rsplit(" ", 1)[0])
                return "\n\n".join(parts)
            parts.append(part.decode())
            size += 2 + len(part)


def percentiles(values: list[int]) -> dict:
    q = statistics.quantiles(values, n=20, method="inclusive") if len(values) > 1 else values * 19
    return {"min": min(values), "p5": q[0], "median": statistics.median(values), "mean": statistics.fmean(values),
            "p95": q[18], "max": max(values)}


def describe(docs: list[Page], qs: list[Query]) -> str:
    p = percentiles([d.tokens for d in docs])
    depth = percentiles([q.token_start for q in qs]) if qs else None
    lines = [f"pages: {len(docs)} of at least {MIN_TOKENS} tokens, {sum(d.tokens for d in docs):,} tokens, "
             f"{sum(len(d.text) for d in docs):,} characters",
             "page tokens: " + ", ".join(f"{k} {v:,.0f}" for k, v in p.items()),
             f"queries: {len(qs)} (x2: shortened and verbatim) from {len({q.page_id for q in qs})} pages"]
    if depth:
        lines.append("query depth (first token's index in its page): " + ", ".join(f"{k} {v:,.0f}" for k, v in depth.items()))
        lines.append(f"query words: shortened mean {statistics.fmean(len(q.text.split()) for q in qs):.1f}, "
                     f"verbatim mean {statistics.fmean(len(q.verbatim.split()) for q in qs):.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-page", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print this many queries")
    a = p.parse_args()
    docs = pages()
    qs = queries(docs, a.per_page, a.seed)
    print(describe(docs, qs))
    for q in qs[: a.show]:
        print(f"\npage {q.page_id} ({docs[q.page_id].topic}), token {q.token_start}:\n  verbatim: {q.verbatim}\n  query:    {q.text}")


if __name__ == "__main__":
    main()
