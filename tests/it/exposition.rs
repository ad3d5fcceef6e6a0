//! /metrics in both formats a scraper may ask for, from the real binary after the docs' example:
//! Prometheus text 0.0.4 by default and OpenMetrics 1.0 for an `Accept` that names it, each read
//! by the reference parsers of the Python `prometheus_client` (its text parser and its stricter
//! OpenMetrics parser), which must find the same series with the same values.

use std::time::Duration;

use crate::common::*;

const BOTH_FORMATS: &str = r##"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families as text_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families

def get(accept):
    req = urllib.request.Request(sys.argv[1], headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode()

def samples(families):
    """Series -> value; bucket bounds compared as numbers (OpenMetrics writes le="1.0" where the
    text format, like Go's client, writes le="1")."""
    out = {}
    for family in families:
        for s in family.samples:
            labels = dict(s.labels)
            if "le" in labels:
                labels["le"] = repr(float(labels["le"]))
            labels = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
            out[s.name + ("{%s}" % labels if labels else "")] = s.value
    return out

text_type, text = get(None)
om_type, om = get("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
print(json.dumps({"text_type": text_type, "om_type": om_type, "om_eof": om.endswith("# EOF\n"),
                  "text": samples(text_families(text)), "om": samples(om_families(om))}))
"##;

#[test]
fn text_and_openmetrics_expositions_agree_series_for_series() {
    let server = RedisServer::start();
    let names = Names::new("expo");
    let mut conn = server.conn();
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let _: String = ::redis::cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg(&["id", &i.to_string(), "content", content, "genre", genre])
            .query(&mut conn)
            .unwrap();
    }
    let port = free_port();
    let _worker = Fleet(vec![worker_cmd(&server, &names)
        .arg("run")
        .env("EMBED_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()]);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let scrape = || -> Option<serde_json::Value> {
        let out = std::process::Command::new(python())
            .arg("-c")
            .arg(BOTH_FORMATS)
            .arg(&url)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    };
    let done = wait_for(Duration::from_secs(120), || {
        let s = scrape()?;
        let acked = s["text"]["embed_worker_documents_acked_total"].as_f64()?;
        // The probe's gauges refreshed since the acks too (a round from before the reads shows
        // the three entries as lag, and the index without them).
        let gauges = ["embed_worker_group_pending", "embed_worker_stream_lag"]
            .iter()
            .all(|g| s["text"][*g].as_f64() == Some(0.0))
            && s["text"]["embed_worker_index_documents"].as_f64() == Some(3.0);
        (acked == 3.0 && gauges && pending(&mut conn, &names) == 0).then_some(s)
    })
    .expect("the worker never acked the docs' three documents");
    // Idle now: a second pair of scrapes, so no series moved between the two formats' reads.
    std::thread::sleep(Duration::from_millis(1500));
    let s = scrape().expect("both formats parse");
    assert!(
        s["text_type"]
            .as_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{}",
        s["text_type"]
    );
    assert!(
        s["om_type"]
            .as_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{}",
        s["om_type"]
    );
    assert_eq!(s["om_eof"], true);
    let (text, om) = (s["text"].as_object().unwrap(), s["om"].as_object().unwrap());
    let differ: Vec<_> = text
        .keys()
        .chain(om.keys())
        .filter(|k| text.get(*k) != om.get(*k))
        .map(|k| (k, text.get(k), om.get(k)))
        .collect();
    assert!(
        differ.is_empty(),
        "the two formats disagree (series, text, OpenMetrics): {differ:?}"
    );
    let before = done["text"].as_object().unwrap();
    let moved: Vec<_> = text
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .collect();
    assert!(moved.is_empty(), "series moved while idle: {moved:?}");
    for series in [
        "embed_worker_documents_acked_total",
        "embed_worker_indexing_delay_seconds_count",
        "embed_worker_ready",
        "embed_worker_stream_lag",
        "embed_worker_oldest_pending_age_seconds",
        "embed_worker_index_documents",
        "embed_worker_index_unindexed_primaries",
    ] {
        assert!(
            s["om"].get(series).is_some(),
            "{series} missing: {}",
            s["om"]
        );
    }
    assert_eq!(s["om"]["embed_worker_indexing_delay_seconds_count"], 3.0);
}
