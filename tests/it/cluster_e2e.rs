//! The worker fleet on a real Redis Cluster (3 primaries with the search and JSON modules, no
//! search coordinator), end to end through sharded streams: the docs page's example alone; then
//! the example and 2000 documents with `redis.wait_replicas = 1` (3 primaries, 3 replicas) while a primary is
//! SIGKILLed and never restarted, another hands over by CLUSTER FAILOVER, and slots move: some
//! documents', a shard stream's and a primary's index name's. Every document ends written,
//! indexed and found by an exact search; nothing stays pending; no letter is dead; no worker
//! exits.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ::redis::ConnectionLike;

use crate::cluster_index::{assert_same_ranking, brute_force, search};
use crate::cluster_support::RedisCluster;
use crate::common::*;

const SHARDS: u32 = 3;
const DOCUMENTS: usize = 2000;
/// How long the fleet may take to finish once the last document is produced.
const SETTLE: Duration = Duration::from_secs(240);

/// The documented shard of `id` (docs/OPERATIONS.md "Sharded streams"; tests/it/shards.rs checks
/// the worker against Python's zlib.crc32).
fn shard_key(stream: &str, id: &str) -> String {
    format!("{stream}{{{}-ew}}", crc32fast::hash(id.as_bytes()) % SHARDS)
}

fn sharded(cluster: &RedisCluster, names: &Names) -> Command {
    let mut cmd = cluster.worker_cmd(names);
    cmd.env("EMBED_WORKER__STREAM__SHARDS", SHARDS.to_string());
    cmd
}

