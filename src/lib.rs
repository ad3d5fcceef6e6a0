//! embed-worker: turns a Redis Stream of documents into a Redis vector index.
//!
//! # Layout
//! The data path, in order:
//! 1. [`pipeline::consume`]: XREADGROUP through a consumer group (plus XAUTOCLAIM of stuck entries).
//! 2. [`pipeline::entry`]: each entry becomes a document or a dead letter with a reason.
//! 3. [`pipeline::batch`]: length-aware batches bounded by documents and padded tokens.
//! 4. [`pipeline::embed`] with [`model`]: tokenise, run the ONNX encoder on its own thread, pool, normalise.
//! 5. [`pipeline::write`]: HSET the hash with the vector bytes, then XACK; dead letters to `<stream>:dead`.
//!
//! Around it: [`settings`] (config layering), [`redis`] (connections, index schema, KNN query),
//! [`observe`] (metrics, health, logging), [`commands`] (the CLI's subcommands).

pub mod commands;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod redis;
pub mod settings;

pub use settings::Settings;
