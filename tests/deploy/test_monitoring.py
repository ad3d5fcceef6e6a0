"""deploy/monitoring checked by what operators run: the alert rules by `promtool check rules` and
their unit tests by `promtool test rules` (every alert with series that fire it and series that
must not), the Grafana dashboard's structure, and both against a live worker: a real Prometheus
server (Debian's `prometheus` package) scrapes the worker while it indexes the Redis docs'
example, loads the rules, answers every dashboard query, and every metric the rules and the
dashboard name is in the worker's /metrics.

Real processes only: the embedded redis-server (scripts/redis.sh), the debug binary `make test`
has built, and Prometheus, each on a free port with its data in a temporary directory, all
stopped at the end. promtool and prometheus are required (`.ci/run` installs them; elsewhere
`sudo apt-get install prometheus`): a missing one fails these tests, never skips them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy_support import ROOT
from test_local_setup import assert_docs_lines, clean_env, free_port, sh

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboard.json"
BIN = Path(os.environ.get("EMBED_WORKER_BIN") or ROOT / "target" / "debug" / "embed-worker")
METRIC = re.compile(r"\bembed_worker_[a-z0-9_]+")
# What the dashboard must show (issue 18): each a panel title.
PANELS = ["Throughput", "Indexing delay (XADD to ack)", "Lag and pending", "Oldest pending entry age",
          "Dead letters by reason", "Batch size", "Padding", "Model busy share", "Resident memory"]
ALERTS = ["EmbedWorkerLagGrowing", "EmbedWorkerPendingEntryStuck", "EmbedWorkerDeadLetters",
          "EmbedWorkerNotReady", "EmbedWorkerModelErrors", "EmbedWorkerNoAcks"]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the deploy/monitoring checks need Prometheus's {name}. "
                    "Fix: sudo apt-get install prometheus (.ci/run installs it)")
    return path


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def named_metrics() -> set[str]:
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    return {m for e in exprs for m in METRIC.findall(e)}


# ---------------------------------------------------------------------------------------------
# Offline: the files themselves


def test_the_rules_pass_promtool_check():
    p = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in p.stdout, p.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_that_must_not_and_they_pass():
    assert sorted(r["alert"] for r in rules()) == sorted(ALERTS)
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(ALERTS), f"alerts without a firing case: {set(ALERTS) - fires}"
    assert quiet == set(ALERTS), f"alerts without a must-not-fire case: {set(ALERTS) - quiet}"
    p = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=MONITORING,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout, p.stdout


def test_the_dashboard_is_grafana_json_with_the_panels_operators_ask_for():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    titles = [p["title"] for p in dash["panels"]]
    assert [t for t in PANELS if t not in titles] == [], titles
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"], p["title"]
            assert METRIC.search(t["expr"]) and 'job=~"$job"' in t["expr"], t["expr"]


# ---------------------------------------------------------------------------------------------
# Live: the embedded Redis, the worker indexing the docs' example, Prometheus scraping it


@dataclass
class Live:
    metrics_url: str
    prometheus: str

    def query(self, promql: str) -> list[dict]:
        """An instant query; the result vector (fails on a PromQL error)."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.prometheus}{path}", timeout=10) as r:
            return json.load(r)["data"]


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait(what: str, timeout: float, check, *logs: Path):
    """Polls `check` until it returns something truthy; fails naming `what` and the logs' tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"{what} within {timeout:.0f} s\n{tails}")


def samples(text: str) -> dict[str, float]:
    """Series (name plus labels as written) -> value, from Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def demo_documents() -> str:
    """The docs' three documents, as scripts/demo.sh enqueues them (JSON lines)."""
    lines = re.findall(r"'(\{.*\})'", (ROOT / "scripts" / "demo.sh").read_text())
    assert len(lines) == 3, lines
    return "\n".join(lines) + "\n"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    prometheus = tool("prometheus")
    assert BIN.is_file(), f"{BIN} missing: `make test` builds it with cargo test (or set EMBED_WORKER_BIN)"
    tmp = tmp_path_factory.mktemp("monitoring")
    redis_port, http_port, prom_port = free_port(), free_port(), free_port()
    env = clean_env(REDIS_PORT=str(redis_port), REDIS_DIR=str(tmp / "redis"))
    worker_env = dict(env, EMBED_WORKER__REDIS__URL=f"redis://127.0.0.1:{redis_port}",
                      EMBED_WORKER__HTTP__LISTEN=f"127.0.0.1:{http_port}")
    p, _ = sh(["scripts/redis.sh", "start"], env)
    assert p.returncode == 0, p.stdout + p.stderr
    procs: list[subprocess.Popen] = []
    try:
        worker_log = tmp / "worker.log"
        procs.append(subprocess.Popen(["bash", "-c", 'source scripts/env.sh && exec "$@"', "_", str(BIN), "run"],
                                      cwd=ROOT, env=worker_env, stdout=subprocess.DEVNULL,
                                      stderr=worker_log.open("w")))
        metrics_url = f"http://127.0.0.1:{http_port}/metrics"
        wait("the worker ready", 180, lambda: get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, worker_log)

        # The Redis docs' example through the running worker: enqueue, indexed, searched.
        enqueue = subprocess.run(["bash", "-c", 'source scripts/env.sh && exec "$@"', "_", str(BIN), "enqueue", "-"],
                                 cwd=ROOT, env=worker_env, input=demo_documents(), capture_output=True, text=True,
                                 timeout=60)
        assert enqueue.returncode == 0, enqueue.stderr
        wait("3 documents acked", 120,
             lambda: samples(get(metrics_url)[1]).get("embed_worker_documents_acked_total") == 3, worker_log)
        p, _ = sh([str(BIN), "search", "That is a happy person"], worker_env)
        assert p.returncode == 0, p.stderr
        assert_docs_lines(p.stdout)

        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "embed-worker",
                                "static_configs": [{"targets": [f"127.0.0.1:{http_port}"]}]}],
        }))
        prom_log = tmp / "prometheus.log"
        procs.append(subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            cwd=tmp, stdout=subprocess.DEVNULL, stderr=prom_log.open("w")))
        url = f"http://127.0.0.1:{prom_port}"
        wait("Prometheus ready", 60, lambda: get(f"{url}/-/ready")[0] == 200, prom_log)
        yield Live(metrics_url, url)
    finally:
        for proc in reversed(procs):
            stop(proc)
        sh(["scripts/redis.sh", "stop"], env)


