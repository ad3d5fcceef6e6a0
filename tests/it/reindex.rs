//! `embed-worker reindex`: fp32 -> int8 with producers and queries running, real processes,
//! real models. Queries through `index.name` answer throughout; at the end every document has
//! the int8 vector, the fp32 worker is refused, and `search` with int8 prints the docs' order.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;

/// The binary on `storage`.
fn cmd(server: &RedisServer, names: &Names, storage: &str) -> std::process::Command {
    let mut cmd = worker_cmd(server, names);
    cmd.env("EMBED_WORKER__INDEX__STORAGE", storage);
    cmd
}

fn worker(server: &RedisServer, names: &Names, storage: &str, file: &str, consumer: &str) -> Child {
    cmd(server, names, storage)
        .env("EMBED_WORKER__MODEL__FILE", file)
        .env("EMBED_WORKER__STREAM__CONSUMER", consumer)
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn lag(conn: &mut ::redis::Connection, names: &Names) -> Option<u64> {
    let groups: Vec<HashMap<String, ::redis::Value>> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&names.stream)
        .query(conn)
        .ok()?;
    match groups.first()?.get("lag")? {
        ::redis::Value::Int(n) => Some(*n as u64),
        _ => None,
    }
}

fn drained(conn: &mut ::redis::Connection, names: &Names) -> bool {
    lag(conn, names) == Some(0) && pending(conn, names) == 0
}

fn record(conn: &mut ::redis::Connection) -> HashMap<String, String> {
    ::redis::cmd("HGETALL")
        .arg("embed:index:{vector_idx}")
        .query(conn)
        .unwrap()
}

