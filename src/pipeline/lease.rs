//! Leases on the entries a worker holds. Entries queued inside a live worker age in the group's
//! pending list exactly like those of a dead one, so without renewal any batch slower than
//! `stream.claim_idle` would be reclaimed and redone by another worker. The reader registers
//! every entry it takes, the writer releases each one it acks, and the [`renewer`] resets the
//! idle time of those still held every `claim_idle / 3` (XCLAIM ... JUSTID: the delivery count
//! stays as it is). `claim_idle` then only says how long a *dead* worker's entries wait.
//!
//! Renewal stops when the worker can no longer vouch for its work: when the connection is lost
//! (nothing is renewed until it is back, and then only what is still this consumer's), and when
//! the model watchdog finds the model thread stuck ([`Leases::stop`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::cluster::Conn;
use tokio::sync::watch;

use super::op::EntryRef;
use super::shared::{sleep_unless_stopped, Ctx};
use super::WorkerError;
use crate::store::stream;

/// The entries this worker holds (read, not yet acked) with the delivery count each was read
/// with and its size, and whether they are still renewed. Also what the read budget counts:
/// entries and bytes in hand.
pub struct Leases {
    held: Mutex<Held>,
    /// Set once renewal must end: the writer is done, or the model is stuck.
    stopped: watch::Sender<bool>,
}

/// Entry -> (delivery count, bytes), and the bytes in all.
#[derive(Default)]
struct Held {
    entries: HashMap<EntryRef, (u64, usize)>,
    bytes: usize,
}

impl Default for Leases {
    fn default() -> Self {
        Self {
            held: Mutex::new(Held::default()),
            stopped: watch::channel(false).0,
        }
    }
}

impl Leases {
    /// The reader of shard `shard` took these entries: (entry ID, delivery count, bytes of
    /// fields and values).
    pub fn hold<'a>(&self, shard: usize, entries: impl IntoIterator<Item = (&'a str, u64, usize)>) {
        let mut held = self.lock();
        for (id, deliveries, bytes) in entries {
            held.bytes += bytes;
            let entry = EntryRef::new(shard, id);
            if let Some((_, old)) = held.entries.insert(entry, (deliveries, bytes)) {
                held.bytes -= old;
            }
        }
    }

    /// The writer acked these entries.
    pub fn release(&self, ids: &[EntryRef]) {
        let mut held = self.lock();
        for id in ids {
            if let Some((_, bytes)) = held.entries.remove(id) {
                held.bytes -= bytes;
            }
        }
    }

    pub fn contains(&self, id: &EntryRef) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// How many entries are held, and their bytes.
    pub fn in_hand(&self) -> (usize, usize) {
        let held = self.lock();
        (held.entries.len(), held.bytes)
    }

    /// The entries held now.
    pub fn held(&self) -> Vec<EntryRef> {
        self.lock().entries.keys().cloned().collect()
    }

    /// The entries held now with the delivery count each was read with.
    pub fn held_with_deliveries(&self) -> Vec<(EntryRef, u64)> {
        self.lock()
            .entries
            .iter()
            .map(|(id, (n, _))| (id.clone(), *n))
            .collect()
    }

    /// No more renewals: what is held is left to idle, and to be reclaimed after `claim_idle`.
    pub fn stop(&self) {
        self.stopped.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Fires once the writer is done (the worker is stopping): the end of every side task.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .expect("the lease set's lock is never held across a panic")
    }
}

/// Renews the held entries every `claim_idle / 3` on its own connection until
/// [`Leases::stop`]. Transient Redis errors drop the connection and retry with back-off (no
/// renewal meanwhile, so a worker cut off from Redis lets its entries go); a refusal that will
/// not fix itself (the ACL lacks XCLAIM) stops the worker.
pub async fn renewer(ctx: Arc<Ctx>) -> Result<(), WorkerError> {
    let stop = ctx.leases.stopped();
    let interval = ctx.settings.lease_renew_interval();
    let mut conn: Option<Conn> = None;
    let mut backoff = ctx.backoff();
    while sleep_unless_stopped(interval, &stop).await {
        let held = ctx.leases.held();
        if held.is_empty() {
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx
                .connect_with_retry(&stop, std::time::Duration::ZERO)
                .await?
            {
                Some(c) => conn.insert(c),
                None => break,
            },
        };
        // The model may have been found stuck while this waited for the connection.
        if ctx.leases.is_stopped() {
            break;
        }
        match renew_all(&ctx, c, held).await {
            Ok((renewed, lost)) => {
                backoff.reset();
                // Those acked since the snapshot are not lost.
                let lost: Vec<EntryRef> = lost
                    .into_iter()
                    .filter(|id| ctx.leases.contains(id))
                    .collect();
                ctx.metrics.leases(renewed, lost.len());
                if !lost.is_empty() {
                    // Reclaimed by another consumer while this one could not renew: the work is
                    // redone there (harmless: the newest version wins on the server).
                    ctx.leases.release(&lost);
                    tracing::warn!(entries = lost.len(), first = %lost[0],
                        "entries held here were reclaimed by another worker; not renewed (their work is done twice)");
                }
            }
            Err(e) => {
                ctx.retry_or_stop(e)?;
                conn = None;
                if !sleep_unless_stopped(backoff.next_delay(), &stop).await {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Renews the held entries of every shard: how many were renewed, and those no longer this
/// consumer's.
async fn renew_all(
    ctx: &Ctx,
    conn: &mut Conn,
    held: Vec<EntryRef>,
) -> Result<(usize, Vec<EntryRef>), ::redis::RedisError> {
    let mut by_shard: HashMap<usize, Vec<String>> = HashMap::new();
    for e in held {
        by_shard.entry(e.shard).or_default().push(e.id);
    }
    let (mut renewed, mut lost) = (0, Vec::new());
    for (shard, ids) in by_shard {
        let (r, l) = stream::renew(conn, ctx.group(shard), &ids).await?;
        renewed += r.len();
        lost.extend(l.into_iter().map(|id| EntryRef { shard, id }));
    }
    Ok((renewed, lost))
}
