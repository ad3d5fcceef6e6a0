"""deploy/redis-acl.conf: it loads in a real redis-server with the search module, grants the
embed-worker user every command the worker sends (on the keys it uses), and refuses the rest;
the embed-reindex user (`embed-worker reindex`), the producer and keda users likewise get only
what they need.
"""

from __future__ import annotations

import fnmatch
import json
import struct

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from deploy_support import ACL_FILE, ROOT, commands_of, even_slot_ranges, key_slot, parse_acl, patterns_of

LIBRARY = (ROOT / "src" / "store" / "documents.lua").read_text()

ACL = parse_acl(ACL_FILE.read_text())
USERS = {"embed-worker", "embed-reindex", "producer", "keda"}

# Exactly what the worker may run. Widening the ACL means changing this list on purpose.
WORKER_COMMANDS = {
    # connection set-up (AUTH and HELLO are always allowed; HELLO is listed for clarity)
    "ping", "hello", "client|setname", "client|setinfo",
    # one server or a cluster: `redis.cluster = "auto"` asks INFO cluster (only that section:
    # INFO's first argument is restricted), the redis crate's cluster client fetches the slot map
    # with CLUSTER SLOTS and sends ASKING before a command redirected by ASK (a slot being moved);
    # `redis.wait_replicas` sends WAIT before acking
    "info|cluster", "cluster|slots", "asking", "wait",
    # WAIT asks each primary for no more replicas than it has: INFO replication on every primary,
    # re-read every few seconds (src/store/replicas.rs)
    "info|replication",
    # a cluster whose search module has no coordinator (src/store/fanout.rs): COMMAND INFO tells
    # one (_FT.SEARCH registered or not); then one index per primary, found with FT._LIST and the
    # primary's own CLUSTER NODES line (its slots), and INFO search for the module's queue (best
    # effort: the metrics leave it out when refused)
    "command|info", "ft._list", "cluster|nodes", "info|search",
    # consume, ack, reclaim, renew the leases on entries in hand (XCLAIM ... JUSTID), dead-letter,
    # housekeeping
    "xreadgroup", "xack", "xadd", "xautoclaim", "xclaim", "xpending",
    "xgroup|create", "xgroup|delconsumer",
    "xinfo|groups", "xinfo|consumers", "xinfo|stream", "xlen",
    # document writes and the model record: the embed_worker function library
    # (src/store/documents.lua), loaded at start-up and called by name (a plain pipeline of
    # FCALLs: no MULTI/EXEC, no EVAL)
    "fcall", "function|load",
    # the index (the one the model record names): create if missing, check, query
    "ft.create", "ft.alter", "ft.info", "ft.search",
}
# The worker's keys: streams, tombstones and the model record (embed:*), documents, and the
# index: `vector_idx` itself, or after a reindex `vector_idx@<fingerprint>` (and the alias), and
# on a cluster without search coordinator each other primary's own `vector_idx{<n>}`.
WORKER_PATTERNS = ["embed:*", "doc:*", "vector_idx", "vector_idx@*", "vector_idx{*}"]
# What the functions run inside FCALL (ew_upsert, ew_touch, ew_delete, ew_adopt), each only on its
# own keys: documents, tombstones, and the model record. The worker also reads the record with a
# plain HGETALL at start-up. With index.storage = "json" (ew_json_upsert, ew_json_touch,
# ew_json_delete) a document is read with JSON.GET and written whole with JSON.SET; those never
# run JSON.MERGE or JSON.DEL (a JSON touch always rewrites with JSON.SET).
WORKER_SELECTORS = [
    ({"hmget", "hgetall", "hkeys", "exists", "hset", "del", "json.get", "json.set"}, ["doc:*"]),
    ({"get", "set", "del"}, ["embed:tomb:*"]),
    ({"hmget", "hgetall", "exists", "hset"}, ["embed:index:*"]),
]
# Exactly what `embed-worker reindex` (src/commands/reindex.rs) may run: an operator's command,
# never the worker's.
REINDEX_COMMANDS = {
    "ping", "hello", "client|setname", "client|setinfo",
    # the same connection as the worker's, to one server or a cluster
    "info|cluster", "cluster|slots", "asking",
    # every stored document, once (SCAN MATCH doc:* TYPE hash)
    "scan",
    # the library (loaded if missing or older), ew_reembed and ew_retire
    "fcall", "function|load",
    # the next model's index: create, wait for it to fill, find what still lacks its vector
    "ft.create", "ft.info", "ft.search",
    # the switch, in one MULTI: the first index goes, its name becomes the new one's alias;
    # --drop-old drops the previous model's index
    "multi", "exec", "ft.dropindex", "ft.aliasupdate",
}
REINDEX_PATTERNS = ["doc:*", "embed:index:*", "vector_idx", "vector_idx@*"]
# Documents: read their text and version (HMGET; on JSON, JSON.GET key $.a $.b ...), and inside
# ew_reembed / ew_retire add or remove a model's vector (on JSON: ew_json_reembed, ew_json_retire
# with JSON.GET, JSON.MERGE, JSON.DEL). The record: read, name the next model, hold writers off,
# switch, forget the old.
REINDEX_SELECTORS = [
    ({"hmget", "hget", "hset", "hdel", "json.get", "json.merge", "json.del"}, ["doc:*"]),
    ({"hgetall", "hmget", "hget", "hset", "hdel"}, ["embed:index:*"]),
]
# A producer on a cluster: `embed-worker enqueue` connects as the worker does; redis-py's and
# go-redis's cluster clients also read the command table (COMMAND) to find each command's keys.
PRODUCER_COMMANDS = {"ping", "hello", "client|setname", "client|setinfo",
                     "info|cluster", "cluster|slots", "asking", "command", "xadd"}
# KEDA's redis-streams scalers: the lag trigger checks the server's version with a plain INFO
# first (Redis 7+); redis-cluster-streams is go-redis's cluster client (CLUSTER SLOTS, COMMAND,
# ASKING).
KEDA_COMMANDS = {"ping", "hello", "client|setname", "client|setinfo", "info", "cluster|slots", "asking", "command",
                 "xinfo|groups", "xpending", "xlen"}

STREAM, GROUP, DEAD, INDEX, PREFIX = "embed:docs", "embedders", "embed:docs:dead", "vector_idx", "doc:"
RECORD = f"embed:index:{{{INDEX}}}"
DIM = 4
# Two model fingerprints (16 hex digits, as src/model names them).
FP1, FP2 = "0123456789abcdef", "fedcba9876543210"


def primary_index_names(base: str, primaries: int) -> list[str]:
    """The index name of each primary of an even slot layout on a cluster without search
    coordinator, as src/store/fanout.rs `shard_index_name` picks it: `base` on the primary serving
    its slot, elsewhere the smallest `base{<n>}` that hashes to one of the primary's slots."""
    names = []
    for slots in even_slot_ranges(primaries):
        n = 0
        name = base
        while key_slot(name) not in slots:
            name, n = f"{base}{{{n}}}", n + 1
        names.append(name)
    return names


def vec(*xs: float) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


