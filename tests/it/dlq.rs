//! The dead-letter lifecycle: `dlq list`, `dlq replay`, `dlq purge` against a real Redis, a full
//! round from a misconfigured worker to indexed documents, and the stream's cap.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::reliability::{dead_letters, text_of};

fn dlq(server: &RedisServer, names: &Names, args: &[&str]) -> String {
    let out = run_ok(worker_cmd(server, names).arg("dlq").args(args));
    String::from_utf8(out.stdout).unwrap()
}

/// Dead-letter stream entries: (dead-letter ID, reason).
fn dead_ids(conn: &mut ::redis::Connection, names: &Names) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = ::redis::cmd("XRANGE")
        .arg(names.dead())
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    entries
        .into_iter()
        .map(|(id, kv)| {
            let kv: HashMap<String, String> = kv.into_iter().collect();
            (id, kv["dead_reason"].clone())
        })
        .collect()
}

#[test]
fn dead_letters_are_listed_replayed_once_fixed_and_purged() {
    let server = RedisServer::start();
    let names = Names::new("dlq");
    let mut conn = server.conn();
    // The producer writes "body"; the worker is (wrongly) configured for "content".
    let mut sent = Vec::new();
    for i in 0..3 {
        let text = format!("a document in the body field {i}");
        sent.push(xadd(
            &mut conn,
            &names.stream,
            &[("id", &format!("b{i}")), ("body", &text), ("genre", "g")],
        ));
    }
    let empty = xadd(&mut conn, &names.stream, &[("id", "e"), ("content", "  ")]);
    run_ok(worker_cmd(&server, &names).arg("run").arg("--drain"));
    let before = dead_ids(&mut conn, &names);
    assert_eq!(before.len(), 4, "{before:?}");

    // list: by reason, as JSON, with the original fields in brief.
    let listed: Vec<serde_json::Value> = serde_json::from_str(&dlq(
        &server,
        &names,
        &["list", "--reason", "missing_text", "--json"],
    ))
    .unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0]["entry_id"], sent[0].as_str());
    assert_eq!(listed[0]["deliveries"], "1");
    let fields: Vec<&str> = listed[0]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["id", "body", "genre"],
        "the original fields, no metadata"
    );
    let human = dlq(&server, &names, &["list"]);
    assert!(
        human.contains("empty_text") && human.contains(&empty),
        "{human}"
    );
    let since = dlq(
        &server,
        &names,
        &["list", "--since", &before[3].0, "--json"],
    );
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&since)
            .unwrap()
            .len(),
        1
    );

    // A dry run changes nothing.
    let dry = dlq(
        &server,
        &names,
        &["replay", "--reason", "missing_text", "--dry-run"],
    );
    assert!(dry.contains("3 dead letter(s) would be replayed"), "{dry}");
    assert_eq!(dead_ids(&mut conn, &names), before);

    // The fix: the right text field. Then the replay, and a worker with the fix.
    let out = dlq(&server, &names, &["replay", "--reason", "missing_text"]);
    assert!(out.contains("replayed 3 dead letter(s)"), "{out}");
    assert_eq!(
        dead_ids(&mut conn, &names),
        before[3..].to_vec(),
        "the other dead letter untouched"
    );
    run_ok(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__STREAM__TEXT_FIELD", "body")
            .env("EMBED_WORKER__INDEX__SCHEMA", "body TEXT,genre TAG")
            .arg("run")
            .arg("--drain"),
    );
    for i in 0..3 {
        let (body, genre, vector): (String, String, Vec<u8>) = ::redis::cmd("HMGET")
            .arg(format!("{}b{i}", names.prefix))
            .arg("body")
            .arg("genre")
            .arg("embedding")
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            (body, genre, vector.len()),
            (
                format!("a document in the body field {i}"),
                "g".to_string(),
                1536
            )
        );
    }
    assert_eq!(
        dead_ids(&mut conn, &names),
        before[3..].to_vec(),
        "no new dead letters"
    );
    assert_eq!(pending(&mut conn, &names), 0);

    // purge: never without a filter; by id of the original entry.
    let bare = worker_cmd(&server, &names)
        .args(["dlq", "purge"])
        .output()
        .unwrap();
    assert!(!bare.status.success());
    assert_eq!(dead_ids(&mut conn, &names).len(), 1);
    let out = dlq(&server, &names, &["purge", "--id", &empty]);
    assert!(out.contains("deleted 1 dead letter(s)"), "{out}");
    assert!(dead_ids(&mut conn, &names).is_empty());
}

#[test]
fn the_dead_letter_stream_stays_near_its_cap_and_trims_are_counted() {
    use embed_worker::model::fake::FakeEmbedder;

    let server = RedisServer::start();
    let names = Names::new("cap");
    let mut conn = server.conn();
    let total = 600;
    let mut pipe = ::redis::pipe();
    for i in 0..total {
        pipe.cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("id")
            .arg(format!("x{i}"))
            .arg("nocontent")
            .arg("x");
    }
    let _: Vec<String> = pipe.query(&mut conn).unwrap();
    let model = fake_model(|_| FakeEmbedder {
        dimension: 384,
        ..FakeEmbedder::default()
    });
    let settings = in_process_settings(
        &server,
        &names,
        "cap",
        &[("STREAM__DEAD_LETTER_MAXLEN", "100")],
    );
    let metrics = Arc::new(embed_worker::observe::Metrics::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let summary = runtime
        .block_on(drain_in_process(
            settings,
            model,
            metrics.clone(),
            Arc::new(embed_worker::observe::Health::default()),
            Duration::from_secs(60),
        ))
        .unwrap();
    assert_eq!(summary.dead_lettered, total as u64);
    let len: u64 = ::redis::cmd("XLEN")
        .arg(names.dead())
        .query(&mut conn)
        .unwrap();
    // MAXLEN ~ trims whole nodes (stream-node-max-entries, 100 by default).
    assert!((100..=200).contains(&len), "near the cap of 100: {len}");
    assert_eq!(
        metrics.dead_letters_trimmed_total(),
        total as u64 - len,
        "every trimmed one counted"
    );
    let letters = dead_letters(&mut conn, &names);
    assert_eq!(
        text_of(letters.last().unwrap(), "id"),
        format!("x{}", total - 1),
        "the newest are kept"
    );
}
