//! The worker: wiring only. Five stages joined by small bounded channels, so reading, skipping
//! unchanged texts, tokenising, inference and writing overlap, and a slow model slows the reads
//! instead of growing memory.
//!
//! ```text
//! consume --upserts(1)--> unchanged --(1)--> tokenize --reads(1)--> embed --writes(2)--> write
//!    \______________ deletes, dead letters, acks (2) _______________/
//!       (lease renewer: keeps what consume took and write has not acked yet)
//! ```
//! Shutdown is a parameter: when it resolves the reader stops, the stages finish what they hold
//! (write, ack) and `run` returns, or gives up after `worker.shutdown_timeout`, leaving the rest
//! pending for another worker to claim.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::cluster::Conn;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::consume::reader;
use super::embed::embedder;
use super::index_keeper;
use super::lease::renewer;
use super::op::Doc;
use super::op::Write;
use super::shared::{sleep_unless_stopped, Ctx};
use super::tokenize::{tokenizer, Tokenized};
use super::unchanged::sifter;
use super::write::writer;
use crate::model::{Fingerprint, Model, ModelError};
use crate::observe::metrics::Stage;
use crate::observe::{Health, Metrics};
use crate::settings::Settings;
use crate::store::connect::StoreError;
use crate::store::documents::Writer;
use crate::store::generation::{self, Generation, Verdict};
use crate::store::{index, library, stream};

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
    /// The model watchdog: one call ran longer than `model.timeout`. The model thread cannot be
    /// interrupted, so the process must exit for the entries to be retried.
    #[error(
        "the model thread is stuck: a batch of {} document(s) ran longer than model.timeout ({}); \
         exiting so its entries go back to the group (entries: {})",
        entries.len(), humantime::format_duration(*timeout), entries.join(" ")
    )]
    ModelStuck {
        timeout: Duration,
        entries: Vec<String>,
    },
    #[error(
        "configuration: chunk.size ({size}) is more than the model's longest input ({max} tokens). \
         Fix: set chunk.size (EMBED_WORKER__CHUNK__SIZE) to at most {max}"
    )]
    ChunkTooLong { size: usize, max: usize },
    /// Key prefixes that a cluster cannot keep in one slot with their documents.
    #[error("{0}")]
    KeysAcrossSlots(String),
    #[error(
        "model mismatch: index {index} holds vectors of {index_model}, and this worker runs {ours}; \
         it wrote nothing. Fix: set model.file (EMBED_WORKER__MODEL__FILE) to the index's model, \
         or move the index to this model with `embed-worker reindex --model-file {file}`"
    )]
    ModelMismatch {
        index: String,
        index_model: String,
        ours: Fingerprint,
        file: String,
    },
    #[error(
        "index {index} moved to another model ({index_fingerprint}) while this worker ran {ours}: \
         its writes are refused, so it stops, leaving its entries pending for a worker of the \
         index's model. Fix: restart with the index's model (EMBED_WORKER__MODEL__FILE; \
         `embed-worker stats` names it)"
    )]
    ModelRetired {
        index: String,
        index_fingerprint: String,
        ours: Fingerprint,
    },
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
    let max = model.config.max_seq_length;
    if settings.parent_field().is_some() && settings.chunk.size > max {
        return Err(WorkerError::ChunkTooLong {
            size: settings.chunk.size,
            max,
        });
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    metrics.model_info(model.handle.name(), model.handle.dimension());
    health.set_model_loaded(true);
    let ctx = Arc::new(Ctx::new(
        settings,
        metrics,
        health,
        model.config.max_seq_length,
        model.fingerprint.clone(),
    )?);

    let Some((conn, generation)) = start_up(&ctx, &stop_rx, model.handle.dimension()).await? else {
        return Ok(RunSummary::default());
    };
    let cluster = conn.is_cluster();
    let g = ctx.group(0);
    tracing::info!(
        stream = %g.stream, shards = ctx.groups.len(), group = %g.group, consumer = %g.consumer,
        index = %ctx.settings.index.name, model = %model.fingerprint, dimension = model.handle.dimension(),
        "worker started"
    );

    // One read's upserts handed to the tokeniser while the previous one is tokenised; one
    // tokenised read queued ahead of the model so it never waits on the tokeniser; two jobs
    // queued ahead of Redis so a slow round trip does not stall the model. Small on purpose:
    // together they never hold more than the reader's budget of about two reads, so memory
    // stays flat under any backlog.
    let (upsert_tx, upsert_rx) = mpsc::channel::<Vec<Doc>>(1);
    let (tokenized_tx, tokenized_rx) = mpsc::channel::<Tokenized>(1);
    let (write_tx, write_rx) = mpsc::channel::<Vec<Write>>(2);

    let mut tasks: JoinSet<Result<(), WorkerError>> = JoinSet::new();
    let mut conn = Some(conn);
    for shard in 0..ctx.groups.len() {
        tasks.spawn(reader(
            ctx.clone(),
            shard,
            conn.take(),
            upsert_tx.clone(),
            write_tx.clone(),
            stop_rx.clone(),
            options,
        ));
    }
    drop(upsert_tx);
    // With worker.skip_unchanged, upserts pass the unchanged stage first (one more read in hand).
    let changed_rx = if ctx.settings.worker.skip_unchanged {
        let (changed_tx, changed_rx) = mpsc::channel::<Vec<Doc>>(1);
        tasks.spawn(sifter(ctx.clone(), upsert_rx, changed_tx, write_tx.clone()));
        changed_rx
    } else {
        upsert_rx
    };
    tasks.spawn(tokenizer(
        ctx.clone(),
        model.clone(),
        changed_rx,
        tokenized_tx,
        write_tx.clone(),
    ));
    tasks.spawn(embedder(ctx.clone(), model.clone(), tokenized_rx, write_tx));
    let writing = ctx.clone();
    tasks.spawn(async move {
        let done = writer(writing.clone(), write_rx).await;
        // Nothing is left to ack: renewing further would only keep a stopped worker's leftovers
        // (a shutdown cut short) from other workers.
        writing.leases.stop();
        done
    });
    tasks.spawn(renewer(ctx.clone()));
    if cluster {
        tasks.spawn(index_keeper::keep(
            ctx.clone(),
            generation,
            model.handle.dimension(),
        ));
    }

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
                Some(Ok(Err(e))) => { ctx.leases.stop(); tasks.abort_all(); return Err(e); }
                Some(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Some(Err(_cancelled)) => {}
            },
            () = &mut deadline => {
                timed_out = true;
                ctx.leases.stop();
                tracing::warn!(in_flight = ctx.in_flight(),
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

/// How often a worker waiting for a reindex to reach its model looks again.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// Connects and prepares the document functions, the model check, the group and the index,
/// retrying transient errors (a Redis still LOADING its dataset after a restart, a dropped
/// connection) until `stop`. A worker whose model a running `reindex` is moving the index to
/// waits here (unready) until the switch. `None` = stopped first.
async fn start_up(
    ctx: &Ctx,
    stop: &watch::Receiver<bool>,
    dimension: usize,
) -> Result<Option<(Conn, Generation)>, WorkerError> {
    let mut backoff = ctx.backoff();
    let mut said_waiting = false;
    loop {
        let Some(mut conn) = ctx.connect_with_retry(stop, Duration::ZERO).await? else {
            return Ok(None);
        };
        loop {
            match prepare_redis(ctx, &mut conn, dimension).await {
                Ok(Some(generation)) => return Ok(Some((conn, generation))),
                Ok(None) => {
                    if !said_waiting {
                        said_waiting = true;
                        tracing::info!(index = %ctx.settings.index.name, model = %ctx.model,
                            "waiting: a reindex is moving the index to this worker's model; \
                             this worker starts once it switches");
                    }
                    if !sleep_unless_stopped(WAIT_POLL, stop).await {
                        return Ok(None);
                    }
                }
                Err(WorkerError::Store(e)) if ctx.transient(&e) => {
                    if !sleep_unless_stopped(backoff.next_delay(), stop).await {
                        return Ok(None);
                    }
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The generation to write when ready to run; None while a reindex to this worker's model has
/// not switched yet. The model is checked before anything is written (the group, the index).
async fn prepare_redis(
    ctx: &Ctx,
    conn: &mut Conn,
    dimension: usize,
) -> Result<Option<Generation>, WorkerError> {
    ctx.docs
        .keys
        .set_cluster(conn.is_cluster())
        .map_err(WorkerError::KeysAcrossSlots)?;
    let Some(generation) = check_model(ctx, conn).await? else {
        return Ok(None);
    };
    for g in &ctx.groups {
        let created = stream::ensure_group(conn, g)
            .await
            .map_err(|e| ctx.store.error(e))?;
        if created {
            tracing::info!(stream = %g.stream, group = %g.group, "created consumer group");
        }
    }
    ctx.health.set_group_present(true);
    if index_keeper::ensure(ctx, conn, &generation, dimension).await? {
        tracing::info!(index = %generation.index, dimension, "created index");
    }
    ctx.health.set_index_present(true);
    if index::partial_indexed_docs(conn).await == Some(false) {
        tracing::warn!(
            "the Query Engine re-indexes a document on every write, even of fields \
            outside the schema: an unchanged re-feed then costs an index update per document \
            (~1-2 ms of Redis CPU each) instead of none. Load the module with \
            PARTIAL_INDEXED_DOCS 1 (Redis 8: search-partial-indexed-docs yes); see \
            docs/OPERATIONS.md \"Changing the model\""
        );
    }
    ctx.docs.set_writer(Writer {
        fingerprint: ctx.model.id.clone(),
        vector_field: generation.vector_field.clone(),
    });
    Ok(Some(generation))
}

/// The index's model against this worker's: the generation to write (its index and field),
/// `None` to wait for a reindex, or the refusal. The first worker of an index records its
/// model as the index's.
async fn check_model(ctx: &Ctx, conn: &mut Conn) -> Result<Option<Generation>, WorkerError> {
    let key = generation::record_key(&ctx.settings.index.name);
    let s = &ctx.settings;
    // Read first, so a worker of another model is refused before it writes anything (the
    // function library included).
    let found = generation::load(conn, &key)
        .await
        .map_err(|e| ctx.store.error(e))?;
    if let Some(record) = &found {
        if record.verdict(&ctx.model.id) == Verdict::Refuse {
            return Err(mismatch(ctx, record));
        }
    }
    if library::ensure(conn)
        .await
        .map_err(|e| ctx.store.error(e))?
    {
        tracing::info!("loaded the embed_worker function library");
    }
    let record = match found {
        Some(record) => record,
        None => {
            let existing = index::info(conn, &s.index.name)
                .await
                .map_err(|e| ctx.store.error(e))?;
            let record = generation::adopt(
                conn,
                &key,
                &Generation {
                    fingerprint: ctx.model.id.clone(),
                    model: ctx.model.name.clone(),
                    index: s.index.name.clone(),
                    vector_field: s.index.vector_field.clone(),
                },
            )
            .await
            .map_err(|e| ctx.store.error(e))?;
            if existing.is_some() && record.current.fingerprint == ctx.model.id {
                tracing::warn!(index = %s.index.name, model = %ctx.model, record = %key,
                    "the index has no model record (it predates them): recorded this worker's \
                     model as the index's. If its vectors came from another model, re-embed them \
                     (`embed-worker reindex --model-file ...`)");
            }
            record
        }
    };
    match record.verdict(&ctx.model.id) {
        Verdict::Write(generation) => Ok(Some(generation)),
        Verdict::Wait => Ok(None),
        Verdict::Refuse => Err(mismatch(ctx, &record)),
    }
}

fn mismatch(ctx: &Ctx, record: &generation::Record) -> WorkerError {
    WorkerError::ModelMismatch {
        index: ctx.settings.index.name.clone(),
        index_model: format!("{} [{}]", record.current.model, record.current.fingerprint),
        ours: ctx.model.clone(),
        file: ctx.settings.model.file.clone(),
    }
}
