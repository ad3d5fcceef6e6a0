//! The data path, one file per stage, each owning its loop:
//! [`consume`] (XREADGROUP / XAUTOCLAIM, sized by [`read_ahead`]; each entry an [`op::Op`] by
//! [`entry`], newest per document, rejections named by [`reason`]) -> [`unchanged`] (texts the
//! store already has skip the model) -> [`tokenize`] (long texts
//! cut by [`chunk`]) -> [`embed`] (batches cut by [`batch`], the model) -> [`write`] (versioned upserts and deletes, dead letters, then XACK) — wired together
//! in [`worker`], sharing [`shared`]. Beside them, [`lease`] renews the entries in hand so no
//! other worker reclaims a live worker's work, and on a cluster [`index_keeper`] gives every
//! primary its own index.

pub mod batch;
pub mod chunk;
pub mod consume;
pub mod embed;
pub mod entry;
pub mod index_keeper;
pub mod lease;
pub mod op;
pub mod read_ahead;
pub mod reason;
pub mod shared;
pub mod tokenize;
pub mod unchanged;
pub mod worker;
pub mod write;

pub use worker::{run, RunOptions, RunSummary, WorkerError};
