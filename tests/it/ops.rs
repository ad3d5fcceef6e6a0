//! The operations issue's promises, against the real binary, model and redis-server:
//! `/metrics` parses as Prometheus text and moves by exactly what happened, `/readyz` follows
//! Redis going away and coming back, `stats` agrees with Redis, the logs name each failed entry
//! once, real Node.js and RedisVL clients work with the worker, and docs/OPERATIONS.md documents
//! every configuration key.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// Kills the worker if a test fails half-way.
/// GET `path` from 127.0.0.1:`port`: (status, body), or None if nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn readyz(port: u16) -> Option<u16> {
    http_get(port, "/readyz").map(|(status, _)| status)
}

// ---------------------------------------------------------------------------------------------
// A strict parser for the Prometheus text format 0.0.4, as this exposition should be written:
// every sample belongs to a family declared by one `# TYPE` line before it, families are not
// interleaved, names and label names are valid, label values are properly escaped, no series
// appears twice, counters end in `_total`, histogram buckets are cumulative and `+Inf` = `_count`.

/// Series key (`name{a="x",b="y"}`, labels sorted, values unescaped) -> value.
type Samples = BTreeMap<String, f64>;

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn series_key(name: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Parses `{a="x",...}` at the start of `s`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("unquoted label value")?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[eq + 2 + end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_prometheus(text: &str) -> Result<Samples, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut samples = Samples::new();
    if !text.ends_with('\n') {
        return Err("exposition must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, arg) = (parts.next(), parts.next(), parts.next());
            let name = name.ok_or_else(|| err("comment without a name".into()))?;
            match kind {
                Some("HELP") => {
                    if !helps.insert(name.to_string()) {
                        return Err(err("second HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let t = arg.ok_or_else(|| err("TYPE without a type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(err(format!("unknown type {t}")));
                    }
                    if !valid_name(name) || types.insert(name.into(), t.into()).is_some() {
                        return Err(err("bad or repeated TYPE".into()));
                    }
                    if t == "counter" && !name.ends_with("_total") {
                        return Err(err("counter name without _total".into()));
                    }
                    if let Some(prev) = current.replace(name.to_string()) {
                        finished.insert(prev);
                    }
                }
                _ => return Err(err("unknown comment".into())),
            }
            continue;
        }
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value_text = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?;
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .map_err(|_| err("bad value (or a timestamp)".into()))?,
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            .unwrap_or(name);
        let Some(kind) = types.get(family) else {
            return Err(err("sample of an undeclared family".into()));
        };
        if current.as_deref() != Some(family) || finished.contains(family) {
            return Err(err("family interleaved with another".into()));
        }
        if kind == "histogram" && name.ends_with("_bucket") != labels.contains_key("le") {
            return Err(err("le label only and always on buckets".into()));
        }
        if samples.insert(series_key(name, &labels), value).is_some() {
            return Err(err("series repeated".into()));
        }
    }
    check_histograms(text, &types, &samples)?;
    Ok(samples)
}

/// Buckets cumulative in `le` order, `+Inf` present and equal to `_count`.
fn check_histograms(
    text: &str,
    types: &BTreeMap<String, String>,
    samples: &Samples,
) -> Result<(), String> {
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        // Group bucket lines by their other labels, in exposition order.
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
        {
            let (mut labels, rest) = parse_labels(&line[family.len() + 7..])?;
            let le = labels.remove("le").expect("checked above");
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().map_err(|_| format!("bad le {le}"))?
            };
            let v: f64 = rest
                .trim()
                .parse()
                .map_err(|_| "bad bucket value".to_string())?;
            series
                .entry(series_key("", &labels))
                .or_default()
                .push((le, v));
        }
        if series.is_empty() {
            return Err(format!("{family}: histogram without buckets"));
        }
        for (labels, buckets) in series {
            if !buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
            {
                return Err(format!(
                    "{family}{labels}: buckets not cumulative: {buckets:?}"
                ));
            }
            let (last_le, inf) = *buckets.last().expect("non-empty");
            let count = samples.get(&format!("{family}_count{labels}"));
            if last_le != f64::INFINITY || count != Some(&inf) {
                return Err(format!(
                    "{family}{labels}: +Inf bucket {inf} vs _count {count:?}"
                ));
            }
            if !samples.contains_key(&format!("{family}_sum{labels}")) {
                return Err(format!("{family}{labels}: no _sum"));
            }
        }
    }
    Ok(())
}

#[test]
fn the_strict_parser_rejects_what_prometheus_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"x\\\"y\"} 1\n";
    assert_eq!(parse_prometheus(good).unwrap()["a_total{k=\"x\"y\"}"], 1.0);
    for bad in [
        "a_total 1\n",                                    // undeclared
        "# TYPE a_total counter\na_total 1",              // no final newline
        "# TYPE a_total counter\na_total one\n",          // bad value
        "# TYPE a_total counter\na_total{k=x} 1\n",       // unquoted
        "# TYPE a_total counter\na_total 1\na_total 2\n", // repeated
        "# TYPE a counter\na 1\n",                        // counter without _total
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n",
        "# TYPE a_total counter\n# TYPE b gauge\nb 1\na_total 1\n", // interleaved
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

/// The same text through the reference parser (prometheus_client, pinned in
/// tests/clients/requirements.txt): series key -> value, in the strict parser's key format.
fn parse_with_prometheus_client(text: &str) -> Samples {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(
            r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        out[s.name + ("{%s}" % labels if labels else "")] = s.value
print(json.dumps(out))
"#,
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(port: u16) -> Samples {
    let (status, text) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    let ours = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let reference = parse_with_prometheus_client(&text);
    assert_eq!(ours, reference, "the two parsers disagree");
    ours
}

fn value(samples: &Samples, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no series {key} in {samples:#?}"))
}

/// 5 documents and 2 poison entries through a running worker: exact counters, the gauges while
/// entries are held pending, one JSON log line per failed entry, then `stats` against Redis.
#[test]
fn metrics_logs_and_stats_account_for_every_entry() {
    let server = RedisServer::start();
    let names = Names::new("ops");
    let mut conn = server.conn();
    for i in 0..5 {
        let content = format!("operations document number {i}");
        xadd(
            &mut conn,
            &names.stream,
            &[("id", &i.to_string()), ("content", &content)],
        );
    }
    let missing = xadd(
        &mut conn,
        &names.stream,
        &[("id", "p1"), ("title", "no content")],
    );
    let empty = xadd(
        &mut conn,
        &names.stream,
        &[("id", "p2"), ("content", "   ")],
    );

    let port = free_port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let worker = Fleet(vec![worker_cmd(&server, &names)
        .args(["run"])
        .env("EMBED_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("EMBED_WORKER__LOG__FORMAT", "json")
        .env("EMBED_WORKER__STREAM__CONSUMER", "ops-worker")
        // Every write waits 4 s, so the 7 entries sit pending long enough to be seen.
        .env("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE", "4s")
        .stderr(logs.reopen().unwrap())
        .spawn()
        .unwrap()]);

    // While held: the gauges show all 7 delivered and pending, none lagging.
    let held = wait_for(Duration::from_secs(60), || {
        let m = http_get(port, "/metrics").and_then(|(_, t)| parse_prometheus(&t).ok())?;
        (m.get("embed_worker_group_pending") == Some(&7.0)).then_some(m)
    })
    .expect("embed_worker_group_pending never showed the 7 pending entries");
    assert_eq!(value(&held, "embed_worker_stream_lag"), 0.0);
    assert_eq!(value(&held, "embed_worker_documents_acked_total"), 0.0);

    let done = wait_for(Duration::from_secs(60), || {
        let m = scrape(port);
        let finished = m["embed_worker_documents_acked_total"] == 5.0
            && m["embed_worker_group_pending"] == 0.0;
        finished.then_some(m)
    })
    .expect("the worker did not ack the 5 documents");
    // Redis agrees, and nothing moves further.
    assert_eq!(pending(&mut conn, &names), 0);
    let dead_len: u64 = ::redis::cmd("XLEN")
        .arg(names.dead())
        .query(&mut conn)
        .unwrap();
    assert_eq!(dead_len, 2);
    std::thread::sleep(probe_interval());
    let m = scrape(port);
    assert_eq!(m, done, "counters moved after everything was handled");

    assert_eq!(value(&m, "embed_worker_documents_embedded_total"), 5.0);
    assert_eq!(value(&m, "embed_worker_documents_written_total"), 5.0);
    assert_eq!(value(&m, "embed_worker_documents_acked_total"), 5.0);
    let dead = |reason: &str| {
        value(
            &m,
            &format!("embed_worker_dead_letters_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(dead("missing_text"), 1.0);
    assert_eq!(dead("empty_text"), 1.0);
    let all_dead: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("embed_worker_dead_letters_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(all_dead, 2.0, "acked + dead letters = the 7 entries");
    assert_eq!(value(&m, "embed_worker_errors_total{kind=\"redis\"}"), 0.0);
    assert_eq!(value(&m, "embed_worker_errors_total{kind=\"model\"}"), 0.0);
    // Every embedded document went through exactly one model call.
    let batches = value(&m, "embed_worker_batch_documents_count");
    assert!(batches >= 1.0);
    assert_eq!(value(&m, "embed_worker_batch_documents_sum"), 5.0);
    assert_eq!(value(&m, "embed_worker_batch_padded_tokens_count"), batches);
    // Each text is [CLS] operations document number N [SEP]: 6 tokens, all the same length.
    assert_eq!(value(&m, "embed_worker_batch_padded_tokens_sum"), 5.0 * 6.0);
    let stage = |s: &str| {
        value(
            &m,
            &format!("embed_worker_stage_duration_seconds_count{{stage=\"{s}\"}}"),
        )
    };
    assert_eq!(stage("model"), batches);
    assert!(stage("tokenize") >= 1.0);
    assert!(
        stage("write") >= 2.0,
        "the dead letters and the documents were written"
    );
    let model_info: Vec<_> = m
        .keys()
        .filter(|k| k.starts_with("embed_worker_model_info{"))
        .collect();
    assert_eq!(model_info.len(), 1);
    assert!(
        model_info[0].contains("dimension=\"384\"") && !model_info[0].contains("name=\"\""),
        "{model_info:?}"
    );

    drop(worker);
    // JSON logs, and each failed entry named exactly once with its reason.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(logs.path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    for (id, reason) in [(&missing, "missing_text"), (&empty, "empty_text")] {
        let about: Vec<_> = lines.iter().filter(|l| l["entry"] == id.as_str()).collect();
        assert_eq!(about.len(), 1, "{id}: {about:?}");
        assert_eq!(about[0]["reason"], reason);
        assert_eq!(about[0]["level"], "WARN");
    }
    assert_eq!(lines.iter().filter(|l| l.get("entry").is_some()).count(), 2);

    // stats: one entry new (lag), one delivered to another consumer and not acked (pending).
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "8"), ("content", "late one")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "9"), ("content", "later one")],
    );
    take_one_as(&mut conn, &names, "probe");
    let out = run_ok(worker_cmd(&server, &names).args(["stats", "--json"]));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let xlen: u64 = ::redis::cmd("XLEN")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    assert_eq!(xlen, 9);
    assert_eq!(s["stream"]["length"], xlen);
    assert_eq!(s["group"]["name"], names.group.as_str());
    assert_eq!(s["group"]["lag"], 1);
    assert_eq!(s["group"]["pending"], pending(&mut conn, &names));
    assert_eq!(s["group"]["pending"], 1);
    let consumers: BTreeMap<String, (u64, u64)> = s["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let n = |k: &str| c[k].as_u64().unwrap();
            (
                c["name"].as_str().unwrap().to_string(),
                (n("pending"), n("idle_ms")),
            )
        })
        .collect();
    assert_eq!(
        consumers.keys().collect::<Vec<_>>(),
        ["ops-worker", "probe"]
    );
    assert_eq!(consumers["ops-worker"].0, 0);
    assert_eq!(consumers["probe"].0, 1);
    assert!(consumers["probe"].1 < 60_000, "{consumers:?}");
    assert_eq!(s["dead_letters"]["name"], names.dead());
    assert_eq!(s["dead_letters"]["length"], 2);
    assert_eq!(s["index"]["name"], names.index.as_str());
    assert_eq!(s["index"]["num_docs"], 5);
    assert_eq!(s["index"]["hash_indexing_failures"], 0);

    let table = String::from_utf8(run_ok(worker_cmd(&server, &names).arg("stats")).stdout).unwrap();
    for needle in [
        "length 9",
        "lag 1  pending 1",
        "hashes 5  indexing failures 0",
        "probe",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }

    // Nothing there yet: no error, just absences.
    let fresh = Names::new("opsnone");
    let out = run_ok(worker_cmd(&server, &fresh).args(["stats", "--json"]));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["stream"]["length"], 0);
    assert!(s["group"].is_null() && s["index"].is_null(), "{s}");
}

fn probe_interval() -> Duration {
    embed_worker::observe::probe::INTERVAL + Duration::from_millis(500)
}

/// `/readyz` turns 503 within seconds of Redis going away while the worker is idle, and 200 again
/// when it returns; it also notices an index dropped behind the worker's back. The worker itself
/// carries on and indexes a document written afterwards.
#[test]
fn readyz_follows_redis_away_and_back() {
    let mut server = RedisServer::start();
    let names = Names::new("ready");
    let port = free_port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Fleet(vec![worker_cmd(&server, &names)
        .arg("run")
        .env("EMBED_WORKER__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stderr(logs.reopen().unwrap())
        .spawn()
        .unwrap()]);
    wait_for(Duration::from_secs(60), || {
        (readyz(port) == Some(200)).then_some(())
    })
    .expect("never ready");
    assert_eq!(http_get(port, "/readyz").unwrap().1, "ready\n");

    // A snapshot keeps the stream, the group and the index across the restart, as a persistent
    // production Redis would (the restarted server loads it from the same directory).
    let _: () = ::redis::cmd("SAVE").query(&mut server.conn()).unwrap();
    server.kill();
    wait_for(Duration::from_secs(10), || {
        (readyz(port) == Some(503)).then_some(())
    })
    .expect("still ready 10 s after Redis went away");
    let (_, body) = http_get(port, "/readyz").unwrap();
    assert!(body.contains("redis unreachable"), "{body}");
    assert_eq!(
        http_get(port, "/livez").map(|r| r.0),
        Some(200),
        "alive, just not ready"
    );

    server.restart();
    wait_for(Duration::from_secs(30), || {
        (readyz(port) == Some(200)).then_some(())
    })
    .expect("not ready again 30 s after Redis came back");
    assert!(
        worker.0[0].try_wait().unwrap().is_none(),
        "the worker exited"
    );

    // Readiness covers more than the connection: an index dropped behind the worker's back.
    let mut conn = server.conn();
    let _: () = ::redis::cmd("FT.DROPINDEX")
        .arg(&names.index)
        .query(&mut conn)
        .unwrap();
    wait_for(Duration::from_secs(10), || {
        let (status, body) = http_get(port, "/readyz")?;
        (status == 503 && body == "not ready: index missing\n").then_some(())
    })
    .expect("not 503 \"index missing\" 10 s after the index was dropped");
    run_ok(worker_cmd(&server, &names).args(["index", "create"]));
    wait_for(Duration::from_secs(10), || {
        (readyz(port) == Some(200)).then_some(())
    })
    .expect("not ready 10 s after the index was recreated");

    xadd(
        &mut conn,
        &names.stream,
        &[("id", "after"), ("content", "written after the restart")],
    );
    let key = format!("{}after", names.prefix);
    wait_for(Duration::from_secs(30), || {
        let n: u64 = ::redis::cmd("EXISTS").arg(&key).query(&mut conn).ok()?;
        (n == 1).then_some(())
    })
    .expect("the document written after the restart was not indexed");

    // Human logs by default, without colour codes when stderr is not a terminal.
    drop(worker);
    let text = std::fs::read_to_string(logs.path()).unwrap();
    assert!(text.contains("worker started"), "{text}");
    assert!(!text.contains('\x1b') && !text.starts_with('{'), "{text}");
}

/// A Node.js producer (npm `redis`) feeds the worker; RedisVL (`SearchIndex.from_existing`,
/// `VectorQuery`) gets the Redis docs' answer from the worker's index.
#[test]
fn node_producer_and_redisvl_query() {
    let node_dir = root().join("tests/clients/node");
    assert!(
        node_dir.join("node_modules/redis").is_dir(),
        "run `make setup` (npm ci in tests/clients/node)"
    );
    let server = RedisServer::start();
    let names = Names {
        stream: "embed:docs".into(),
        group: "embedders".into(),
        index: "vector_idx".into(),
        prefix: "doc:".into(),
    };
    let out = run_ok(
        Command::new("node")
            .arg(node_dir.join("producer.mjs"))
            .arg(server.url())
            .arg(&names.stream),
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut conn = server.conn();
    let xlen: u64 = ::redis::cmd("XLEN")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    assert_eq!(xlen, 3);

    run_ok(worker_cmd(&server, &names).args(["run", "--drain"]));

    let query = embed(&[QUERY]).pop().unwrap();
    assert_docs_search_lines(&redisvl_query(&server, &names.index, &query));
}

/// docs/OPERATIONS.md's configuration reference lists exactly the keys of config/default.toml,
/// each with its default as written there.
#[test]
fn operations_doc_covers_every_config_key() {
    let toml = std::fs::read_to_string(root().join("config/default.toml")).unwrap();
    let mut section = String::new();
    let mut in_config: BTreeMap<String, String> = BTreeMap::new();
    for line in toml.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((key, value)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
            in_config.insert(
                format!("{section}.{}", key.trim()),
                value.trim().to_string(),
            );
        }
    }
    assert!(in_config.len() > 30, "{in_config:?}");
    let doc = std::fs::read_to_string(root().join("docs/OPERATIONS.md")).unwrap();
    let reference = doc
        .split_once("\n## Configuration reference")
        .expect("a \"## Configuration reference\" section")
        .1;
    let reference = reference.split("\n## ").next().unwrap();
    // Its table rows: | `section.key` | `default` | meaning |
    let in_doc: BTreeMap<String, String> = reference
        .lines()
        .filter_map(|l| {
            let (key, rest) = l.strip_prefix("| `")?.split_once("` | `")?;
            let (default, _) = rest.split_once("` | ")?;
            Some((key.to_string(), default.replace("\\|", "|")))
        })
        .collect();
    let config_keys: BTreeSet<_> = in_config.keys().collect();
    let doc_keys: BTreeSet<_> = in_doc.keys().collect();
    let undocumented: Vec<_> = config_keys.difference(&doc_keys).collect();
    let unknown: Vec<_> = doc_keys.difference(&config_keys).collect();
    assert!(
        undocumented.is_empty(),
        "keys missing from docs/OPERATIONS.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/OPERATIONS.md lists keys config/default.toml lacks: {unknown:?}"
    );
    for (key, default) in &in_config {
        assert_eq!(
            &in_doc[key], default,
            "docs/OPERATIONS.md: default of {key}"
        );
    }
}