def jvec(*xs: float) -> str:
    """A vector as a JSON document stores it (src/store/documents.rs `vector`): an array of numbers."""
    return json.dumps([float(x) for x in xs])


def js(value: str) -> str:
    """A field value as the JSON functions take it: JSON text (a string as a JSON string)."""
    return json.dumps(value)


def tomb(key: str) -> str:
    return f"embed:tomb:{{{key}}}"


def doc_keys(key: str, chunks: int = 1) -> list[str]:
    """KEYS of ew_upsert / ew_touch / ew_delete: the document, its tombstone, the model record,
    then its chunk keys (at least #0)."""
    return [key, tomb(key), RECORD, *(f"{key}#{n}" for n in range(chunks))]


def create_index(client: redis.Redis, name: str = INDEX, field: str = "embedding", model_tag: bool = False):
    """As src/store/index.rs creates it (a reindex's index: its own vector field AS embedding, and
    __ew_model as a TAG)."""
    schema = ["content", "TEXT", "genre", "TAG", "parent", "TAG"]
    if model_tag:
        schema += ["__ew_model", "TAG", "SEPARATOR", " "]
    schema += [field] + (["AS", "embedding"] if field != "embedding" else [])
    schema += ["VECTOR", "HNSW", "10", "TYPE", "FLOAT32", "DIM", str(DIM), "DISTANCE_METRIC", "L2",
               "M", "16", "EF_CONSTRUCTION", "200"]
    return client.execute_command("FT.CREATE", name, "ON", "HASH", "PREFIX", "1", PREFIX, "SCHEMA", *schema)


def json_path(name: str) -> str:
    """As src/store/index.rs `json_path`: $.name for a plain identifier, else $["name"]."""
    plain = (name[:1].isascii() and (name[:1].isalpha() or name[:1] == "_")
             and all(c.isascii() and (c.isalnum() or c == "_") for c in name))
    return f"$.{name}" if plain else f"$[{json.dumps(name)}]"


def create_json_index(client: redis.Redis, name: str = INDEX, field: str = "embedding", model_tag: bool = False):
    """create_index with index.storage = "json": ON JSON, every field its path AS its name."""
    schema = [json_path("content"), "AS", "content", "TEXT", json_path("genre"), "AS", "genre", "TAG",
              json_path("parent"), "AS", "parent", "TAG"]
    if model_tag:
        schema += [json_path("__ew_model"), "AS", "__ew_model", "TAG", "SEPARATOR", " "]
    schema += [json_path(field), "AS", "embedding", "VECTOR", "HNSW", "10", "TYPE", "FLOAT32", "DIM", str(DIM),
               "DISTANCE_METRIC", "L2", "M", "16", "EF_CONSTRUCTION", "200"]
    return client.execute_command("FT.CREATE", name, "ON", "JSON", "PREFIX", "1", PREFIX, "SCHEMA", *schema)


# ---------------------------------------------------------------------------------------------
# The file itself


def test_acl_file_has_only_user_lines():
    # Redis refuses an ACL file with comment lines (and aborts start-up), so all explanation lives
    # in deploy/README.md; this keeps someone from "documenting" the file into a broken one.
    for n, line in enumerate(ACL_FILE.read_text().splitlines(), 1):
        assert not line.strip() or line.startswith("user "), f"line {n} is not a user line: {line!r}"


def test_acl_users_and_their_grants():
    assert set(ACL) == USERS
    assert ACL["embed-worker"].commands == WORKER_COMMANDS
    assert ACL["embed-worker"].key_patterns == WORKER_PATTERNS
    assert [(commands_of(s), patterns_of(s)) for s in ACL["embed-worker"].selectors] == WORKER_SELECTORS
    assert ACL["embed-reindex"].commands == REINDEX_COMMANDS
    assert ACL["embed-reindex"].key_patterns == REINDEX_PATTERNS
    assert [(commands_of(s), patterns_of(s)) for s in ACL["embed-reindex"].selectors] == REINDEX_SELECTORS
    assert ACL["producer"].commands == PRODUCER_COMMANDS
    assert ACL["keda"].commands == KEDA_COMMANDS


@pytest.mark.parametrize("user", sorted(ACL))
def test_acl_users_are_least_privilege(user):
    rules = ACL[user].rules
    assert "on" in rules
    assert "-@all" in rules and rules.index("-@all") < min(
        i for i, r in enumerate(rules) if r.startswith("+")), "start from nothing, then add"
    for broad in ("+@all", "allcommands", "allkeys", "~*", "nopass", "&*", "allchannels"):
        assert broad not in rules, f"{user}: {broad} is too broad"
    assert not any(r.startswith("+@") for r in rules), f"{user}: grant commands, not categories"
    assert ACL[user].key_patterns, f"{user}: no key pattern"
    assert [r for r in rules if r.startswith(">")] == [">changeme"], \
        f"{user}: the only password in the file is the placeholder; the real one comes from the Secret"


@pytest.mark.parametrize("user", ["embed-worker", "embed-reindex"])
def test_index_patterns_cover_the_index_and_its_reindexed_successors_only(user):
    patterns = ACL[user].key_patterns
    covered = lambda key: any(fnmatch.fnmatchcase(key, p) for p in patterns)
    assert covered(INDEX) and covered(f"{INDEX}@{FP2}")
    assert not covered("vector_idx_other") and not covered("other_idx")
    assert not covered("vector_idxx{7}") and not covered("{vector_idx}")


@pytest.mark.parametrize("primaries", [2, 3, 6])
def test_worker_patterns_cover_every_primarys_own_index(primaries):
    # On a cluster without search coordinator the worker keeps one index per primary; only it
    # does (reindex refuses to run on a cluster), so only its patterns take `vector_idx{<n>}`.
    covered = lambda user, key: any(fnmatch.fnmatchcase(key, p) for p in ACL[user].key_patterns)
    for base in (INDEX, f"{INDEX}@{FP2}"):
        names = primary_index_names(base, primaries)
        assert len(set(names)) == primaries and any(n != base for n in names), names
        for name in names:
            assert covered("embed-worker", name), name
            assert not covered("producer", name) and not covered("keda", name), name
    assert [covered("embed-reindex", n) for n in primary_index_names(INDEX, primaries)].count(True) == 1


def test_keda_user_is_read_only():
    patterns = [r for r in ACL["keda"].rules if "~" in r]
    assert patterns and all(r.startswith("%R~") for r in patterns), patterns


# ---------------------------------------------------------------------------------------------
# Loaded into a real server


def login(server, user: str) -> redis.Redis:
    return server.client(user, ACL[user].password)


def test_file_loads_and_reloads(redis_server):
    admin = redis_server.client()
    assert USERS <= set(admin.acl_users())
    # ACL LOAD re-parses the file: an error would come back here instead of at the next restart.
    assert admin.execute_command("ACL", "LOAD")
    for user in ACL:
        assert login(redis_server, user).ping(), f"{user} cannot log in with its placeholder password"


