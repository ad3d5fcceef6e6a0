//! The long-documents issue's promises: a long text is cut into chunks, each its own hash and
//! vector, so any part of it can be found; the chunk set is replaced and deleted as one unit;
//! `search` shows each document once; reads are bounded in bytes. Real redis-server, real model.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

fn drain(server: &RedisServer, names: &Names, env: &[(&str, &str)]) -> String {
    let mut cmd = worker_cmd(server, names);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_ok(cmd.args(["run", "--drain"]));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The keys of a document: its own and its chunks', sorted.
fn keys_of(conn: &mut ::redis::Connection, key: &str) -> Vec<String> {
    let mut keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{key}#*"))
        .query(conn)
        .unwrap();
    if ::redis::cmd("EXISTS").arg(key).query::<u64>(conn).unwrap() == 1 {
        keys.push(key.to_string());
    }
    keys.sort();
    keys
}

fn hash(conn: &mut ::redis::Connection, key: &str) -> HashMap<String, String> {
    let h: HashMap<String, Vec<u8>> = ::redis::cmd("HGETALL").arg(key).query(conn).unwrap();
    h.into_iter()
        .filter(|(k, _)| k != "embedding")
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// ~3,000 tokens of real prose (pages of the CPython documentation that ships with Python) and a
/// sentence from its last tenth.
fn long_document() -> (String, String) {
    let out = python_ok(
        r#"
import json, re, pydoc_data.topics as t
text = (t.topics["assignment"] + "\n\n" + t.topics["execmodel"])[:13000]
tail = text[int(len(text) * 0.9):]
sentences = [s for s in re.split(r"(?<=[.!?])\s+", tail) if 60 <= len(s) <= 300 and "\n\n" not in s]
print(json.dumps({"text": text, "query": sentences[-2]}))
"#,
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    (
        v["text"].as_str().unwrap().to_string(),
        v["query"].as_str().unwrap().to_string(),
    )
}

/// XADDs the long document (id "long", genre "docs") and the docs' three; its text and query.
fn feed_long_document_and_the_docs(
    conn: &mut ::redis::Connection,
    names: &Names,
) -> (String, String) {
    let (text, query) = long_document();
    xadd(
        conn,
        &names.stream,
        &[("id", "long"), ("content", &text), ("genre", "docs")],
    );
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let id = i.to_string();
        xadd(
            conn,
            &names.stream,
            &[("id", &id), ("content", content), ("genre", genre)],
        );
    }
    (text, query)
}

#[test]
fn a_long_document_is_found_by_a_sentence_near_its_end_and_shown_once() {
    let server = RedisServer::start();
    let names = Names::new("chunks");
    let mut conn = server.conn();
    let (text, query) = feed_long_document_and_the_docs(&mut conn, &names);
    drain(&server, &names, &[]);

    let key = format!("{}long", names.prefix);
    let keys = keys_of(&mut conn, &key);
    assert!(
        keys.len() >= 10,
        "a ~3,000-token text in chunks of 256: {keys:?}"
    );
    assert!(
        !keys.contains(&key),
        "a multi-chunk document has no hash of its own"
    );
    // Each chunk: the parent id, its number, its span, its own text, the entry's other fields.
    let chars: Vec<char> = text.chars().collect();
    let mut last_start = None;
    for n in 0..keys.len() {
        let h = hash(&mut conn, &format!("{key}#{n}"));
        assert_eq!(h["parent"], "long");
        assert_eq!(h["chunk"], n.to_string());
        assert_eq!(h["genre"], "docs");
        assert_eq!(h["__ew_chunks"], keys.len().to_string());
        let (s, e): (usize, usize) = (
            h["chunk_start"].parse().unwrap(),
            h["chunk_end"].parse().unwrap(),
        );
        assert_eq!(
            chars[s..e].iter().collect::<String>(),
            h["content"],
            "chunk {n}"
        );
        assert!(last_start.is_none_or(|l| s > l), "chunks advance");
        last_start = Some(s);
    }
    // The docs' one-chunk documents are as before: their key, their fields, no chunk fields.
    let zero = hash(&mut conn, &format!("{}0", names.prefix));
    let mut fields: Vec<&str> = zero.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "__ew_digest",
            "__ew_entry",
            "__ew_model",
            "__ew_version",
            "content",
            "genre"
        ]
    );

    let out = run_ok(worker_cmd(&server, &names).args(["search", &query, "-k", "3"]));
    let printed = String::from_utf8(out.stdout).unwrap();
    // One result per "ID: " (a chunk's text may hold line breaks, printed as they are).
    let results: Vec<&str> = printed.split("ID: ").skip(1).collect();
    assert_eq!(results.len(), 3, "{printed}");
    assert!(
        results[0].starts_with(&format!("{key}, Distance:")),
        "{printed}"
    );
    assert!(
        results[0].contains(&query),
        "the best chunk's text is shown: {}",
        results[0]
    );
    let shown = results
        .iter()
        .filter(|r| r.starts_with(&format!("{key},")))
        .count();
    assert_eq!(shown, 1, "{printed}");

    // --chunks: every chunk hit, by its own key; --json: the same as JSON.
    let out = run_ok(worker_cmd(&server, &names).args(["search", &query, "-k", "4", "--chunks"]));
    let chunk_lines = String::from_utf8(out.stdout).unwrap();
    assert!(
        chunk_lines.matches(&format!("ID: {key}#")).count() >= 2,
        "{chunk_lines}"
    );
    let out = run_ok(worker_cmd(&server, &names).args([
        "search", &query, "-k", "2", "--json", "--return", "content", "genre",
    ]));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], key.as_str());
    assert_eq!(rows[0]["genre"], "docs");
    assert!(rows[0]["distance"].as_f64().unwrap() < rows[1]["distance"].as_f64().unwrap());

    // With chunking off the same document is invisible past its first ~200 words.
    let off = Names::new("nochunks");
    xadd(
        &mut conn,
        &off.stream,
        &[("id", "long"), ("content", &text)],
    );
    drain(&server, &off, &[("EMBED_WORKER__CHUNK__STRATEGY", "none")]);
    assert_eq!(
        keys_of(&mut conn, &format!("{}long", off.prefix)),
        [format!("{}long", off.prefix)]
    );
}

