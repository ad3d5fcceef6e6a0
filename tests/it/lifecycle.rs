//! The lifecycle issue's promises: the index stays true to its source. Newest version wins within
//! a read, across workers and after kills; deletes remove documents and their tombstones stop
//! late older upserts; an upsert replaces the whole document. Real redis-server, real model.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common::*;
use crate::reliability::{dead_letters, text_of};

fn drain(server: &RedisServer, names: &Names) -> String {
    let out = run_ok(worker_cmd(server, names).args(["run", "--drain"]));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn hash(conn: &mut ::redis::Connection, key: &str) -> HashMap<String, Vec<u8>> {
    ::redis::cmd("HGETALL").arg(key).query(conn).unwrap()
}

fn field(h: &HashMap<String, Vec<u8>>, name: &str) -> Option<String> {
    h.get(name).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn exists(conn: &mut ::redis::Connection, key: &str) -> bool {
    ::redis::cmd("EXISTS").arg(key).query::<u64>(conn).unwrap() == 1
}

fn dead_reasons(conn: &mut ::redis::Connection, names: &Names) -> Vec<String> {
    dead_letters(conn, names)
        .iter()
        .map(|m| text_of(m, "dead_reason"))
        .collect()
}

/// A paragraph of about 230 tokens: sorted after any short text in a batch, and one chunk.
fn long_text(tag: &str) -> String {
    format!("{tag}: ") + &"a long paragraph about the history of the document store ".repeat(22)
}

#[test]
fn the_newest_entry_of_an_id_wins_within_one_read_in_both_length_orders() {
    let server = RedisServer::start();
    let names = Names::new("oneread");
    let mut conn = server.conn();
    // x: long first, short second (the short one sorts into an earlier batch).
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", &long_text("version one"))],
    );
    let x2 = xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", "Version two: short.")],
    );
    // y: short first, long second.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "y"), ("content", "Version one: short.")],
    );
    let y2 = xadd(
        &mut conn,
        &names.stream,
        &[("id", "y"), ("content", &long_text("version two"))],
    );
    drain(&server, &names);

    let x = hash(&mut conn, &format!("{}x", names.prefix));
    assert_eq!(field(&x, "content").as_deref(), Some("Version two: short."));
    assert_eq!(field(&x, "__ew_entry"), Some(x2));
    let y = hash(&mut conn, &format!("{}y", names.prefix));
    assert_eq!(field(&y, "content"), Some(long_text("version two")));
    assert_eq!(field(&y, "__ew_entry"), Some(y2));
    assert_eq!(field(&y, "__ew_version").as_deref(), Some("0"));
    // The vector is the newest text's.
    let want = embed(&["Version two: short."]).remove(0);
    let got: Vec<f32> = x["embedding"]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    assert_eq!(pending(&mut conn, &names), 0);
}