def test_worker_can_run_the_whole_pipeline(redis_server):
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")  # RESP3: HELLO 3 AUTH ...
    producer = login(redis_server, "producer")
    keda = login(redis_server, "keda")
    consumer = "embed-worker-7d9f-abcde"

    assert worker.ping()
    assert worker.client_setname(consumer)
    assert worker.execute_command("CLIENT", "SETINFO", "LIB-NAME", "redis-rs")
    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    # Start-up: the model record (none yet), the index it would name, then ew_adopt records this
    # worker's model as the index's and answers the record.
    assert worker.hgetall(RECORD) == {}
    with pytest.raises(ResponseError, match="Unknown index name|no such index"):
        worker.execute_command("FT.INFO", INDEX)
    adopted = worker.fcall("ew_adopt_v5", 1, RECORD, FP1, "all-MiniLM-L6-v2", INDEX, "embedding")
    record = dict(zip(adopted[::2], adopted[1::2]))
    assert record == {"fingerprint": FP1, "model": "all-MiniLM-L6-v2", "index": INDEX,
                      "vector_field": "embedding", "writers": FP1}
    assert worker.hgetall(RECORD) == record
    # A second worker of another model gets the same record back, unchanged.
    assert worker.fcall("ew_adopt_v5", 1, RECORD, FP2, "other", INDEX, "embedding") == adopted
    worker.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    assert create_index(worker)
    assert worker.execute_command("FT.INFO", INDEX)
    # PARTIAL_INDEXED_DOCS is only read if the user may; the worker is not granted FT.CONFIG.
    with pytest.raises(NoPermissionError):
        worker.execute_command("FT.CONFIG", "GET", "PARTIAL_INDEXED_DOCS")

    ids = [producer.xadd(STREAM, {"id": str(i), "content": f"doc {i}", "genre": "g"}) for i in range(3)]
    # What KEDA's lag trigger reads (Redis 7+): three entries not yet delivered to the group.
    (group,) = keda.xinfo_groups(STREAM)
    assert group["lag"] == 3
    assert keda.xlen(STREAM) == 3

    read = worker.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=256, block=100)
    entries = read[STREAM][0]  # RESP3: {stream: [entries]}
    assert [e[0] for e in entries] == ids

    assert keda.xpending(STREAM, GROUP)["pending"] == 3  # what the pending trigger reads

    with worker.pipeline(transaction=False) as pipe:  # as the worker writes: no MULTI
        for i, entry in enumerate(ids):
            key = f"{PREFIX}{i}"
            # KEYS: the document, its tombstone, the model record, its chunk 0; ARGV: version,
            # entry, the writer's fingerprint, the text's digest, 1 chunk, 0 shared fields, then
            # the chunk's 3 field pairs (src/store/documents.lua).
            pipe.fcall("ew_upsert_v5", 4, *doc_keys(key), "0", entry, FP1, f"digest{i}", "1", "0", "3",
                       "content", f"doc {i}", "genre", "g", "embedding", vec(i, 0, 0, 0))
        assert pipe.execute() == ["written"] * 3
    # A writer of another model is refused: the index holds FP1's vectors.
    assert worker.fcall("ew_upsert_v5", 4, *doc_keys(f"{PREFIX}0"), "0", ids[2], FP2, "d", "1", "0", "1",
                        "content", "x") == f"model {FP1}"
    # An unchanged re-feed: ew_touch (HGETALL, EXISTS, HMGET of the record) advances the version
    # without the model. ARGV: version, entry, fingerprint, digest, the text field, the parent
    # field and value, then the entry's field pairs.
    assert worker.fcall("ew_touch_v5", 4, *doc_keys(f"{PREFIX}0"), "1", ids[0], FP1, "digest0", "content",
                        "parent", "0", "2", "content", "doc 0", "genre", "g") == "unchanged"
    assert worker.fcall("ew_touch_v5", 4, *doc_keys(f"{PREFIX}1"), "1", ids[1], FP1, "other digest",
                        "content", "parent", "1", "1", "content", "new text") == "changed"
    assert worker.fcall("ew_touch_v5", 4, *doc_keys(f"{PREFIX}8"), "1", ids[1], FP1, "d", "content",
                        "parent", "8", "1", "content", "never written") == "changed"
    # A document of two chunks: doc:7#0 and doc:7#1, each with the shared parent field.
    long_key = f"{PREFIX}7"
    chunk = lambda n: ["5", "content", f"part {n}", "chunk", str(n), "chunk_start", "0", "chunk_end", "4",
                       "embedding", vec(n, 1, 0, 0)]
    assert worker.fcall("ew_upsert_v5", 5, *doc_keys(long_key, 2), "0", ids[1], FP1, "digest7",
                        "2", "1", "parent", "7", *chunk(0), *chunk(1)) == "written"
    # Touching it declaring only chunk 0 asks for the keys of both; with both, each chunk keeps its
    # text, number, span and vector, and takes the entry's other fields (a changed genre).
    assert worker.fcall("ew_touch_v5", 4, *doc_keys(long_key), "1", ids[1], FP1, "digest7", "content",
                        "parent", "7", "2", "content", "part 0 part 1", "genre", "h") == "keys 2"
    assert worker.fcall("ew_touch_v5", 5, *doc_keys(long_key, 2), "1", ids[1], FP1, "digest7", "content",
                        "parent", "7", "2", "content", "part 0 part 1", "genre", "h") == "unchanged"
    assert admin.hmget(f"{long_key}#1", "content", "genre", "chunk", "__ew_version") == ["part 1", "h", "1", "1"]
    # Deleting it declaring only chunk 0 changes nothing and asks for the keys of both.
    # ARGV: version, entry, tombstone TTL, the writer's fingerprint.
    assert worker.fcall("ew_delete_v5", 4, *doc_keys(long_key), "1", ids[2], "60000", FP1) == "keys 2"
    assert worker.fcall("ew_delete_v5", 5, *doc_keys(long_key, 2), "1", ids[2], "60000", FP2) == f"model {FP1}"
    assert worker.fcall("ew_delete_v5", 5, *doc_keys(long_key, 2), "1", ids[2], "60000", FP1) == "deleted"
    # A delete of a document never written: nothing goes, a tombstone stays.
    assert worker.fcall("ew_delete_v5", 4, *doc_keys(f"{PREFIX}9"), "0", ids[2], "60000", FP1) == "absent"
    assert admin.get(tomb(f"{PREFIX}9")) == f"0 {ids[2]}"
    assert worker.xack(STREAM, GROUP, ids[0], ids[1]) == 2

    # Reclaim and dead-letter the third entry.
    assert worker.xpending_range(STREAM, GROUP, min="-", max="+", count=10)[0]["times_delivered"] == 1
    claimed = worker.xautoclaim(STREAM, GROUP, consumer, min_idle_time=0, start_id="0-0", count=10)
    assert [e[0] for e in claimed[1]] == [ids[2]]
    # Renew the lease on it, as the worker does: idle reset, delivery count unchanged.
    assert worker.xclaim(STREAM, GROUP, consumer, 0, [ids[2]], justid=True) == [ids[2]]
    assert worker.xpending_range(STREAM, GROUP, min="-", max="+", count=10)[0]["times_delivered"] == 2
    worker.xadd(DEAD, {"id": "2", "error": "example"})
    assert worker.xack(STREAM, GROUP, ids[2]) == 1

    assert worker.xinfo_stream(STREAM)["length"] == 3
    assert worker.xinfo_consumers(STREAM, GROUP)[0]["pending"] == 0
    assert worker.xlen(DEAD) == 1

    res = worker.execute_command(
        "FT.SEARCH", INDEX, "*=>[KNN 2 @embedding $q AS score]", "PARAMS", "2", "q", vec(0, 0, 0, 0),
        "SORTBY", "score", "RETURN", "1", "score", "DIALECT", "2",
    )
    assert [r["id"] for r in res["results"]] == [f"{PREFIX}0", f"{PREFIX}1"]

    assert worker.xgroup_delconsumer(STREAM, GROUP, consumer) == 0


