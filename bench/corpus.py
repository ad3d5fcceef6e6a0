"""Deterministic benchmark and calibration corpora (no downloads).

* short: real English sentences, ~3,900 of them, from the documentation that ships inside every
  CPython (pydoc_data.topics, the language reference's prose, and the docstrings of a fixed list
  of stdlib modules): mean ~24 tokens (all-MiniLM-L6-v2's WordPiece, with [CLS]/[SEP]), median
  20, spread 10-51 (5th-95th percentile), as real sentences are. The same for the same Python
  version and seed.
* uniform: one templated sentence, every one 19-29 tokens: the case where length-aware
  batching has no padding to remove.
* long: passages of that same documentation, ~360 of them, cut as a RAG text splitter cuts a
  document: consecutive prose sentences packed into chunks of at most 1,000 characters (the
  common `chunk_size` default), chunks under 400 characters (a document's tail) dropped. Mean
  ~186 tokens, median 196, 5th-95th percentile 101-256 (6% reach the model's 256-token limit).
* long-uniform: a templated paragraph of sentences on one topic, every one 183-209 tokens.

Templated texts come from topic word lists with a seeded RNG, so every run of `make bench`
and `make model-int8` sees the same texts.

    python bench/corpus.py short 5 --seed 1     # print 5 short texts
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import random
import re

TOPICS = {
    "weather": (
        ["storm", "forecast", "rainfall", "heatwave", "breeze", "cloud cover", "snowfall", "humidity", "drought", "thunder"],
        ["coastal towns", "the northern valley", "farmers", "commuters", "the harbour", "mountain villages"],
        ["arrived", "lingered", "cleared", "intensified", "moved east", "surprised forecasters"],
    ),
    "cooking": (
        ["recipe", "sauce", "sourdough loaf", "spice blend", "stew", "pastry", "marinade", "broth", "risotto", "salad"],
        ["the chef", "home cooks", "the bakery", "a small restaurant", "our grandmother", "the cooking class"],
        ["simmered slowly", "needed more salt", "tasted smoky", "was served warm", "rose overnight", "won praise"],
    ),
    "software": (
        ["database", "compiler", "deployment", "memory leak", "release", "cache", "scheduler", "API", "test suite", "queue"],
        ["the engineers", "the on-call team", "open source maintainers", "the startup", "our customers", "the reviewers"],
        ["crashed at midnight", "shipped on time", "ran twice as fast", "needed a rollback", "passed every check", "leaked memory"],
    ),
    "sports": (
        ["match", "striker", "marathon", "goalkeeper", "tournament", "coach", "relay team", "final", "season", "penalty"],
        ["the fans", "the home side", "the visiting club", "young athletes", "the referee", "the commentators"],
        ["ended in a draw", "broke the record", "was postponed", "turned the game around", "drew a huge crowd", "lost narrowly"],
    ),
    "finance": (
        ["interest rate", "stock price", "budget", "bond market", "inflation", "quarterly report", "loan", "pension fund", "currency", "tax reform"],
        ["investors", "the central bank", "small businesses", "analysts", "households", "the treasury"],
        ["fell sharply", "rose unexpectedly", "stayed flat", "worried markets", "beat estimates", "was revised upward"],
    ),
    "health": (
        ["vaccine", "clinic", "diet", "sleep study", "therapy", "hospital ward", "blood test", "exercise plan", "allergy", "surgery"],
        ["patients", "the nurses", "researchers", "older adults", "the doctors", "parents"],
        ["showed promise", "reduced symptoms", "was delayed", "improved recovery", "raised questions", "went smoothly"],
    ),
    "travel": (
        ["flight", "train journey", "hotel", "ferry", "road trip", "museum visit", "passport", "mountain hike", "beach resort", "tour"],
        ["tourists", "the family", "backpackers", "the travel agent", "pilgrims", "business travellers"],
        ["was cancelled", "felt unforgettable", "ran late", "cost too much", "offered stunning views", "sold out quickly"],
    ),
    "pets": (
        ["dog", "kitten", "parrot", "hamster", "puppy", "old cat", "goldfish", "rabbit", "horse", "tortoise"],
        ["the children", "the vet", "our neighbours", "the shelter", "a happy person", "the owners"],
        ["barked all night", "learned a new trick", "slept in the sun", "ran across the park", "needed a checkup", "was adopted"],
    ),
}
ADJ = ["quiet", "sudden", "remarkable", "ordinary", "careful", "unusual", "bright", "long-awaited", "modest", "difficult", "cheerful", "strange"]
TIME = ["on Monday", "last winter", "this morning", "after a long delay", "during the holidays", "late on Friday", "in early spring", "yesterday afternoon"]
TEMPLATES = [
    "The {adj} {noun} {verb} {time}, and {who} said they had never seen anything like it.",
    "{Who} noticed that the {noun} {verb} {time}, which made the whole week feel {adj}.",
    "According to {who}, the {adj} {noun} {verb} {time} because nobody had planned for it.",
    "{Time}, the {noun} {verb}, so {who} decided to try something {adj} next time.",
    "It was a {adj} day for {who}: the {noun} {verb} {time} and everyone talked about it.",
]


def sentence(rng: random.Random, topic: str | None = None) -> str:
    topic = topic or rng.choice(sorted(TOPICS))
    nouns, whos, verbs = TOPICS[topic]
    who = rng.choice(whos)
    time = rng.choice(TIME)
    return rng.choice(TEMPLATES).format(
        adj=rng.choice(ADJ), noun=rng.choice(nouns), verb=rng.choice(verbs),
        who=who, Who=who[0].upper() + who[1:], time=time, Time=time[0].upper() + time[1:],
    )


def paragraph(rng: random.Random, sentences: int = 9) -> str:
    """About 200 tokens: several sentences on one topic (a second topic sometimes drifts in)."""
    topic = rng.choice(sorted(TOPICS))
    return " ".join(sentence(rng, topic if rng.random() < 0.8 else None) for _ in range(sentences))


# Stdlib modules whose docstrings add to pydoc_data's sentences (a fixed list: same order, same texts).
DOC_MODULES = ["argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
               "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
               "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "pathlib", "pickle",
               "random", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
               "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile"]


def _documentation():
    import pydoc_data.topics
    for key in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[key]
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        yield inspect.getdoc(module) or ""
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            yield inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                yield from (inspect.getdoc(v) or "" for k, v in sorted(vars(obj).items()) if not k.startswith("_"))


def _prose_sentences(text: str) -> list[str]:
    """The prose sentences of one document, in order. Code examples, tables and sentences with
    markup-heavy characters are left out."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if para.startswith(" ") or para.lstrip().startswith((">>>", "|", "+-", "==", "-")):
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
            if len(s.split()) >= 4 and s[-1] in ".!?" and not re.search(r"[{}=<>\[\]]|::|\\\\|>>>", s):
                out.append(s)
    return out


