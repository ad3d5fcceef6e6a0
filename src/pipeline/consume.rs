//! The reader stage: takes entries from the group (this consumer's own pending ones after a
//! restart, entries idle on dead consumers, then new ones), turns each into an [`Op`], keeps
//! the newest op per document within the read, and routes them: upserts to the tokeniser,
//! everything else straight to the writer. It reads again only while the worker holds less than
//! its budget ([`ReadAhead`](super::read_ahead::ReadAhead)). With stream shards there is one
//! reader per shard, each on its own connection (its reads block), all under that one budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::cluster::Conn;
use tokio::sync::{mpsc, watch};

use super::entry;
use super::op::Doc;
use super::op::{self, AckOnly, AckWhy, Completion, Op, Write};
use super::shared::{sleep_unless_stopped, Ctx};
use super::{RunOptions, WorkerError};
use crate::store::documents::EntryId;
use crate::store::stream::{self, Read};

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

pub async fn reader(
    ctx: Arc<Ctx>,
    shard: usize,
    conn: Option<Conn>,
    upserts: mpsc::Sender<Vec<Doc>>,
    writes: mpsc::Sender<Vec<Write>>,
    stop: watch::Receiver<bool>,
    options: RunOptions,
) -> Result<(), WorkerError> {
    let s = &ctx.settings.stream;
    let g = ctx.group(shard);
    let mut conn = conn;
    let mut cursors = Cursors {
        source: Source::OwnPending("0".into()),
        next_claim: Instant::now(),
        claim_cursor: "0-0".to_string(),
    };
    let mut backoff = ctx.backoff();
    // At most two reads in flight: one being embedded and written, one prefetched. Entries
    // queued inside a live worker age in the PEL like those of a dead one, so this bound is what
    // keeps `claim_idle` meaningful (and the SIGTERM drain short).
    while !*stop.borrow() {
        if !ctx.may_read() {
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
            conn = ctx
                .connect_with_retry(&stop, s.block + ctx.settings.batch.max_wait)
                .await?;
            continue;
        };
        let (read, from_new) = match read_step(&ctx, shard, c, &mut cursors, options).await {
            Ok(r) => r,
            Err(e) => {
                ctx.retry_or_stop(e)?;
                conn = None;
                if !sleep_unless_stopped(backoff.next_delay(), &stop).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        if read.entries.is_empty() && read.deleted.is_empty() {
            if options.drain && from_new && ctx.in_flight() == 0 {
                match stream::group_info(c, &g.stream, &g.group).await {
                    Ok(Some(info)) if info.pending == 0 && info.lag.unwrap_or(0) == 0 => {
                        tracing::info!(stream = %g.stream, "drained: nothing new or pending");
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not read group state"),
                }
            }
            continue;
        }
        let taken: Vec<(&str, u64, usize)> = read
            .entries
            .iter()
            .map(|e| (e.id.as_str(), e.deliveries, entry::entry_bytes(e)))
            .chain(read.deleted.iter().map(|id| (id.as_str(), 1, 0)))
            .collect();
        ctx.took(shard, &taken);
        let (docs, rest) = route(&ctx, read, shard);
        if !rest.is_empty() && writes.send(rest).await.is_err() {
            break;
        }
        if !docs.is_empty() && upserts.send(docs).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// One read's ops, newest per document: upserts (to embed) apart from the rest (to write).
fn route(ctx: &Ctx, read: Read, shard: usize) -> (Vec<Doc>, Vec<Write>) {
    let mut ops: Vec<Op> = read
        .entries
        .into_iter()
        .map(|raw| entry::parse(raw, &ctx.rules, shard))
        .collect();
    ops.extend(read.deleted.iter().map(|id| {
        Op::AckOnly(AckOnly {
            why: AckWhy::DeletedFromStream,
            done: Completion::new(shard, id),
        })
    }));
    let mut docs = Vec::new();
    let mut rest = Vec::new();
    for op in op::collapse(ops) {
        match op {
            Op::Upsert(doc) => docs.push(doc),
            Op::Delete(d) => rest.push(Write::Delete(d)),
            Op::DeadLetter(d) => {
                // Logged once, at warn, when the dead letter is written.
                tracing::debug!(entry = %d.entry.id, reason = %d.reason, detail = %d.detail, "rejected entry");
                rest.push(Write::DeadLetter(d));
            }
            Op::AckOnly(a) => rest.push(Write::AckOnly(a)),
        }
    }
    (docs, rest)
}

/// The read budget in bytes: no call may bring in more than `read_bytes` in all, counting each
/// entry it asks for at the largest size an entry may have.
#[derive(Debug, Clone, Copy)]
struct ByteBudget {
    read_bytes: usize,
    max_entry_bytes: usize,
}

impl ByteBudget {
    fn from_settings(s: &crate::settings::StreamSettings) -> Self {
        Self {
            read_bytes: s.read_bytes,
            max_entry_bytes: s.max_entry_bytes.max(1),
        }
    }

    /// How many of `wanted` entries the next call may ask for, `taken` bytes into the read.
    /// The first call of a read may always ask for one (settings keep `read_bytes` at least
    /// `max_entry_bytes`).
    fn entries(&self, wanted: usize, taken: usize) -> usize {
        let room = self.read_bytes.saturating_sub(taken) / self.max_entry_bytes;
        let room = if taken == 0 { room.max(1) } else { room };
        wanted.min(room)
    }
}

/// Up to `count` entries from `cursor` (">" for new ones, an entry ID for this consumer's own
/// pending ones after it), in calls of at most `read_bytes / max_entry_bytes` entries each,
/// repeated while the stream has more and the budgets allow: the bytes one read brings in are
/// bounded whatever the entries' sizes, and a stream of short entries still fills a read. Only
/// the first call blocks (for `block`).
async fn read_bounded(
    conn: &mut Conn,
    g: &stream::GroupRef,
    cursor: &str,
    count: usize,
    block: Option<Duration>,
    unknown: u64,
    bytes: ByteBudget,
) -> Result<Read, ::redis::RedisError> {
    let mut read = Read::default();
    let mut cursor = cursor.to_string();
    let mut taken = 0;
    let mut block = block;
    loop {
        let n = bytes.entries(
            count - (read.entries.len() + read.deleted.len()).min(count),
            taken,
        );
        if n == 0 {
            break;
        }
        let got = stream::read(conn, g, &cursor, n, block.take(), unknown).await?;
        let short = got.entries.len() + got.deleted.len() < n;
        if cursor != ">" {
            match last_id(&got) {
                Some(last) => cursor = last,
                None => break,
            }
        }
        taken += got.entries.iter().map(entry::entry_bytes).sum::<usize>();
        read.entries.extend(got.entries);
        read.deleted.extend(got.deleted);
        if short {
            break;
        }
    }
    Ok(read)
}

/// The last entry ID of a read (entries and deleted ones interleave in stream order).
fn last_id(read: &Read) -> Option<String> {
    read.entries
        .iter()
        .map(|e| e.id.as_str())
        .chain(read.deleted.iter().map(String::as_str))
        .max_by_key(|id| EntryId::parse(id))
        .map(str::to_string)
}

/// One read: own pending first, then due claims, then new entries (topped up for `max_wait`).
/// Returns what was read and whether it came from the new-entries read.
async fn read_step(
    ctx: &Ctx,
    shard: usize,
    conn: &mut Conn,
    cursors: &mut Cursors,
    options: RunOptions,
) -> Result<(Read, bool), ::redis::RedisError> {
    let s = &ctx.settings.stream;
    let g = ctx.group(shard);
    let Cursors {
        source,
        next_claim,
        claim_cursor,
    } = cursors;
    let idle_drain = options.drain && ctx.in_flight() == 0;
    // Fail closed: an entry whose delivery count cannot be read counts as one too many.
    let unknown = s.max_deliveries.saturating_add(1);
    let count = ctx.read_ahead.count();
    let bytes = ByteBudget::from_settings(s);
    // The lag and pending gauges are kept current by observe::probe, once a second.
    if let Source::OwnPending(from) = source {
        let read = read_bounded(conn, g, from, count, None, unknown, bytes).await?;
        match last_id(&read) {
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
        let (cursor, read) = stream::autoclaim(
            conn,
            g,
            s.claim_idle,
            claim_cursor,
            bytes.entries(count, 0),
            unknown,
        )
        .await?;
        let wrapped = cursor == "0-0";
        *claim_cursor = cursor;
        if wrapped {
            *next_claim = Instant::now() + s.claim_interval;
            match stream::delete_idle_consumers(conn, g, s.consumer_idle_delete).await {
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
    let mut read = read_bounded(conn, g, ">", count, Some(block), unknown, bytes).await?;
    let wait = ctx.settings.batch.max_wait;
    if !read.entries.is_empty()
        && read.entries.len() < ctx.settings.batch.max_docs
        && !wait.is_zero()
    {
        // A short read: give batch-mates `max_wait` to arrive, so a trickle still batches.
        let taken = read.entries.iter().map(entry::entry_bytes).sum();
        let n = bytes.entries(count - read.entries.len().min(count - 1), taken);
        if n > 0 {
            let more = stream::read(conn, g, ">", n, Some(wait), unknown).await?;
            read.entries.extend(more.entries);
            read.deleted.extend(more.deleted);
        }
    }
    Ok((read, true))
}
