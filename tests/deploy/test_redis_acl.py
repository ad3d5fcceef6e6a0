"""deploy/redis-acl.conf: it loads in a real redis-server with the search module, grants the
embed-worker user every command the worker sends (on the keys it uses), and refuses the rest;
the producer and keda users likewise get only what they need.
"""

from __future__ import annotations

import struct

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from deploy_support import ACL_FILE, ROOT, commands_of, parse_acl, patterns_of

LIBRARY = (ROOT / "src" / "store" / "documents.lua").read_text()

ACL = parse_acl(ACL_FILE.read_text())

# Exactly what the worker may run. Widening the ACL means changing this list on purpose.
WORKER_COMMANDS = {
    # connection set-up (AUTH and HELLO are always allowed; HELLO is listed for clarity)
    "ping", "hello", "client|setname", "client|setinfo",
    # consume, ack, reclaim, renew the leases on entries in hand (XCLAIM ... JUSTID), dead-letter,
    # housekeeping
    "xreadgroup", "xack", "xadd", "xautoclaim", "xclaim", "xpending",
    "xgroup|create", "xgroup|delconsumer",
    "xinfo|groups", "xinfo|consumers", "xinfo|stream", "xlen",
    # document writes: the embed_worker function library (src/store/documents.lua), loaded at
    # start-up and called by name (a plain pipeline of FCALLs: no MULTI/EXEC, no EVAL)
    "fcall", "function|load",
    # the index: create if missing, check, query
    "ft.create", "ft.alter", "ft.info", "ft.search",
}
PRODUCER_COMMANDS = {"ping", "hello", "client|setname", "client|setinfo", "xadd"}
# What the functions run inside FCALL, each only on its own keys: documents, and tombstones.
WORKER_SELECTORS = [({"hmget", "hkeys", "hset", "del"}, ["doc:*"]), ({"get", "set", "del"}, ["embed:tomb:*"])]
KEDA_COMMANDS = {"ping", "hello", "client|setname", "client|setinfo", "xinfo|groups", "xpending", "xlen"}

STREAM, GROUP, DEAD, INDEX, PREFIX = "embed:docs", "embedders", "embed:docs:dead", "vector_idx", "doc:"
DIM = 4


def vec(*xs: float) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


# ---------------------------------------------------------------------------------------------
# The file itself


def test_acl_file_has_only_user_lines():
    # Redis refuses an ACL file with comment lines (and aborts start-up), so all explanation lives
    # in deploy/README.md; this keeps someone from "documenting" the file into a broken one.
    for n, line in enumerate(ACL_FILE.read_text().splitlines(), 1):
        assert not line.strip() or line.startswith("user "), f"line {n} is not a user line: {line!r}"


def test_acl_users_and_their_grants():
    assert set(ACL) == {"embed-worker", "producer", "keda"}
    assert ACL["embed-worker"].commands == WORKER_COMMANDS
    assert [(commands_of(s), patterns_of(s)) for s in ACL["embed-worker"].selectors] == WORKER_SELECTORS
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


def test_keda_user_is_read_only():
    patterns = [r for r in ACL["keda"].rules if "~" in r]
    assert patterns and all(r.startswith("%R~") for r in patterns), patterns


# ---------------------------------------------------------------------------------------------
# Loaded into a real server


def login(server, user: str) -> redis.Redis:
    return server.client(user, ACL[user].password)


