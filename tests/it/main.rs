//! One integration test binary (shared helpers in `common`), against real redis-server
//! processes with the Query Engine and the real ONNX model.

mod chunks;
mod cluster_e2e;
mod cluster_index;
mod cluster_smoke;
mod cluster_support;
mod common;
mod dlq;
mod exposition;
mod freshness;
mod leases;
mod lifecycle;
mod model;
mod model_identity;
mod ops;
mod reindex;
mod reliability;
mod shards;
mod storage;
mod worker;
