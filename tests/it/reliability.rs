//! Issue 4's promises against real processes: at-least-once indexing under SIGKILLed workers, a
//! Redis restart and an outage, poison input, SIGTERM mid-batch, and batch isolation.
//! Security (wrong password, TLS, the ACL user) is in `reliability/security.rs`.
//!
//! `EMBED_WORKER_FAULT_DOCS=20000 cargo test --test it fault_injection -- --nocapture` runs the
//! full-size fault suite (the default keeps `make test` short).

mod security;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::common::*;

/// One planned stream entry: its fields, and what must become of it.
struct Planned {
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// The hash key's id (valid documents only).
    doc_id: Option<String>,
    text: String,
    /// The dead-letter reason a poison entry must get.
    poison: Option<&'static str>,
}

const MAX_TEXT_BYTES: usize = 4096;

/// `n` entries, 1% poison of every kind the parser rejects, spread through the stream.
fn plan_documents(n: usize) -> Vec<Planned> {
    const TOPICS: [&str; 6] = ["rivers", "databases", "bread", "volcanoes", "jazz", "chess"];
    (0..n)
        .map(|i| {
            let text = format!(
                "Document {i} is about {} in city {} and mentions number {}",
                TOPICS[i % TOPICS.len()],
                i % 91,
                i * 7 % 1000
            );
            let f = |k: &str, v: &[u8]| (k.as_bytes().to_vec(), v.to_vec());
            let p_id = format!("p{i}");
            if i % 100 != 37 {
                let fields = vec![
                    f("id", format!("d{i}").as_bytes()),
                    f("content", text.as_bytes()),
                    f("genre", format!("g{}", i % 5).as_bytes()),
                ];
                return Planned {
                    fields,
                    doc_id: Some(format!("d{i}")),
                    text,
                    poison: None,
                };
            }
            let (fields, reason) = match (i / 100) % 6 {
                0 => (
                    vec![f("id", p_id.as_bytes()), f("genre", b"x")],
                    "missing_text",
                ),
                1 => (
                    vec![
                        f("id", p_id.as_bytes()),
                        f("content", b"caf\xe9 \xff\xfe bytes"),
                    ],
                    "invalid_utf8",
                ),
                2 => (
                    vec![f("id", p_id.as_bytes()), f("content", b" \t\n  ")],
                    "empty_text",
                ),
                3 => (
                    vec![
                        f("id", p_id.as_bytes()),
                        f("content", "long ".repeat(MAX_TEXT_BYTES / 4).as_bytes()),
                    ],
                    "text_too_long",
                ),
                4 => {
                    let bad = if (i / 600) % 2 == 0 {
                        format!("a b{i}")
                    } else {
                        format!("x*{i}")
                    };
                    (
                        vec![f("id", bad.as_bytes()), f("content", text.as_bytes())],
                        "invalid_id",
                    )
                }
                _ => (
                    vec![
                        f("id", p_id.as_bytes()),
                        f("content", text.as_bytes()),
                        f("embedding", b"not a vector"),
                    ],
                    "reserved_field",
                ),
            };
            Planned {
                fields,
                doc_id: None,
                text,
                poison: Some(reason),
            }
        })
        .collect()
}

