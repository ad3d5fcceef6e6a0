//! The JSON issue: every behaviour below runs on both storages (`index.storage = "hash"` and
//! `"json"`), one body per scenario, parametrised by the storage.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use embed_worker::model::fake::FakeEmbedder;
use embed_worker::observe::{Health, Metrics};

use crate::common::*;

/// Generates `<name>_on_hash` and `<name>_on_json` tests running `body(storage)`.
macro_rules! on_both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn on_hash() {
                super::$body("hash");
            }
            #[test]
            fn on_json() {
                super::$body("json");
            }
        }
    };
}

fn stored_as(cmd: &mut Command, storage: &str) {
    cmd.env("EMBED_WORKER__INDEX__STORAGE", storage);
}

fn docs_example(storage: &str) {
    let server = RedisServer::start();
    let names = docs_names();
    let mut conn = server.conn();
    xadd_docs(&mut conn, &names.stream);
    let mut run = worker_cmd(&server, &names);
    stored_as(&mut run, storage);
    run_ok(run.args(["run", "--drain"]));

    // 1. `search` prints the docs' three lines.
    let mut search = worker_cmd(&server, &names);
    stored_as(&mut search, storage);
    let out = run_ok(search.args(["search", QUERY]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());

    // 2. redis-py FT.SEARCH: the same order and distances.
    let query = embed(&[QUERY]).pop().unwrap();
    let out = python_ok(
        r#"
import sys, json, struct, redis
r = redis.Redis(port=int(sys.argv[1]), protocol=2)
vec = struct.pack("<%df" % 384, *json.loads(sys.argv[2]))
res = r.execute_command("FT.SEARCH", "vector_idx", "*=>[KNN 3 @embedding $vec AS vector_distance]",
    "PARAMS", "2", "vec", vec, "SORTBY", "vector_distance", "RETURN", "2", "vector_distance", "content", "DIALECT", "2")
for i in range(1, len(res), 2):
    f = dict(zip(res[i+1][::2], res[i+1][1::2]))
    print(res[i].decode(), f[b"vector_distance"].decode())
"#,
        &[
            &server.port.to_string(),
            &serde_json::to_string(&query).unwrap(),
        ],
    );
    let ids: Vec<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(ids, ["doc:0", "doc:1", "doc:2"], "{out}");
    for (line, expected) in out.lines().zip(EXPECTED) {
        let d: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((d - expected).abs() < 1e-4, "{line}");
    }

    // 3. RedisVL reads the index's schema back (SearchIndex.from_existing) and answers the same.
    assert_docs_search_lines(&redisvl_query(&server, &names.index, &query));

    // 4. The document itself: on JSON, `JSON.GET doc:0` holds the vector as 384 numbers.
    let doc = document(&mut conn, "doc:0", storage);
    assert_eq!(doc["content"], DOCS[0].0);
    assert_eq!(doc["genre"], DOCS[0].1);
    assert_eq!(doc["embedding#floats"], "384");
    if storage == "json" {
        let text: String = ::redis::cmd("JSON.GET")
            .arg("doc:0")
            .arg("$.embedding")
            .query(&mut conn)
            .unwrap();
        let v: Vec<Vec<f32>> = serde_json::from_str(&text).unwrap();
        let stored = &v[0];
        let want = embed(&[DOCS[0].0]).pop().unwrap();
        assert!(
            max_abs_diff(stored, &want) < 1e-6,
            "the stored array is the vector"
        );
        let kind: String = ::redis::cmd("TYPE").arg("doc:0").query(&mut conn).unwrap();
        assert_eq!(kind, "ReJSON-RL");
    }
    assert_eq!(pending(&mut conn, &names), 0);
    let mut info = worker_cmd(&server, &names);
    stored_as(&mut info, storage);
    let out = String::from_utf8(run_ok(info.args(["index", "info"])).stdout).unwrap();
    assert!(out.contains("vector: FLOAT32 DIM 384 L2"), "{out}");
}
on_both!(the_docs_example_for_every_reader, docs_example);

fn model(storage: &str) -> embed_worker::model::Model {
    let _ = storage;
    fake_model(|_| FakeEmbedder {
        dimension: 384,
        ..FakeEmbedder::default()
    })
}

fn settings_for(
    server: &RedisServer,
    names: &Names,
    storage: &str,
    extra: &[(&str, &str)],
) -> embed_worker::Settings {
    let mut all = vec![
        ("INDEX__STORAGE", storage),
        ("INDEX__SCHEMA", "content TEXT,genre TAG,year NUMERIC"),
    ];
    all.extend_from_slice(extra);
    in_process_settings(server, names, "w1", &all)
}

fn drain_now(settings: embed_worker::Settings, storage: &str) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::default());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(drain_in_process(
            settings,
            model(storage),
            metrics.clone(),
            Arc::new(Health::default()),
            Duration::from_secs(60),
        ))
        .unwrap();
    metrics
}

