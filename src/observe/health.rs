//! Readiness facts, set by the stages that learn them and read by `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Health {
    model_loaded: AtomicBool,
    redis_reachable: AtomicBool,
    group_present: AtomicBool,
    index_present: AtomicBool,
    /// Set by the model watchdog: a batch ran past `model.timeout` (the worker is exiting).
    model_stuck: AtomicBool,
}

impl Health {
    pub fn set_model_loaded(&self, v: bool) {
        self.model_loaded.store(v, Ordering::Relaxed);
    }
    pub fn set_redis_reachable(&self, v: bool) {
        self.redis_reachable.store(v, Ordering::Relaxed);
    }
    pub fn set_group_present(&self, v: bool) {
        self.group_present.store(v, Ordering::Relaxed);
    }
    pub fn set_index_present(&self, v: bool) {
        self.index_present.store(v, Ordering::Relaxed);
    }
    pub fn set_model_stuck(&self) {
        self.model_stuck.store(true, Ordering::Relaxed);
    }

    /// Ready = model loaded and not stuck, Redis reachable, group and index present. On failure,
    /// what is missing.
    pub fn ready(&self) -> Result<(), Vec<&'static str>> {
        let mut missing: Vec<&'static str> = [
            (&self.model_loaded, "model not loaded"),
            (&self.redis_reachable, "redis unreachable"),
            (&self.group_present, "consumer group missing"),
            (&self.index_present, "index missing"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
        .map(|(_, what)| what)
        .collect();
        if self.model_stuck.load(Ordering::Relaxed) {
            missing.push("model stuck");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

impl Health {
    /// `embed_worker_ready` (gauge): what `/readyz` would answer, as 1 or 0, so an alert can say
    /// a worker has been unready for minutes. A registry made afresh per scrape, encoded after
    /// the metrics ([`super::Metrics::encode`]).
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("embed_worker");
        registry.register(
            "ready",
            "1 while /readyz answers 200 (model loaded and not stuck, Redis reachable, group and index present), else 0",
            ConstGauge::new(i64::from(self.ready().is_ok())),
        );
        registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_fact_holds_and_says_what_is_missing() {
        let h = Health::default();
        assert_eq!(
            h.ready(),
            Err(vec![
                "model not loaded",
                "redis unreachable",
                "consumer group missing",
                "index missing"
            ])
        );
        h.set_model_loaded(true);
        h.set_redis_reachable(true);
        h.set_group_present(true);
        h.set_index_present(true);
        assert_eq!(h.ready(), Ok(()));
        h.set_redis_reachable(false);
        assert_eq!(h.ready(), Err(vec!["redis unreachable"]));
        h.set_redis_reachable(true);
        h.set_model_stuck();
        assert_eq!(h.ready(), Err(vec!["model stuck"]));
    }

    #[test]
    fn the_ready_gauge_follows_readyz() {
        let text = |h: &Health| {
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, &h.registry()).unwrap();
            out
        };
        let h = Health::default();
        assert!(
            text(&h).ends_with("\nembed_worker_ready 0\n"),
            "{}",
            text(&h)
        );
        h.set_model_loaded(true);
        h.set_redis_reachable(true);
        h.set_group_present(true);
        h.set_index_present(true);
        assert!(text(&h).ends_with("\nembed_worker_ready 1\n"));
        assert!(text(&h).contains("# TYPE embed_worker_ready gauge\n"));
    }
}
