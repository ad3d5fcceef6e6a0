//! The index kept whole on a cluster: every `KEEP_EVERY`, the index check of start-up again
//! ([`crate::store::index::ensure`]), so that a primary added to the cluster, or one whose index
//! name's slot a reshard moved away, gets an index of its own within seconds, and its documents
//! become searchable again without anyone running `index create`. On one server the index
//! cannot lose a part, so this runs on clusters only.

use std::sync::Arc;
use std::time::Duration;

use super::shared::{sleep_unless_stopped, Ctx};
use super::worker::WorkerError;
use crate::store::cluster::Conn;
use crate::store::generation::Generation;
use crate::store::index;

/// Time between checks. Each costs about two round trips to every primary (COMMAND INFO,
/// FT._LIST, CLUSTER NODES, then FT.INFO), so the fleet's share stays small.
pub const KEEP_EVERY: Duration = Duration::from_secs(5);

/// The index of `generation` as start-up and every check make it: created where missing,
/// refused where its vector field disagrees. True when some index was created.
pub async fn ensure(
    ctx: &Ctx,
    conn: &mut Conn,
    generation: &Generation,
    dimension: usize,
) -> Result<bool, WorkerError> {
    let layout = index::Layout {
        name: &generation.index,
        vector_field: &generation.vector_field,
        model_tag: false,
    };
    let parent = ctx.settings.parent_field();
    let wanted = index::Wanted {
        settings: &ctx.settings.index,
        layout,
        parent,
        dim: dimension,
    };
    Ok(index::ensure(&ctx.store, conn, &wanted).await?)
}

/// Checks the index every `KEEP_EVERY` until the worker stops. A transient failure (a failover,
/// a node down) waits for the next check on a fresh connection; anything else (an index of
/// another shape on a new primary) stops the worker, as it would at start-up.
pub async fn keep(
    ctx: Arc<Ctx>,
    generation: Generation,
    dimension: usize,
) -> Result<(), WorkerError> {
    let stop = ctx.leases.stopped();
    let mut conn: Option<Conn> = None;
    while sleep_unless_stopped(KEEP_EVERY, &stop).await {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.connect_with_retry(&stop, Duration::ZERO).await? {
                Some(c) => conn.insert(c),
                None => break,
            },
        };
        match ensure(&ctx, c, &generation, dimension).await {
            Ok(true) => {
                tracing::info!(index = %generation.index, "made the index of a primary that had none")
            }
            Ok(false) => {}
            Err(WorkerError::Store(e)) if ctx.transient(&e) => conn = None,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
