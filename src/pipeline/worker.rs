//! The worker: four stages joined by small bounded channels, so reading, tokenising, inference
//! and writing overlap and a slow model slows the reads instead of growing memory.
//!
//! ```text
//! reader --windows(1)--> prepare --batches(2)--> embedder --writes(2)--> writer
//! ```
//! Shutdown is a parameter: when it resolves the reader stops, the stages finish what they hold
//! (write, ack) and `run` returns, or gives up after `worker.shutdown_timeout`, leaving the rest
//! pending for another worker to claim.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use super::batch::BatchLimits;
use super::consume::{self, GroupRef, Read};
use super::embed::{self, Tokenized};
use super::entry::{self, Doc, EntryRules};
use super::read_ahead::ReadAhead;
use super::write::{self, DeadLetter};
use crate::model::{Model, ModelError};
use crate::observe::metrics::Stage;
use crate::observe::{Health, Metrics};
use crate::redis::connect::{Backoff, Disposition, Store, StoreError};
use crate::redis::index;
use crate::settings::Settings;

#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Exit once the group has nothing new or pending.
    pub drain: bool,
}

#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub acked: u64,
    pub dead_lettered: u64,
    /// True when shutdown_timeout cut the drain short (the rest stays pending).
    pub timed_out: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A window of entries read together: documents, rejections, and IDs deleted while pending.
struct Window {
    docs: Vec<Doc>,
    dead: Vec<DeadLetter>,
    deleted: Vec<String>,
}

/// What the writer gets: embedded documents and dead letters, plus IDs to ack as they are.
#[derive(Default)]
struct WriteJob {
    embedded: Vec<(Doc, Vec<f32>)>,
    dead: Vec<DeadLetter>,
    deleted: Vec<String>,
}

impl WriteJob {
    fn entries(&self) -> usize {
        self.embedded.len() + self.dead.len() + self.deleted.len()
    }
}

/// Shared by the stages.
struct Ctx {
    settings: Settings,
    store: Store,
    group: GroupRef,
    rules: EntryRules,
    dead_stream: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Entries read but not yet acked or dead-lettered (for `--drain`, and the read budget).
    in_flight: AtomicUsize,
    /// Signalled whenever the reader's budget may have grown: entries left `in_flight` (the
    /// writer), or a read was tokenised and the read size updated (prepare).
    budget_grew: Notify,
    /// How many entries to read, and when (fed the token counts of tokenised reads).
    read_ahead: ReadAhead,
    /// Fault injection for the crash tests: hold every job this long before writing it, so a
    /// test can kill the process between read and write. Set by EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE.
    fault_pause_before_write: Option<Duration>,
}

