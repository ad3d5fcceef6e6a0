//! `stream.shards` on one server: the documented id -> shard rule (checked against Python's
//! zlib.crc32, not the worker's own code), every shard drained through one group, dead letters
//! naming their shard, `stats` summing the shards, and the docs' example answered the same.

use crate::common::*;

const SHARDS: u32 = 3;

/// The documented key of the shard of `id`, computed by Python's zlib.
fn python_shard_keys(stream: &str, ids: &[String]) -> Vec<String> {
    let code = format!(
        "import sys, zlib\nfor i in sys.argv[1:]: print('{stream}{{%d-ew}}' % (zlib.crc32(i.encode()) % {SHARDS}))"
    );
    let args: Vec<&str> = ids.iter().map(String::as_str).collect();
    python_ok(&code, &args)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn sharded_streams_follow_the_documented_rule_and_drain_through_one_group() {
    let server = RedisServer::start();
    let names = Names::new("shards");
    let shards = SHARDS.to_string();
    let sharded = |cmd: &mut std::process::Command| {
        cmd.env("EMBED_WORKER__STREAM__SHARDS", &shards);
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.jsonl");
    let ids: Vec<String> = (0..30).map(|i| format!("d{i}")).collect();
    let mut lines: String = ids
        .iter()
        .map(|id| format!("{{\"id\":\"{id}\",\"content\":\"document number {id}\"}}\n"))
        .collect();
    // An invalid op: dead-lettered, naming the shard it came from.
    lines.push_str("{\"id\":\"bad\",\"op\":\"frobnicate\",\"content\":\"x\"}\n");
    std::fs::write(&file, lines).unwrap();
    let mut enqueue = worker_cmd(&server, &names);
    sharded(&mut enqueue);
    run_ok(enqueue.arg("enqueue").arg(&file));

    let mut conn = server.conn();
    let mut all_ids = ids.clone();
    all_ids.push("bad".into());
    let expected = python_shard_keys(&names.stream, &all_ids);
    for (id, key) in all_ids.iter().zip(&expected) {
        let entries: Vec<(String, Vec<(String, String)>)> = ::redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .unwrap();
        assert!(
            entries
                .iter()
                .any(|(_, f)| f.iter().any(|(k, v)| k == "id" && v == id)),
            "{id} not in {key}"
        );
    }
    let used: std::collections::BTreeSet<&String> = expected.iter().collect();
    assert_eq!(used.len(), SHARDS as usize, "30 ids use every shard");

    let mut drain = worker_cmd(&server, &names);
    sharded(&mut drain);
    run_ok(drain.args(["run", "--drain"]));
    for id in &ids {
        let n: u64 = ::redis::cmd("EXISTS")
            .arg(format!("{}{id}", names.prefix))
            .query(&mut conn)
            .unwrap();
        assert_eq!(n, 1, "{id} written");
    }
    for key in &used {
        let pending: (u64, Option<String>, Option<String>, ::redis::Value) =
            ::redis::cmd("XPENDING")
                .arg(key.as_str())
                .arg(&names.group)
                .query(&mut conn)
                .unwrap();
        assert_eq!(pending.0, 0, "{key} has nothing pending");
    }
    let letters: Vec<(String, Vec<(String, String)>)> = ::redis::cmd("XRANGE")
        .arg(names.dead())
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let field = |k: &str| {
        letters[0]
            .1
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("dead_reason").as_deref(), Some("invalid_op"));
    assert_eq!(field("dead_stream").as_ref(), expected.last());

    let mut stats = worker_cmd(&server, &names);
    sharded(&mut stats);
    let out = run_ok(stats.args(["stats", "--json"]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["stream"]["length"], 31, "{json}");
    assert_eq!(json["group"]["pending"], 0, "{json}");
    assert_eq!(json["group"]["lag"], 0, "{json}");
    assert_eq!(json["shards"].as_array().map(Vec::len), Some(3), "{json}");
}

#[test]
fn the_docs_example_is_answered_the_same_through_shards() {
    let server = RedisServer::start();
    let names = docs_names();
    let mut conn = server.conn();
    let ids = ["0", "1", "2"].map(String::from);
    let keys = python_shard_keys(&names.stream, &ids);
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        xadd(
            &mut conn,
            &keys[i],
            &[("id", &ids[i]), ("content", content), ("genre", genre)],
        );
    }
    run_ok(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__STREAM__SHARDS", SHARDS.to_string())
            .args(["run", "--drain"]),
    );
    let out = run_ok(worker_cmd(&server, &names).args(["search", QUERY]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());
}
