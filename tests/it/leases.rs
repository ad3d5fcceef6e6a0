//! Leases and the model watchdog, with real worker processes: a live worker keeps its entries
//! however long it holds them, a dead one's are taken over within about `claim_idle`, and a text
//! that makes the model hang ends as a `max_deliveries` dead letter while its batch-mates are
//! indexed.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use ::redis::Value;

use crate::common::*;
use crate::reliability::{dead_letters, tail, text_of, wait_exit};

fn spawn(
    server: &RedisServer,
    names: &Names,
    consumer: &str,
    env: &[(&str, &str)],
    log: &Path,
    args: &[&str],
) -> Child {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    worker_cmd(server, names)
        .env("EMBED_WORKER__STREAM__CONSUMER", consumer)
        .env("EMBED_WORKER__STREAM__CLAIM_IDLE", "3s")
        .env("EMBED_WORKER__STREAM__CLAIM_INTERVAL", "500ms")
        .envs(env.iter().copied())
        .arg("run")
        .args(args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// XPENDING's extended form: entry ID -> (owner, times delivered).
fn pending_rows(conn: &mut ::redis::Connection, names: &Names) -> HashMap<String, (String, u64)> {
    let rows: Vec<Value> = ::redis::cmd("XPENDING")
        .arg(&names.stream)
        .arg(&names.group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query(conn)
        .unwrap_or_default();
    rows.into_iter()
        .filter_map(|r| {
            let Value::Array(c) = r else { return None };
            let id: String = ::redis::from_redis_value(c[0].clone()).ok()?;
            let owner: String = ::redis::from_redis_value(c[1].clone()).ok()?;
            let n: u64 = ::redis::from_redis_value(c[3].clone()).ok()?;
            Some((id, (owner, n)))
        })
        .collect()
}

fn produce(
    conn: &mut ::redis::Connection,
    names: &Names,
    texts: &[String],
    first: usize,
) -> Vec<String> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            ::redis::cmd("XADD")
                .arg(&names.stream)
                .arg("*")
                .arg("id")
                .arg(format!("d{}", first + i))
                .arg("content")
                .arg(t)
                .query(conn)
                .unwrap()
        })
        .collect()
}