@functools.cache
def real_sentences() -> tuple[str, ...]:
    """Prose sentences of the CPython documentation, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for text in _documentation():
        for s in _prose_sentences(text):
            seen.setdefault(s)
    return tuple(seen)


CHUNK_CHARS = 1000  # the usual chunk_size of character-based text splitters
CHUNK_MIN_CHARS = 400


@functools.cache
def real_passages() -> tuple[str, ...]:
    """Each document's prose sentences packed greedily into chunks of at most CHUNK_CHARS
    characters (a sentence never split), deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for text in _documentation():
        chunk = ""
        for s in _prose_sentences(text) + [""]:  # "" flushes the document's last chunk
            if chunk and (not s or len(chunk) + 1 + len(s) > CHUNK_CHARS):
                if len(chunk) >= CHUNK_MIN_CHARS:
                    seen.setdefault(chunk)
                chunk = ""
            chunk = f"{chunk} {s}" if chunk else s
    return tuple(seen)


def _draw(pool: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """`n` texts from `pool` without repetition until it is used up, then a new shuffle."""
    rest, out = list(pool), []
    while len(out) < n:
        rng.shuffle(rest)
        out += rest[: n - len(out)]
    return out


KINDS = ("short", "uniform", "long", "long-uniform")


def texts(kind: str, n: int, seed: int = 0) -> list[str]:
    """`n` texts of `kind` (one of KINDS), the same for the same seed. The real-text kinds draw
    without repetition until their pool is used up, then start a new shuffle."""
    # long-uniform keeps the seed name it had as "long", so calibration texts stay the same.
    rng = random.Random(f"{'long' if kind == 'long-uniform' else kind}-{seed}")
    if kind == "short":
        return _draw(real_sentences(), n, rng)
    if kind == "long":
        return _draw(real_passages(), n, rng)
    if kind == "uniform":
        return [sentence(rng) for _ in range(n)]
    if kind == "long-uniform":
        return [paragraph(rng) for _ in range(n)]
    raise ValueError(f"unknown corpus kind {kind!r} ({', '.join(KINDS)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("n", type=int)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for t in texts(a.kind, a.n, a.seed):
        print(t)


if __name__ == "__main__":
    main()