/// A worker that reads the entry just added and holds its write for `pause` (the test-only
/// fault hook), and that reads nothing else: with `read_count` 1 it prefetches one more read,
/// which a filler entry takes, and then its budget is full. So a later entry can only go to
/// another worker.
fn hold_the_last_entry(
    server: &RedisServer,
    names: &Names,
    conn: &mut ::redis::Connection,
    pause: &str,
) -> Fleet {
    let before = pending(conn, names);
    let fleet = Fleet(vec![worker_cmd(server, names)
        .env("EMBED_WORKER__STREAM__CONSUMER", "slow-a")
        .env("EMBED_WORKER__STREAM__READ_COUNT", "1")
        .env("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE", pause)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    wait_pending(conn, names, before + 1);
    xadd(
        conn,
        &names.stream,
        &[("id", "filler"), ("content", "a filler entry")],
    );
    wait_pending(conn, names, before + 2);
    // Its budget is full now (two reads of one entry); give it a moment to prove it stays so.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(pending(conn, names), before + 2);
    fleet
}

/// Waits until `n` entries are pending in the group (a worker has read them).
fn wait_pending(conn: &mut ::redis::Connection, names: &Names, n: u64) {
    let read = wait_for(Duration::from_secs(60), || {
        (pending(conn, names) == n).then_some(())
    });
    assert!(
        read.is_some(),
        "expected {n} pending, have {}",
        pending(conn, names)
    );
}

fn fast_worker(server: &RedisServer, names: &Names) -> std::process::Child {
    worker_cmd(server, names)
        .env("EMBED_WORKER__STREAM__CONSUMER", "fast-b")
        .args(["run", "--drain"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn an_older_write_held_back_by_a_slow_worker_loses_to_the_newer_one() {
    let server = RedisServer::start();
    let names = Names::new("twoworkers");
    let mut conn = server.conn();
    let key = format!("{}x", names.prefix);
    // Worker A reads v1 and holds its write for 8 s.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", "version one"), ("genre", "old")],
    );
    let _a = hold_the_last_entry(&server, &names, &mut conn, "8s");
    // Meanwhile v2 arrives, and worker B writes it at once.
    let v2 = xadd(
        &mut conn,
        &names.stream,
        &[("id", "x"), ("content", "version two")],
    );
    let mut b = fast_worker(&server, &names);
    let written = wait_for(Duration::from_secs(60), || {
        (field(&hash(&mut conn, &key), "__ew_entry").as_deref() == Some(v2.as_str())).then_some(())
    });
    assert!(
        written.is_some(),
        "B should have written v2 while A holds v1"
    );
    assert_eq!(
        pending(&mut conn, &names),
        2,
        "A still holds v1 and the filler"
    );
    // B's drain ends once A's late write of v1 is acked: the group is empty.
    assert!(b.wait().unwrap().success());
    assert_eq!(pending(&mut conn, &names), 0, "A acked its superseded v1");
    let h = hash(&mut conn, &key);
    assert_eq!(field(&h, "content").as_deref(), Some("version two"));
    assert_eq!(field(&h, "__ew_entry"), Some(v2));
    assert_eq!(field(&h, "genre"), None, "replaced, not merged");
    assert!(
        dead_reasons(&mut conn, &names).is_empty(),
        "superseded is not a dead letter"
    );
}

#[test]
fn a_delete_leaves_a_tombstone_that_stops_a_late_older_upsert() {
    let server = RedisServer::start();
    let names = Names::new("tomb");
    let mut conn = server.conn();
    let key = format!("{}y", names.prefix);
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "y"), ("content", "first version")],
    );
    drain(&server, &names);
    assert!(exists(&mut conn, &key));

    // A slow worker reads an upsert of y and holds it; the delete behind it is written first.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "y"), ("content", "late older version")],
    );
    let _a = hold_the_last_entry(&server, &names, &mut conn, "8s");
    let del = xadd(&mut conn, &names.stream, &[("id", "y"), ("op", "delete")]);
    // Deleting an id that never existed is acked, not an error.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "nobody"), ("op", "delete")],
    );
    let mut b = fast_worker(&server, &names);
    // B deletes y while A still holds the older upsert.
    let deleted = wait_for(Duration::from_secs(60), || {
        (!exists(&mut conn, &key)).then_some(())
    });
    assert!(
        deleted.is_some(),
        "B should have deleted y while A holds its upsert"
    );
    assert!(b.wait().unwrap().success());
    assert_eq!(pending(&mut conn, &names), 0);
    assert!(
        !exists(&mut conn, &key),
        "the late older upsert must not bring y back"
    );
    let tomb = format!("embed:tomb:{{{key}}}");
    let stone: String = ::redis::cmd("GET").arg(&tomb).query(&mut conn).unwrap();
    assert_eq!(stone, format!("0 {del}"));
    let ttl: i64 = ::redis::cmd("PTTL").arg(&tomb).query(&mut conn).unwrap();
    assert!(ttl > 23 * 3600 * 1000, "24h by default: {ttl}");
    assert!(exists(
        &mut conn,
        &format!("embed:tomb:{{{}nobody}}", names.prefix)
    ));
    assert!(dead_reasons(&mut conn, &names).is_empty());
    // The index no longer finds it.
    let out = run_ok(worker_cmd(&server, &names).args(["search", "first version", "-k", "5"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&key));

    // A newer upsert brings it back and clears the tombstone.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "y"), ("content", "reborn")],
    );
    drain(&server, &names);
    assert_eq!(
        field(&hash(&mut conn, &key), "content").as_deref(),
        Some("reborn")
    );
    assert!(!exists(&mut conn, &tomb));
}

