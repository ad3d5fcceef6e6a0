//! What the stages share: settings, the store, counters, the reader's budget, and the one set
//! of rules for a Redis error (retry with back-off, or stop).

use std::sync::Arc;
use std::time::Duration;

use crate::store::cluster::Conn;
use crate::store::replicas::Replicas;
use tokio::sync::{watch, Notify};

use super::entry::EntryRules;
use super::lease::Leases;
use super::op::EntryRef;
use super::read_ahead::ReadAhead;
use super::WorkerError;
use crate::model::Fingerprint;
use crate::observe::{Health, Metrics};
use crate::settings::Settings;
use crate::store::connect::{Backoff, Disposition, Store, StoreError};
use crate::store::documents::DocStore;
use crate::store::shards;
use crate::store::stream::GroupRef;

pub struct Ctx {
    pub settings: Settings,
    pub store: Store,
    pub docs: DocStore,
    /// This worker's place in the group on each stream shard (one with `stream.shards = 1`).
    pub groups: Vec<GroupRef>,
    pub rules: EntryRules,
    pub dead_stream: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The entries read but not yet acked (for `--drain` and the read budget, in entries and
    /// bytes), renewed so no other worker reclaims them while this one lives.
    pub leases: Leases,
    /// Signalled whenever the reader's budget may have grown: entries were acked (the writer),
    /// or a read was tokenised and the read size updated (the tokeniser).
    pub budget_grew: Notify,
    /// How many entries to read, and when (fed the token counts of tokenised reads).
    pub read_ahead: ReadAhead,
    /// Fault injection for the crash tests: hold every write this long before sending it, so a
    /// test can kill the process (or let another worker overtake) between read and write. Set
    /// by EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE.
    pub fault_pause_before_write: Option<Duration>,
    /// This worker's model.
    pub model: Fingerprint,
    /// Each primary's replica count, for `redis.wait_replicas`.
    pub replicas: Replicas,
}

impl Ctx {
    pub fn new(
        settings: Settings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        max_seq_length: usize,
        model: Fingerprint,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            model,
            replicas: Replicas::default(),
            store: Store::new(&settings.redis)?,
            docs: DocStore::from_settings(&settings),
            groups: shards::keys(&settings.stream)
                .into_iter()
                .map(|stream| GroupRef {
                    stream,
                    group: settings.stream.group.clone(),
                    consumer: settings.consumer_name(),
                })
                .collect(),
            rules: EntryRules::from_settings(&settings),
            dead_stream: settings.dead_letter_stream(),
            metrics,
            health,
            leases: Leases::default(),
            budget_grew: Notify::new(),
            read_ahead: ReadAhead::new(
                settings.stream.read_tokens,
                settings.stream.read_count,
                max_seq_length,
            ),
            fault_pause_before_write: std::env::var("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE")
                .ok()
                .and_then(|v| humantime::parse_duration(&v).ok()),
            settings,
        })
    }

    /// The stop of a worker whose writes the index's model record refuses: the index holds
    /// (or is switching to) the model `index_fingerprint`.
    pub fn model_retired(&self, index_fingerprint: String) -> WorkerError {
        WorkerError::ModelRetired {
            index: self.settings.index.name.clone(),
            index_fingerprint,
            ours: self.model.clone(),
        }
    }

    /// This worker's place in the group on shard `shard`.
    pub fn group(&self, shard: usize) -> &GroupRef {
        &self.groups[shard]
    }

    /// Entries held (read, not yet acked).
    pub fn in_flight(&self) -> usize {
        self.leases.in_hand().0
    }

    /// Whether the reader may read again: below its budget in entries and tokens
    /// ([`ReadAhead::may_read`]) and in bytes (less than one read's `stream.read_bytes` held, so
    /// at most two reads' worth are ever in hand).
    pub fn may_read(&self) -> bool {
        let (entries, bytes) = self.leases.in_hand();
        entries == 0
            || (self.read_ahead.may_read(entries) && bytes < self.settings.stream.read_bytes)
    }

    /// The reader of `shard` took these entries, (ID, delivery count, bytes): held, and
    /// renewed, until acked.
    pub fn took(&self, shard: usize, entries: &[(&str, u64, usize)]) {
        self.leases.hold(shard, entries.iter().copied());
    }

    /// The writer acked these entries.
    pub fn released(&self, ids: &[EntryRef]) {
        self.leases.release(ids);
        self.budget_grew.notify_one();
    }

    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            self.settings.redis.backoff_initial,
            self.settings.redis.backoff_max,
        )
    }

    /// Records a Redis error; true if it is worth retrying.
    pub fn transient(&self, e: &StoreError) -> bool {
        self.metrics.error("redis");
        match e.disposition() {
            Disposition::Retry => {
                self.health.set_redis_reachable(false);
                tracing::warn!(error = %e, "redis unavailable; retrying with back-off");
                true
            }
            Disposition::Stop => false,
        }
    }

    /// A Redis command failed: `Ok` if it is worth retrying (the caller drops the connection and
    /// backs off), the error to stop the worker with if a person must act.
    pub fn retry_or_stop(&self, e: ::redis::RedisError) -> Result<(), WorkerError> {
        let e = self.store.error(e);
        if self.transient(&e) {
            Ok(())
        } else {
            Err(e.into())
        }
    }

    /// Connects, retrying transient failures with back-off until `stop`. `None` = stopped first.
    /// `extra` lengthens the reply timeout (blocking reads).
    pub async fn connect_with_retry(
        &self,
        stop: &watch::Receiver<bool>,
        extra: Duration,
    ) -> Result<Option<Conn>, WorkerError> {
        let mut backoff = self.backoff();
        loop {
            match self.store.connect_with(extra).await {
                // Readiness comes back through observe::probe, which also re-checks the group
                // and the index (a restarted Redis may have lost them), not from here.
                Ok(conn) => return Ok(Some(conn)),
                Err(e) => {
                    if !self.transient(&e) {
                        return Err(e.into());
                    }
                    if !sleep_unless_stopped(backoff.next_delay(), stop).await {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Sleeps unless `stop` fires first; false if stopped.
pub async fn sleep_unless_stopped(delay: Duration, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}