def test_worker_uses_the_index_a_reindex_made(redis_server):
    # After a reindex the record names `vector_idx@<fingerprint>`: the worker checks it with
    # FT.INFO (and would create or alter it), and queries it under its alias `vector_idx`.
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")
    moved = f"{INDEX}@{FP2}"
    assert create_index(worker, moved, f"embedding@{FP2}", model_tag=True)
    assert worker.execute_command("FT.INFO", moved)
    assert worker.execute_command("FT.ALTER", moved, "SCHEMA", "ADD", "extra", "TAG")
    admin.execute_command("FT.ALIASADD", INDEX, moved)
    assert worker.execute_command("FT.INFO", INDEX)
    assert worker.execute_command("FT.SEARCH", INDEX, "*", "NOCONTENT")["total_results"] == 0


def test_worker_can_run_the_json_pipeline(redis_server):
    # index.storage = "json": the same pipeline through ew_json_upsert_v5, ew_json_touch_v5 and
    # ew_json_delete_v5, whose arguments are JSON text (field values as JSON strings, vectors as
    # arrays), on RedisJSON documents, as the embed-worker user.
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")
    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    worker.fcall("ew_adopt_v5", 1, RECORD, FP1, "all-MiniLM-L6-v2", INDEX, "embedding")
    assert create_json_index(worker)
    entries = ["1-0", "2-0", "3-0"]

    with worker.pipeline(transaction=False) as pipe:  # as the worker writes: no MULTI
        for i, entry in enumerate(entries):
            pipe.fcall("ew_json_upsert_v5", 4, *doc_keys(f"{PREFIX}{i}"), "0", entry, FP1, f"digest{i}", "1", "0",
                       "3", "content", js(f"doc {i}"), "genre", js("g"), "embedding", jvec(i, 0, 0, 0))
        assert pipe.execute() == ["written"] * 3
    assert admin.type(f"{PREFIX}0") == "ReJSON-RL"
    assert json.loads(admin.execute_command("JSON.GET", f"{PREFIX}1", "$")) == [{
        "__ew_version": "0", "__ew_entry": "2-0", "__ew_model": FP1, "__ew_digest": "digest1",
        "content": "doc 1", "genre": "g", "embedding": [1.0, 0.0, 0.0, 0.0]}]
    # A writer of another model is refused (JSON.GET of the stored version, then the record).
    assert worker.fcall("ew_json_upsert_v5", 4, *doc_keys(f"{PREFIX}0"), "0", "3-0", FP2, "d", "1", "0", "1",
                        "content", js("x")) == f"model {FP1}"
    # ew_json_touch: JSON.GET, EXISTS, the record's HMGET, then the whole document in one JSON.SET.
    assert worker.fcall("ew_json_touch_v5", 4, *doc_keys(f"{PREFIX}0"), "1", entries[0], FP1, "digest0",
                        "content", "parent", "0", "2", "content", js("doc 0"), "genre", js("h")) == "unchanged"
    assert json.loads(admin.execute_command("JSON.GET", f"{PREFIX}0", "$.genre", "$.__ew_version", "$.embedding")) \
        == {"$.genre": ["h"], "$.__ew_version": ["1"], "$.embedding": [[0.0, 0.0, 0.0, 0.0]]}
    assert worker.fcall("ew_json_touch_v5", 4, *doc_keys(f"{PREFIX}1"), "1", entries[1], FP1, "other digest",
                        "content", "parent", "1", "1", "content", js("new text")) == "changed"
    assert worker.fcall("ew_json_touch_v5", 4, *doc_keys(f"{PREFIX}8"), "1", entries[1], FP1, "d", "content",
                        "parent", "8", "1", "content", js("never written")) == "changed"
    # A document of two chunks: doc:7#0 and doc:7#1, each with the shared parent field.
    long_key = f"{PREFIX}7"
    chunk = lambda n: ["5", "content", js(f"part {n}"), "chunk", js(str(n)), "chunk_start", js("0"),
                       "chunk_end", js("4"), "embedding", jvec(n, 1, 0, 0)]
    assert worker.fcall("ew_json_upsert_v5", 5, *doc_keys(long_key, 2), "0", entries[1], FP1, "digest7",
                        "2", "1", "parent", js("7"), *chunk(0), *chunk(1)) == "written"
    assert admin.exists(long_key) == 0
    assert worker.fcall("ew_json_touch_v5", 4, *doc_keys(long_key), "1", entries[1], FP1, "digest7", "content",
                        "parent", "7", "2", "content", js("part 0 part 1"), "genre", js("h")) == "keys 2"
    assert worker.fcall("ew_json_touch_v5", 5, *doc_keys(long_key, 2), "1", entries[1], FP1, "digest7", "content",
                        "parent", "7", "2", "content", js("part 0 part 1"), "genre", js("h")) == "unchanged"
    assert json.loads(admin.execute_command("JSON.GET", f"{long_key}#1", "$.content", "$.genre", "$.chunk",
                                            "$.__ew_version", "$.embedding")) == {
        "$.content": ["part 1"], "$.genre": ["h"], "$.chunk": ["1"], "$.__ew_version": ["1"],
        "$.embedding": [[1.0, 1.0, 0.0, 0.0]]}
    res = worker.execute_command(
        "FT.SEARCH", INDEX, "*=>[KNN 2 @embedding $q AS score]", "PARAMS", "2", "q", vec(0, 0, 0, 0),
        "SORTBY", "score", "RETURN", "1", "score", "DIALECT", "2",
    )
    assert [r["id"] for r in res["results"]] == [f"{PREFIX}0", f"{PREFIX}1"]
    # ew_json_delete: JSON.GET, DEL, the tombstone's SET.
    assert worker.fcall("ew_json_delete_v5", 4, *doc_keys(long_key), "1", entries[2], "60000", FP1) == "keys 2"
    assert worker.fcall("ew_json_delete_v5", 5, *doc_keys(long_key, 2), "1", entries[2], "60000", FP2) \
        == f"model {FP1}"
    assert worker.fcall("ew_json_delete_v5", 5, *doc_keys(long_key, 2), "1", entries[2], "60000", FP1) == "deleted"
    assert admin.exists(long_key, f"{long_key}#0", f"{long_key}#1") == 0
    assert worker.fcall("ew_json_delete_v5", 4, *doc_keys(f"{PREFIX}9"), "0", entries[2], "60000", FP1) == "absent"
    assert admin.get(tomb(f"{PREFIX}9")) == f"0 {entries[2]}"
    # A late upsert of an older version loses to the tombstone.
    assert worker.fcall("ew_json_upsert_v5", 4, *doc_keys(f"{PREFIX}9"), "0", "2-0", FP1, "d", "1", "0", "1",
                        "content", js("late")) == "superseded"


