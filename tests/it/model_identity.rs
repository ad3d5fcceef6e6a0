//! The model-identity issue: an index records its model and refuses any other; an unchanged
//! re-feed skips the model but still replaces fields and advances versions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use embed_worker::model::fake::FakeEmbedder;
use embed_worker::model::Fingerprint;
use embed_worker::observe::{Health, Metrics};
use embed_worker::pipeline::WorkerError;

use crate::common::*;

fn fake_named(label: &str) -> embed_worker::model::Model {
    let mut model = fake_model(|_| FakeEmbedder {
        dimension: 384,
        ..FakeEmbedder::default()
    });
    model.fingerprint = Fingerprint::of_fake(label, &model.config);
    model
}

async fn drain(
    settings: embed_worker::Settings,
    model: embed_worker::model::Model,
    metrics: Arc<Metrics>,
) -> Result<embed_worker::pipeline::RunSummary, WorkerError> {
    drain_in_process(
        settings,
        model,
        metrics,
        Arc::new(Health::default()),
        Duration::from_secs(60),
    )
    .await
}

fn hash(conn: &mut ::redis::Connection, key: &str) -> HashMap<String, Vec<u8>> {
    ::redis::cmd("HGETALL").arg(key).query(conn).unwrap()
}

fn field(h: &HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(h.get(name).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// A text the tokenizer cuts into several chunks (about 600 tokens).
fn long_text() -> String {
    (0..60)
        .map(|i| format!("Sentence number {i} talks about rivers and mountains."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A server whose index a worker of the fake model `model` made, from one document "a".
async fn indexed_by(tag: &str, model: &str) -> (RedisServer, Names, embed_worker::Settings) {
    let server = RedisServer::start();
    let names = Names::new(tag);
    xadd(
        &mut server.conn(),
        &names.stream,
        &[("id", "a"), ("content", "first")],
    );
    let settings = in_process_settings(&server, &names, "w1", &[]);
    drain(
        settings.clone(),
        fake_named(model),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    (server, names, settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_model_is_refused_before_it_writes_anything() {
    let (server, names, settings) = indexed_by("ident", "model-a").await;
    let mut conn = server.conn();
    let record = hash(&mut conn, &format!("embed:index:{{{}}}", names.index));
    let a = fake_named("model-a").fingerprint;
    assert_eq!(field(&record, "fingerprint"), a.id);
    assert_eq!(field(&record, "writers"), a.id);
    assert_eq!(field(&record, "index"), names.index);
    let doc = hash(&mut conn, &format!("{}a", names.prefix));
    assert_eq!(
        field(&doc, "__ew_model"),
        a.id,
        "every document records its model"
    );
    assert_eq!(field(&doc, "__ew_digest").len(), 32);

    // Another model: refused at start-up, with both models named, and nothing read or written.
    let key_b = format!("{}b", names.prefix);
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "b"), ("content", "second")],
    );
    // Not even the function library: flushed here, still absent after the refusal.
    let _: () = ::redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut conn)
        .unwrap();
    let lag_before: Vec<::redis::Value> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    let err = drain(
        in_process_settings(&server, &names, "w2", &[]),
        fake_named("model-b"),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WorkerError::ModelMismatch { .. }), "{text}");
    assert!(
        text.contains(&a.id) && text.contains(&fake_named("model-b").fingerprint.id),
        "{text}"
    );
    assert!(text.contains("reindex --model-file"), "{text}");
    let exists: bool = ::redis::cmd("EXISTS").arg(&key_b).query(&mut conn).unwrap();
    assert!(!exists, "the refused worker wrote nothing");
    let lag_after: Vec<::redis::Value> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&names.stream)
        .query(&mut conn)
        .unwrap();
    assert_eq!(lag_before, lag_after, "and read nothing");
    let libraries: Vec<::redis::Value> = ::redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut conn)
        .unwrap();
    assert!(libraries.is_empty(), "and loaded nothing: {libraries:?}");

    // A worker already running when the record stops naming its model (a reindex switched)
    // is refused at its next write: it stops, and its entry stays pending, unwritten.
    let running = tokio::spawn(embed_worker::pipeline::run(
        settings,
        fake_named("model-a"),
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
        embed_worker::pipeline::RunOptions { drain: false },
        std::future::pending(),
    ));
    let written = wait_for(Duration::from_secs(30), || {
        (!hash(&mut conn, &key_b).is_empty()).then_some(())
    });
    assert!(written.is_some(), "the worker of the index's model took b");
    let _: () = ::redis::cmd("HSET")
        .arg(format!("embed:index:{{{}}}", names.index))
        .arg("writers")
        .arg("someone-else")
        .query(&mut conn)
        .unwrap();
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "c"), ("content", "third")],
    );
    let err = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, WorkerError::ModelRetired { .. }), "{err}");
    let exists: bool = ::redis::cmd("EXISTS")
        .arg(format!("{}c", names.prefix))
        .query(&mut conn)
        .unwrap();
    assert!(!exists, "c was not written");
    assert_eq!(
        pending(&mut conn, &names),
        1,
        "c stays pending for another worker"
    );
}

