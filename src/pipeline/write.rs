//! The writer stage: applies each document change (newest version wins, checked on the server),
//! dead-letters what cannot be indexed, then acks exactly the entries whose every part is done.
//! Nothing is acked that was not written (or found superseded) first, and a job is never dropped:
//! transient Redis errors are retried for as long as it takes (the shutdown deadline is the only
//! way out).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::cluster::Conn;
use tokio::sync::{mpsc, watch};

use super::op::{AckWhy, Completion, DeadLetter, Delete, Embedded, EntryRef, Write};
use super::reason::DeadReason;
use super::shared::Ctx;
use super::WorkerError;
use crate::observe::metrics::Stage;
use crate::store::documents::{self, Applied, Body, Change, ChunkBody};
use crate::store::stream::{self, DeadLetterRecord};

pub async fn writer(
    ctx: Arc<Ctx>,
    mut jobs: mpsc::Receiver<Vec<Write>>,
) -> Result<(), WorkerError> {
    let never_stop = watch::channel(false).1;
    let mut conn: Option<Conn> = None;
    let mut backoff = ctx.backoff();
    while let Some(writes) = jobs.recv().await {
        if let Some(pause) = ctx.fault_pause_before_write {
            tokio::time::sleep(pause).await;
        }
        let mut job = Job::new(writes);
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    conn = ctx.connect_with_retry(&never_stop, Duration::ZERO).await?;
                    continue;
                }
            };
            match job.run(&ctx, c).await {
                // What was applied before the refusal is acked; the rest stays pending.
                Ok(()) if job.wrong_model.is_some() => {
                    return Err(ctx.model_retired(job.wrong_model.take().unwrap_or_default()));
                }
                Ok(()) => break,
                Err(e) => {
                    ctx.retry_or_stop(e)?;
                    conn = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        backoff.reset();
    }
    Ok(())
}

/// One job, done in steps. Each step removes what it finished, so after an error the job holds
/// exactly what is still to do and a retry redoes only that.
struct Job {
    /// Upserts and deletes still to apply.
    changes: Vec<DocChange>,
    dead: Vec<DeadLetter>,
    /// Entries done (written, deleted, superseded, ...) and not yet acked.
    acks: Vec<EntryRef>,
    /// Entries dead-lettered and not yet acked.
    dead_acks: Vec<EntryRef>,
    /// The index's model record refused this worker's writes: the fingerprint it names.
    wrong_model: Option<String>,
}

impl Job {
    fn new(writes: Vec<Write>) -> Self {
        let mut job = Job {
            changes: Vec::new(),
            dead: Vec::new(),
            acks: Vec::new(),
            dead_acks: Vec::new(),
            wrong_model: None,
        };
        for w in writes {
            match w {
                Write::Upsert(e) => job.changes.push(DocChange::Upsert(e)),
                Write::Delete(d) => job.changes.push(DocChange::Delete(d)),
                Write::DeadLetter(d) => job.dead.push(d),
                Write::AckOnly(a) => {
                    match a.why {
                        AckWhy::Superseded | AckWhy::Unchanged | AckWhy::Current => {}
                        AckWhy::DeletedFromStream => {
                            tracing::info!(entry = %a.done.entry_id(), "acking a pending entry deleted from the stream")
                        }
                    }
                    job.finished(a.done);
                }
            }
        }
        job
    }

    fn finished(&mut self, done: Completion) {
        self.acks.extend(done.finish());
    }

    async fn run(&mut self, ctx: &Ctx, conn: &mut Conn) -> Result<(), ::redis::RedisError> {
        let started = Instant::now();
        if !self.changes.is_empty() {
            self.apply_changes(ctx, conn).await?;
        }
        if !self.dead.is_empty() {
            let records: Vec<DeadLetterRecord> = self
                .dead
                .iter()
                .map(|l| DeadLetterRecord {
                    entry: &l.entry,
                    stream: &ctx.group(l.done.shard()).stream,
                    reason: l.reason.as_str(),
                    detail: &l.detail,
                })
                .collect();
            let trimmed = stream::add_dead_letters(
                conn,
                &ctx.groups[0].consumer,
                &ctx.dead_stream,
                ctx.settings.stream.dead_letter_maxlen,
                &records,
            )
            .await?;
            ctx.metrics.dead_letters_trimmed(trimmed);
            // A retry after a failed wait writes them again: a duplicate, never a loss.
            replicated(ctx, conn).await?;
            for l in self.dead.drain(..) {
                // The one log line per failed entry: every failure path ends here, once it is durable.
                tracing::warn!(entry = %l.entry.id, reason = %l.reason, detail = %l.detail,
                    dead_letter_stream = %ctx.dead_stream, "dead-lettered entry");
                ctx.metrics.dead_lettered(l.reason.as_str());
                self.dead_acks.extend(l.done.finish());
            }
        }
        if !self.acks.is_empty() || !self.dead_acks.is_empty() {
            let ids: Vec<EntryRef> = self.acks.iter().chain(&self.dead_acks).cloned().collect();
            for (shard, group) in ctx.groups.iter().enumerate() {
                let of_shard: Vec<&str> = ids
                    .iter()
                    .filter(|e| e.shard == shard)
                    .map(|e| e.id.as_str())
                    .collect();
                stream::ack(conn, group, &of_shard).await?;
            }
            let names: Vec<String> = ids.iter().map(|e| e.id.clone()).collect();
            ctx.metrics.indexing_delay(&names);
            ctx.metrics.acked(self.acks.len());
            ctx.released(&ids);
            self.acks.clear();
            self.dead_acks.clear();
        }
        ctx.metrics.stage(Stage::Write, started.elapsed());
        Ok(())
    }