fn hashes(
    conn: &mut ::redis::Connection,
    names: &Names,
    ids: impl Iterator<Item = usize>,
) -> usize {
    ids.filter(|i| {
        ::redis::cmd("EXISTS")
            .arg(format!("{}d{i}", names.prefix))
            .query::<bool>(conn)
            .unwrap()
    })
    .count()
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_live_worker_keeps_its_entries_and_a_dead_ones_are_taken_over_within_claim_idle() {
    let server = RedisServer::start();
    let names = Names::new("lease");
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut conn = server.conn();
    let texts: Vec<String> = (0..20)
        .map(|i| format!("a sentence about lease number {i}"))
        .collect();
    produce(&mut conn, &names, &texts, 0);

    // A holds every write 8s, well past claim_idle (3s); B is idle and looks for idle entries
    // every 500ms.
    let hold = [("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE", "8s")];
    let a = spawn(&server, &names, "a", &hold, &log_a, &[]);
    let mut fleet = Fleet(vec![a]);
    wait_for(Duration::from_secs(60), || {
        (pending_rows(&mut conn, &names).len() == 20).then_some(())
    })
    .unwrap_or_else(|| panic!("A read the 20 entries:\n{}", tail(&log_a, 20)));
    fleet.0.push(spawn(&server, &names, "b", &[], &log_b, &[]));

    let mut max_deliveries = 0;
    let mut owners: Vec<String> = Vec::new();
    wait_for(Duration::from_secs(60), || {
        let rows = pending_rows(&mut conn, &names);
        for (owner, n) in rows.values() {
            max_deliveries = max_deliveries.max(*n);
            if !owners.contains(owner) {
                owners.push(owner.clone());
            }
        }
        rows.is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("A acked its entries:\n{}", tail(&log_a, 20)));
    assert_eq!(
        owners,
        ["a"],
        "B reclaimed a live worker's entries:\n{}",
        tail(&log_b, 20)
    );
    assert_eq!(max_deliveries, 1, "renewal does not raise delivery counts");
    assert_eq!(hashes(&mut conn, &names, 0..20), 20);
    assert!(!std::fs::read_to_string(&log_b)
        .unwrap()
        .contains("claimed entries idle"));

    // Now A dies holding ten more. B must be the only reader left for them: stop it while they
    // are added, start it again once A holds them.
    let mut b = fleet.0.pop().unwrap();
    crate::reliability::sigterm(&b);
    assert!(wait_exit(&mut b, Duration::from_secs(30))
        .unwrap()
        .success());
    let more: Vec<String> = (20..30)
        .map(|i| format!("a sentence about lease number {i}"))
        .collect();
    let ids = produce(&mut conn, &names, &more, 20);
    wait_for(Duration::from_secs(30), || {
        (pending_rows(&mut conn, &names).len() == 10).then_some(())
    })
    .unwrap_or_else(|| panic!("A read the ten:\n{}", tail(&log_a, 20)));
    std::fs::write(&log_b, "").unwrap();
    fleet.0.push(spawn(&server, &names, "b", &[], &log_b, &[]));
    wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(&log_b)
            .unwrap()
            .contains("worker started")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("B started:\n{}", tail(&log_b, 20)));
    let killed = Instant::now();
    kill(&mut fleet.0[0]);
    wait_for(Duration::from_secs(30), || {
        let rows = pending_rows(&mut conn, &names);
        ids.iter()
            .all(|id| rows.get(id).is_none_or(|(owner, _)| owner == "b"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("B took A's entries over:\n{}", tail(&log_b, 20)));
    let takeover = killed.elapsed();
    eprintln!("takeover of a killed worker's entries: {takeover:.2?} (claim_idle 3s, claim_interval 500ms)");
    assert!(
        takeover < Duration::from_millis(3000 + 500 + 1500),
        "within about claim_idle: {takeover:?}"
    );
    wait_for(Duration::from_secs(60), || {
        (pending(&mut conn, &names) == 0).then_some(())
    })
    .unwrap_or_else(|| panic!("B finished them:\n{}", tail(&log_b, 20)));
    assert_eq!(hashes(&mut conn, &names, 20..30), 10);
}

#[test]
fn a_text_that_hangs_the_model_ends_as_a_dead_letter_and_its_batch_mates_are_indexed() {
    let server = RedisServer::start();
    let names = Names::new("hang");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("w.log");
    let mut conn = server.conn();
    let texts: Vec<String> = (0..6)
        .map(|i| {
            if i == 2 {
                "a zebra crossed the road".to_string()
            } else {
                format!("harmless sentence number {i}")
            }
        })
        .collect();
    let ids = produce(&mut conn, &names, &texts, 0);
    let env = [
        ("EMBED_WORKER_FAULT_FAKE_MODEL_HANGS_ON", "zebra"),
        ("EMBED_WORKER__MODEL__TIMEOUT", "1s"),
        ("EMBED_WORKER__STREAM__MAX_DELIVERIES", "3"),
        ("EMBED_WORKER__BATCH__MAX_WAIT", "200ms"),
        ("EMBED_WORKER__LOG__FORMAT", "json"),
    ];
    // The restart loop Kubernetes would be: same consumer name, so each run resumes its own
    // pending entries first (and raises their delivery counts).
    let mut exits = Vec::new();
    for _ in 0..8 {
        let mut w = spawn(&server, &names, "w", &env, &log, &["--drain"]);
        let status = wait_exit(&mut w, Duration::from_secs(60));
        let Some(status) = status else {
            kill(&mut w);
            panic!(
                "the worker neither finished nor exited:\n{}",
                tail(&log, 20)
            );
        };
        exits.push(status.code());
        if status.success() {
            break;
        }
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        exits,
        [Some(1), Some(1), Some(1), Some(0)],
        "hangs with deliveries 1, 2 and 3 (alone), then a dead letter:\n{}",
        tail(&log, 30)
    );
    assert!(logged.contains("the model thread is stuck"), "{logged}");
    assert!(
        logged
            .lines()
            .any(|l| l.contains("model.timeout") && l.contains(&ids[2])),
        "the stuck batch's entries are logged"
    );
    let letters = dead_letters(&mut conn, &names);
    let brief: Vec<(String, String)> = letters
        .iter()
        .map(|l| (text_of(l, "id"), text_of(l, "dead_reason")))
        .collect();
    assert_eq!(letters.len(), 1, "only the hanging text: {brief:?}");
    assert_eq!(text_of(&letters[0], "dead_reason"), "max_deliveries");
    assert_eq!(text_of(&letters[0], "dead_entry_id"), ids[2]);
    assert_eq!(hashes(&mut conn, &names, [0, 1, 3, 4, 5].into_iter()), 5);
    assert_eq!(pending(&mut conn, &names), 0);
}

#[test]
fn the_watchdog_turns_the_worker_unready_and_names_the_stuck_batch() {
    use embed_worker::model::fake::FakeEmbedder;
    use embed_worker::pipeline::WorkerError;
    use std::sync::Arc;

    let server = RedisServer::start();
    let names = Names::new("stuck");
    let mut conn = server.conn();
    let texts = vec![
        "a zebra crossed the road".to_string(),
        "a calm sentence".to_string(),
    ];
    let ids = produce(&mut conn, &names, &texts, 0);
    let model = fake_model(|zebra| FakeEmbedder {
        dimension: 384,
        hang_token: Some(zebra),
        ..FakeEmbedder::default()
    });
    let settings = in_process_settings(
        &server,
        &names,
        "stuck",
        &[("MODEL__TIMEOUT", "500ms"), ("BATCH__MAX_WAIT", "200ms")],
    );
    let health = Arc::new(embed_worker::observe::Health::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(drain_in_process(
        settings,
        model,
        Arc::new(embed_worker::observe::Metrics::default()),
        health.clone(),
        Duration::from_secs(30),
    ));
    runtime.shutdown_background();
    let err = result.unwrap_err();
    let WorkerError::ModelStuck { entries, .. } = &err else {
        panic!("{err}");
    };
    assert!(entries.contains(&ids[0]), "{entries:?}");
    assert!(err.to_string().contains("model.timeout"), "{err}");
    assert!(
        health.ready().unwrap_err().contains(&"model stuck"),
        "{:?}",
        health.ready()
    );
    // Nothing was acked: both entries are back in the group for a restart or another worker.
    assert_eq!(pending(&mut conn, &names), 2);
}