#[test]
fn an_upsert_replaces_the_document_so_dropped_fields_leave_tag_filters() {
    let server = RedisServer::start();
    let names = Names::new("replace");
    let mut conn = server.conn();
    let key = format!("{}p", names.prefix);
    xadd(
        &mut conn,
        &names.stream,
        &[
            ("id", "p"),
            ("content", "That is a very happy person"),
            ("genre", "persons"),
        ],
    );
    drain(&server, &names);
    let filtered = || {
        let out = run_ok(worker_cmd(&server, &names).args([
            "search",
            QUERY,
            "-k",
            "5",
            "--filter",
            "@genre:{persons}",
        ]));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(filtered().starts_with(&format!("ID: {key}, ")));

    xadd(
        &mut conn,
        &names.stream,
        &[("id", "p"), ("content", "That is a very happy person")],
    );
    drain(&server, &names);
    assert_eq!(
        filtered().trim(),
        "",
        "genre was dropped by the newer version"
    );
    let mut fields: Vec<String> = hash(&mut conn, &key).into_keys().collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "__ew_digest",
            "__ew_entry",
            "__ew_model",
            "__ew_version",
            "content",
            "embedding"
        ]
    );
}

#[test]
fn producer_versions_outrank_stream_order_and_bad_ones_are_dead_letters() {
    let server = RedisServer::start();
    let names = Names::new("versions");
    let mut conn = server.conn();
    let key = format!("{}v", names.prefix);
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("content", "five"), ("version", "5")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("content", "four"), ("version", "4")],
    );
    // Unversioned counts as version 0: it loses to a versioned document.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("content", "unversioned")],
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("content", "x"), ("version", "-1")],
    );
    xadd(&mut conn, &names.stream, &[("id", "v"), ("op", "remove")]);
    drain(&server, &names);
    let h = hash(&mut conn, &key);
    assert_eq!(field(&h, "content").as_deref(), Some("five"));
    assert_eq!(field(&h, "__ew_version").as_deref(), Some("5"));
    assert_eq!(field(&h, "version"), None, "control fields are not stored");
    let mut reasons = dead_reasons(&mut conn, &names);
    reasons.sort();
    assert_eq!(reasons, ["invalid_op", "invalid_version"]);

    // Across reads too: an older version later in the stream loses, a higher one wins, and a
    // versioned delete below the stored version is superseded.
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("op", "delete"), ("version", "3")],
    );
    drain(&server, &names);
    assert_eq!(
        field(&hash(&mut conn, &key), "content").as_deref(),
        Some("five")
    );
    xadd(
        &mut conn,
        &names.stream,
        &[("id", "v"), ("content", "six"), ("version", "6")],
    );
    drain(&server, &names);
    assert_eq!(
        field(&hash(&mut conn, &key), "content").as_deref(),
        Some("six")
    );
    assert_eq!(pending(&mut conn, &names), 0);
}

