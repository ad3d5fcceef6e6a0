//! The Redis probe: once a second, PING Redis and look up the group and the index (its counts
//! go to the metrics), each round
//! under a short timeout. It keeps `/readyz` true to Redis while the worker is idle (no command
//! in flight to notice an outage) and the lag/pending/oldest-pending-age gauges current while the
//! reader is blocked behind a full pipeline, which is exactly when the backlog grows.

use std::sync::Arc;
use std::time::Duration;

use crate::store::cluster::Conn;
use ::redis::Value;
use tokio::task::JoinHandle;

use super::{freshness, Health, Metrics};
use crate::settings::Settings;
use crate::store::connect::{Store, StoreError};
use crate::store::index::{self, IndexProgress};
use crate::store::stream;

/// Time between rounds.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Limit on one round (connect included): an unresponsive Redis counts as unreachable.
const ROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// What the probe looks up.
#[derive(Debug, Clone)]
pub struct Target {
    /// Every stream shard's key.
    pub streams: Vec<String>,
    pub group: String,
    pub index: String,
}

impl Target {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            streams: crate::store::shards::keys(&settings.stream),
            group: settings.stream.group.clone(),
            index: settings.index.name.clone(),
        }
    }
}

/// What one round found.
#[derive(Debug, Clone, PartialEq)]
struct Round {
    /// Present when the group exists.
    group: Option<GroupRound>,
    /// None when the index does not exist.
    index: Option<IndexProgress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GroupRound {
    pending: u64,
    lag: u64,
    /// Zero when nothing is pending.
    oldest_pending_age: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Connect(#[from] StoreError),
    #[error("{0}")]
    Command(#[from] ::redis::RedisError),
    #[error("no reply within {ROUND_TIMEOUT:?}")]
    Timeout,
}

/// Starts the probe in the background; it runs until the runtime shuts down.
pub fn spawn(
    store: Store,
    target: Target,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<Conn> = None;
        let mut ticker = tokio::time::interval(INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            let round = tokio::time::timeout(ROUND_TIMEOUT, async {
                let reused = conn.is_some();
                match check(&store, &mut conn, &target).await {
                    // A connection kept from before a Redis restart fails once: that is not an
                    // outage, so retry on a fresh one before saying so.
                    Err(ProbeError::Command(e)) if reused && e.code().is_none() => {
                        conn = None;
                        check(&store, &mut conn, &target).await
                    }
                    other => other,
                }
            })
            .await
            .unwrap_or(Err(ProbeError::Timeout));
            match round {
                Ok(round) => {
                    // The facts first, reachability last: no moment of "ready" on stale facts.
                    health.set_group_present(round.group.is_some());
                    // On a cluster, present only when every primary has its own.
                    health.set_index_present(
                        round.index.as_ref().is_some_and(|p| p.unindexed.is_empty()),
                    );
                    health.set_redis_reachable(true);
                    if let Some(g) = round.group {
                        // The age before the count: a scrape that sees pending at 0 sees age 0.
                        metrics.oldest_pending_age(g.oldest_pending_age);
                        metrics.group_state(g.pending, g.lag);
                    }
                    if let Some(p) = &round.index {
                        metrics.index_progress(p);
                    }
                    if last_error.take().is_some() {
                        tracing::info!(url = %store.url, "redis reachable again");
                    }
                }
                Err(e) => {
                    // A half-broken connection would fail every round: start afresh.
                    conn = None;
                    health.set_redis_reachable(false);
                    let text = e.to_string();
                    // Logged on change only, not once a second for the whole outage.
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(url = %store.url, error = %text, "redis health check failed; not ready");
                        last_error = Some(text);
                    }
                }
            }
        }
    })
}

async fn check(
    store: &Store,
    conn: &mut Option<Conn>,
    target: &Target,
) -> Result<Round, ProbeError> {
    if conn.is_none() {
        *conn = Some(store.connect().await?);
    }
    let c = conn.as_mut().expect("connected just above");
    let _: Value = ::redis::cmd("PING").query_async(c).await?;
    // The group counts as present only when every shard has it; counts are summed, the age is
    // the oldest over the shards.
    let mut group = Some(GroupRound {
        pending: 0,
        lag: 0,
        oldest_pending_age: Duration::ZERO,
    });
    for stream in &target.streams {
        let (Some(sum), Some(shard)) =
            (group.as_mut(), shard_round(c, stream, &target.group).await?)
        else {
            group = None;
            break;
        };
        sum.pending += shard.pending;
        sum.lag += shard.lag;
        sum.oldest_pending_age = sum.oldest_pending_age.max(shard.oldest_pending_age);
    }
    let index = index::progress(c, &target.index).await?;
    Ok(Round { group, index })
}

/// One stream shard's group: None when the group is missing.
async fn shard_round(
    c: &mut Conn,
    stream: &str,
    group: &str,
) -> Result<Option<GroupRound>, ProbeError> {
    let Some(g) = stream::group_info(c, stream, group).await? else {
        return Ok(None);
    };
    // Nothing pending needs no second command (and keeps count and age agreeing).
    let oldest = match g.pending {
        0 => None,
        _ => freshness::oldest_pending_id(c, stream, group).await?,
    };
    let now = freshness::now_ms();
    Ok(Some(GroupRound {
        pending: g.pending,
        // A lag Redis cannot tell (after some deletions) reads as 0.
        lag: g.lag.unwrap_or(0),
        oldest_pending_age: oldest
            .and_then(|id| freshness::age(now, &id))
            .unwrap_or(Duration::ZERO),
    }))
}
