"""deploy/kubernetes and deploy/Dockerfile: schema, KEDA structure and the references between them.

Core Kubernetes kinds are validated offline against the OpenAPI-derived JSON schemas bundled in
the kubernetes-validate package (strict: unknown fields are errors), for the oldest and newest
Kubernetes versions the manifests target. KEDA's CRDs are not in those schemas, so the KEDA
objects are checked structurally against the keys KEDA documents for the redis-streams scaler.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from urllib.parse import urlsplit

import pytest
from kubernetes_validate import utils as kv

from deploy_support import (ACL_FILE, DEFAULT_CONFIG, DEPLOY, K8S, Doc, load_docs, only, parse_acl,
                      parse_duration, worker_config)

DOCS = load_docs()
# Oldest and newest Kubernetes the manifests must be valid for.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
CORE_KINDS = {"ConfigMap", "Secret", "Deployment", "Service"}
KEDA_API = "keda.sh/v1alpha1"
# https://keda.sh/docs/latest/scalers/redis-streams/ (trigger metadata) and
# https://keda.sh/docs/latest/reference/scaledobject-spec/ (spec keys).
REDIS_STREAMS_KEYS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}
REDIS_STREAMS_INT_KEYS = {"pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
                          "databaseIndex"}
SCALEDOBJECT_SPEC_KEYS = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
TRIGGER_AUTH_PARAMS = {"username", "password", "host", "port", "address", "addresses", "tls",
                       "ca", "cert", "key", "keyPassword", "sentinelUsername", "sentinelPassword",
                       "sentinelMaster"}


def cluster_docs() -> list[Doc]:
    """Everything that would be sent to the API server (the Kustomization is not)."""
    return [d for d in DOCS if d.kind != "Kustomization"]


def deployment() -> dict:
    return only(DOCS, "Deployment").body


def pod_spec() -> dict:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict:
    containers = pod_spec()["containers"]
    assert len(containers) == 1, "one container expected"
    return containers[0]


def container_ports() -> dict[str, int]:
    """Container port names (and their numbers as strings) -> number."""
    ports = {}
    for p in container()["ports"]:
        ports[str(p["containerPort"])] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def resolve_port(port) -> int:
    ports = container_ports()
    assert str(port) in ports, f"port {port!r} is not a container port ({sorted(ports)})"
    return ports[str(port)]


def secret_keys(name: str) -> set[str]:
    secrets = [d for d in DOCS if d.kind == "Secret" and d.name == name]
    assert secrets, f"Secret {name!r} is referenced but not defined"
    body = secrets[0].body
    return set(body.get("data", {})) | set(body.get("stringData", {}))


def secret_value(name: str, key: str) -> str:
    body = next(d.body for d in DOCS if d.kind == "Secret" and d.name == name)
    assert key in body.get("stringData", {}), f"{name}/{key} not in stringData"
    return body["stringData"][key]


# ---------------------------------------------------------------------------------------------
# Every document


def test_manifests_exist():
    kinds = sorted(d.kind for d in DOCS)
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "TriggerAuthentication",
                            "ScaledObject", "Kustomization"]), kinds


@pytest.mark.parametrize("doc", DOCS, ids=str)
def test_document_identity(doc: Doc):
    assert doc.body.get("apiVersion") and doc.kind, f"{doc}: apiVersion and kind are required"
    if doc.kind == "Kustomization":
        return
    meta = doc.body.get("metadata", {})
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")), f"{doc}: bad name"
    # Namespace-agnostic: the namespace comes from `kubectl -n` or a kustomize overlay.
    assert "namespace" not in meta, f"{doc}: must not pin a namespace"
    assert meta.get("labels", {}).get("app.kubernetes.io/name") == "embed-worker", doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for d in DOCS if d.kind in CORE_KINDS], ids=str)
def test_core_kind_matches_kubernetes_schema(doc: Doc, version: str):
    # strict: additionalProperties=false, so a misspelt or misplaced field fails here.
    kv.validate(doc.body, version, strict=True)


def test_every_cluster_kind_is_checked():
    unchecked = {d.kind for d in cluster_docs()} - CORE_KINDS - {"ScaledObject", "TriggerAuthentication"}
    assert not unchecked, f"kinds with no schema or structural check: {unchecked}"


def test_kustomization_lists_every_manifest():
    kust = only(DOCS, "Kustomization").body
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    files = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(listed) == files, f"listed {sorted(listed)} but the directory holds {sorted(files)}"
    assert "namespace" not in kust, "namespace-agnostic: set it in an overlay or with -n"
    image_names = {i["name"] for i in kust.get("images", [])}
    image = container()["image"]
    assert image.rsplit(":", 1)[0] in image_names, f"kustomize images do not cover {image}"


# ---------------------------------------------------------------------------------------------
# The worker's configuration (ConfigMap)


def test_configmap_toml_keys_exist_in_defaults():
    """Unknown keys are a start-up error (deny_unknown_fields), and so is a wrong type."""
    defaults = tomllib.loads(DEFAULT_CONFIG.read_text())
    overlay = tomllib.loads(only(DOCS, "ConfigMap").body["data"]["config.toml"])
    for section, values in overlay.items():
        assert section in defaults, f"[{section}] is not a config section"
        for key, value in values.items():
            assert key in defaults[section], f"[{section}] {key} is not a config key"
            assert type(value) is type(defaults[section][key]), f"[{section}] {key}: wrong type"


def test_configmap_keeps_secrets_out():
    cfg = tomllib.loads(only(DOCS, "ConfigMap").body["data"]["config.toml"])
    redis = cfg.get("redis", {})
    assert not redis.get("password"), "the password comes from the Secret, not the ConfigMap"
    assert "@" not in redis.get("url", ""), "no credentials in the URL"


def test_configmap_redis_url_points_at_redis_service():
    url = urlsplit(worker_config(DOCS)["redis"]["url"])
    assert url.scheme in ("redis", "rediss") and url.hostname == "redis"


# ---------------------------------------------------------------------------------------------
# Deployment


def test_deployment_selector_matches_pod_labels():
    dep = deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for k, v in dep["spec"]["selector"]["matchLabels"].items():
        assert labels.get(k) == v, f"selector {k}={v} does not match the pod template"


def test_deployment_replicas_left_to_keda():
    targets = {only(DOCS, "ScaledObject").body["spec"]["scaleTargetRef"]["name"]}
    if only(DOCS, "Deployment").name in targets:
        assert "replicas" not in deployment()["spec"], "replicas would fight the KEDA-managed HPA"


def test_grace_period_exceeds_shutdown_timeout():
    drain = parse_duration(worker_config(DOCS)["worker"]["shutdown_timeout"])
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > drain, f"terminationGracePeriodSeconds {grace} <= shutdown_timeout {drain}s"
    # Some margin for process exit and the kubelet, not just one second.
    assert grace - drain >= 5, f"only {grace - drain}s between the drain timeout and SIGKILL"


def test_probes_hit_the_metrics_listener():
    listen_port = int(worker_config(DOCS)["http"]["listen"].rsplit(":", 1)[1])
    assert listen_port in container_ports().values(), "http.listen port is not a container port"
    paths = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/livez"}
    for probe, path in paths.items():
        spec = container().get(probe)
        if probe == "startupProbe" and spec is None:
            continue
        assert spec, f"{probe} missing"
        assert spec["httpGet"]["path"] == path, f"{probe} path"
        assert resolve_port(spec["httpGet"]["port"]) == listen_port, f"{probe} port"


def test_pod_runs_non_root_with_read_only_root():
    pod_sc, c_sc = pod_spec()["securityContext"], container()["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert isinstance(pod_sc["runAsUser"], int) and pod_sc["runAsUser"] > 0
    assert c_sc["readOnlyRootFilesystem"] is True
    assert c_sc["allowPrivilegeEscalation"] is False
    assert c_sc["capabilities"]["drop"] == ["ALL"]
    assert pod_spec().get("enableServiceLinks") is False, \
        "service links inject EMBED_WORKER_* variables into the config loader's namespace"


def test_resources_cap_cpu_at_two():
    res = container()["resources"]
    assert str(res["limits"]["cpu"]) in ("2", "2000m"), "ORT threads follow this CPU limit"
    assert res["requests"]["memory"] and res["limits"]["memory"]


def test_env_wires_consumer_user_and_password():
    env = {e["name"]: e for e in container()["env"]}
    consumer = env["EMBED_WORKER__STREAM__CONSUMER"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert consumer == "metadata.name"
    user = env["EMBED_WORKER__REDIS__USERNAME"]["value"]
    assert user in parse_acl(ACL_FILE.read_text()), f"ACL user {user!r} not in {ACL_FILE.name}"
    ref = env["EMBED_WORKER__REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secret_keys(ref["name"]), f"Secret {ref['name']} has no key {ref['key']}"
    for name, e in env.items():
        assert name.startswith("EMBED_WORKER__") or name in ("RUST_LOG", "RUST_BACKTRACE"), name
        assert "PASSWORD" not in name or "value" not in e, f"{name}: a password must come from a Secret"


def test_config_file_comes_from_the_configmap():
    args = container()["args"]
    config_path = args[args.index("--config") + 1]
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    configmaps = {d.name: d.body for d in DOCS if d.kind == "ConfigMap"}
    for name, mount in mounts.items():
        vol = volumes[name]
        if "configMap" not in vol:
            continue
        cm = vol["configMap"]["name"]
        assert cm in configmaps, f"ConfigMap {cm!r} is mounted but not defined"
        for item in vol["configMap"].get("items", []):
            assert item["key"] in configmaps[cm]["data"], f"{cm} has no key {item['key']}"
            if f"{mount['mountPath'].rstrip('/')}/{item['path']}" == config_path:
                return
    pytest.fail(f"--config {config_path} is not provided by a mounted ConfigMap")


def test_every_volume_mount_has_a_volume():
    volumes = {v["name"] for v in pod_spec()["volumes"]}
    for m in container()["volumeMounts"]:
        assert m["name"] in volumes, f"volumeMount {m['name']} has no volume"


# ---------------------------------------------------------------------------------------------
# Service


def test_service_selects_the_pods_and_the_metrics_port():
    svc = only(DOCS, "Service").body
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    for k, v in svc["spec"]["selector"].items():
        assert labels.get(k) == v, f"Service selector {k}={v} matches no pod label"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 9464
    assert resolve_port(port.get("targetPort", port["port"])) == 9464
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert resolve_port(ann["prometheus.io/port"]) == 9464
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"


# ---------------------------------------------------------------------------------------------
# KEDA


def test_keda_objects_use_the_keda_api():
    for kind in ("ScaledObject", "TriggerAuthentication"):
        assert only(DOCS, kind).body["apiVersion"] == KEDA_API, kind


def test_scaledobject_targets_the_deployment_and_can_reach_zero():
    spec = only(DOCS, "ScaledObject").body["spec"]
    assert set(spec) <= SCALEDOBJECT_SPEC_KEYS, f"unknown spec keys {set(spec) - SCALEDOBJECT_SPEC_KEYS}"
    ref = spec["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert ref["name"] == only(DOCS, "Deployment").name
    assert spec["minReplicaCount"] == 0, "scale to zero needs minReplicaCount 0 (and the lag trigger)"
    assert spec["maxReplicaCount"] >= 1
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int), f"{key} must be an integer"
    if "fallback" in spec:
        assert {"failureThreshold", "replicas"} <= set(spec["fallback"])
        # KEDA supports fallback only with AverageValue metrics (the default).
        assert all(t.get("metricType", "AverageValue") == "AverageValue" for t in spec["triggers"])


def test_cooldown_outlasts_the_drain_and_the_reclaim():
    cfg = worker_config(DOCS)
    cooldown = only(DOCS, "ScaledObject").body["spec"]["cooldownPeriod"]
    drain = parse_duration(cfg["worker"]["shutdown_timeout"])
    reclaim = parse_duration(cfg["stream"]["claim_idle"]) + parse_duration(cfg["stream"]["claim_interval"])
    assert cooldown > drain and cooldown > reclaim, (cooldown, drain, reclaim)


def redis_streams_triggers() -> list[dict]:
    return only(DOCS, "ScaledObject").body["spec"]["triggers"]


@pytest.mark.parametrize("trigger", redis_streams_triggers(), ids=lambda t: t.get("name", "?"))
def test_redis_streams_trigger_metadata(trigger: dict):
    assert set(trigger) <= TRIGGER_KEYS, f"unknown trigger keys {set(trigger) - TRIGGER_KEYS}"
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    # The CRD types metadata as map[string]string: an unquoted number is rejected by the API server.
    assert all(isinstance(v, str) for v in meta.values()), f"non-string metadata values: {meta}"
    assert set(meta) <= REDIS_STREAMS_KEYS, f"unknown redis-streams keys {set(meta) - REDIS_STREAMS_KEYS}"
    for key in REDIS_STREAMS_INT_KEYS & set(meta):
        assert int(meta[key]) >= 0, key
    assert "address" in meta or ("host" in meta and "port" in meta) or "addressFromEnv" in meta
    cfg = worker_config(DOCS)
    assert meta["stream"] == cfg["stream"]["name"]
    assert meta["consumerGroup"] == cfg["stream"]["group"]
    if "address" in meta:
        url = urlsplit(cfg["redis"]["url"])
        assert meta["address"] == f"{url.hostname}:{url.port or 6379}", "KEDA and the worker read different Redis"
    auth = trigger["authenticationRef"]
    assert auth.get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    names = {d.name for d in DOCS if d.kind == "TriggerAuthentication"}
    assert auth["name"] in names, f"authenticationRef {auth['name']!r} not in {names}"


def test_one_lag_trigger_and_one_pending_trigger():
    metas = [t["metadata"] for t in redis_streams_triggers()]
    lag = [m for m in metas if "lagCount" in m]
    # KEDA prefers lagCount when both are set, so a pending trigger must not carry lagCount.
    pending = [m for m in metas if "pendingEntriesCount" in m and "lagCount" not in m]
    assert len(lag) == 1 and len(pending) == 1, metas
    assert "activationLagCount" in lag[0], "the lag trigger needs activationLagCount"
    assert all("consumerGroup" in m for m in metas), "without consumerGroup KEDA falls back to XLEN"
    read_count = worker_config(DOCS)["stream"]["read_count"]
    assert int(pending[0]["pendingEntriesCount"]) > 2 * read_count, \
        "a healthy pod holds up to two reads in flight; below that, normal work would scale on 'pending'"


def test_trigger_authentication_reads_the_keda_user_from_the_secret():
    spec = only(DOCS, "TriggerAuthentication").body["spec"]
    refs = {r["parameter"]: r for r in spec["secretTargetRef"]}
    assert set(refs) <= TRIGGER_AUTH_PARAMS
    assert {"username", "password"} <= set(refs)
    for r in refs.values():
        assert r["key"] in secret_keys(r["name"]), f"Secret {r['name']} has no key {r['key']}"
    user = secret_value(refs["username"]["name"], refs["username"]["key"])
    assert user in parse_acl(ACL_FILE.read_text()), f"KEDA's ACL user {user!r} is not defined"


# ---------------------------------------------------------------------------------------------
# The Redis ACL file against the configuration


def test_acl_key_patterns_cover_the_configured_keys():
    cfg = worker_config(DOCS)
    worker = parse_acl(ACL_FILE.read_text())["embed-worker"]
    dead = cfg["stream"]["dead_letter_stream"] or f"{cfg['stream']['name']}:dead"
    keys = [cfg["stream"]["name"], dead, cfg["index"]["prefix"] + "some-id", cfg["index"]["name"]]
    for key in keys:
        assert any(fnmatch.fnmatchcase(key, p) for p in worker.key_patterns), \
            f"{key!r} is outside the embed-worker ACL key patterns {worker.key_patterns}"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    """Instructions of the last stage, with the stages it is built FROM prepended (runtime -> final)."""
    stages: dict[str, list] = {}
    order = []
    current = None
    for ins, args in dockerfile_instructions():
        if ins == "FROM":
            parts = args.split()
            current = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else f"#{len(order)}"
            base = parts[0]
            stages[current] = list(stages.get(base, [])) + [(ins, args)]
            order.append(current)
        elif current:
            stages[current].append((ins, args))
    return stages[order[-1]]


def test_dockerfile_final_image():
    ins = final_stage()
    text = (DEPLOY / "Dockerfile").read_text()
    assert "cargo build --release --locked" in text
    assert re.search(r"^FROM debian:[\w.-]*slim\b", text, re.M), "the runtime image is debian-slim"
    users = [a for i, a in ins if i == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER must be numeric for runAsNonRoot"
    assert int(users[-1].split(":")[0]) == pod_spec()["securityContext"]["runAsUser"]
    assert any(i == "EXPOSE" and "9464" in a.split() for i, a in ins)
    entry = [a for i, a in ins if i == "ENTRYPOINT"][-1]
    assert "embed-worker" in entry
    cmd = [a for i, a in ins if i == "CMD"][-1]
    assert cmd == '["run", "--config", "/etc/embed-worker/config.toml"]'
    assert container()["args"] == ["run", "--config", "/etc/embed-worker/config.toml"]
    env = " ".join(a for i, a in ins if i == "ENV")
    assert re.search(r"ORT_DYLIB_PATH=\S*libonnxruntime\.so\.", env), "ORT_DYLIB_PATH must be set"
    copies = " ".join(a for i, a in ins if i == "COPY")
    assert "libonnxruntime.so" in copies and "config/default.toml" in copies
    assert "all-MiniLM-L6-v2" in copies, "the default target bakes the model in"


# ---------------------------------------------------------------------------------------------
# The reindex Job (deploy/kubernetes/jobs/reindex.yaml): applied by hand, not by the Kustomization


def reindex_job() -> dict:
    import yaml

    docs = list(yaml.safe_load_all((K8S / "jobs" / "reindex.yaml").read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == "Job", docs
    return docs[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_reindex_job_matches_kubernetes_schema(version: str):
    kv.validate(reindex_job(), version, strict=True)


def test_reindex_job_runs_reindex_as_the_operator_user_with_the_workers_config():
    job = reindex_job()
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "OnFailure", "the command is resumable: retry it"
    (c,) = spec["containers"]
    assert c["args"][:2] == ["reindex", "--model-file"], c["args"]
    assert c["image"] == container()["image"], "the same image as the workers"
    env = {e["name"]: e for e in c["env"]}
    assert env["EMBED_WORKER__REDIS__USERNAME"]["value"] == "embed-reindex"
    assert "embed-reindex" in parse_acl(ACL_FILE.read_text()), "the user exists in the ACL file"
    ref = env["EMBED_WORKER__REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] != "embed-worker-redis", "never the workers' Secret"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert c["args"][c["args"].index("--config") + 1].startswith(mounts["config"])
    assert spec["volumes"] == pod_spec()["volumes"], "the workers' config and scratch volumes"
    assert spec["securityContext"] == pod_spec()["securityContext"]
    assert c["securityContext"] == container()["securityContext"]