/// A worker of the model a reindex is moving the index to waits, unready, and starts at the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_models_worker_waits_for_the_switch() {
    let (server, names, settings) = indexed_by("wait", "old").await;
    let mut conn = server.conn();
    let next = fake_named("new").fingerprint;
    let key = format!("embed:index:{{{}}}", names.index);
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "next_fingerprint",
            &next.id,
            "next_model",
            &next.name,
            "next_index",
            "x",
            "next_vector_field",
            "y",
            "state",
            "migrating",
        ])
        .query(&mut conn)
        .unwrap();
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "b"), ("content", "second")],
    );
    let health = Arc::new(Health::default());
    let waiting = tokio::spawn(drain_in_process(
        settings,
        fake_named("new"),
        Arc::new(Metrics::default()),
        health.clone(),
        Duration::from_secs(60),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "it waits");
    assert!(health.ready().is_err(), "unready while it waits");
    assert!(hash(&mut conn, &format!("{}b", names.prefix)).is_empty());
    // The switch, as reindex leaves the record.
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "fingerprint",
            &next.id,
            "model",
            &next.name,
            "writers",
            &next.id,
        ])
        .query(&mut conn)
        .unwrap();
    let _: () = ::redis::cmd("HDEL")
        .arg(&key)
        .arg(&[
            "next_fingerprint",
            "next_model",
            "next_index",
            "next_vector_field",
            "state",
        ])
        .query(&mut conn)
        .unwrap();
    waiting.await.unwrap().unwrap();
    let b = hash(&mut conn, &format!("{}b", names.prefix));
    assert_eq!(field(&b, "__ew_model"), next.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_refeed_skips_the_model_but_replaces_fields_and_versions() {
    let server = RedisServer::start();
    let names = Names::new("unch");
    let mut conn = server.conn();
    let long = long_text();
    let docs: Vec<(String, String)> = (0..20)
        .map(|i| (i.to_string(), format!("Document {i} is about the sea.")))
        .chain([("long".to_string(), long.clone())])
        .collect();
    for (id, text) in &docs {
        xadd(
            &mut conn,
            &names.stream,
            &[("id", id), ("content", text), ("genre", "old")],
        );
    }
    let settings = in_process_settings(&server, &names, "w1", &[]);
    let first = Arc::new(Metrics::default());
    drain(settings.clone(), fake_named("m"), first.clone())
        .await
        .unwrap();
    let chunks_before: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}long#*", names.prefix))
        .query(&mut conn)
        .unwrap();
    assert!(chunks_before.len() >= 3, "{chunks_before:?}");
    let vector_of = |conn: &mut ::redis::Connection, key: &str| hash(conn, key).remove("embedding");
    let v0 = vector_of(&mut conn, &format!("{}0", names.prefix));
    let chunk0 = format!("{}long#0", names.prefix);
    let chunk0_before = hash(&mut conn, &chunk0);

    // The same texts again, with a new genre; one text changed; one document deleted then
    // re-fed unchanged (nothing stored: embedded again).
    for (id, text) in &docs {
        let text = if id == "3" {
            "Document 3 changed its mind."
        } else {
            text.as_str()
        };
        xadd(
            &mut conn,
            &names.stream,
            &[("id", id), ("content", text), ("genre", "new")],
        );
    }
    let second = Arc::new(Metrics::default());
    drain(settings.clone(), fake_named("m"), second.clone())
        .await
        .unwrap();
    let m = second.render();
    assert!(
        m.contains("embed_worker_documents_unchanged_total 20"),
        "{m}"
    );
    // Only document 3 went through the model: one text.
    assert!(
        m.contains("embed_worker_documents_embedded_total 1\n"),
        "{m}"
    );
    assert!(m.contains("embed_worker_documents_acked_total 21"), "{m}");

    let d0 = hash(&mut conn, &format!("{}0", names.prefix));
    assert_eq!(
        field(&d0, "genre"),
        "new",
        "the other fields replace the old ones"
    );
    assert_eq!(d0.get("embedding"), v0.as_ref(), "the vector is kept");
    let d3 = hash(&mut conn, &format!("{}3", names.prefix));
    assert_eq!(field(&d3, "content"), "Document 3 changed its mind.");
    // Every chunk took the new genre and version, and kept its own text, span and vector.
    let chunks_after: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}long#*", names.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(chunks_after.len(), chunks_before.len());
    let chunk0_after = hash(&mut conn, &chunk0);
    for name in [
        "content",
        "chunk",
        "chunk_start",
        "chunk_end",
        "embedding",
        "parent",
        "__ew_chunks",
        "__ew_digest",
    ] {
        assert_eq!(chunk0_after.get(name), chunk0_before.get(name), "{name}");
    }
    assert_eq!(field(&chunk0_after, "genre"), "new");
    assert!(field(&chunk0_after, "__ew_entry") > field(&chunk0_before, "__ew_entry"));
    for key in &chunks_after {
        assert_eq!(field(&hash(&mut conn, key), "genre"), "new", "{key}");
    }

    // An older producer version arriving after is superseded, even when its text is unchanged.
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "v"),
            ("content", "versioned"),
            ("genre", "two"),
            ("version", "2"),
        ],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "v"),
            ("content", "versioned"),
            ("genre", "one"),
            ("version", "1"),
        ],
    );
    drain(
        settings.clone(),
        fake_named("m"),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "v"),
            ("content", "versioned"),
            ("genre", "one"),
            ("version", "1"),
        ],
    );
    let third = Arc::new(Metrics::default());
    drain(settings.clone(), fake_named("m"), third.clone())
        .await
        .unwrap();
    assert!(third
        .render()
        .contains("embed_worker_documents_superseded_total 1"));
    assert_eq!(
        field(&hash(&mut conn, &format!("{}v", names.prefix)), "genre"),
        "two"
    );

    // With skip_unchanged off, the same re-feed runs the model again.
    for (id, text) in docs.iter().take(5) {
        xadd(
            &mut conn,
            &names.stream,
            &[("id", id), ("content", text), ("genre", "new")],
        );
    }
    let off = Arc::new(Metrics::default());
    drain(
        in_process_settings(
            &server,
            &names,
            "w1",
            &[("WORKER__SKIP_UNCHANGED", "false")],
        ),
        fake_named("m"),
        off.clone(),
    )
    .await
    .unwrap();
    let m = off.render();
    assert!(
        m.contains("embed_worker_documents_embedded_total 5\n"),
        "{m}"
    );
    assert!(
        !m.contains("embed_worker_documents_unchanged_total 5"),
        "{m}"
    );
}

