//! The store: every command the worker sends to Redis, and the parsing of every reply.
//! Connections from the settings ([`connect`]), the stream and its group ([`stream`]), document
//! writes and deletes on hashes or JSON ([`documents`], through the Redis Functions of
//! [`library`]; on a cluster each document's keys in its slot: [`slots`]), the index's model
//! record ([`generation`]), the dead-letter stream read back ([`dead_letters`]), the FT index schema
//! ([`index`]; on a cluster without search coordinator ([`coordinator`]) one per primary, which
//! [`fanout`] names and [`shard_index`] covers), KNN queries ([`query`]) and the reindex's walks
//! and vector writes ([`reindex`]).
//! (The external crate is spelled `::redis` inside this crate.)

pub mod cluster;
pub mod connect;
pub mod coordinator;
pub mod dead_letters;
pub mod documents;
pub mod fanout;
pub mod generation;
pub mod index;
pub mod library;
pub mod query;
pub mod reindex;
pub mod replicas;
pub mod reply;
pub mod seeds;
pub mod shard_index;
pub mod shards;
pub mod slots;
pub mod stream;

pub use connect::{Disposition, Store, StoreError};