/// Random upserts and deletes over a few ids, produced in waves while workers run and are
/// SIGKILLed and restarted: the index must end in exactly the last operation per id in stream
/// order. Seed with EMBED_WORKER_LIFECYCLE_SEED to replay a run.
#[test]
fn random_upserts_and_deletes_with_kills_end_in_the_last_op_per_id() {
    let seed: u64 = std::env::var("EMBED_WORKER_LIFECYCLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("EMBED_WORKER_LIFECYCLE_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let server = RedisServer::start();
    let names = Names::new("chaos");
    let mut conn = server.conn();
    let ids = ["a", "b", "c", "d", "e"];
    // Stream order is the order of these XADDs: the last op per id is the expected state.
    let mut last: HashMap<&str, Option<(String, String)>> = HashMap::new();
    let spawn = |consumer: String| {
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__STREAM__CONSUMER", consumer)
            // Small reads and quick reclaims: many batches in flight, kills recovered fast.
            .env("EMBED_WORKER__STREAM__READ_TOKENS", "400")
            .env("EMBED_WORKER__STREAM__CLAIM_IDLE", "3s")
            .env("EMBED_WORKER__STREAM__CLAIM_INTERVAL", "500ms")
            // Live workers on 2 shared cores can hold a read past claim_idle and be reclaimed
            // from; this test is about order, not about the poison guard.
            .env("EMBED_WORKER__STREAM__MAX_DELIVERIES", "100")
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut fleet = Fleet(vec![spawn("w0".into()), spawn("w1".into())]);
    let mut n = 0;
    for wave in 0..6 {
        for _ in 0..60 {
            n += 1;
            let id = ids[rng.random_range(0..ids.len())];
            if rng.random_bool(0.3) {
                xadd(&mut conn, &names.stream, &[("id", id), ("op", "delete")]);
                last.insert(id, None);
            } else {
                // Lengths vary so that batches are sorted differently from stream order.
                let text = if rng.random_bool(0.3) {
                    long_text(&format!("op {n}"))
                } else {
                    format!("op {n} on {id}")
                };
                let entry = xadd(&mut conn, &names.stream, &[("id", id), ("content", &text)]);
                last.insert(id, Some((text, entry)));
            }
        }
        // Kill one worker at a random moment of its work and start another in its place
        // (sometimes under the same name, so it resumes its own pending entries first).
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        let victim = rng.random_range(0..fleet.0.len());
        let _ = fleet.0[victim].kill();
        let _ = fleet.0[victim].wait();
        let name = if rng.random_bool(0.5) {
            format!("w{victim}")
        } else {
            format!("w{victim}-{wave}")
        };
        fleet.0[victim] = spawn(name);
    }
    drop(fleet);
    // Whatever the kills left pending is finished by one more worker.
    run_ok(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__STREAM__CLAIM_IDLE", "1s")
            .env("EMBED_WORKER__STREAM__MAX_DELIVERIES", "100")
            .args(["run", "--drain"]),
    );
    assert_eq!(pending(&mut conn, &names), 0, "seed {seed}");
    for id in ids {
        let key = format!("{}{id}", names.prefix);
        let h = hash(&mut conn, &key);
        match last.get(id) {
            None | Some(None) => {
                assert!(h.is_empty(), "seed {seed}: {key} should be absent: {h:?}")
            }
            Some(Some((text, entry))) => {
                assert_eq!(
                    field(&h, "content").as_ref(),
                    Some(text),
                    "seed {seed}: {key}"
                );
                assert_eq!(
                    field(&h, "__ew_entry").as_ref(),
                    Some(entry),
                    "seed {seed}: {key}"
                );
            }
        }
    }
    assert!(dead_reasons(&mut conn, &names).is_empty(), "seed {seed}");
}

#[test]
fn an_entry_with_thousands_of_fields_is_stored_whole_and_replaced_whole() {
    let server = RedisServer::start();
    let names = Names::new("wide");
    let mut conn = server.conn();
    let key = format!("{}w", names.prefix);
    // 5,000 fields: more values than one HSET inside the function takes (it writes in slices).
    let extra: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("f{i}"), format!("v{i}")))
        .collect();
    let mut fields: Vec<(&str, &str)> = vec![("id", "w"), ("content", "a wide document")];
    fields.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    xadd(&mut conn, &names.stream, &fields);
    drain(&server, &names);
    let h = hash(&mut conn, &key);
    assert_eq!(
        h.len(),
        5000 + 6,
        "content, embedding, 4 bookkeeping fields and 5,000 more"
    );
    assert_eq!(field(&h, "f4999").as_deref(), Some("v4999"));
    assert!(dead_reasons(&mut conn, &names).is_empty());

    xadd(
        &mut conn,
        &names.stream,
        &[("id", "w"), ("content", "narrow again")],
    );
    drain(&server, &names);
    assert_eq!(hash(&mut conn, &key).len(), 6);
}
