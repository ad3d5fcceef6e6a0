//! The worker issue's promises: the docs' example end to end through the stream, against a real
//! redis-server with the Query Engine, with producers and queries from a non-Rust client.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// XADDs the docs' three documents from Python (redis-py), ids 0..2 with genres.
fn produce_docs_with_python(server: &RedisServer, stream: &str) {
    python_ok(
        r#"
import sys, redis
r = redis.Redis(port=int(sys.argv[1]))
docs = [("That is a very happy person", "persons"), ("That is a happy dog", "pets"), ("Today is a sunny day", "weather")]
for i, (content, genre) in enumerate(docs):
    r.xadd(sys.argv[2], {"id": str(i), "content": content, "genre": genre})
"#,
        &[&server.port.to_string(), stream],
    );
}

fn drain(server: &RedisServer, names: &Names) -> std::process::Output {
    run_ok(worker_cmd(server, names).args(["run", "--drain"]))
}

#[test]
fn docs_example_through_the_stream() {
    let server = RedisServer::start();
    let names = docs_names();
    produce_docs_with_python(&server, &names.stream);
    drain(&server, &names);

    let mut conn = server.conn();
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let key = format!("doc:{i}");
        let h: std::collections::HashMap<String, Vec<u8>> =
            ::redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
        assert_eq!(
            h.get("content").map(|v| v.as_slice()),
            Some(content.as_bytes()),
            "{key}"
        );
        assert_eq!(
            h.get("genre").map(|v| v.as_slice()),
            Some(genre.as_bytes()),
            "{key}"
        );
        assert_eq!(
            h.get("embedding").map(Vec::len),
            Some(1536),
            "{key}: 384 little-endian float32"
        );
        assert!(!h.contains_key("id"), "the id is the key, not a field");
    }
    assert_eq!(pending(&mut conn, &names), 0);

    let out = run_ok(worker_cmd(&server, &names).args(["search", QUERY]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());
}

#[test]
fn an_external_client_gets_the_same_knn_answer() {
    let server = RedisServer::start();
    let names = docs_names();
    produce_docs_with_python(&server, &names.stream);
    drain(&server, &names);
    let query = embed(&[QUERY]).pop().unwrap();
    let out = python_ok(
        r#"
import sys, json, struct, redis
r = redis.Redis(port=int(sys.argv[1]), protocol=2)
vec = struct.pack("<%df" % 384, *json.loads(sys.argv[2]))
res = r.execute_command("FT.SEARCH", "vector_idx", "*=>[KNN 3 @embedding $vec AS vector_distance]",
    "PARAMS", "2", "vec", vec, "SORTBY", "vector_distance", "RETURN", "1", "vector_distance", "DIALECT", "2")
for i in range(1, len(res), 2):
    print(res[i].decode(), dict(zip(res[i+1][::2], res[i+1][1::2]))[b"vector_distance"].decode())
"#,
        &[
            &server.port.to_string(),
            &serde_json::to_string(&query).unwrap(),
        ],
    );
    let rows: Vec<(String, f64)> = out
        .lines()
        .map(|l| {
            let (k, d) = l.split_once(' ').unwrap();
            (k.to_string(), d.parse().unwrap())
        })
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["doc:0", "doc:1", "doc:2"]
    );
    for (i, (_, d)) in rows.iter().enumerate() {
        assert!((d - EXPECTED[i]).abs() < 1e-4, "doc:{i} at {d}");
    }
}

#[test]
fn extra_fields_are_copied_missing_ids_use_the_entry_id_and_filters_narrow() {
    let server = RedisServer::start();
    let names = Names::new("extra");
    let mut conn = server.conn();
    let entry_id: String = ::redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg("content")
        .arg("That is a happy dog")
        .arg("genre")
        .arg("pets")
        .arg("lang")
        .arg("en")
        .query(&mut conn)
        .unwrap();
    let _: String = ::redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg("id")
        .arg("p1")
        .arg("content")
        .arg("That is a very happy person")
        .arg("genre")
        .arg("persons")
        .query(&mut conn)
        .unwrap();
    drain(&server, &names);
    let key = format!("{}{entry_id}", names.prefix);
    let lang: Option<String> = ::redis::cmd("HGET")
        .arg(&key)
        .arg("lang")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        lang.as_deref(),
        Some("en"),
        "{key} should hold the extra field"
    );

    let out = run_ok(worker_cmd(&server, &names).args([
        "search",
        QUERY,
        "-k",
        "5",
        "--filter",
        "@genre:{pets}",
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with(&format!("ID: {key}, ")), "{text}");
}

/// `run` with one setting, and every write held back for a minute (the test-only pause between
/// read and write), so whatever it reads stays pending.
fn worker_holding_its_writes(server: &RedisServer, names: &Names, key: &str, value: &str) -> Fleet {
    Fleet(vec![worker_cmd(server, names)
        .env(key, value)
        .env("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE", "60s")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()])
}

#[test]
fn a_killed_worker_leaves_entries_pending_and_its_restart_finishes_them() {
    let server = RedisServer::start();
    let names = Names::new("kill");
    let mut conn = server.conn();
    for i in 0..40 {
        let _: String = ::redis::cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("id")
            .arg(i)
            .arg("content")
            .arg(format!("sentence number {i}"))
            .query(&mut conn)
            .unwrap();
    }
    // A worker that reads, then dies before writing: the test-only pause between read and
    // write holds it there, and SIGKILL ends it.
    let fleet =
        worker_holding_its_writes(&server, &names, "EMBED_WORKER__STREAM__CONSUMER", "pod-a");
    let read = wait_for(Duration::from_secs(30), || {
        (pending(&mut conn, &names) == 40).then_some(())
    });
    drop(fleet); // SIGKILL

    assert!(read.is_some(), "the worker should have read all 40 entries");
    let written: u64 = ::redis::cmd("XLEN")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    assert_eq!(written, 40);
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}*", names.prefix))
        .query(&mut conn)
        .unwrap();
    assert!(
        keys.is_empty(),
        "nothing may be written by the killed worker: {keys:?}"
    );
    assert_eq!(
        pending(&mut conn, &names),
        40,
        "killed mid-batch: all still pending, none acked"
    );

    // Same consumer name: it picks up its own pending entries first.
    run_ok(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__STREAM__CONSUMER", "pod-a")
            .args(["run", "--drain"]),
    );
    assert_eq!(pending(&mut conn, &names), 0);
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}*", names.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 40);
}