/// XADDs the entries in pipelined chunks; returns their entry IDs in order.
fn produce(conn: &mut ::redis::Connection, stream: &str, plan: &[Planned]) -> Vec<String> {
    let mut ids = Vec::with_capacity(plan.len());
    for chunk in plan.chunks(500) {
        let mut pipe = ::redis::pipe();
        for p in chunk {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            for (k, v) in &p.fields {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        let chunk_ids: Vec<String> = pipe.query(conn).unwrap();
        ids.extend(chunk_ids);
    }
    ids
}

/// A worker process (`embed-worker run`) logging JSON lines to `log` (appended across restarts).
fn spawn_worker(
    server_url: &str,
    server: &RedisServer,
    names: &Names,
    consumer: &str,
    env: &[(&str, String)],
    log: &Path,
) -> Child {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    worker_cmd(server, names)
        .env("EMBED_WORKER__REDIS__URL", server_url)
        .env("EMBED_WORKER__STREAM__CONSUMER", consumer)
        .env("EMBED_WORKER__LOG__FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("run")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

pub(crate) fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    wait_for(timeout, || child.try_wait().unwrap())
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// XINFO GROUPS for our group, as name -> value.
fn group_info(conn: &mut ::redis::Connection, names: &Names) -> HashMap<String, Value> {
    let groups: Vec<Value> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&names.stream)
        .query(conn)
        .unwrap_or_default();
    for g in groups {
        let Value::Array(kv) = g else { continue };
        let map: HashMap<String, Value> = kv
            .chunks(2)
            .map(|c| {
                (
                    ::redis::from_redis_value::<String>(c[0].clone()).unwrap(),
                    c[1].clone(),
                )
            })
            .collect();
        if map
            .get("name")
            .map(|v| ::redis::from_redis_value::<String>(v.clone()).unwrap())
            == Some(names.group.clone())
        {
            return map;
        }
    }
    HashMap::new()
}

fn int(map: &HashMap<String, Value>, key: &str) -> Option<u64> {
    match map.get(key) {
        Some(Value::Int(n)) => Some(*n as u64),
        _ => None,
    }
}

fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// Stream entries as XRANGE returns them: (entry id, [(field, value)]).
type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Every entry of the dead-letter stream as its fields (last value of a repeated name wins).
pub(crate) fn dead_letters(
    conn: &mut ::redis::Connection,
    names: &Names,
) -> Vec<HashMap<String, Vec<u8>>> {
    let entries: Entries = ::redis::cmd("XRANGE")
        .arg(names.dead())
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_default();
    entries
        .into_iter()
        .map(|(_, kv)| kv.into_iter().collect())
        .collect()
}

pub(crate) fn text_of(map: &HashMap<String, Vec<u8>>, k: &str) -> String {
    String::from_utf8_lossy(map.get(k).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// Nothing acked unwritten: every entry the group delivered and no longer holds pending has its
/// hash (valid documents) or its dead letter (poison). Race-free against live workers: the
/// delivered mark is read first, then the pending list, then the outcomes (which only grow).
/// Returns how many acked entries were checked.
fn assert_acked_are_written(
    conn: &mut ::redis::Connection,
    names: &Names,
    plan: &[Planned],
    ids: &[String],
) -> usize {
    let info = group_info(conn, names);
    // No group yet (the workers are still starting): nothing was delivered, so nothing acked.
    let Some(last) = info.get("last-delivered-id") else {
        return 0;
    };
    let last: String = ::redis::from_redis_value(last.clone()).unwrap();
    let last = stream_id(&last);
    let pel: Vec<(String, String, u64, u64)> = ::redis::cmd("XPENDING")
        .arg(&names.stream)
        .arg(&names.group)
        .arg("-")
        .arg("+")
        .arg(1_000_000)
        .query(conn)
        .unwrap();
    let pending: HashSet<String> = pel.into_iter().map(|p| p.0).collect();
    let dead: HashSet<String> = dead_letters(conn, names)
        .iter()
        .map(|d| text_of(d, "dead_entry_id"))
        .collect();
    let acked: Vec<usize> = (0..ids.len())
        .filter(|&i| stream_id(&ids[i]) <= last && !pending.contains(&ids[i]))
        .collect();
    let mut pipe = ::redis::pipe();
    let valid: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|&i| plan[i].doc_id.is_some())
        .collect();
    for &i in &valid {
        pipe.cmd("EXISTS").arg(format!(
            "{}{}",
            names.prefix,
            plan[i].doc_id.as_ref().unwrap()
        ));
    }
    let exists: Vec<u64> = if valid.is_empty() {
        vec![]
    } else {
        pipe.query(conn).unwrap()
    };
    for (&i, e) in valid.iter().zip(exists) {
        assert_eq!(e, 1, "entry {} was acked but its hash is missing", ids[i]);
    }
    for &i in acked.iter().filter(|&&i| plan[i].poison.is_some()) {
        assert!(
            dead.contains(&ids[i]),
            "poison entry {} was acked without a dead letter",
            ids[i]
        );
    }
    acked.len()
}

/// Entries re-delivered, from the workers' logs: own pending resumed after a restart, and
/// entries reclaimed from other consumers.
fn redeliveries(logs: &[PathBuf]) -> (u64, u64) {
    let (mut resumed, mut claimed) = (0, 0);
    for log in logs {
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let n = v["entries"].as_u64().unwrap_or(0);
            match v["message"].as_str() {
                Some("resuming this consumer's pending entries") => resumed += n,
                Some("claimed entries idle on other consumers") => claimed += n,
                _ => {}
            }
        }
    }
    (resumed, claimed)
}

fn vector_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Asserts sampled hashes hold what `embed` computes for their text.
fn assert_sample_embeddings(conn: &mut ::redis::Connection, names: &Names, plan: &[Planned]) {
    let valid: Vec<&Planned> = plan.iter().filter(|p| p.doc_id.is_some()).collect();
    let step = (valid.len() / 16).max(1);
    let sample: Vec<&Planned> = valid.iter().step_by(step).copied().collect();
    let texts: Vec<&str> = sample.iter().map(|p| p.text.as_str()).collect();
    let expected = embed(&texts);
    for (p, want) in sample.iter().zip(expected) {
        let key = format!("{}{}", names.prefix, p.doc_id.as_ref().unwrap());
        let bytes: Vec<u8> = ::redis::cmd("HGET")
            .arg(&key)
            .arg("embedding")
            .query(conn)
            .unwrap();
        let d = squared_l2(&vector_of(&bytes), &want);
        assert!(d < 1e-6, "{key}: squared L2 {d} from `embed`");
    }
}

#[test]
fn fault_injection_kills_a_redis_restart_and_poison_lose_nothing() {
    let total: usize = std::env::var("EMBED_WORKER_FAULT_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let started = Instant::now();
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let url = server.url();
    let names = Names::new("fault");
    let plan = plan_documents(total);
    let mut conn = server.conn();
    let mut ids = produce(&mut conn, &names.stream, &plan[..total / 2]);

    let logs_dir = tempfile::tempdir().unwrap();
    let logs: Vec<PathBuf> = (0..3)
        .map(|k| logs_dir.path().join(format!("w{k}.log")))
        .collect();
    let env: Vec<(&str, String)> = vec![
        ("EMBED_WORKER__STREAM__CLAIM_IDLE", "3s".into()),
        ("EMBED_WORKER__STREAM__CLAIM_INTERVAL", "1s".into()),
        // Small reads keep a worker's in-flight work (about three reads) well under claim_idle,
        // so live workers do not steal each other's entries.
        ("EMBED_WORKER__STREAM__READ_COUNT", "32".into()),
        (
            "EMBED_WORKER__STREAM__MAX_TEXT_BYTES",
            MAX_TEXT_BYTES.to_string(),
        ),
        ("EMBED_WORKER__MODEL__INTRA_THREADS", "1".into()),
        ("EMBED_WORKER__REDIS__BACKOFF_MAX", "1s".into()),
    ];
    let mut workers = Fleet(
        (0..3)
            .map(|k| spawn_worker(&url, &server, &names, &format!("w{k}"), &env, &logs[k]))
            .collect(),
    );

    let (mut kills, mut redis_restarts, mut checks, mut checked_acks) = (0u32, 0u32, 0u32, 0usize);
    let mut hset_before_restart = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut jitter = move |lo: u64, hi: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Duration::from_millis(lo + seed % (hi - lo))
    };
    // Kills come on a timer and at progress marks (every sixth of the documents), so a fast,
    // quiet machine gets as many faults as a slow one.
    let mut next_kill = Instant::now() + jitter(2000, 5000);
    let mut next_kill_at = total / 10;
    let deadline = started + Duration::from_secs(120 + total as u64 / 10);
    loop {
        for (k, w) in workers.0.iter_mut().enumerate() {
            if let Some(status) = w.try_wait().unwrap() {
                panic!("w{k} exited on its own ({status}):\n{}", tail(&logs[k], 30));
            }
        }
        let info = group_info(&mut conn, &names);
        let (read, pending, lag) = (
            int(&info, "entries-read").unwrap_or(0),
            int(&info, "pending").unwrap_or(0),
            int(&info, "lag"),
        );
        let acked = read.saturating_sub(pending) as usize;
        if ids.len() < total && acked >= total / 4 {
            ids.extend(produce(&mut conn, &names.stream, &plan[total / 2..]));
        }
        if ids.len() == total && pending == 0 && lag == Some(0) && read as usize >= total {
            break;
        }
        if redis_restarts == 0 && acked >= total * 2 / 5 {
            hset_before_restart = command_calls(&mut conn, "hset");
            server.restart();
            redis_restarts += 1;
            conn = server.conn();
        }
        if (Instant::now() >= next_kill || acked >= next_kill_at) && acked < total * 9 / 10 {
            // SIGKILL w2 mid-work, check the invariant while it is down, restart it (same name).
            workers.0[2].kill().unwrap();
            workers.0[2].wait().unwrap();
            kills += 1;
            checked_acks = assert_acked_are_written(&mut conn, &names, &plan, &ids);
            checks += 1;
            std::thread::sleep(jitter(100, 1000));
            workers.0[2] = spawn_worker(&url, &server, &names, "w2", &env, &logs[2]);
            next_kill = Instant::now() + jitter(3000, 6000);
            next_kill_at = acked + total / 6;
        }
        assert!(
            Instant::now() < deadline,
            "not done after {:?}: read {read}, pending {pending}, lag {lag:?}, kills {kills}\n{}",
            started.elapsed(),
            tail(&logs[0], 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let processing_time = started.elapsed();

    // Every process still running stops cleanly on SIGTERM.
    for w in &workers.0 {
        sigterm(w);
    }
    for (k, w) in workers.0.iter_mut().enumerate() {
        let status = wait_exit(w, Duration::from_secs(30)).expect("exits after SIGTERM");
        assert!(status.success(), "w{k}: {status}\n{}", tail(&logs[k], 30));
    }

    // Every valid document's hash, with a full vector; the sample matches `embed`.
    let valid: Vec<&Planned> = plan.iter().filter(|p| p.doc_id.is_some()).collect();
    let mut pipe = ::redis::pipe();
    for p in &valid {
        pipe.cmd("HSTRLEN")
            .arg(format!("{}{}", names.prefix, p.doc_id.as_ref().unwrap()))
            .arg("embedding");
    }
    let lengths: Vec<u64> = pipe.query(&mut conn).unwrap();
    let missing: Vec<&String> = valid
        .iter()
        .zip(&lengths)
        .filter(|(_, &l)| l != 1536)
        .map(|(p, _)| p.doc_id.as_ref().unwrap())
        .collect();
    assert!(
        missing.is_empty(),
        "{} valid documents lack a vector: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_sample_embeddings(&mut conn, &names, &plan);
    assert_eq!(pending(&mut conn, &names), 0);
    checked_acks = checked_acks.max(assert_acked_are_written(&mut conn, &names, &plan, &ids));

    // The dead-letter stream holds exactly the poison entries, each with its reason.
    let letters = dead_letters(&mut conn, &names);
    let mut by_entry: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in &letters {
        by_entry
            .entry(text_of(l, "dead_entry_id"))
            .or_default()
            .push(text_of(l, "dead_reason"));
        assert_eq!(text_of(l, "dead_stream"), names.stream);
        assert!(text_of(l, "dead_worker").starts_with('w'), "{l:?}");
    }
    let expected: BTreeMap<String, &str> = plan
        .iter()
        .zip(&ids)
        .filter_map(|(p, id)| p.poison.map(|r| (id.clone(), r)))
        .collect();
    assert_eq!(
        by_entry.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "dead letters must be exactly the poison entries"
    );
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for (id, reasons) in &by_entry {
        for r in reasons {
            assert_eq!(r, expected[id], "entry {id}");
        }
        *by_reason.entry(reasons[0].clone()).or_default() += 1;
    }
    // The original fields travel with the letter, byte for byte.
    for (p, id) in plan.iter().zip(&ids).filter(|(p, _)| p.poison.is_some()) {
        let letter = letters
            .iter()
            .find(|l| text_of(l, "dead_entry_id") == *id)
            .unwrap();
        for (k, v) in &p.fields {
            let k = String::from_utf8(k.clone()).unwrap();
            assert_eq!(letter.get(&k), Some(v), "{id}: field {k}");
        }
    }
    // No poison became a hash.
    for p in plan.iter().filter(|p| p.poison.is_some()) {
        let id = String::from_utf8_lossy(&p.fields[0].1).into_owned();
        let exists: u64 = ::redis::cmd("EXISTS")
            .arg(format!("{}{id}", names.prefix))
            .query(&mut conn)
            .unwrap();
        assert_eq!(exists, 0, "poison {id} was indexed");
    }

    let duplicate_letters = letters.len() - by_entry.len();
    let hset_total = hset_before_restart + command_calls(&mut conn, "hset");
    let (resumed, claimed) = redeliveries(&logs);
    eprintln!(
        "fault suite: {total} documents ({} valid, {} poison), 3 workers, {kills} SIGKILLs of w2, \
         {redis_restarts} Redis restart(s), {checks} mid-run acked=>written checks (last {checked_acks} acks); \
         re-deliveries: {resumed} own-pending after restart + {claimed} reclaimed (XAUTOCLAIM); \
         duplicates re-embedded and rewritten: {} (HSET calls {hset_total} - valid {}); \
         dead letters by reason: {by_reason:?}, duplicate dead letters: {duplicate_letters}; \
         processing {:.1}s, wall {:.1}s",
        valid.len(),
        expected.len(),
        hset_total.saturating_sub(valid.len() as u64),
        valid.len(),
        processing_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    assert!(kills >= 2 && redis_restarts == 1, "the faults must happen");
}

/// Entries of `names.stream` as (entry id, doc id), in order.
fn produce_texts(conn: &mut ::redis::Connection, names: &Names, texts: &[String]) -> Vec<String> {
    let plan: Vec<Planned> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Planned {
            fields: vec![
                (b"id".to_vec(), format!("d{i}").into_bytes()),
                (b"content".to_vec(), t.clone().into_bytes()),
            ],
            doc_id: Some(format!("d{i}")),
            text: t.clone(),
            poison: None,
        })
        .collect();
    produce(conn, &names.stream, &plan)
}

fn long_texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Report {i}: the committee met on a rainy Tuesday to discuss the budget for the \
                 new library wing, the repairs to the old bridge over the river, the school bus \
                 timetable for district {}, and a proposal to plant {} trees along the avenue \
                 before the spring festival, which last year drew record crowds.",
                i % 40,
                i % 300
            )
        })
        .collect()
}

/// Counts hashes among `d0..d{n}` and checks acked => written for every delivered entry.
fn written_and_checked(
    conn: &mut ::redis::Connection,
    names: &Names,
    texts: &[String],
    ids: &[String],
) -> (usize, usize) {
    let plan: Vec<Planned> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Planned {
            fields: vec![],
            doc_id: Some(format!("d{i}")),
            text: t.clone(),
            poison: None,
        })
        .collect();
    let acked = assert_acked_are_written(conn, names, &plan, ids);
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}*", names.prefix))
        .query(conn)
        .unwrap();
    (acked, keys.len())
}

/// Whether `pid` has a handler for SIGTERM (bit 15 of SigCgt in /proc/PID/status).
fn catches_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
}