    /// Upserts and deletes in one pipeline; a document Redis refuses alone becomes a dead letter.
    async fn apply_changes(
        &mut self,
        ctx: &Ctx,
        conn: &mut Conn,
    ) -> Result<(), ::redis::RedisError> {
        let text_field = ctx.settings.stream.text_field.as_str();
        let changes: Vec<Change> = self.changes.iter().map(|c| c.change(text_field)).collect();
        let outcomes = documents::apply(conn, &ctx.docs, &changes).await?;
        drop(changes);
        // Nothing is taken off the job before the replicas have it: after a failed wait (or a
        // failover) the retry writes everything again, and what did survive answers `Current`.
        replicated(ctx, conn).await?;
        for (change, outcome) in std::mem::take(&mut self.changes).into_iter().zip(outcomes) {
            let (key, entry) = change.names();
            match outcome {
                Ok(applied) => {
                    match applied {
                        Applied::Written => ctx.metrics.written(1),
                        Applied::Deleted | Applied::Absent => ctx.metrics.deleted(1),
                        Applied::Superseded => {
                            tracing::debug!(%entry, %key, "a newer version is stored; not written");
                            ctx.metrics.superseded(1)
                        }
                        Applied::Current => {
                            tracing::debug!(%entry, %key, "already applied (a redelivery)")
                        }
                        Applied::WrongModel(index) => {
                            self.wrong_model = Some(index);
                            // Not done: dropped unfinished, so its entry is never acked here.
                            continue;
                        }
                        Applied::Unchanged | Applied::Changed => {
                            unreachable!("only a touch answers {applied:?}")
                        }
                    }
                    self.finished(change.into_completion());
                }
                Err(detail) => {
                    tracing::debug!(%entry, %key, error = %detail, "redis refused the document");
                    self.dead.push(change.into_dead_letter(detail));
                }
            }
        }
        Ok(())
    }
}

/// With `redis.wait_replicas`, waits until the replicas hold what this connection wrote.
async fn replicated(ctx: &Ctx, conn: &mut Conn) -> Result<(), ::redis::RedisError> {
    let want = ctx.settings.redis.wait_replicas;
    if want == 0 {
        return Ok(());
    }
    let short = ctx
        .replicas
        .wait(conn, want, ctx.settings.redis.wait_timeout)
        .await?;
    if let Some(first) = short.first() {
        ctx.metrics.under_replicated();
        // Once a minute at most: after a failover every batch is short until a replica returns.
        static LAST_WARNED_S: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = crate::observe::freshness::now_ms() / 1000;
        let last = LAST_WARNED_S.load(std::sync::atomic::Ordering::Relaxed);
        if now < last + 60 {
            return Ok(());
        }
        LAST_WARNED_S.store(now, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(node = %first.node, replicas = first.replicas, wanted = want,
            primaries = short.len(),
            "acked with fewer replicas than redis.wait_replicas: the primary has no more (a promoted replica not yet given one)");
    }
    Ok(())
}

/// A change to a document, still to apply.
enum DocChange {
    Upsert(Embedded),
    Delete(Delete),
}

impl DocChange {
    fn change<'a>(&'a self, text_field: &'a str) -> Change<'a> {
        match self {
            DocChange::Upsert(e) => Change::Upsert {
                key: &e.doc.key,
                version: e.doc.version,
                digest: &e.doc.digest,
                body: match e.chunks.as_slice() {
                    [one] => Body::Whole {
                        fields: e.doc.stored_fields().collect(),
                        vector: &one.vector,
                    },
                    chunks => Body::Chunks {
                        parent: e.doc.id(),
                        shared: e.doc.other_fields(text_field).collect(),
                        chunks: chunks
                            .iter()
                            .map(|c| ChunkBody {
                                text: &e.doc.text[c.span.bytes.clone()],
                                chars: c.span.chars.clone(),
                                vector: &c.vector,
                            })
                            .collect(),
                    },
                },
            },
            DocChange::Delete(d) => Change::Delete {
                key: &d.key,
                version: d.version,
            },
        }
    }

    /// (document key, entry ID), for logs.
    fn names(&self) -> (&str, &str) {
        match self {
            DocChange::Upsert(e) => (&e.doc.key, &e.doc.entry.id),
            DocChange::Delete(d) => (&d.key, &d.entry.id),
        }
    }

    fn into_completion(self) -> Completion {
        match self {
            DocChange::Upsert(e) => e.doc.done,
            DocChange::Delete(d) => d.done,
        }
    }

    /// Redis refused it for this document alone (e.g. the key holds another type).
    fn into_dead_letter(self, detail: String) -> DeadLetter {
        match self {
            DocChange::Upsert(e) => e.doc.into_dead_letter(DeadReason::WriteError, detail),
            DocChange::Delete(d) => DeadLetter {
                entry: d.entry,
                reason: DeadReason::WriteError,
                detail,
                done: d.done,
            },
        }
    }
}
