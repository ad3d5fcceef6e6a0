//! Observability: Prometheus metrics, health state, and tracing set-up.

pub mod health;
pub mod logging;
pub mod metrics;

pub use health::Health;
pub use metrics::Metrics;
pub mod http;

pub use http::serve;