/// The real binary and the real models: a worker on model_int8.onnx against an index built by
/// model.onnx exits non-zero with one line naming both and the fix.
#[test]
fn the_binary_refuses_another_model_in_one_line() {
    let (server, names, stderr) =
        indexed_then_refused("bin", "EMBED_WORKER__MODEL__FILE", "model_int8.onnx");
    let line = stderr
        .lines()
        .find(|l| l.contains("model mismatch"))
        .unwrap_or_else(|| panic!("no mismatch line: {stderr}"));
    assert!(
        line.contains("model.onnx") && line.contains("model_int8.onnx"),
        "{line}"
    );
    assert!(
        line.contains("reindex --model-file model_int8.onnx"),
        "{line}"
    );
    // `search` with the wrong model is refused the same way.
    let out = worker_cmd(&server, &names)
        .env("EMBED_WORKER__MODEL__FILE", "model_int8.onnx")
        .args(["search", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model mismatch"));
    let stats = run_ok(worker_cmd(&server, &names).args(["stats"]));
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("model.onnx, 384 dims"), "{stats}");
}

/// Workers of two library versions in one rolling upgrade: loading library 4 leaves an older
/// one (here a stand-in for library 3, named `embed_worker` as it was) loaded and callable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_this_library_leaves_an_older_one_in_place() {
    let server = RedisServer::start();
    let names = Names::new("libs");
    let mut conn = server.conn();
    let old =
        "#!lua name=embed_worker\nredis.register_function{function_name = 'ew_library_version', \
               callback = function() return '3' end, flags = { 'no-writes' }}";
    let _: String = ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(old)
        .query(&mut conn)
        .unwrap();
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "a"), ("content", "first")],
    );
    drain(
        in_process_settings(&server, &names, "w1", &[]),
        fake_named("m"),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let v3: String = ::redis::cmd("FCALL")
        .arg("ew_library_version")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    let v5: String = ::redis::cmd("FCALL")
        .arg("ew_library_version_v5")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    assert_eq!((v3.as_str(), v5.as_str()), ("3", "5"));
}
