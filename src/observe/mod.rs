//! Observability: Prometheus metrics, health state (kept current by the Redis probe), the HTTP
//! listener serving both, the index's own counts ([`index_gauges`]), entry ages for the freshness metrics, and tracing set-up.

pub mod exposition;
pub mod freshness;
pub mod health;
pub mod http;
pub mod index_gauges;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod probe;

pub use health::Health;
pub use http::serve;
pub use metrics::Metrics;
