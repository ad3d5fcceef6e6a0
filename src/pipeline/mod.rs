//! The data path, one file per stage:
//! [`consume`] (XREADGROUP / XAUTOCLAIM, sized by [`read_ahead`]) -> [`entry`] (parse or reject) -> [`embed`] (tokenise,
//! [`batch`] by length, model) -> [`write`] (HSET, then XACK; dead letters) — joined in [`worker`].

pub mod batch;
pub mod consume;
pub mod embed;
pub mod entry;
pub mod read_ahead;
pub mod worker;
pub mod write;

pub use worker::{run, RunOptions, RunSummary, WorkerError};