fn doc_keys(conn: &mut ::redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = ::redis::cmd("KEYS").arg("doc:*").query(conn).unwrap();
    keys.sort();
    keys
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn reindex_moves_fp32_to_int8_while_producers_and_queries_run_on_hash() {
    moves_fp32_to_int8("hash");
}

#[test]
fn reindex_moves_fp32_to_int8_while_producers_and_queries_run_on_json() {
    moves_fp32_to_int8("json");
}

fn moves_fp32_to_int8(storage: &str) {
    let server = RedisServer::start();
    let names = docs_names();
    let mut conn = server.conn();
    xadd_docs(&mut conn, &names.stream);
    for i in 0..150 {
        let text = format!(
            "Corpus line {i}: the committee reviewed budget item {}.",
            i * 7
        );
        xadd(
            &mut conn,
            &names.stream,
            &[
                ("id", &format!("c{i}")),
                ("content", &text),
                ("genre", "corpus"),
            ],
        );
    }
    // A document long enough to be chunked: each chunk is re-embedded from its own text.
    let long: String = (0..60)
        .map(|i| format!("Paragraph {i} of the long report covers harbour dues and tides."))
        .collect::<Vec<_>>()
        .join(" ");
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "long"), ("content", &long), ("genre", "corpus")],
    );
    let mut fleet = Fleet(vec![worker(&server, &names, storage, "model.onnx", "fp32")]);
    assert!(
        wait_for(Duration::from_secs(120), || drained(&mut conn, &names)
            .then_some(()))
        .is_some(),
        "the fp32 worker drains the first feed"
    );
    let fp32 = record(&mut conn)["fingerprint"].clone();

    // Producers and queries run throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = {
        let (stop, produced, url) = (stop.clone(), produced.clone(), server.url());
        std::thread::spawn(move || {
            let mut conn = ::redis::Client::open(url)
                .unwrap()
                .get_connection()
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("Produced during the move, number {i}, about harbours.");
                xadd(
                    &mut conn,
                    "embed:docs",
                    &[
                        ("id", &format!("p{i}")),
                        ("content", &text),
                        ("genre", "produced"),
                    ],
                );
                // And rewrites of earlier documents, new text.
                let j = i % 150;
                let text = format!("Corpus line {j} rewritten at step {i}.");
                xadd(
                    &mut conn,
                    "embed:docs",
                    &[
                        ("id", &format!("c{j}")),
                        ("content", &text),
                        ("genre", "corpus"),
                    ],
                );
                produced.fetch_add(2, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    let (queries, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let querier = {
        let (stop, queries, failures, url) = (
            stop.clone(),
            queries.clone(),
            failures.clone(),
            server.url(),
        );
        std::thread::spawn(move || {
            let mut conn = ::redis::Client::open(url)
                .unwrap()
                .get_connection()
                .unwrap();
            let mut v = vec![0f32; 384];
            v[0] = 1.0;
            let blob: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            while !stop.load(Ordering::Relaxed) {
                let r: Result<Vec<::redis::Value>, _> = ::redis::cmd("FT.SEARCH")
                    .arg("vector_idx")
                    .arg("*=>[KNN 3 @embedding $v AS d]")
                    .arg("PARAMS")
                    .arg(2)
                    .arg("v")
                    .arg(&blob)
                    .arg("NOCONTENT")
                    .arg("DIALECT")
                    .arg(2)
                    .query(&mut conn);
                match r {
                    Ok(items) if items.len() == 4 => {}
                    Ok(items) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{} hits: {items:?}", items.len().saturating_sub(1))),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                queries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // A reindex killed once it has begun resumes when run again.
    let mut first = cmd(&server, &names, storage)
        .args(["reindex", "--model-file", "model_int8.onnx"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let begun = wait_for(Duration::from_secs(60), || {
        record(&mut conn)
            .contains_key("next_fingerprint")
            .then_some(())
    });
    first.kill().unwrap();
    let _ = first.wait();
    assert!(begun.is_some(), "the reindex began");
    // Its pass can be shared out (--part I/N), then one run without --part catches up and
    // switches.
    for part in ["0/2", "1/2"] {
        let out = run_ok(cmd(&server, &names, storage).args([
            "reindex",
            "--model-file",
            "model_int8.onnx",
            "--part",
            part,
        ]));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("part {part} done")), "{said}");
    }
    assert!(
        record(&mut conn).contains_key("next_fingerprint"),
        "parts do not switch"
    );
    // The int8 worker, started while the move is under way, waits for the switch (or starts
    // at once if the switch came first).
    fleet
        .0
        .push(worker(&server, &names, storage, "model_int8.onnx", "int8"));
    let out =
        run_ok(cmd(&server, &names, storage).args(["reindex", "--model-file", "model_int8.onnx"]));
    let said = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("moved to"), "{said}\n{progress}");
    assert!(progress.contains("resuming"), "{progress}");
    assert!(
        fleet.0[1].try_wait().unwrap().is_none(),
        "the int8 worker runs"
    );
    let r = record(&mut conn);
    let int8 = r["fingerprint"].clone();
    assert_ne!(int8, fp32);
    assert_eq!(r["writers"], int8);
    assert_eq!(r["index"], format!("vector_idx@{int8}"));
    assert_eq!(r["old_fingerprint"], fp32);

    // The fp32 worker is refused at its next write and exits, naming the move.
    let status = wait_for(Duration::from_secs(60), || fleet.0[0].try_wait().unwrap());
    let status = status.expect("the fp32 worker stops once the index moved");
    assert!(!status.success());
    let err = stderr_of(&mut fleet.0[0]);
    assert!(err.contains("moved to another model"), "{err}");

    // Let the int8 worker take over what was produced meanwhile and after.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    querier.join().unwrap();
    assert!(
        wait_for(Duration::from_secs(120), || drained(&mut conn, &names)
            .then_some(()))
        .is_some(),
        "the int8 worker drains the rest"
    );
    let failures = failures.lock().unwrap();
    assert!(
        queries.load(Ordering::Relaxed) > 20,
        "queries ran throughout"
    );
    assert!(
        failures.is_empty(),
        "queries through vector_idx failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(produced.load(Ordering::Relaxed) > 0);

    // Every document has the int8 vector, and the index has them all.
    let field = format!("embedding@{int8}");
    let keys = doc_keys(&mut conn);
    assert!(
        keys.iter().filter(|k| k.starts_with("doc:long#")).count() >= 3,
        "the long document is chunked: {keys:?}"
    );
    for key in &keys {
        let doc = document(&mut conn, key, storage);
        let models = doc.get("__ew_model").cloned().unwrap_or_default();
        assert!(models.split(' ').any(|m| m == int8), "{key}: {models}");
        assert_eq!(
            doc.get(&format!("{field}#floats")).map(String::as_str),
            Some("384"),
            "{key}: {doc:?}"
        );
    }
    let info: HashMap<String, ::redis::Value> = ::redis::cmd("FT.INFO")
        .arg("vector_idx")
        .query(&mut conn)
        .unwrap();
    let num_docs: String = ::redis::from_redis_value(info["num_docs"].clone()).unwrap();
    assert_eq!(num_docs.parse::<usize>().unwrap(), keys.len());

    // search with int8 prints the docs' order; fp32 is refused for search and run.
    let out = run_ok(
        cmd(&server, &names, storage)
            .env("EMBED_WORKER__MODEL__FILE", "model_int8.onnx")
            .args(["search", "--filter", "@genre:{persons|pets|weather}", QUERY]),
    );
    let lines = String::from_utf8(out.stdout).unwrap();
    let ids: Vec<&str> = lines
        .lines()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(ids, ["ID: doc:0", "ID: doc:1", "ID: doc:2"], "{lines}");
    for (line, expected) in lines.lines().zip(EXPECTED) {
        let d: f64 = line
            .split("Distance:")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((d - expected).abs() < 3e-2, "{line}");
    }
    for args in [vec!["search", QUERY], vec!["run", "--drain"]] {
        let out = cmd(&server, &names, storage).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("model mismatch"),
            "{args:?}"
        );
    }

    // A second run does nothing; --drop-old removes the fp32 vectors.
    let out =
        run_ok(cmd(&server, &names, storage).args(["reindex", "--model-file", "model_int8.onnx"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to move"));
    run_ok(cmd(&server, &names, storage).args([
        "reindex",
        "--model-file",
        "model_int8.onnx",
        "--drop-old",
    ]));
    for key in doc_keys(&mut conn) {
        let doc = document(&mut conn, &key, storage);
        assert!(
            !doc.contains_key("embedding#floats"),
            "{key} still has the fp32 vector"
        );
        assert_eq!(doc.get("__ew_model"), Some(&int8), "{key}");
    }
    assert!(!record(&mut conn).contains_key("old_fingerprint"));
    let indexes: Vec<String> = ::redis::cmd("FT._LIST").query(&mut conn).unwrap();
    assert_eq!(indexes, [format!("vector_idx@{int8}")]);
}