#[test]
fn a_document_that_shrinks_leaves_one_key_and_a_delete_leaves_none() {
    let server = RedisServer::start();
    let names = Names::new("shrink");
    let mut conn = server.conn();
    let key = format!("{}x", names.prefix);
    let sentences = |n: usize, tag: &str| {
        (0..n)
            .map(|i| {
                format!(
                    "Sentence {i} of version {tag} says something about topic {}.",
                    i * 7
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let env = [
        ("EMBED_WORKER__CHUNK__SIZE", "64"),
        ("EMBED_WORKER__CHUNK__OVERLAP", "8"),
    ];
    let count = |conn: &mut ::redis::Connection| keys_of(conn, &key).len();

    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", &sentences(40, "one"))],
    );
    drain(&server, &names, &env);
    let grown = count(&mut conn);
    assert!(grown >= 8, "{grown}");
    // Fewer chunks: the extra chunk keys are gone (the function asked for them to be declared).
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", &sentences(25, "two"))],
    );
    drain(&server, &names, &env);
    let fewer = count(&mut conn);
    assert!((2..grown).contains(&fewer), "{fewer} of {grown}");
    let h = hash(&mut conn, &format!("{key}#0"));
    assert!(h["content"].contains("version two"), "{h:?}");
    // One chunk: the document's own key, and no chunk keys.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", "Now a short text.")],
    );
    drain(&server, &names, &env);
    assert_eq!(keys_of(&mut conn, &key), std::slice::from_ref(&key));
    assert!(!hash(&mut conn, &key).contains_key("parent"));
    // Long again, then deleted: nothing left but the tombstone.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", &sentences(30, "three"))],
    );
    drain(&server, &names, &env);
    assert!(count(&mut conn) >= 5);
    xadd(&mut conn, &names.stream, &[("id", "x"), ("op", "delete")]);
    drain(&server, &names, &env);
    assert!(
        keys_of(&mut conn, &key).is_empty(),
        "{:?}",
        keys_of(&mut conn, &key)
    );
    assert_eq!(pending(&mut conn, &names), 0);
}

#[test]
fn readers_never_see_chunks_of_two_versions_mixed_on_hash() {
    never_mixed("hash");
}