def test_prometheus_scrapes_the_worker_and_counts_the_docs_example(live):
    def acked():
        got = live.query("embed_worker_documents_acked_total")
        return got if got and got[0]["value"][1] == "3" else None

    [series] = wait("Prometheus to have scraped embed_worker_documents_acked_total = 3", 60, acked)
    assert series["metric"]["job"] == "embed-worker"
    [delays] = live.query("embed_worker_indexing_delay_seconds_count")
    assert delays["value"][1] == "3", delays
    [ready] = live.query("embed_worker_ready")
    assert ready["value"][1] == "1", ready
    [target] = live.api("/api/v1/targets")["activeTargets"]
    assert target["health"] == "up", target


def test_prometheus_loads_and_evaluates_every_alert_rule(live):
    def evaluated():
        loaded = [r for g in live.api("/api/v1/rules")["groups"] for r in g["rules"]]
        done = [r for r in loaded if r.get("lastEvaluation", "").startswith("0001")] == []
        return loaded if done and len(loaded) == len(ALERTS) else None

    loaded = wait("every rule evaluated once", 30, evaluated)
    assert sorted(r["name"] for r in loaded) == sorted(ALERTS)
    for r in loaded:
        assert r["type"] == "alerting" and r["health"] == "ok", r
    # A healthy worker that has finished the example fires nothing.
    assert [r["name"] for r in loaded if r["state"] == "firing"] == []


def test_every_dashboard_query_runs_and_the_freshness_panels_have_data(live):
    wait("two scrapes of the worker", 30, lambda: live.query("count_over_time(up[1m]) >= 2"))
    results = {}
    for expr in dashboard_exprs():
        promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        results[expr] = live.query(promql)
    with_data = {e for e, r in results.items() if r}
    for needle in ["embed_worker_documents_acked_total", "embed_worker_stream_lag",
                   "embed_worker_oldest_pending_age_seconds", "embed_worker_resident_memory_bytes",
                   "embed_worker_ready"]:
        assert any(needle in e for e in with_data), f"no data for the panel on {needle}"


def test_every_metric_the_rules_and_the_dashboard_name_is_exposed(live):
    status, text = get(live.metrics_url)
    assert status == 200
    exposed = {series.split("{", 1)[0] for series in samples(text)}
    named = named_metrics()
    assert len(named) >= 10, named
    assert sorted(named - exposed) == [], f"named by deploy/monitoring but not in /metrics: {sorted(named - exposed)}"