#[test]
fn sigterm_while_the_model_loads_is_a_clean_stop() {
    let server = RedisServer::start();
    let names = Names::new("early");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("w.log");
    let mut fleet = Fleet(vec![spawn_worker(
        &server.url(),
        &server,
        &names,
        "early",
        &[],
        &log,
    )]);
    let w = &mut fleet.0[0];
    // Polled tightly: the model takes a few hundred milliseconds to load, and the handler must
    // be there before it is ("model loaded" is the first line the worker logs).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches_sigterm(w.id()) {
        assert!(Instant::now() < deadline, "no SIGTERM handler after 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    let early = !tail(&log, 50).contains("model loaded");
    sigterm(w);
    let status = wait_exit(w, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", tail(&log, 20));
    assert!(
        early,
        "the handler came only after the model had loaded:\n{}",
        tail(&log, 20)
    );
}

#[test]
fn sigterm_during_a_large_batch_exits_0_and_leaves_nothing_half_done() {
    let server = RedisServer::start();
    let names = Names::new("term");
    let mut conn = server.conn();
    let texts = long_texts(2000);
    let ids = produce_texts(&mut conn, &names, &texts);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("w.log");
    let big = |timeout: &str| -> Vec<(&str, String)> {
        vec![
            ("EMBED_WORKER__BATCH__MAX_DOCS", "256".into()),
            ("EMBED_WORKER__BATCH__MAX_TOKENS", "65536".into()),
            ("EMBED_WORKER__STREAM__READ_COUNT", "256".into()),
            // Reads of read_count entries from the first one (not sized by tokens).
            ("EMBED_WORKER__STREAM__READ_TOKENS", "1000000".into()),
            ("EMBED_WORKER__WORKER__SHUTDOWN_TIMEOUT", timeout.into()),
        ]
    };

    // 1. A drain cut short by a tiny shutdown_timeout: exit 0, what was not finished stays
    //    pending, nothing acked unwritten.
    let mut fleet1 = Fleet(vec![spawn_worker(
        &server.url(),
        &server,
        &names,
        "term-a",
        &big("300ms"),
        &log,
    )]);
    let w = &mut fleet1.0[0];
    wait_for(Duration::from_secs(60), || {
        (pending(&mut conn, &names) >= 256).then_some(())
    })
    .expect("the worker reads a large window");
    std::thread::sleep(Duration::from_millis(500)); // the model is inside a 256-document batch
    sigterm(w);
    let t = Instant::now();
    let status = wait_exit(w, Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", tail(&log, 20));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let left = pending(&mut conn, &names);
    let (acked, written) = written_and_checked(&mut conn, &names, &texts, &ids);
    assert!(
        left > 0,
        "a 300ms drain cannot finish a 256-document batch of long texts"
    );
    assert!(written >= acked, "acked {acked}, written {written}");

    // 2. The same consumer again, with time to finish: SIGTERM while it works through what it
    //    resumed: exit 0, and every entry it read is written and acked (nothing left pending).
    let log = logs.path().join("w2.log");
    let mut w2 = Fleet(vec![spawn_worker(
        &server.url(),
        &server,
        &names,
        "term-a",
        &big("120s"),
        &log,
    )]);
    let w = &mut w2.0[0];
    wait_for(Duration::from_secs(60), || {
        tail(&log, 50)
            .contains("resuming this consumer's pending entries")
            .then_some(())
    })
    .expect("the restarted worker resumes its own pending entries");
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(w);
    let t = Instant::now();
    let status = wait_exit(w, Duration::from_secs(150)).expect("exits after SIGTERM");
    let drain = t.elapsed();
    assert!(status.success(), "{status}\n{}", tail(&log, 20));
    assert!(
        !tail(&log, 20).contains("shutdown_timeout reached"),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(
        pending(&mut conn, &names),
        0,
        "everything read was finished"
    );
    let (acked_after, written_after) = written_and_checked(&mut conn, &names, &texts, &ids);
    assert!(
        acked_after > acked && acked_after < texts.len(),
        "stopped reading: {acked_after}"
    );
    assert_eq!(
        written_after, acked_after,
        "written == acked: nothing half done"
    );
    // It holds at most two reads: the drain finishes those (plus what it finished before the
    // signal), not a backlog.
    assert!(
        acked_after - acked <= 3 * 256,
        "finished {} after SIGTERM",
        acked_after - acked
    );
    eprintln!(
        "sigterm: cut drain acked {acked} (pending {left}); full drain finished {} more in {drain:?}",
        acked_after - acked
    );
}

#[test]
fn a_redis_outage_and_a_busy_server_are_waited_out() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let names = Names::new("outage");
    let mut conn = server.conn();
    let texts: Vec<String> = (0..900)
        .map(|i| format!("sentence {i} about the outage"))
        .collect();
    let ids = produce_texts(&mut conn, &names, &texts);
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("w.log");
    let env = vec![
        ("EMBED_WORKER__STREAM__READ_COUNT", "32".to_string()),
        ("EMBED_WORKER__REDIS__BACKOFF_MAX", "1s".into()),
    ];
    let mut fleet = Fleet(vec![spawn_worker(
        &server.url(),
        &server,
        &names,
        "o1",
        &env,
        &log,
    )]);
    let w = &mut fleet.0[0];
    let progress = |conn: &mut ::redis::Connection| {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}*", names.prefix))
            .query(conn)
            .unwrap_or_default();
        keys.len()
    };
    wait_for(Duration::from_secs(60), || {
        (progress(&mut conn) >= 100).then_some(())
    })
    .expect("progress before the outage");

    // Redis down for 3 seconds, then back on the same port with its data.
    server.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        w.try_wait().unwrap().is_none(),
        "the worker must wait, not exit"
    );
    server.restart();
    let mut conn = server.conn();
    let at_return = progress(&mut conn);
    wait_for(Duration::from_secs(30), || {
        (progress(&mut conn) > at_return + 50).then_some(())
    })
    .expect("the worker reconnects and goes on");

    // A script hogging the server: every other client gets BUSY for about 2 seconds.
    let _: () = ::redis::cmd("CONFIG")
        .arg(&["SET", "busy-reply-threshold", "100"][..])
        .query(&mut conn)
        .unwrap();
    let _: i64 = ::redis::cmd("EVAL")
        .arg("local s = redis.call('TIME')[1] + 0; while redis.call('TIME')[1] - s < 2 do end; return 1")
        .arg(0)
        .query(&mut conn)
        .unwrap();
    assert!(
        w.try_wait().unwrap().is_none(),
        "BUSY is transient: {}",
        tail(&log, 10)
    );

    wait_for(Duration::from_secs(90), || {
        (pending(&mut conn, &names) == 0 && progress(&mut conn) == texts.len()).then_some(())
    })
    .unwrap_or_else(|| panic!("not finished: {}", tail(&log, 20)));
    sigterm(w);
    let status = wait_exit(w, Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", tail(&log, 20));
    let (acked, written) = written_and_checked(&mut conn, &names, &texts, &ids);
    assert_eq!((acked, written), (texts.len(), texts.len()));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("redis unavailable; retrying with back-off"),
        "{logged}"
    );
}

#[test]
fn a_document_the_model_fails_on_is_dead_lettered_alone() {
    use embed_worker::model::fake::FakeEmbedder;
    use embed_worker::model::Embedder;
    use std::sync::Arc;

    let server = RedisServer::start();
    let names = Names::new("iso");
    let texts: Vec<String> = (0..16)
        .map(|i| {
            if i == 11 {
                "a zebra crossed the road".to_string()
            } else {
                format!("harmless sentence number {i}")
            }
        })
        .collect();
    let mut conn = server.conn();
    let ids = produce_texts(&mut conn, &names, &texts);
    let model = fake_model(|zebra| FakeEmbedder {
        dimension: 384,
        poison_token: Some(zebra),
        ..FakeEmbedder::default()
    });
    let settings = in_process_settings(
        &server,
        &names,
        "iso",
        &[("BATCH__MAX_DOCS", "16"), ("BATCH__MAX_WAIT", "200ms")],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let summary = runtime
        .block_on(drain_in_process(
            settings,
            model.clone(),
            Arc::new(embed_worker::observe::Metrics::default()),
            Arc::new(embed_worker::observe::Health::default()),
            Duration::from_secs(60),
        ))
        .unwrap();
    assert_eq!((summary.acked, summary.dead_lettered), (15, 1));

    let letters = dead_letters(&mut conn, &names);
    assert_eq!(letters.len(), 1);
    assert_eq!(text_of(&letters[0], "dead_reason"), "model_error");
    assert_eq!(text_of(&letters[0], "dead_entry_id"), ids[11]);
    assert_eq!(pending(&mut conn, &names), 0);
    // The others are written with the vectors the model gives them alone.
    let mut fake = FakeEmbedder {
        dimension: 384,
        ..FakeEmbedder::default()
    };
    for (i, text) in texts.iter().enumerate() {
        let bytes: Option<Vec<u8>> = ::redis::cmd("HGET")
            .arg(format!("{}d{i}", names.prefix))
            .arg("embedding")
            .query(&mut conn)
            .unwrap();
        if i == 11 {
            assert!(bytes.is_none(), "the culprit has no hash");
            continue;
        }
        let want = fake
            .embed(&[model.tokenizer.encode_one(text).unwrap()])
            .unwrap()
            .remove(0);
        assert_eq!(vector_of(&bytes.expect("written")), want, "d{i}");
    }
}
