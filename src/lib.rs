//! embed-worker: turns a Redis Stream of documents into a Redis vector index.
//!
//! # Layout
//! The data path, in order:
//! 1. [`pipeline::consume`]: XREADGROUP through a consumer group (plus XAUTOCLAIM of stuck entries).
//! 2. [`pipeline::entry`]: each entry becomes an [`pipeline::op::Op`] (upsert, delete, dead
//!    letter), and only the newest op per document in a read is kept.
//! 3. [`pipeline::tokenize`]: texts to token ids, off the async workers.
//! 4. [`pipeline::embed`]: length-aware batches ([`pipeline::batch`]) through the ONNX encoder on
//!    its own thread ([`model`]): pool, normalise.
//! 5. [`pipeline::write`]: versioned replace or delete of each document on the server (newest
//!    wins, [`store::documents`]), dead letters to `<stream>:dead`, then XACK.
//!
//! Around it: [`settings`] (config layering), [`store`] (every Redis command and reply: connections, stream, documents, index schema, KNN query),
//! [`observe`] (metrics, health, logging), [`commands`] (the CLI's subcommands).

pub mod commands;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod settings;
pub mod store;

pub use settings::Settings;
