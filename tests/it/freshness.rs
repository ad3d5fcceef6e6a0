//! The freshness metrics with real traffic through a real redis-server (the fake model at the
//! model seam, the real probe): entries XADDed with IDs 30 s in the past read 30 s old, in the
//! oldest-pending-age gauge while a stalled consumer holds one, and in the indexing-delay
//! histogram once the worker reclaims, writes and acks them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::common::*;

/// The value of the series `name` (no labels) in a rendering.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn indexing_delay_and_oldest_pending_age_move_with_real_traffic() {
    use embed_worker::model::fake::FakeEmbedder;
    use embed_worker::observe::{probe, Health, Metrics};

    let server = RedisServer::start();
    let names = Names::new("fresh");
    let mut conn = server.conn();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Three entries added "30 s ago" (an explicit ID carries its time), then one now.
    let old_ms = now_ms - 30_000;
    for i in 0..3 {
        let _: String = ::redis::cmd("XADD")
            .arg(&names.stream)
            .arg(format!("{old_ms}-{i}"))
            .arg(&["id", &format!("old{i}"), "content", "written a while ago"])
            .query(&mut conn)
            .unwrap();
    }
    let _: String = ::redis::cmd("XADD")
        .arg(&names.stream)
        .arg("*")
        .arg(&["id", "new", "content", "written just now"])
        .query(&mut conn)
        .unwrap();
    // A consumer that takes the first entry and never acks it: the PEL's oldest entry.
    let _: () = ::redis::cmd("XGROUP")
        .arg(&["CREATE", &names.stream, &names.group, "0"])
        .query(&mut conn)
        .unwrap();
    take_one_as(&mut conn, &names, "stalled");

    let model = fake_model(|_| FakeEmbedder {
        dimension: 384,
        ..FakeEmbedder::default()
    });
    // Reclaimed after 1 s idle, so the drain finishes the stalled consumer's entry too.
    let settings = in_process_settings(
        &server,
        &names,
        "fresh",
        &[
            ("STREAM__CLAIM_IDLE", "1s"),
            ("STREAM__CLAIM_INTERVAL", "1s"),
        ],
    );
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let age = "embed_worker_oldest_pending_age_seconds";
    let delay = "embed_worker_indexing_delay_seconds";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        probe::spawn(
            embed_worker::store::Store::new(&settings.redis).unwrap(),
            probe::Target::from_settings(&settings),
            health.clone(),
            metrics.clone(),
        );
        // Before the worker runs: the held entry's age, from its ID.
        let mut held = None;
        for _ in 0..100 {
            held = sample(&metrics.render(), age).filter(|a| *a > 0.0);
            if held.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let held = held.expect("the oldest-pending-age gauge never showed the held entry");
        assert!((30.0..120.0).contains(&held), "{held}");
        assert_eq!(
            sample(&metrics.render(), &format!("{delay}_count")),
            Some(0.0)
        );

        let summary = drain_in_process(
            settings.clone(),
            model,
            metrics.clone(),
            health.clone(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(summary.acked, 4);

        // Nothing pending any more: the gauge goes back to 0 within a probe round or two.
        let mut cleared = false;
        for _ in 0..50 {
            cleared = sample(&metrics.render(), age) == Some(0.0);
            if cleared {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cleared, "{}", metrics.render());
    });
    runtime.shutdown_background();

    // One observation per acked entry: the three old ones past 30 s, the new one well under.
    let text = metrics.render();
    let bucket = |le: &str| sample(&text, &format!("{delay}_bucket{{le=\"{le}\"}}"));
    assert_eq!(
        sample(&text, &format!("{delay}_count")),
        Some(4.0),
        "{text}"
    );
    assert_eq!(bucket("+Inf"), Some(4.0));
    assert_eq!(bucket("10"), Some(1.0), "{text}");
    assert_eq!(bucket("30"), Some(1.0), "{text}");
    assert_eq!(bucket("120"), Some(4.0), "{text}");
    let sum = sample(&text, &format!("{delay}_sum")).unwrap();
    assert!(sum >= 90.0, "{sum}");
    assert_eq!(pending(&mut conn, &names), 0);
}