#[test]
fn a_dimension_mismatch_refuses_to_start() {
    let server = RedisServer::start();
    let names = Names::new("dim");
    let mut conn = server.conn();
    let _: () = ::redis::cmd("FT.CREATE")
        .arg(&names.index)
        .arg("ON")
        .arg("HASH")
        .arg("PREFIX")
        .arg("1")
        .arg(&names.prefix)
        .arg("SCHEMA")
        .arg("embedding")
        .arg("VECTOR")
        .arg("HNSW")
        .arg("6")
        .arg("TYPE")
        .arg("FLOAT32")
        .arg("DIM")
        .arg("768")
        .arg("DISTANCE_METRIC")
        .arg("L2")
        .query(&mut conn)
        .unwrap();
    let out = worker_cmd(&server, &names)
        .args(["run", "--drain"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("DIM 768") && err.contains("DIM 384") && err.contains(&names.index),
        "{err}"
    );
}

#[test]
fn enqueue_reports_bad_lines_with_their_number_and_adds_the_rest() {
    let server = RedisServer::start();
    let names = Names::new("enq");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.jsonl");
    std::fs::write(
        &file,
        "{\"id\":\"a\",\"content\":\"That is a happy dog\",\"genre\":\"pets\"}\n\
         {not json}\n\
         \n\
         [1,2]\n\
         {\"id\":\"b\",\"content\":\"Today is a sunny day\",\"n\":3}\n",
    )
    .unwrap();
    let out = run_ok(worker_cmd(&server, &names).arg("enqueue").arg(&file));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("line 2:") && err.contains("line 4:"), "{err}");
    assert!(
        err.contains("enqueued 2 entries") && err.contains("skipped 2"),
        "{err}"
    );
    let mut conn = server.conn();
    let len: u64 = ::redis::cmd("XLEN")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 2);
    drain(&server, &names);
    let n: Option<String> = ::redis::cmd("HGET")
        .arg(format!("{}b", names.prefix))
        .arg("n")
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        n.as_deref(),
        Some("3"),
        "non-string JSON values are stored as JSON text"
    );
}

#[test]
fn index_commands_create_describe_and_drop() {
    let server = RedisServer::start();
    let names = Names::new("idx");
    let out = run_ok(worker_cmd(&server, &names).args(["index", "create"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    let out = run_ok(worker_cmd(&server, &names).args(["index", "create"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));
    let out = run_ok(worker_cmd(&server, &names).args(["index", "info"]));
    let info = String::from_utf8(out.stdout).unwrap();
    assert!(
        info.contains("vector: FLOAT32 DIM 384 L2") && info.contains("num_docs: 0"),
        "{info}"
    );
    run_ok(worker_cmd(&server, &names).args(["index", "drop"]));
    let out = worker_cmd(&server, &names)
        .args(["index", "info"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not exist"));
}

/// What a worker holds once it stops reading, with every write held back: its first read (sized
/// for the model's longest input) plus one read sized from the documents it tokenised.
fn held_after_reading(texts: impl Fn(usize) -> String) -> u64 {
    let server = RedisServer::start();
    let names = Names::new("readahead");
    let mut conn = server.conn();
    let mut pipe = ::redis::pipe();
    for i in 0..1500 {
        pipe.cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("content")
            .arg(texts(i))
            .ignore();
    }
    let () = pipe.query(&mut conn).unwrap();
    let _fleet =
        worker_holding_its_writes(&server, &names, "EMBED_WORKER__STREAM__READ_TOKENS", "2560");
    // Settled: the same count twice, 1.5 s apart.
    let mut last = u64::MAX;
    wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = pending(&mut conn, &names);
        let settled = now > 0 && now == last;
        last = now;
        settled.then_some(now)
    })
    .expect("the worker stops reading while its writes are held")
}

#[test]
fn reads_are_sized_in_tokens_so_long_documents_are_read_fewer_at_a_time() {
    // read_tokens 2560: the first read assumes 256-token documents (10 entries); the next one is
    // 2560 / the mean of what was tokenised.
    let short = held_after_reading(|i| format!("note {i}")); // 4 tokens with [CLS] and [SEP]
    let long = held_after_reading(|i| {
        format!(
            "Report {i}: the committee met on a rainy Tuesday to discuss the budget for the new \
             library wing, the repairs to the old bridge over the river, the school bus timetable \
             for the district, and a proposal to plant trees along the avenue before the festival."
        )
    });
    eprintln!("held: short {short}, long {long}");
    assert!(
        (600..=700).contains(&short),
        "short: 10 + 2560/4 = 650 expected, held {short}"
    );
    assert!(
        (40..=80).contains(&long),
        "long (~50 tokens): 10 + ~50 expected, held {long}"
    );
}