fn keys(conn: &mut ::redis::Connection, pattern: &str) -> Vec<String> {
    let mut k: Vec<String> = ::redis::cmd("KEYS").arg(pattern).query(conn).unwrap();
    k.sort();
    k
}

fn dead(conn: &mut ::redis::Connection, names: &Names) -> Vec<(String, String)> {
    let entries: Vec<(String, HashMap<String, String>)> = ::redis::cmd("XRANGE")
        .arg(names.dead())
        .arg("-")
        .arg("+")
        .query::<::redis::streams::StreamRangeReply>(conn)
        .map(|r| {
            r.ids
                .into_iter()
                .map(|e| {
                    let m = e
                        .map
                        .into_iter()
                        .filter_map(|(k, v)| {
                            ::redis::from_redis_value::<String>(v).ok().map(|v| (k, v))
                        })
                        .collect();
                    (e.id, m)
                })
                .collect()
        })
        .unwrap_or_default();
    entries
        .into_iter()
        .map(|(_, m)| {
            (
                m.get("id").cloned().unwrap_or_default(),
                m.iter()
                    .find(|(k, _)| k.ends_with("reason"))
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Newest wins, replace drops fields, delete leaves a tombstone that stops a late older upsert,
/// NUMERIC fields are numbers (and a non-number is a dead letter), a long text becomes chunks
/// replaced as one, and an unchanged re-feed skips the model.
fn lifecycle(storage: &str) {
    let server = RedisServer::start();
    let names = Names::new("store");
    let mut conn = server.conn();
    let p = &names.prefix;
    let long: String = (0..60)
        .map(|i| format!("Sentence {i} is about lighthouses and ships."))
        .collect::<Vec<_>>()
        .join(" ");
    // Producer versions out of order: v2 then v1 of "a"; "b" gets a field it later drops.
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "a"),
            ("content", "two"),
            ("version", "2"),
            ("year", "2020"),
        ],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "a"),
            ("content", "one"),
            ("version", "1"),
            ("year", "1999"),
        ],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "b"), ("content", "bee"), ("genre", "insects")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "n"), ("content", "bad number"), ("year", "soon")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "long"), ("content", &long), ("genre", "sea")],
    );
    let settings = settings_for(&server, &names, storage, &[]);
    drain_now(settings.clone(), storage);
    let a = document(&mut conn, &format!("{p}a"), storage);
    assert_eq!(a["content"], "two", "the producer's version wins");
    assert_eq!(a["year"], "2020");
    assert_eq!(a["embedding#floats"], "384");
    assert_eq!(
        dead(&mut conn, &names),
        [("n".to_string(), "invalid_number".to_string())]
    );
    let chunks = keys(&mut conn, &format!("{p}long#*"));
    assert!(chunks.len() >= 3, "{chunks:?}");
    let c0 = document(&mut conn, &chunks[0], storage);
    assert_eq!(c0["parent"], "long");
    assert_eq!(c0["genre"], "sea");
    assert_eq!(c0["chunk"], "0");
    // NUMERIC year filters as a number: only a.
    let hits: Vec<::redis::Value> = ::redis::cmd("FT.SEARCH")
        .arg(&names.index)
        .arg("@year:[2000 2030]")
        .arg("NOCONTENT")
        .query(&mut conn)
        .unwrap();
    assert_eq!(hits.len(), 2, "{hits:?}");

    // Replace drops a field; the long document shrinks to one; delete + a late older upsert.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "b"), ("content", "bee again")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "long"), ("content", "Short now.")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "a"), ("op", "delete"), ("version", "3")],
    );
    drain_now(settings.clone(), storage);
    let b = document(&mut conn, &format!("{p}b"), storage);
    assert_eq!(b["content"], "bee again");
    assert!(!b.contains_key("genre"), "replace, not merge: {b:?}");
    assert!(keys(&mut conn, &format!("{p}long#*")).is_empty());
    assert_eq!(
        document(&mut conn, &format!("{p}long"), storage)["content"],
        "Short now."
    );
    assert!(document(&mut conn, &format!("{p}a"), storage).is_empty());
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "a"), ("content", "late"), ("version", "2")],
    );
    let m = drain_now(settings.clone(), storage);
    assert!(
        document(&mut conn, &format!("{p}a"), storage).is_empty(),
        "the tombstone holds"
    );
    assert!(m
        .render()
        .contains("embed_worker_documents_superseded_total 1"));

    // An unchanged re-feed: no model run, the new field lands, chunks keep their vectors.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "long2"), ("content", &long), ("genre", "sea")],
    );
    drain_now(settings.clone(), storage);
    let before = document(&mut conn, &format!("{p}long2#1"), storage);
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "b"), ("content", "bee again"), ("genre", "back")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "long2"), ("content", &long), ("genre", "ocean")],
    );
    let m = drain_now(settings, storage);
    let r = m.render();
    assert!(
        r.contains("embed_worker_documents_unchanged_total 2"),
        "{r}"
    );
    assert!(
        r.contains("embed_worker_documents_embedded_total 0\n"),
        "{r}"
    );
    assert_eq!(
        document(&mut conn, &format!("{p}b"), storage)["genre"],
        "back"
    );
    let after = document(&mut conn, &format!("{p}long2#1"), storage);
    assert_eq!(after["genre"], "ocean");
    for k in [
        "content",
        "chunk",
        "chunk_start",
        "chunk_end",
        "parent",
        "embedding#floats",
        "__ew_digest",
    ] {
        assert_eq!(after.get(k), before.get(k), "{k}");
    }
}
on_both!(newest_wins_delete_numbers_chunks_and_unchanged, lifecycle);