#[test]
fn readers_never_see_chunks_of_two_versions_mixed_on_json() {
    never_mixed("json");
}

/// `__ew_entry` and `__ew_chunks` of the hash or JSON document at `key` (None when absent).
fn bookkeeping_cmd(pipe: &mut ::redis::Pipeline, storage: &str, key: &str) {
    match storage {
        "hash" => pipe
            .cmd("HMGET")
            .arg(key)
            .arg("__ew_entry")
            .arg("__ew_chunks"),
        _ => pipe
            .cmd("JSON.GET")
            .arg(key)
            .arg("$.__ew_entry")
            .arg("$.__ew_chunks"),
    };
}

fn bookkeeping(storage: &str, reply: ::redis::Value) -> Vec<Option<String>> {
    match storage {
        "hash" => ::redis::from_redis_value(reply).unwrap(),
        _ => {
            let Some(text) = ::redis::from_redis_value::<Option<String>>(reply).unwrap() else {
                return vec![None, None];
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            ["$.__ew_entry", "$.__ew_chunks"]
                .iter()
                .map(|p| v[*p][0].as_str().map(str::to_string))
                .collect()
        }
    }
}

fn never_mixed(storage: &'static str) {
    let server = RedisServer::start();
    let names = Names::new("mixed");
    let mut conn = server.conn();
    let key = format!("{}m", names.prefix);
    // Twenty versions alternating between ~6 and ~10 chunks of 64 tokens (each over 256 tokens,
    // so never one chunk).
    for v in 0..20 {
        let n = if v % 2 == 0 { 24 } else { 40 };
        let text = (0..n)
            .map(|i| format!("Version {v} sentence {i} talks about the weather and the sea."))
            .collect::<Vec<_>>()
            .join(" ");
        xadd(&mut conn, &names.stream, &[("id", "m"), ("content", &text)]);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let mut conn = server.conn();
        let key = key.clone();
        std::thread::spawn(move || {
            let mut looks = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // One MULTI/EXEC reads every chunk at one instant.
                let mut pipe = ::redis::pipe();
                pipe.atomic();
                for n in 0..12 {
                    bookkeeping_cmd(&mut pipe, storage, &format!("{key}#{n}"));
                }
                let replies: Vec<::redis::Value> = pipe.query(&mut conn).unwrap();
                let seen: Vec<Vec<Option<String>>> = replies
                    .into_iter()
                    .map(|r| bookkeeping(storage, r))
                    .collect();
                let present: Vec<&Vec<Option<String>>> =
                    seen.iter().filter(|r| r[0].is_some()).collect();
                if let Some(first) = present.first() {
                    assert!(
                        present.iter().all(|r| r[0] == first[0]),
                        "mixed versions: {seen:?}"
                    );
                    let chunks: usize = first[1].as_ref().unwrap().parse().unwrap();
                    assert_eq!(
                        present.len(),
                        chunks.min(12),
                        "a partial chunk set: {seen:?}"
                    );
                    looks += 1;
                }
            }
            looks
        })
    };
    // One version per read, so every version is written.
    drain(
        &server,
        &names,
        &[
            ("EMBED_WORKER__CHUNK__SIZE", "64"),
            ("EMBED_WORKER__CHUNK__OVERLAP", "8"),
            ("EMBED_WORKER__STREAM__READ_COUNT", "1"),
            ("EMBED_WORKER__INDEX__STORAGE", storage),
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = watcher.join().expect("no mixed read");
    assert!(looks > 20, "the watcher saw the document {looks} times");
    assert!(document(&mut conn, &format!("{key}#0"), storage)["content"].starts_with("Version 19 "));
}

#[test]
fn a_document_past_max_chunks_is_dead_lettered_with_its_reason() {
    let server = RedisServer::start();
    let names = Names::new("maxchunks");
    let mut conn = server.conn();
    let text = "A sentence about nothing in particular. ".repeat(100);
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "big"), ("content", &text)],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "small"), ("content", "Fits easily.")],
    );
    drain(&server, &names, &[("EMBED_WORKER__CHUNK__MAX_CHUNKS", "2")]);
    let letters = crate::reliability::dead_letters(&mut conn, &names);
    assert_eq!(letters.len(), 1);
    assert_eq!(
        crate::reliability::text_of(&letters[0], "dead_reason"),
        "too_many_chunks"
    );
    assert_eq!(
        crate::reliability::text_of(&letters[0], "content"),
        text,
        "the entry is kept whole"
    );
    assert!(keys_of(&mut conn, &format!("{}big", names.prefix)).is_empty());
    assert_eq!(
        keys_of(&mut conn, &format!("{}small", names.prefix)).len(),
        1
    );
    assert_eq!(pending(&mut conn, &names), 0);
}