/// Runs the worker until `shutdown` resolves (or, with `drain`, until nothing is left).
pub async fn run(
    settings: Settings,
    model: Model,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunSummary, WorkerError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let store = Store::new(&settings.redis)?;
    let group = GroupRef {
        stream: settings.stream.name.clone(),
        group: settings.stream.group.clone(),
        consumer: settings.consumer_name(),
    };
    metrics.model_info(model.handle.name(), model.handle.dimension());
    health.set_model_loaded(true);

    let ctx = Arc::new(Ctx {
        rules: EntryRules::from_settings(&settings),
        dead_stream: settings.dead_letter_stream(),
        store,
        group,
        metrics,
        health,
        in_flight: AtomicUsize::new(0),
        budget_grew: Notify::new(),
        read_ahead: ReadAhead::new(
            settings.stream.read_tokens,
            settings.stream.read_count,
            model.config.max_seq_length,
        ),
        fault_pause_before_write: std::env::var("EMBED_WORKER_FAULT_PAUSE_BEFORE_WRITE")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok()),
        settings,
    });

    // Start-up: the group and the index, retrying only what can fix itself.
    let Some(conn) = start_up(&ctx, &stop_rx, model.handle.dimension()).await? else {
        return Ok(RunSummary::default());
    };
    tracing::info!(
        stream = %ctx.group.stream, group = %ctx.group.group, consumer = %ctx.group.consumer,
        index = %ctx.settings.index.name, model = %model.handle.name(), dimension = model.handle.dimension(),
        "worker started"
    );

    // One window prefetched while the previous one is tokenised; two batches queued ahead of
    // the model so it never waits on the tokeniser; two written batches queued ahead of Redis so
    // a slow round trip does not stall the model. Small on purpose: together they never hold more
    // than the reader's budget of about two reads, so memory stays flat under any backlog.
    let (window_tx, window_rx) = mpsc::channel::<Window>(1);
    let (batch_tx, batch_rx) = mpsc::channel::<Tokenized>(2);
    let (write_tx, write_rx) = mpsc::channel::<WriteJob>(2);

    let mut tasks: JoinSet<Result<(), WorkerError>> = JoinSet::new();
    tasks.spawn(reader(
        ctx.clone(),
        conn,
        window_tx,
        write_tx.clone(),
        stop_rx.clone(),
        options,
    ));
    tasks.spawn(prepare(
        ctx.clone(),
        model.clone(),
        window_rx,
        batch_tx,
        write_tx.clone(),
    ));
    tasks.spawn(embedder(ctx.clone(), model, batch_rx, write_tx));
    tasks.spawn(writer(ctx.clone(), write_rx));

    let started = Instant::now();
    let mut stop = stop_rx.clone();
    let mut timed_out = false;
    let deadline = async {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(ctx.settings.worker.shutdown_timeout).await;
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { tasks.abort_all(); return Err(e); }
                Some(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Some(Err(_cancelled)) => {}
            },
            () = &mut deadline => {
                timed_out = true;
                tracing::warn!(in_flight = ctx.in_flight.load(Ordering::Relaxed),
                    "shutdown_timeout reached; unfinished entries stay pending for another worker");
                tasks.abort_all();
                break;
            }
        }
    }
    let summary = RunSummary {
        acked: ctx.metrics.acked_total(),
        dead_lettered: ctx.metrics.dead_lettered_total(),
        timed_out,
    };
    // Model busy time against wall time: how well the other stages keep the model fed.
    let wall = started.elapsed().as_secs_f64();
    let (batches, padded_tokens) = ctx.metrics.batch_totals();
    tracing::info!(
        acked = summary.acked,
        dead_lettered = summary.dead_lettered,
        wall_s = format!("{wall:.2}"),
        model_busy_s = format!("{:.2}", ctx.metrics.stage_seconds(Stage::Model)),
        tokenize_s = format!("{:.2}", ctx.metrics.stage_seconds(Stage::Tokenize)),
        write_s = format!("{:.2}", ctx.metrics.stage_seconds(Stage::Write)),
        batches,
        padded_tokens,
        "worker stopped"
    );
    Ok(summary)
}