fn stats(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.args(["stats", "--json"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// XADD with retries: a producer rides out a failover or a moving slot (MOVED and ASK are
/// followed by the cluster client; CLUSTERDOWN and TRYAGAIN are not errors of the entry).
fn produce(conn: &mut impl ConnectionLike, stream: &str, fields: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut cmd = ::redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        match cmd.query::<String>(conn) {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("XADD to {stream} failed ({e}); again");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("XADD to {stream}: {e}"),
        }
    }
}

/// Document `i`'s text: distinct, and close to a few others (shared words).
fn text(i: usize) -> String {
    const A: [&str; 8] = [
        "quiet", "crowded", "ancient", "sunny", "windy", "narrow", "golden", "frozen",
    ];
    const N: [&str; 10] = [
        "harbour", "library", "orchard", "station", "bridge", "market", "garden", "tower",
        "valley", "workshop",
    ];
    const V: [&str; 5] = ["opens", "closes", "fills up", "falls silent", "is repaired"];
    format!(
        "Note {i}: the {} {} {} at dawn.",
        A[i % 8],
        N[(i / 8) % 10],
        V[(i / 80) % 5]
    )
}

fn produce_range(
    cluster: &RedisCluster,
    names: &Names,
    ids: std::ops::Range<usize>,
    pace: Duration,
) {
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    for i in ids {
        let id = format!("n{i}");
        let text = text(i);
        produce(
            &mut conn,
            &shard_key(&names.stream, &id),
            &[("id", &id), ("content", &text), ("genre", "notes")],
        );
        std::thread::sleep(pace);
    }
}

/// Entries read and not yet acked plus entries not yet read, over every shard.
fn outstanding(s: &serde_json::Value) -> u64 {
    s["group"]["pending"].as_u64().unwrap_or(u64::MAX) + s["group"]["lag"].as_u64().unwrap_or(0)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn the_docs_example_runs_through_sharded_streams_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let names = docs_names();
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let id = i.to_string();
        produce(
            &mut conn,
            &shard_key(&names.stream, &id),
            &[("id", &id), ("content", content), ("genre", genre)],
        );
    }
    run_ok(sharded(&cluster, &names).args(["run", "--drain"]));
    let out = run_ok(sharded(&cluster, &names).args(["search", QUERY]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());
    let s = stats(&mut sharded(&cluster, &names));
    assert_eq!(outstanding(&s), 0, "{s}");
    assert_eq!(s["index"]["num_docs"], 3, "{s}");
    assert_eq!(
        s["index"]["unindexed_primaries"],
        serde_json::json!([]),
        "{s}"
    );
    // Each primary its own index: three, under names of their own slots.
    let mut indexes = Vec::new();
    for port in cluster.primaries() {
        let names: Vec<String> = ::redis::cmd("FT._LIST")
            .query(&mut cluster.conn(port))
            .unwrap();
        assert_eq!(names.len(), 1, "{port}: {names:?}");
        indexes.extend(names);
    }
    assert!(indexes.contains(&"vector_idx".to_string()), "{indexes:?}");

    // A prefix that cannot keep a document's chunks and tombstone in its slot is refused at
    // start-up, naming the setting, before anything is read or written.
    let before = stats(&mut sharded(&cluster, &names));
    let refused = sharded(&cluster, &names)
        .env("EMBED_WORKER__INDEX__PREFIX", "doc}:")
        .args(["run", "--drain"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("index.prefix \"doc}:\" has a brace but no whole hash tag"),
        "{stderr}"
    );
    let after = stats(&mut sharded(&cluster, &names));
    for part in ["shards", "dead_letters", "index"] {
        assert_eq!(after[part], before[part], "{part}");
    }
    let consumers = |s: &serde_json::Value| s["consumers"].as_array().unwrap().len();
    assert_eq!(consumers(&after), consumers(&before), "it joined no group");

    // A running worker asks whether the search module has a coordinator once, not on each of
    // its index calls (the readiness probe's every second, the index keeper's every 5 s).
    let asked = || -> u64 {
        cluster
            .primaries()
            .into_iter()
            .map(|port| command_calls(&mut cluster.conn(port), "command|info"))
            .sum()
    };
    let before = asked();
    let running = Fleet(vec![sharded(&cluster, &names)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()]);
    std::thread::sleep(Duration::from_secs(8));
    drop(running);
    // Each primary once, or a few times where the start-up's ensure, the probe's first round
    // and the index keeper's ask before any has the answer; asked on each call, it would be
    // at least 8 (the probe alone).
    let per_primary = (asked() - before) as f64 / cluster.primaries().len() as f64;
    assert!(
        (1.0..=3.0).contains(&per_primary),
        "COMMAND INFO per primary in 8 s of a running worker: {per_primary}"
    );
}

#[test]
fn a_fleet_loses_nothing_through_a_killed_primary_a_manual_failover_and_a_reshard() {
    let mut cluster = RedisCluster::start(3, 1);
    let names = docs_names();
    let logs = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    // FLAT: the shards' answers are exact, so the search below can be checked against brute force.
    let worker = |cluster: &RedisCluster| {
        let mut cmd = sharded(cluster, &names);
        cmd.env("EMBED_WORKER__REDIS__WAIT_REPLICAS", "1")
            .env("EMBED_WORKER__INDEX__ALGORITHM", "FLAT")
            .env("EMBED_WORKER__LOG__LEVEL", "info,ort=warn");
        cmd
    };
    let log_paths: Vec<_> = (0..2)
        .map(|w| logs.path().join(format!("worker{w}.log")))
        .collect();
    let seed = cluster.primaries()[0];
    assert_eq!(cluster.url(), format!("redis://127.0.0.1:{seed}"));
    let mut fleet = Fleet(
        log_paths
            .iter()
            .map(|path| {
                let log = File::create(path).unwrap();
                worker(&cluster)
                    .arg("run")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let alive = |fleet: &mut Fleet, when: &str| {
        for (w, child) in fleet.0.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "worker {w} exited ({status}) {when}:\n{}",
                    tail(&log_paths[w])
                );
            }
        }
    };

    // 1. The docs' example and a backlog, replicated, then the primary holding the most shard
    //    streams is SIGKILLed mid-way through it, and never restarted.
    let mut producer = cluster.cluster_client().get_connection().unwrap();
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let id = i.to_string();
        produce(
            &mut producer,
            &shard_key(&names.stream, &id),
            &[("id", &id), ("content", content), ("genre", genre)],
        );
    }
    produce_range(&cluster, &names, 0..1000, Duration::ZERO);
    cluster.wait_replicated();
    let done = wait_for(Duration::from_secs(120), || {
        let s = stats(&mut sharded(&cluster, &names));
        (outstanding(&s) <= 800).then_some(())
    });
    assert!(done.is_some(), "the fleet did not start on the backlog");
    let mut streams_on: BTreeMap<u16, usize> = BTreeMap::new();
    for shard in 0..SHARDS {
        let key = format!("{}{{{shard}-ew}}", names.stream);
        *streams_on
            .entry(cluster.primary_for_slot(cluster.slot_of(&key)))
            .or_default() += 1;
    }
    // Of those, the node in the workers' redis.url: they must carry on without it.
    let (&victim, _) = streams_on
        .iter()
        .max_by_key(|(&port, &n)| (n, port == seed))
        .unwrap();
    cluster.kill(victim);
    let promoted = cluster.wait_failover(victim);
    eprintln!("{:?}: killed {victim}; {promoted} took over", t0.elapsed());
    alive(&mut fleet, "after the failover");

    // 2. More documents while another primary hands over to its replica.
    let handing = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != promoted && !cluster.replicas_of(p).is_empty())
        .expect("a primary with a replica");
    let replica = cluster.replicas_of(handing)[0];
    std::thread::scope(|scope| {
        let producer =
            scope.spawn(|| produce_range(&cluster, &names, 1000..1500, Duration::from_millis(4)));
        std::thread::sleep(Duration::from_millis(500));
        cluster.graceful_failover(replica);
        producer.join().unwrap();
    });
    eprintln!(
        "{:?}: {replica} took over from {handing} by CLUSTER FAILOVER",
        t0.elapsed()
    );
    alive(&mut fleet, "after CLUSTER FAILOVER");

    // 3. More documents while slots move: 64 slots of documents, the slot of a shard stream,
    //    and the slot of one primary's own index name (stranding that index: the workers' index
    //    check must give the primary a new one).
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let from_slots = cluster
        .nodes()
        .into_iter()
        .find(|n| n.port == from)
        .unwrap()
        .slots;
    let start = *from_slots[0].start();
    let stream_key = format!("{}{{0-ew}}", names.stream);
    let stream_slot = cluster.slot_of(&stream_key);
    let stream_to = primaries
        .iter()
        .copied()
        .find(|&p| p != cluster.primary_for_slot(stream_slot))
        .unwrap();
    let index_names: Vec<String> = ::redis::cmd("FT._LIST")
        .query(&mut cluster.conn(to))
        .unwrap();
    assert_eq!(index_names.len(), 1, "{index_names:?}");
    let stranded = index_names[0].clone();
    std::thread::scope(|scope| {
        let producer = scope
            .spawn(|| produce_range(&cluster, &names, 1500..DOCUMENTS, Duration::from_millis(4)));
        cluster.migrate_slots(start..=start + 63, to);
        cluster.migrate_slot(stream_slot, stream_to);
        cluster.migrate_slot(cluster.slot_of(&stranded), from);
        producer.join().unwrap();
    });
    eprintln!(
        "moved 64 slots {from}->{to}, {stream_key} to {stream_to}, {stranded}'s slot to {from}"
    );
    alive(&mut fleet, "after the reshard");

    // Everything done: acked, indexed on every primary.
    let started = Instant::now();
    let mut last = None;
    let settled = wait_for(SETTLE, || {
        let s = stats(&mut sharded(&cluster, &names));
        let progress = (outstanding(&s), s["index"]["num_docs"].clone());
        if last.as_ref() != Some(&progress) {
            eprintln!(
                "{:?}: outstanding {}, indexed {}",
                t0.elapsed(),
                progress.0,
                progress.1
            );
            last = Some(progress);
        }
        let indexed = s["index"]["num_docs"].as_u64() == Some((DOCUMENTS + DOCS.len()) as u64)
            && s["index"]["unindexed_primaries"] == serde_json::json!([])
            && s["index"]["indexing"] == false;
        (outstanding(&s) == 0 && indexed).then_some(s)
    });
    if std::env::var_os("EMBED_WORKER_TEST_KEEP_LOGS").is_some() {
        for p in &log_paths {
            let _ = std::fs::copy(p, std::env::temp_dir().join(p.file_name().unwrap()));
        }
    }
    let s = settled.unwrap_or_else(|| {
        panic!(
            "not settled after {SETTLE:?}: {}\n{}",
            stats(&mut sharded(&cluster, &names)),
            tail(&log_paths[0])
        )
    });
    eprintln!("settled {:?} after the last document", started.elapsed());
    assert_eq!(s["dead_letters"]["length"], 0, "{s}");
    alive(&mut fleet, "at the end");

    // Every document, with its vector, from the primaries that serve it now.
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    let mut docs = Vec::new();
    let every = (0..DOCUMENTS)
        .map(|i| (format!("doc:n{i}"), text(i)))
        .chain((0..DOCS.len()).map(|i| (format!("doc:{i}"), DOCS[i].0.to_string())));
    for (key, text) in every {
        let (content, vector): (Option<String>, Option<Vec<u8>>) = ::redis::cmd("HMGET")
            .arg(&key)
            .arg("content")
            .arg("embedding")
            .query(&mut conn)
            .unwrap();
        assert_eq!(content.as_deref(), Some(text.as_str()), "{key}");
        let bytes = vector.unwrap_or_else(|| panic!("{key} has no vector"));
        assert_eq!(bytes.len(), 384 * 4, "{key}");
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        docs.push((key, v));
    }
    // A search over every primary's index is brute force's answer, in order.
    let searching = || {
        let mut cmd = sharded(&cluster, &names);
        cmd.env("EMBED_WORKER__INDEX__ALGORITHM", "FLAT");
        cmd
    };
    for query in ["the quiet harbour falls silent", &text(1234)] {
        let vector = embed(&[query]).pop().unwrap();
        let got = search(searching(), query, 10);
        assert_same_ranking(&got, &brute_force(&docs, &vector, 10));
    }
    assert_eq!(search(searching(), &text(1234), 1)[0].0, "doc:n1234");
    // The docs page's lines, in its order, from every primary's index (the notes filtered out).
    let out = run_ok(searching().args(["search", QUERY, "--filter=-@genre:{notes}"]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());
    drop(fleet);
}