/// The redis-py grouping example in docs/OPERATIONS.md, run as written.
#[test]
fn the_documented_redis_py_grouping_example_runs() {
    let server = RedisServer::start();
    let names = Names::new("grouping");
    let mut conn = server.conn();
    let (_, query) = feed_long_document_and_the_docs(&mut conn, &names);
    drain(&server, &names, &[]);
    let ops = std::fs::read_to_string(root().join("docs/OPERATIONS.md")).unwrap();
    let example = ops
        .split("<!-- grouping example: tests/it/chunks.rs runs it -->")
        .nth(1)
        .and_then(|s| s.split("```python").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the example in docs/OPERATIONS.md");
    let vector = serde_json::to_string(&embed(&[&query])[0]).unwrap();
    let harness = format!(
        "{example}\nimport json, sys, redis\nr = redis.Redis(port=int(sys.argv[1]))\n\
         for key, distance, text in best_documents(r, sys.argv[2], json.loads(sys.argv[3]), k=3):\n    \
         print(key, distance, sep='\\t')\n"
    );
    let out = python_ok(&harness, &[&server.port.to_string(), &names.index, &vector]);
    let keys: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(keys.len(), 3, "{out}");
    assert_eq!(keys[0], format!("{}long", names.prefix), "{out}");
    let mut unique = keys.clone();
    unique.dedup();
    assert_eq!(unique.len(), 3, "each document once: {out}");
}

/// What a worker holds once it stops reading, with every write held back.
fn held_with(server: &RedisServer, names: &Names, env: &[(&str, &str)]) -> (u64, Fleet) {
    let mut cmd = worker_cmd(server, names);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let fleet = Fleet(vec![cmd
        .env("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE", "60s")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    let mut conn = server.conn();
    let mut last = u64::MAX;
    let held = wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = pending(&mut conn, names);
        let settled = now > 0 && now == last;
        last = now;
        settled.then_some(now)
    })
    .expect("the worker stops reading while its writes are held");
    (held, fleet)
}

#[test]
fn reads_are_bounded_in_bytes_whatever_the_token_budget_says() {
    let server = RedisServer::start();
    let names = Names::new("readbytes");
    let mut conn = server.conn();
    // 200 short texts first (the token budget then asks for big reads), then 200 of 30 KB.
    let mut pipe = ::redis::pipe();
    for i in 0..200 {
        pipe.cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("content")
            .arg(format!("note {i}"))
            .ignore();
    }
    let big = "word ".repeat(6000);
    for i in 0..200 {
        pipe.cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("content")
            .arg(format!("{i} {big}"))
            .ignore();
    }
    let () = pipe.query(&mut conn).unwrap();
    let (held, _fleet) = held_with(
        &server,
        &names,
        &[
            ("EMBED_WORKER__STREAM__MAX_TEXT_BYTES", "32768"),
            ("EMBED_WORKER__STREAM__MAX_ENTRY_BYTES", "32768"),
            ("EMBED_WORKER__STREAM__READ_BYTES", "262144"),
            ("EMBED_WORKER__STREAM__READ_TOKENS", "100000"),
            ("EMBED_WORKER__CHUNK__STRATEGY", "none"),
        ],
    );
    // Each read is at most 256 KiB: 8 entries of 32 KiB at most per call, repeated while the
    // budget has room; at most about two reads are held.
    let held_big = held.saturating_sub(200);
    eprintln!("held {held} entries ({held_big} of 30 KB)");
    assert!(held >= 200, "the short ones are read in few calls: {held}");
    assert!(
        held_big <= 2 * 262_144 / 30_000 + 1,
        "held {held_big} entries of 30 KB"
    );
}