def test_file_loads_and_reloads(redis_server):
    admin = redis_server.client()
    assert {"embed-worker", "producer", "keda"} <= set(admin.acl_users())
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
    worker.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
    with pytest.raises(ResponseError, match="Unknown index name|no such index"):
        worker.execute_command("FT.INFO", INDEX)
    assert worker.execute_command(
        "FT.CREATE", INDEX, "ON", "HASH", "PREFIX", "1", PREFIX, "SCHEMA",
        "content", "TEXT", "genre", "TAG",
        "embedding", "VECTOR", "HNSW", "10", "TYPE", "FLOAT32", "DIM", str(DIM),
        "DISTANCE_METRIC", "L2", "M", "16", "EF_CONSTRUCTION", "200",
    )
    assert worker.execute_command("FT.INFO", INDEX)

    ids = [producer.xadd(STREAM, {"id": str(i), "content": f"doc {i}", "genre": "g"}) for i in range(3)]
    # What KEDA's lag trigger reads (Redis 7+): three entries not yet delivered to the group.
    (group,) = keda.xinfo_groups(STREAM)
    assert group["lag"] == 3
    assert keda.xlen(STREAM) == 3

    read = worker.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=256, block=100)
    entries = read[STREAM][0]  # RESP3: {stream: [entries]}
    assert [e[0] for e in entries] == ids
    assert keda.xpending(STREAM, GROUP)["pending"] == 3  # what the pending trigger reads

    assert worker.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY) == "embed_worker"
    with worker.pipeline(transaction=False) as pipe:  # as the worker writes: no MULTI
        for i, entry in enumerate(ids):
            key = f"{PREFIX}{i}"
            # KEYS: the document, its tombstone, its chunk 0; ARGV: version, entry, 1 chunk,
            # 0 shared fields, then the chunk's 3 field pairs (src/store/documents.lua).
            pipe.fcall("ew_upsert", 3, key, f"embed:tomb:{{{key}}}", f"{key}#0", "0", entry, "1", "0", "3",
                       "content", f"doc {i}", "genre", "g", "embedding", vec(i, 0, 0, 0))
        assert pipe.execute() == ["written"] * 3
    # A document of two chunks: doc:7#0 and doc:7#1, each with the shared parent field.
    long_key = f"{PREFIX}7"
    chunk_keys = [f"{long_key}#0", f"{long_key}#1"]
    chunk = lambda n: ["5", "content", f"part {n}", "chunk", str(n), "chunk_start", "0", "chunk_end", "4",
                       "embedding", vec(n, 1, 0, 0)]
    assert worker.fcall("ew_upsert", 4, long_key, f"embed:tomb:{{{long_key}}}", *chunk_keys, "0", ids[1],
                        "2", "1", "parent", "7", *chunk(0), *chunk(1)) == "written"
    # Deleting it declaring only chunk 0 changes nothing and asks for the keys of both.
    assert worker.fcall("ew_delete", 3, long_key, f"embed:tomb:{{{long_key}}}", chunk_keys[0], "0", ids[2], "60000") == "keys 2"
    assert worker.fcall("ew_delete", 4, long_key, f"embed:tomb:{{{long_key}}}", *chunk_keys, "0", ids[2], "60000") == "deleted"
    # A delete: the document goes, a tombstone stays; then the upsert is recreated.
    assert worker.fcall("ew_delete", 3, f"{PREFIX}9", f"embed:tomb:{{{PREFIX}9}}", f"{PREFIX}9#0", "0", ids[2], "60000") == "absent"
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


FORBIDDEN_FOR_WORKER = [
    ("FLUSHALL",),
    ("MULTI",),
    ("EXISTS", "doc:1"),
    ("XCLAIM", "other:stream", "embedders", "c", "0", "0-1", "JUSTID"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("CONFIG", "SET", "maxmemory", "1"),
    ("CONFIG", "GET", "requirepass"),
    ("INFO",),
    ("MODULE", "LIST"),
    ("ACL", "LIST"),
    ("HSET", "other:1", "f", "v"),
    ("HGETALL", "doc:1"),
    ("DEL", "other:1"),
    ("DEL", "embed:docs"),
    ("SET", "embed:docs", "x"),
    ("SET", "doc:1", "x"),
    ("GET", "doc:1"),
    ("FUNCTION", "FLUSH"),
    ("FUNCTION", "DELETE", "embed_worker"),
    ("FCALL_RO", "ew_library_version", "0"),
    ("EVALSHA", "0" * 40, "0"),
    ("XADD", "other:stream", "*", "f", "v"),
    ("XTRIM", "embed:docs", "MAXLEN", "0"),
    ("XGROUP", "DESTROY", "embed:docs", "embedders"),
    ("FT.DROPINDEX", "vector_idx"),
    ("FT._LIST",),
    ("FT.CREATE", "other_idx", "ON", "HASH", "PREFIX", "1", "doc:", "SCHEMA", "content", "TEXT"),
    ("FT.SEARCH", "other_idx", "*"),
    ("EVAL", "return 1", "0"),
]


@pytest.mark.parametrize("command", FORBIDDEN_FOR_WORKER, ids=lambda c: " ".join(c[:2]))
def test_worker_is_refused_everything_else(redis_server, command):
    with pytest.raises(NoPermissionError):
        login(redis_server, "embed-worker").execute_command(*command)


def test_producer_can_only_add_documents(redis_server):
    producer = login(redis_server, "producer")
    assert producer.xadd(STREAM, {"id": "p1", "content": "hello"})
    for command in [("XADD", DEAD, "*", "f", "v"), ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
                    ("XLEN", STREAM), ("HSET", "doc:p1", "f", "v"), ("FT.SEARCH", INDEX, "*"),
                    ("XTRIM", STREAM, "MAXLEN", "0")]:
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
                    ("HGETALL", "doc:1"), ("XINFO", "GROUPS", "other:stream"), ("FLUSHALL",)]:
        with pytest.raises(NoPermissionError):
            keda.execute_command(*command)