/// Connects, retrying transient failures with back-off until `stop`. `None` = stopped first.
/// `extra` lengthens the reply timeout (blocking reads).
async fn connect_with_retry(
    ctx: &Ctx,
    stop: &watch::Receiver<bool>,
    extra: Duration,
) -> Result<Option<MultiplexedConnection>, WorkerError> {
    let mut backoff = backoff(ctx);
    loop {
        match ctx.store.connect_with(extra).await {
            Ok(conn) => {
                // Readiness comes back through observe::probe, which also re-checks the group
                // and the index (a restarted Redis may have lost them), not from here.
                return Ok(Some(conn));
            }
            Err(e) => {
                if !transient(ctx, &e) {
                    return Err(e.into());
                }
                if !sleep_unless_stopped(backoff.next_delay(), stop).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Connects and prepares the group and the index, retrying transient errors (a Redis still
/// LOADING its dataset after a restart, a dropped connection) until `stop`. `None` = stopped.
async fn start_up(
    ctx: &Ctx,
    stop: &watch::Receiver<bool>,
    dimension: usize,
) -> Result<Option<MultiplexedConnection>, WorkerError> {
    let mut backoff = backoff(ctx);
    loop {
        let Some(mut conn) = connect_with_retry(ctx, stop, Duration::ZERO).await? else {
            return Ok(None);
        };
        match prepare_redis(ctx, &mut conn, dimension).await {
            Ok(()) => return Ok(Some(conn)),
            Err(WorkerError::Store(e)) if transient(ctx, &e) => {
                if !sleep_unless_stopped(backoff.next_delay(), stop).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn backoff(ctx: &Ctx) -> Backoff {
    Backoff::new(
        ctx.settings.redis.backoff_initial,
        ctx.settings.redis.backoff_max,
    )
}

/// Records a Redis error; true if it is worth retrying.
fn transient(ctx: &Ctx, e: &StoreError) -> bool {
    ctx.metrics.error("redis");
    match e.disposition() {
        Disposition::Retry => {
            ctx.health.set_redis_reachable(false);
            tracing::warn!(error = %e, "redis unavailable; retrying with back-off");
            true
        }
        Disposition::Stop => false,
    }
}

/// Sleeps unless `stop` fires first; false if stopped.
async fn sleep_unless_stopped(delay: Duration, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn prepare_redis(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    dimension: usize,
) -> Result<(), WorkerError> {
    let created = consume::ensure_group(conn, &ctx.group)
        .await
        .map_err(|e| ctx.store.error(e))?;
    if created {
        tracing::info!(stream = %ctx.group.stream, group = %ctx.group.group, "created consumer group");
    }
    ctx.health.set_group_present(true);
    if index::ensure(&ctx.store, conn, &ctx.settings.index, dimension).await? {
        tracing::info!(index = %ctx.settings.index.name, dimension, "created index");
    }
    ctx.health.set_index_present(true);
    Ok(())
}

/// The longest a `--drain` read blocks for new entries.
const DRAIN_BLOCK: Duration = Duration::from_millis(100);

/// The reader's position: where to read next and when the periodic steps are due.
struct Cursors {
    source: Source,
    /// When to look for entries idle on other consumers.
    next_claim: Instant,
    /// Where the XAUTOCLAIM scan continues.
    claim_cursor: String,
}

/// Where the reader takes entries from next.
enum Source {
    /// This consumer's own pending entries (a restart with the same name), from this ID on.
    OwnPending(String),
    /// New entries.
    New,
}

async fn reader(
    ctx: Arc<Ctx>,
    conn: MultiplexedConnection,
    windows: mpsc::Sender<Window>,
    writes: mpsc::Sender<WriteJob>,
    stop: watch::Receiver<bool>,
    options: RunOptions,
) -> Result<(), WorkerError> {
    let s = &ctx.settings.stream;
    let mut conn = Some(conn);
    let mut cursors = Cursors {
        source: Source::OwnPending("0".into()),
        next_claim: Instant::now(),
        claim_cursor: "0-0".to_string(),
    };
    let mut backoff = backoff(&ctx);
    // At most two reads in flight: one being embedded and written, one prefetched. Entries
    // queued inside a live worker age in the PEL like those of a dead one, so this bound is what
    // keeps `claim_idle` meaningful (and the SIGTERM drain short): without it the channels hold
    // up to ~9 reads, minutes of work on a slow CPU, and other workers would reclaim entries this
    // one is still about to finish.
    while !*stop.borrow() {
        if !ctx
            .read_ahead
            .may_read(ctx.in_flight.load(Ordering::Relaxed))
        {
            let mut stopped = stop.clone();
            tokio::select! {
                // A timeout, not only the notification: a wake-up between the check and the
                // wait would otherwise be missed.
                _ = tokio::time::timeout(Duration::from_millis(100), ctx.budget_grew.notified()) => {}
                _ = stopped.wait_for(|s| *s) => {}
            }
            continue;
        }
        let Some(c) = conn.as_mut() else {
            // Blocking reads need replies to outlive the BLOCK time.
            conn = connect_with_retry(&ctx, &stop, s.block + ctx.settings.batch.max_wait).await?;
            continue;
        };
        let step = read_step(&ctx, c, &mut cursors, options).await;
        let (read, from_new) = match step {
            Ok(r) => r,
            Err(e) => {
                let e = ctx.store.error(e);
                if !transient(&ctx, &e) {
                    return Err(e.into());
                }
                conn = None;
                if !sleep_unless_stopped(backoff.next_delay(), &stop).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        if read.entries.is_empty() && read.deleted.is_empty() {
            if options.drain && from_new && ctx.in_flight.load(Ordering::Relaxed) == 0 {
                match consume::group_state(c, &ctx.group).await {
                    Ok((0, lag)) if lag.unwrap_or(0) == 0 => {
                        tracing::info!("drained: nothing new or pending");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not read group state"),
                }
            }
            continue;
        }
        let window = to_window(&ctx, read);
        ctx.in_flight.fetch_add(
            window.docs.len() + window.dead.len() + window.deleted.len(),
            Ordering::Relaxed,
        );
        // Rejections and deleted IDs go straight to the writer; documents to the tokeniser.
        if !window.dead.is_empty() || !window.deleted.is_empty() {
            let job = WriteJob {
                dead: window.dead,
                deleted: window.deleted,
                ..Default::default()
            };
            if writes.send(job).await.is_err() {
                break;
            }
        }
        if !window.docs.is_empty()
            && windows
                .send(Window {
                    docs: window.docs,
                    dead: vec![],
                    deleted: vec![],
                })
                .await
                .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// One read: own pending first, then due claims, then new entries (topped up for `max_wait`).
/// Returns what was read and whether it came from the new-entries read.
async fn read_step(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    cursors: &mut Cursors,
    options: RunOptions,
) -> Result<(Read, bool), ::redis::RedisError> {
    let s = &ctx.settings.stream;
    let Cursors {
        source,
        next_claim,
        claim_cursor,
    } = cursors;
    let idle_drain = options.drain && ctx.in_flight.load(Ordering::Relaxed) == 0;
    let count = ctx.read_ahead.count();
    // The lag and pending gauges are kept current by observe::probe, once a second.
    if let Source::OwnPending(from) = source {
        let read = consume::read(conn, &ctx.group, from, count, None).await?;
        match read
            .entries
            .last()
            .map(|e| e.id.clone())
            .or_else(|| read.deleted.last().cloned())
        {
            Some(last) => {
                *from = last;
                tracing::info!(
                    entries = read.entries.len(),
                    "resuming this consumer's pending entries"
                );
                return Ok((read, false));
            }
            None => *source = Source::New,
        }
    }
    if Instant::now() >= *next_claim || idle_drain {
        let (cursor, read) =
            consume::autoclaim(conn, &ctx.group, s.claim_idle, claim_cursor, count).await?;
        let wrapped = cursor == "0-0";
        *claim_cursor = cursor;
        if wrapped {
            *next_claim = Instant::now() + s.claim_interval;
            match consume::delete_idle_consumers(conn, &ctx.group, s.consumer_idle_delete).await {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(consumers = ?gone, "deleted idle consumers")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not clean up idle consumers"),
            }
        }
        if !read.entries.is_empty() || !read.deleted.is_empty() {
            tracing::info!(
                entries = read.entries.len(),
                "claimed entries idle on other consumers"
            );
            return Ok((read, false));
        }
    }
    // Draining, an empty stream is the signal to finish: a short block keeps that from costing
    // a whole `block` at the end of every backfill.
    let block = if options.drain {
        s.block.min(DRAIN_BLOCK)
    } else {
        s.block
    };
    let mut read = consume::read(conn, &ctx.group, ">", count, Some(block)).await?;
    let wait = ctx.settings.batch.max_wait;
    if !read.entries.is_empty()
        && read.entries.len() < ctx.settings.batch.max_docs
        && !wait.is_zero()
    {
        // A short read: give batch-mates `max_wait` to arrive, so a trickle still batches.
        let more = consume::read(
            conn,
            &ctx.group,
            ">",
            count - read.entries.len().min(count - 1),
            Some(wait),
        )
        .await?;
        read.entries.extend(more.entries);
        read.deleted.extend(more.deleted);
    }
    Ok((read, true))
}

fn to_window(ctx: &Ctx, read: Read) -> Window {
    let mut window = Window {
        docs: Vec::new(),
        dead: Vec::new(),
        deleted: read.deleted,
    };
    for raw in read.entries {
        match entry::parse(raw, &ctx.rules) {
            Ok(doc) => window.docs.push(doc),
            Err(r) => {
                // Logged once, at warn, when the dead letter is written (write_job).
                tracing::debug!(entry = %r.entry.id, reason = %r.reason, detail = %r.detail, "rejected entry");
                window.dead.push(DeadLetter {
                    entry: r.entry,
                    reason: r.reason,
                    detail: r.detail,
                });
            }
        }
    }
    window
}

async fn prepare(
    ctx: Arc<Ctx>,
    model: Model,
    mut windows: mpsc::Receiver<Window>,
    batches: mpsc::Sender<Tokenized>,
    writes: mpsc::Sender<WriteJob>,
) -> Result<(), WorkerError> {
    let limits = BatchLimits::from_settings(&ctx.settings.batch);
    while let Some(window) = windows.recv().await {
        let (tokenized, dead) =
            embed::tokenize(model.tokenizer.clone(), window.docs, ctx.metrics.clone()).await;
        let tokens = tokenized.encoded.iter().map(|e| e.len()).sum();
        ctx.read_ahead.observe(tokenized.docs.len(), tokens);
        ctx.budget_grew.notify_one();
        if !dead.is_empty()
            && writes
                .send(WriteJob {
                    dead,
                    ..Default::default()
                })
                .await
                .is_err()
        {
            break;
        }
        for batch in embed::batches(tokenized, limits) {
            if batches.send(batch).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn embedder(
    ctx: Arc<Ctx>,
    model: Model,
    mut batches: mpsc::Receiver<Tokenized>,
    writes: mpsc::Sender<WriteJob>,
) -> Result<(), WorkerError> {
    let limits = BatchLimits::from_settings(&ctx.settings.batch);
    while let Some(first) = batches.recv().await {
        // Batches that queued up while the model was busy are planned again together: under a
        // steady trickle they come from small reads, and one fuller call instead of several
        // small ones is what lets the queue drain (each call has a fixed cost).
        let mut queued = vec![first];
        while let Ok(more) = batches.try_recv() {
            queued.push(more);
        }
        for batch in embed::replan(queued, limits) {
            let (embedded, dead) = embed::embed_batch(&model.handle, batch, &ctx.metrics).await?;
            if writes
                .send(WriteJob {
                    embedded,
                    dead,
                    deleted: Vec::new(),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Writes every job it receives, retrying transient Redis errors for as long as it takes (the
/// shutdown deadline is the only way out): a job is never dropped, and never acked unwritten.
async fn writer(ctx: Arc<Ctx>, mut jobs: mpsc::Receiver<WriteJob>) -> Result<(), WorkerError> {
    let never_stop = watch::channel(false).1;
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = backoff(&ctx);
    while let Some(mut job) = jobs.recv().await {
        let entries = job.entries();
        if let Some(pause) = ctx.fault_pause_before_write {
            tokio::time::sleep(pause).await;
        }
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    conn = connect_with_retry(&ctx, &never_stop, Duration::ZERO).await?;
                    continue;
                }
            };
            match write_job(&ctx, c, &mut job).await {
                Ok(()) => break,
                Err(e) => {
                    let e = ctx.store.error(e);
                    if !transient(&ctx, &e) {
                        return Err(e.into());
                    }
                    conn = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        backoff.reset();
        ctx.in_flight.fetch_sub(entries, Ordering::Relaxed);
        ctx.budget_grew.notify_one();
    }
    Ok(())
}

/// Writes one job; on error the job holds exactly what is still to do, so a retry redoes only that.
async fn write_job(
    ctx: &Ctx,
    conn: &mut MultiplexedConnection,
    job: &mut WriteJob,
) -> Result<(), ::redis::RedisError> {
    let started = Instant::now();
    if !job.embedded.is_empty() {
        let written =
            write::write_hashes(conn, &job.embedded, &ctx.settings.index.vector_field).await?;
        ctx.metrics.written(written.ok.len());
        // Per-document refusals (e.g. the key holds a list) become dead letters.
        let mut refused: Vec<(usize, String)> = written.refused;
        refused.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, detail) in refused {
            let (doc, _) = job.embedded.remove(i);
            tracing::debug!(entry = %doc.entry.id, key = %doc.key, error = %detail, "redis refused the hash");
            job.dead.push(DeadLetter {
                entry: doc.entry,
                reason: entry::DeadReason::WriteError,
                detail,
            });
        }
        let ids: Vec<String> = job
            .embedded
            .iter()
            .map(|(d, _)| d.entry.id.clone())
            .collect();
        write::ack(conn, &ctx.group, &ids).await?;
        ctx.metrics.acked(ids.len());
        job.embedded.clear();
    }
    if !job.dead.is_empty() {
        write::dead_letter(conn, &ctx.group, &ctx.dead_stream, &job.dead).await?;
        for l in &job.dead {
            // The one log line per failed entry: every failure path ends here, once it is durable.
            tracing::warn!(entry = %l.entry.id, reason = %l.reason, detail = %l.detail,
                dead_letter_stream = %ctx.dead_stream, "dead-lettered entry");
            ctx.metrics.dead_lettered(l.reason.as_str());
        }
        job.dead.clear();
    }
    if !job.deleted.is_empty() {
        write::ack(conn, &ctx.group, &job.deleted).await?;
        tracing::info!(
            entries = job.deleted.len(),
            "acked pending entries deleted from the stream"
        );
        job.deleted.clear();
    }
    ctx.metrics.stage(Stage::Write, started.elapsed());
    Ok(())
}
