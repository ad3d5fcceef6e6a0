//! Redis: connections built from the settings, the FT index schema, and KNN queries.
//! (The external crate is spelled `::redis` inside this crate.)

pub mod connect;
pub mod index;
pub mod query;

pub use connect::{Disposition, Store, StoreError};