def test_worker_functions_run_only_the_json_commands_granted(redis_server):
    # The ACL holds inside FCALL too: ew_json_reembed_v5 (the reindex's, JSON.MERGE) called as the
    # worker stops at its JSON.MERGE, which the worker is not granted, and writes nothing.
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")
    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    worker.fcall("ew_adopt_v5", 1, RECORD, FP1, "model-a", INDEX, "embedding")
    assert worker.fcall("ew_json_upsert_v5", 4, *doc_keys(f"{PREFIX}1"), "0", "1-0", FP1, "d1", "1", "0", "2",
                        "content", js("one"), "embedding", jvec(1, 0, 0, 0)) == "written"
    admin.hset(RECORD, mapping={"next_fingerprint": FP2, "next_vector_field": f"embedding@{FP2}"})
    before = admin.execute_command("JSON.GET", f"{PREFIX}1", "$")
    with pytest.raises(ResponseError, match="(?i)no permissions.*json.merge"):
        worker.fcall("ew_json_reembed_v5", 2, f"{PREFIX}1", RECORD, "0", "1-0", FP2, jvec(0, 0, 1, 0))
    assert admin.execute_command("JSON.GET", f"{PREFIX}1", "$") == before


# What a cluster client never needs: the rest of INFO, other CLUSTER subcommands (the slot map
# comes from CLUSTER SLOTS; CLUSTER NODES is the worker's alone, below), replica reads
# (READONLY: nothing reads from replicas).
FORBIDDEN_CLUSTER_COMMANDS = [
    ("INFO", "server"),
    ("INFO", "keyspace"),
    ("INFO", "everything"),
    ("INFO", "commandstats"),
    ("CLUSTER", "SHARDS"),
    ("CLUSTER", "INFO"),
    ("CLUSTER", "MYID"),
    ("CLUSTER", "RESET"),
    ("CLUSTER", "FAILOVER"),
    ("CLUSTER", "FORGET", "0" * 40),
    ("CLUSTER", "ADDSLOTS", "1"),
    ("CLUSTER", "SETSLOT", "1", "STABLE"),
    ("CLUSTER", "GETKEYSINSLOT", "1", "10"),
    ("READONLY",),
    ("READWRITE",),
]
# What only the worker sends: its per-primary indexes on a cluster without search coordinator
# (COMMAND INFO, FT._LIST, CLUSTER NODES, INFO search) and the replica counts behind WAIT (INFO
# replication). The other users are refused each of them that their own grants do not cover
# (the producer and keda have the whole COMMAND, keda the whole INFO).
WORKER_ONLY_COMMANDS = [
    ("CLUSTER", "NODES"),
    ("FT._LIST",),
    ("COMMAND", "INFO", "_FT.SEARCH"),
    ("INFO", "search"),
    ("INFO", "replication"),
]
FORBIDDEN_FOR_PRODUCER = FORBIDDEN_CLUSTER_COMMANDS + [c for c in WORKER_ONLY_COMMANDS if c[0] != "COMMAND"]
FORBIDDEN_FOR_KEDA = [c for c in FORBIDDEN_CLUSTER_COMMANDS if c[0] != "INFO"] + [
    c for c in WORKER_ONLY_COMMANDS if c[0] not in ("COMMAND", "INFO")]