/// A value that is not UTF-8 cannot be a JSON string: on JSON it is a dead letter with its own
/// reason; a hash stores it byte for byte.
fn not_utf8(storage: &str) {
    let server = RedisServer::start();
    let names = Names::new("utf");
    let mut conn = server.conn();
    let _: String = ::redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg("id")
        .arg("x")
        .arg("content")
        .arg("fine text")
        .arg("blob")
        .arg(&[0xff_u8, 0xfe, 0x00][..])
        .query(&mut conn)
        .unwrap();
    drain_now(settings_for(&server, &names, storage, &[]), storage);
    let d = dead(&mut conn, &names);
    match storage {
        "json" => assert_eq!(d, [("x".to_string(), "not_json_text".to_string())]),
        _ => {
            assert!(d.is_empty(), "{d:?}");
            let blob: Vec<u8> = ::redis::cmd("HGET")
                .arg(format!("{}x", names.prefix))
                .arg("blob")
                .query(&mut conn)
                .unwrap();
            assert_eq!(blob, [0xff, 0xfe, 0x00]);
        }
    }
}
on_both!(a_value_that_is_not_utf8, not_utf8);

/// A worker whose storage is not the index's is refused at start-up, naming the fix.
#[test]
fn a_worker_on_the_other_storage_is_refused() {
    let (_server, _names, err) =
        indexed_then_refused("mix", "EMBED_WORKER__INDEX__STORAGE", "json");
    assert!(
        err.contains("indexes HASH documents but index.storage is \"json\""),
        "{err}"
    );
}