FORBIDDEN_FOR_WORKER = FORBIDDEN_CLUSTER_COMMANDS + [
    ("FLUSHALL",),
    ("MULTI",),
    ("XCLAIM", "other:stream", "embedders", "c", "0", "0-1", "JUSTID"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("SCAN", "0", "MATCH", "doc:*", "TYPE", "hash"),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("CONFIG", "GET", "requirepass"),
    ("INFO",),
    ("MODULE", "LIST"),
    ("ACL", "LIST"),
    ("HSET", "other:1", "f", "v"),
    ("HGETALL", "other:1"),
    ("HGETALL", "embed:docs"),
    ("HGET", "doc:1", "content"),
    ("HDEL", "doc:1", "embedding"),
    ("HGET", RECORD, "fingerprint"),
    ("HDEL", RECORD, "writers"),
    ("DEL", RECORD),
    ("EXISTS", "other:1"),
    ("DEL", "other:1"),
    ("DEL", "embed:docs"),
    ("SET", "embed:docs", "x"),
    ("SET", "doc:1", "x"),
    ("GET", "doc:1"),
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "DELETE", "embed_worker_v5"),
    ("FCALL_RO", "ew_library_version_v5", "0"),
    ("EVALSHA", "0" * 40, "0"),
    ("XADD", "other:stream", "*", "f", "v"),
    ("XTRIM", "embed:docs", "MAXLEN", "0"),
    ("XGROUP", "DESTROY", "embed:docs", "embedders"),
    ("FT.DROPINDEX", "vector_idx"),
    ("FT.DROPINDEX", f"vector_idx@{FP2}"),
    ("FT.ALIASUPDATE", "vector_idx", f"vector_idx@{FP2}"),
    ("FT.ALIASADD", "vector_idx", f"vector_idx@{FP2}"),
    ("FT.ALIASDEL", "vector_idx"),
    ("FT.CONFIG", "GET", "PARTIAL_INDEXED_DOCS"),
    ("FT.CONFIG", "SET", "PARTIAL_INDEXED_DOCS", "1"),
    ("COMMAND",),
    ("COMMAND", "DOCS", "GET"),
    ("COMMAND", "LIST"),
    ("COMMAND", "GETKEYS", "GET", "doc:1"),
    ("INFO", "clients"),
    ("FT.CREATE", "other_idx", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.CREATE", "vector_idx_other", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    # A primary's own index name is `vector_idx{<n>}` and nothing else like it.
    ("FT.CREATE", "vector_idxx{7}", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.CREATE", "other_idx{7}", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.CREATE", "{vector_idx}", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.DROPINDEX", "vector_idx{7}"),
    ("FT.SEARCH", "other_idx", "*"),
    ("EVAL", "return 1", "0"),
    # JSON: only JSON.GET and JSON.SET, only on documents.
    ("JSON.DEL", "doc:1", "$.embedding"),
    ("JSON.MERGE", "doc:1", "$", "{}"),
    ("JSON.FORGET", "doc:1", "$.embedding"),
    ("JSON.MGET", "doc:1", "doc:2", "$"),
    ("JSON.MSET", "doc:1", "$", "{}"),
    ("JSON.TYPE", "doc:1"),
    ("JSON.NUMINCRBY", "doc:1", "$.n", "1"),
    ("JSON.ARRAPPEND", "doc:1", "$.embedding", "0"),
    ("JSON.CLEAR", "doc:1"),
    ("JSON.SET", "other:1", "$", "{}"),
    ("JSON.GET", "other:1"),
    ("JSON.GET", RECORD),
    ("JSON.SET", RECORD, "$", "{}"),
    ("JSON.SET", "embed:tomb:{doc:1}", "$", "{}"),
    ("JSON.GET", "embed:tomb:{doc:1}"),
    ("JSON.SET", "embed:docs", "$", "{}"),
    ("FT.CREATE", "other_idx", "ON", "JSON", "PREFIX", "1", "doc:", "SCHEMA", "$.content", "AS", "content", "TEXT"),
]


@pytest.mark.parametrize("command", FORBIDDEN_FOR_WORKER, ids=lambda c: " ".join(c[:2]))
def test_worker_is_refused_everything_else(redis_server, command):
    with pytest.raises(NoPermissionError):
        login(redis_server, "embed-worker").execute_command(*command)


def test_reindex_user_can_run_a_whole_reindex(redis_server):
    # What `embed-worker reindex --model-file FILE --drop-old` sends (src/commands/reindex.rs),
    # against documents a worker wrote: one of one chunk, one of two.
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")
    reindex = login(redis_server, "embed-reindex")
    assert reindex.ping()
    assert reindex.client_setname("embed-worker-reindex")
    assert reindex.execute_command("CLIENT", "SETINFO", "LIB-NAME", "redis-rs")

    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    worker.fcall("ew_adopt_v5", 1, RECORD, FP1, "model-a", INDEX, "embedding")
    assert create_index(worker)
    assert worker.fcall("ew_upsert_v5", 4, *doc_keys(f"{PREFIX}1"), "0", "1-0", FP1, "d1", "1", "0", "2",
                        "content", "one", "embedding", vec(1, 0, 0, 0)) == "written"
    chunk = lambda n: ["3", "content", f"part {n}", "chunk", str(n), "embedding", vec(n, 1, 0, 0)]
    assert worker.fcall("ew_upsert_v5", 5, *doc_keys(f"{PREFIX}2", 2), "0", "2-0", FP1, "d2", "2", "1",
                        "parent", "2", *chunk(0), *chunk(1)) == "written"

    # The library: its version, and a (re)load when it is missing or older.
    assert reindex.fcall("ew_library_version_v5", 0) == "5"
    assert reindex.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    # Begin: the record, the current index's size, the next model's index, the record names it.
    assert reindex.hgetall(RECORD)["fingerprint"] == FP1
    assert reindex.execute_command("FT.INFO", INDEX)
    nxt, field = f"{INDEX}@{FP2}", f"embedding@{FP2}"
    with pytest.raises(ResponseError, match="Unknown index name|no such index"):
        reindex.execute_command("FT.INFO", nxt)
    assert create_index(reindex, nxt, field, model_tag=True)
    assert reindex.hset(RECORD, mapping={"next_fingerprint": FP2, "next_model": "model-b", "next_index": nxt,
                                         "next_vector_field": field, "state": "migrating"}) == 5
    # Pass: every stored hash, its text and version read, the next vector added by ew_reembed.
    cursor, found = 0, []
    while True:
        cursor, keys = reindex.execute_command("SCAN", cursor, "MATCH", f"{PREFIX}*", "COUNT", 500, "TYPE", "hash")
        found += keys
        if int(cursor) == 0:
            break
    assert sorted(found) == [f"{PREFIX}1", f"{PREFIX}2#0", f"{PREFIX}2#1"]
    with reindex.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.hmget(key, "content", "__ew_version", "__ew_entry", "__ew_model")
        rows = pipe.execute()
    with reindex.pipeline(transaction=False) as pipe:
        for key, (_, version, entry, _) in zip(found, rows):
            pipe.fcall("ew_reembed_v5", 2, key, RECORD, version, entry, FP2, vec(0, 0, 1, 0))
        assert pipe.execute() == ["written"] * 3
    assert reindex.fcall("ew_reembed_v5", 2, f"{PREFIX}1", RECORD, "0", "0-1", FP2, vec(0, 0, 1, 0)) == "changed"
    # Catch up: the next index finds what still lacks the next model's vector.
    info = reindex.execute_command("FT.INFO", nxt)
    assert info
    query = f"-@__ew_model:{{{FP2}}}"
    res = reindex.execute_command("FT.SEARCH", nxt, query, "NOCONTENT", "LIMIT", 0, 500, "DIALECT", 2)
    assert res["total_results"] == 0
    # Hold: writers refused, then the switch in one MULTI.
    assert reindex.hset(RECORD, mapping={"writers": "", "state": "switching"}) == 0
    assert worker.fcall("ew_upsert_v5", 4, *doc_keys(f"{PREFIX}1"), "0", "3-0", FP1, "d", "1", "0", "1",
                        "content", "late") == f"model {FP1}"
    with reindex.pipeline(transaction=True) as tx:
        tx.execute_command("FT.DROPINDEX", INDEX)
        tx.execute_command("FT.ALIASUPDATE", INDEX, nxt)
        tx.hset(RECORD, mapping={"fingerprint": FP2, "model": "model-b", "index": nxt, "vector_field": field,
                                 "writers": FP2, "old_fingerprint": FP1, "old_model": "model-a",
                                 "old_index": INDEX, "old_vector_field": "embedding"})
        tx.hdel(RECORD, "next_fingerprint", "next_model", "next_index", "next_vector_field", "state")
        tx.execute()
    # The name now answers for the new index (is_alias), and the new model's workers write.
    assert reindex.execute_command("FT.INFO", INDEX)["index_name"] == nxt
    res = worker.execute_command("FT.SEARCH", INDEX, "*=>[KNN 1 @embedding $q AS score]", "PARAMS", "2",
                                 "q", vec(0, 0, 1, 0), "RETURN", "1", "score", "DIALECT", "2")
    assert res["total_results"] == 1
    assert worker.fcall("ew_upsert_v5", 4, *doc_keys(f"{PREFIX}3"), "0", "4-0", FP2, "d3", "1", "0", "2",
                        "content", "three", field, vec(0, 1, 0, 0)) == "written"
    # Drop old: the previous model's vector from every hash (ew_retire), then its record fields.
    with reindex.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.fcall("ew_retire_v5", 2, key, RECORD, "embedding", FP1)
        assert pipe.execute() == ["retired"] * 3
    assert reindex.fcall("ew_retire_v5", 2, f"{PREFIX}3", RECORD, field, FP2) == "current"
    assert reindex.hdel(RECORD, "old_fingerprint", "old_model", "old_index", "old_vector_field") == 4
    assert admin.hmget(f"{PREFIX}1", "embedding", "__ew_model") == [None, FP2]
    # A later reindex drops the then previous model's own index, outside the MULTI.
    later = f"{INDEX}@{FP1}"
    assert create_index(reindex, later, f"embedding@{FP1}", model_tag=True)
    assert reindex.execute_command("FT.DROPINDEX", later)


def test_reindex_user_can_run_a_whole_json_reindex(redis_server):
    # The same reindex with index.storage = "json": SCAN ... TYPE ReJSON-RL, the reads as
    # JSON.GET key $.a $.b ... (src/store/documents.rs read_fields), ew_json_reembed_v5 (JSON.GET,
    # JSON.MERGE) and ew_json_retire_v5 (JSON.GET, JSON.DEL, JSON.MERGE), as embed-reindex.
    admin = redis_server.client()
    admin.flushall()
    worker = login(redis_server, "embed-worker")
    reindex = login(redis_server, "embed-reindex")
    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    worker.fcall("ew_adopt_v5", 1, RECORD, FP1, "model-a", INDEX, "embedding")
    assert create_json_index(worker)
    assert worker.fcall("ew_json_upsert_v5", 4, *doc_keys(f"{PREFIX}1"), "0", "1-0", FP1, "d1", "1", "0", "2",
                        "content", js("one"), "embedding", jvec(1, 0, 0, 0)) == "written"
    chunk = lambda n: ["3", "content", js(f"part {n}"), "chunk", js(str(n)), "embedding", jvec(n, 1, 0, 0)]
    assert worker.fcall("ew_json_upsert_v5", 5, *doc_keys(f"{PREFIX}2", 2), "0", "2-0", FP1, "d2", "2", "1",
                        "parent", js("2"), *chunk(0), *chunk(1)) == "written"
    # A hash under the prefix is not a JSON document: the scan passes it by.
    admin.hset(f"{PREFIX}h", "content", "a hash")

    assert reindex.fcall("ew_library_version_v5", 0) == "5"
    assert reindex.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker_v5"
    assert reindex.hgetall(RECORD)["fingerprint"] == FP1
    assert reindex.execute_command("FT.INFO", INDEX)
    nxt, field = f"{INDEX}@{FP2}", f"embedding@{FP2}"
    assert create_json_index(reindex, nxt, field, model_tag=True)
    assert reindex.hset(RECORD, mapping={"next_fingerprint": FP2, "next_model": "model-b", "next_index": nxt,
                                         "next_vector_field": field, "state": "migrating"}) == 5
    cursor, found = 0, []
    while True:
        cursor, keys = reindex.execute_command("SCAN", cursor, "MATCH", f"{PREFIX}*", "COUNT", 500,
                                               "TYPE", "ReJSON-RL")
        found += keys
        if int(cursor) == 0:
            break
    assert sorted(found) == [f"{PREFIX}1", f"{PREFIX}2#0", f"{PREFIX}2#1"]
    names = ["content", "__ew_version", "__ew_entry", "__ew_model"]
    with reindex.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.execute_command("JSON.GET", key, *map(json_path, names))
        rows = [{n: json.loads(r)[json_path(n)][0] for n in names} for r in pipe.execute()]
    assert {row["__ew_model"] for row in rows} == {FP1}
    with reindex.pipeline(transaction=False) as pipe:
        for key, row in zip(found, rows):
            pipe.fcall("ew_json_reembed_v5", 2, key, RECORD, row["__ew_version"], row["__ew_entry"], FP2,
                       jvec(0, 0, 1, 0))
        assert pipe.execute() == ["written"] * 3
    assert reindex.fcall("ew_json_reembed_v5", 2, f"{PREFIX}1", RECORD, "0", "0-1", FP2, jvec(0, 0, 1, 0)) \
        == "changed"
    assert json.loads(admin.execute_command("JSON.GET", f"{PREFIX}1", json_path(field), "$.__ew_model")) == {
        json_path(field): [[0.0, 0.0, 1.0, 0.0]], "$.__ew_model": [f"{FP1} {FP2}"]}
    res = reindex.execute_command("FT.SEARCH", nxt, f"-@__ew_model:{{{FP2}}}", "NOCONTENT", "LIMIT", 0, 500,
                                  "DIALECT", 2)
    assert res["total_results"] == 0
    assert reindex.hset(RECORD, mapping={"writers": "", "state": "switching"}) == 0
    with reindex.pipeline(transaction=True) as tx:
        tx.execute_command("FT.DROPINDEX", INDEX)
        tx.execute_command("FT.ALIASUPDATE", INDEX, nxt)
        tx.hset(RECORD, mapping={"fingerprint": FP2, "model": "model-b", "index": nxt, "vector_field": field,
                                 "writers": FP2, "old_fingerprint": FP1, "old_model": "model-a",
                                 "old_index": INDEX, "old_vector_field": "embedding"})
        tx.hdel(RECORD, "next_fingerprint", "next_model", "next_index", "next_vector_field", "state")
        tx.execute()
    res = worker.execute_command("FT.SEARCH", INDEX, "*=>[KNN 1 @embedding $q AS score]", "PARAMS", "2",
                                 "q", vec(0, 0, 1, 0), "RETURN", "1", "score", "DIALECT", "2")
    assert res["total_results"] == 1
    # Drop old: ew_json_retire_v5 removes the previous model's vector (JSON.DEL) and its fingerprint
    # from __ew_model (JSON.MERGE).
    with reindex.pipeline(transaction=False) as pipe:
        for key in found:
            pipe.fcall("ew_json_retire_v5", 2, key, RECORD, "embedding", FP1)
        assert pipe.execute() == ["retired"] * 3
    assert reindex.fcall("ew_json_retire_v5", 2, f"{PREFIX}1", RECORD, "embedding", FP1) == "none"
    assert reindex.fcall("ew_json_retire_v5", 2, f"{PREFIX}1", RECORD, field, FP2) == "current"
    assert reindex.hdel(RECORD, "old_fingerprint", "old_model", "old_index", "old_vector_field") == 4
    assert json.loads(admin.execute_command("JSON.GET", f"{PREFIX}1", "$.embedding", "$.__ew_model")) == {
        "$.embedding": [], "$.__ew_model": [FP2]}


FORBIDDEN_FOR_REINDEX = FORBIDDEN_CLUSTER_COMMANDS + WORKER_ONLY_COMMANDS + [
    ("WAIT", "0", "0"),
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("KEYS", "*"),
    ("INFO",),
    ("CONFIG", "GET", "requirepass"),
    ("ACL", "LIST"),
    ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
    ("XADD", STREAM, "*", "f", "v"),
    ("XACK", STREAM, GROUP, "0-1"),
    ("XLEN", STREAM),
    ("HGETALL", "doc:1"),
    ("HKEYS", "doc:1"),
    ("DEL", "doc:1"),
    ("DEL", RECORD),
    ("GET", "embed:tomb:{doc:1}"),
    ("SET", "embed:tomb:{doc:1}", "x"),
    ("HSET", "other:1", "f", "v"),
    ("HSET", "embed:docs", "f", "v"),
    ("EXISTS", "doc:1"),
    # The worker's own functions: their tombstone key is outside this user's patterns.
    ("FCALL", "ew_upsert_v5", "4", "doc:1", "embed:tomb:{doc:1}", RECORD, "doc:1#0", "0", "1-0", FP2, "d",
     "1", "0", "1", "content", "x"),
    ("FCALL", "ew_delete_v5", "4", "doc:1", "embed:tomb:{doc:1}", RECORD, "doc:1#0", "0", "1-0", "1000", FP2),
    ("FCALL_RO", "ew_library_version_v5", "0"),
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "DELETE", "embed_worker_v5"),
    ("EVAL", "return 1", "0"),
    ("DISCARD",),
    ("FT.ALTER", INDEX, "SCHEMA", "ADD", "x", "TAG"),
    ("FT.CONFIG", "GET", "PARTIAL_INDEXED_DOCS"),
    ("FT.ALIASADD", "other_alias", INDEX),
    ("FT.ALIASDEL", INDEX),
    ("FT.DROPINDEX", "other_idx"),
    ("FT.CREATE", "other_idx", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.SEARCH", "other_idx", "*"),
    # JSON: only JSON.GET, JSON.MERGE and JSON.DEL, only on documents; never a whole-document
    # write, nor the worker's JSON functions (their tombstone key is outside this user's patterns).
    ("JSON.SET", "doc:1", "$", "{}"),
    ("JSON.MSET", "doc:1", "$", "{}"),
    ("JSON.MGET", "doc:1", "doc:2", "$"),
    ("JSON.FORGET", "doc:1", "$.embedding"),
    ("JSON.TYPE", "doc:1"),
    ("JSON.ARRAPPEND", "doc:1", "$.embedding", "0"),
    ("JSON.GET", RECORD),
    ("JSON.MERGE", RECORD, "$", "{}"),
    ("JSON.DEL", RECORD),
    ("JSON.GET", "other:1"),
    ("JSON.MERGE", "other:1", "$", "{}"),
    ("JSON.GET", "embed:tomb:{doc:1}"),
    ("FCALL", "ew_json_upsert_v5", "4", "doc:1", "embed:tomb:{doc:1}", RECORD, "doc:1#0", "0", "1-0", FP2, "d",
     "1", "0", "1", "content", '"x"'),
    ("FCALL", "ew_json_touch_v5", "4", "doc:1", "embed:tomb:{doc:1}", RECORD, "doc:1#0", "0", "1-0", FP2, "d",
     "content", "parent", "1", "1", "content", '"x"'),
    ("FCALL", "ew_json_delete_v5", "4", "doc:1", "embed:tomb:{doc:1}", RECORD, "doc:1#0", "0", "1-0", "1000",
     FP2),
]


@pytest.mark.parametrize("command", FORBIDDEN_FOR_REINDEX, ids=lambda c: " ".join(c[:2]))
def test_reindex_user_is_refused_everything_else(redis_server, command):
    with pytest.raises(NoPermissionError):
        login(redis_server, "embed-reindex").execute_command(*command)


def test_producer_can_only_add_documents(redis_server):
    producer = login(redis_server, "producer")
    assert producer.xadd(STREAM, {"id": "p1", "content": "hello"})
    for command in [("XADD", DEAD, "*", "f", "v"), ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
                    ("XLEN", STREAM), ("HSET", "doc:p1", "f", "v"), ("FT.SEARCH", INDEX, "*"),
                    ("XTRIM", STREAM, "MAXLEN", "0"), ("INFO",), ("WAIT", "0", "0"),
                    *FORBIDDEN_FOR_PRODUCER]:
        with pytest.raises(NoPermissionError):
            producer.execute_command(*command)


def test_keda_user_reads_stream_metrics_only(redis_server):
    keda = login(redis_server, "keda")
    admin = redis_server.client()
    admin.xadd(STREAM, {"id": "k1"})
    try:
        admin.xgroup_create(STREAM, GROUP, id="0")
    except ResponseError:
        pass  # BUSYGROUP: created by an earlier test
    assert GROUP in [g["name"] for g in keda.xinfo_groups(STREAM)]
    assert keda.xpending(STREAM, GROUP) is not None
    assert keda.xlen(STREAM) >= 1
    for command in [("XADD", STREAM, "*", "f", "v"), ("XACK", STREAM, GROUP, "0-1"),
                    ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
                    ("HGETALL", "doc:1"), ("XINFO", "GROUPS", "other:stream"), ("FLUSHALL",),
                    ("WAIT", "0", "0"), ("CONFIG", "GET", "*"), ("CLIENT", "LIST"),
                    *FORBIDDEN_FOR_KEDA]:
        with pytest.raises(NoPermissionError):
            keda.execute_command(*command)


# ---------------------------------------------------------------------------------------------
# On a Redis Cluster node


def test_worker_keeps_one_index_per_primary_on_a_cluster_node(redis_cluster_node):
    # What the worker sends on a cluster whose search module has no coordinator (ours), node by
    # node (src/store/fanout.rs, src/store/index.rs): COMMAND INFO to tell a coordinator, FT._LIST
    # and CLUSTER NODES for each primary's own index, FT.CREATE, FT.INFO, FT.ALTER and FT.SEARCH on
    # it, INFO search for the metrics, and INFO replication before WAIT. The node owns every slot,
    # so the names three primaries would get all land on it.
    admin = redis_cluster_node.client()
    admin.flushall()
    worker = login(redis_cluster_node, "embed-worker")
    worker.set_response_callback("COMMAND", lambda reply, **_: reply)  # the raw reply, as the worker reads it
    coordinator = worker.execute_command("COMMAND", "INFO", "_FT.SEARCH", "SEARCH.CLUSTERINFO", "FT.CLUSTERINFO")
    assert coordinator == [None, None, None], "a search module with a coordinator: no per-primary indexes"
    (myself,) = [line for line in worker.execute_command("CLUSTER", "NODES").splitlines() if "myself" in line]
    assert "master" in myself.split()[2] and myself.split()[8:] == ["0-16383"], myself
    assert worker.info("replication")["connected_slaves"] == 0
    search = worker.info("search")
    assert search and all(k.startswith("search_") for k in search), search

    names = primary_index_names(INDEX, 3)
    assert INDEX in names and all(n == INDEX or n.startswith(f"{INDEX}{{") for n in names), names
    for name in names:
        assert create_index(worker, name)
        assert worker.execute_command("FT.INFO", name)
        assert worker.execute_command("FT.ALTER", name, "SCHEMA", "ADD", "extra", "TAG")
    assert set(names) <= set(worker.execute_command("FT._LIST"))
    admin.hset(f"{PREFIX}1", mapping={"content": "one", "embedding": vec(1, 0, 0, 0)})
    for name in names:
        res = worker.execute_command("FT.SEARCH", name, "*=>[KNN 1 @embedding $q AS score]", "PARAMS", "2",
                                     "q", vec(1, 0, 0, 0), "RETURN", "1", "score", "DIALECT", "2")
        assert [r["id"] for r in res["results"]] == [f"{PREFIX}1"], name

    # Outside `vector_idx{*}`, and never a drop: an index a person removes is theirs to remove.
    for command in [
        ("FT.CREATE", "vector_idxx{7}", "ON", "HASH", "PREFIX", "1", PREFIX, "SCHEMA", "content", "TEXT"),
        ("FT.CREATE", "other_idx{7}", "ON", "HASH", "PREFIX", "1", PREFIX, "SCHEMA", "content", "TEXT"),
        ("FT.SEARCH", "other_idx{7}", "*"),
        ("FT.DROPINDEX", names[1]),
        ("COMMAND", "DOCS", "FT.SEARCH"),
        ("CLUSTER", "SHARDS"),
        ("INFO", "keyspace"),
    ]:
        with pytest.raises(NoPermissionError):
            worker.execute_command(*command)
    for name in names:
        assert admin.execute_command("FT.DROPINDEX", name)

