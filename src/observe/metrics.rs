//! Prometheus metrics (prefix `embed_worker_`) on the Prometheus project's `prometheus-client`
//! crate: one [`Registry`] owned by [`Metrics`], no global state, encoded per scrape as Prometheus
//! text 0.0.4 or OpenMetrics 1.0 ([`Format`], chosen from the scraper's `Accept`).
//!
//! The names, types and labels are the ones dashboards and alerts use (docs/OPERATIONS.md,
//! deploy/monitoring): the crate adds `_total` to counters itself, so they are registered
//! without it, and it ends every HELP text with a period, so ours have none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text as openmetrics, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::index_gauges::IndexGauges;
use crate::store::index::IndexProgress;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::exposition::Format;
use super::freshness;
use super::memory::{resident_set_bytes, RESIDENT_STEP};

/// The stages whose durations are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tokenize,
    Model,
    Write,
}

impl Stage {
    const ALL: [Stage; 3] = [Stage::Tokenize, Stage::Model, Stage::Write];

    fn as_str(self) -> &'static str {
        match self {
            Stage::Tokenize => "tokenize",
            Stage::Model => "model",
            Stage::Write => "write",
        }
    }
}

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// XADD to XACK: from a quiet worker's tens of milliseconds (a batch's wait, the model, the write)
/// to a backlog of minutes; past 10 min only `+Inf` and the sum tell, which is alert territory.
const DELAY_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

const BATCH_DOCUMENTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
const BATCH_PADDED_TOKENS: &[f64] = &[64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    name: String,
    dimension: String,
}

/// What the worker's exit summary reads back: the crate's histograms keep their sums and counts
/// to themselves (outside its test feature).
#[derive(Debug, Default)]
struct Totals {
    model_calls: AtomicU64,
    padded_tokens: AtomicU64,
    /// Indexed by `Stage as usize`.
    stage_micros: [AtomicU64; 3],
}

type StageHistograms = Family<StageLabel, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    embedded: Counter,
    written: Counter,
    superseded: Counter,
    unchanged: Counter,
    under_replicated: Counter,
    deleted: Counter,
    acked: Counter,
    dead_letters_trimmed: Counter,
    leases_renewed: Counter,
    leases_lost: Counter,
    dead_lettered: Family<ReasonLabel, Counter>,
    /// All reasons together (the family cannot be summed without knowing every label).
    dead_lettered_total: AtomicU64,
    errors: Family<KindLabel, Counter>,
    batch_docs: Histogram,
    batch_padded_tokens: Histogram,
    stages: StageHistograms,
    indexing_delay: Histogram,
    stream_lag: Gauge,
    group_pending: Gauge,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    /// The resident set size last reported, in bytes (see `resident_memory`).
    resident: Gauge,
    model: Family<ModelLabels, Gauge>,
    index: IndexGauges,
    totals: Totals,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("embed_worker");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let embedded = counter(
            "documents_embedded",
            "Documents turned into vectors by the model (a document is counted again if it is redelivered)",
        );
        let written = counter(
            "documents_written",
            "Document versions Redis stored: the whole document replaced by the entry's fields and vector",
        );
        let superseded = counter(
            "documents_superseded",
            "Upserts and deletes not applied because a newer version of the document was stored, tombstoned, or came later in the same read; acked",
        );
        let unchanged = counter(
            "documents_unchanged",
            "Upserts whose text and model equal the stored document's: fields and version replaced, vectors kept, no model run; acked",
        );
        let under_replicated = counter(
            "under_replicated_writes",
            "Batches acked with fewer replicas than redis.wait_replicas on some primary, because that primary has no more replicas (e.g. its replica was promoted)",
        );
        let deleted = counter(
            "documents_deleted",
            "Deletes applied: the document removed (or already absent) and a tombstone written",
        );
        let acked = counter(
            "documents_acked",
            "Stream entries acknowledged (XACK) once done: written, deleted, superseded, or already applied. Dead letters are acked too but counted only in embed_worker_dead_letters_total, so every entry handled is acked_total + dead_letters_total",
        );
        let dead_letters_trimmed = counter(
            "dead_letters_trimmed",
            "Dead letters removed from the dead-letter stream by its cap (stream.dead_letter_maxlen), estimated from XLEN before and after the XADDs (in the same pipeline)",
        );
        let leases_renewed = counter(
            "leases_renewed",
            "Renewals of held entries (XCLAIM JUSTID resets their idle time, so no other worker reclaims them); one per entry per renewal",
        );
        let leases_lost = counter(
            "leases_lost",
            "Entries this worker still held that another consumer had already reclaimed (this worker was cut off from Redis or stalled past claim_idle); not renewed, so the work is done twice, never lost",
        );
        let dead_lettered = Family::<ReasonLabel, Counter>::default();
        // Series that exist from the start at 0, so `rate()` and alerts see them before the
        // first event.
        for reason in crate::pipeline::reason::DeadReason::ALL {
            let _ = dead_lettered.get_or_create(&ReasonLabel {
                reason: reason.as_str().to_string(),
            });
        }
        registry.register(
            "dead_letters",
            "Entries copied to the dead-letter stream and then acked, by reason (missing_text, model_error, ...)",
            dead_lettered.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        for kind in ["model", "redis"] {
            let _ = errors.get_or_create(&KindLabel {
                kind: kind.to_string(),
            });
        }
        registry.register(
            "errors",
            "Handled errors by kind: redis (connection or command failed; retried with back-off), model (a batch failed; split to isolate the document)",
            errors.clone(),
        );
        let batch_docs = Histogram::new(BATCH_DOCUMENTS.iter().copied());
        registry.register(
            "batch_documents",
            "Documents per model call",
            batch_docs.clone(),
        );
        let batch_padded_tokens = Histogram::new(BATCH_PADDED_TOKENS.iter().copied());
        registry.register(
            "batch_padded_tokens",
            "Padded tokens (docs x longest) per model call",
            batch_padded_tokens.clone(),
        );
        let stages: StageHistograms =
            Family::new_with_constructor(|| Histogram::new(SECONDS.iter().copied()));
        for stage in Stage::ALL {
            let _ = stages.get_or_create(&StageLabel {
                stage: stage.as_str(),
            });
        }
        registry.register(
            "stage_duration_seconds",
            "Time per batch in each stage",
            stages.clone(),
        );
        let indexing_delay = Histogram::new(DELAY_SECONDS.iter().copied());
        registry.register(
            "indexing_delay_seconds",
            "Time from an entry's XADD (the milliseconds in its ID, on the Redis server's clock) to its XACK (on this host's clock, so clock skew shifts it; clamped at 0), one observation per acked entry, dead letters included. A redelivered entry counts from its first XADD",
            indexing_delay.clone(),
        );
        let stream_lag = Gauge::default();
        registry.register(
            "stream_lag",
            "Entries in the stream not yet delivered to the consumer group (XINFO GROUPS lag, refreshed every second)",
            stream_lag.clone(),
        );
        let group_pending = Gauge::default();
        registry.register(
            "group_pending",
            "Entries delivered to the consumer group and not yet acknowledged, all consumers together (XINFO GROUPS pending, refreshed every second)",
            group_pending.clone(),
        );
        let oldest_pending_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the group's oldest pending entry (delivered, not yet acked, any consumer): now on this host minus the milliseconds in its ID (XPENDING summary, refreshed every second); 0 when nothing is pending",
            oldest_pending_age.clone(),
        );
        let resident = Gauge::default();
        registry.register(
            "resident_memory_bytes",
            "Resident set size of this process (VmRSS), read at each scrape and reported again only when it has moved by 1 MiB or more; 0 where /proc/self/status cannot be read",
            resident.clone(),
        );
        let model = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "model_info",
            "The model in use: name and embedding dimension as labels, value always 1",
            model.clone(),
        );
        let index = IndexGauges::register(&mut registry);
        Self {
            registry,
            embedded,
            written,
            superseded,
            unchanged,
            under_replicated,
            deleted,
            acked,
            dead_letters_trimmed,
            leases_renewed,
            leases_lost,
            dead_lettered,
            dead_lettered_total: AtomicU64::new(0),
            errors,
            batch_docs,
            batch_padded_tokens,
            stages,
            indexing_delay,
            stream_lag,
            group_pending,
            oldest_pending_age,
            resident,
            model,
            index,
            totals: Totals::default(),
        }
    }
}

impl Metrics {
    pub fn embedded(&self, n: usize) {
        self.embedded.inc_by(n as u64);
    }
    pub fn written(&self, n: usize) {
        self.written.inc_by(n as u64);
    }
    pub fn superseded(&self, n: usize) {
        self.superseded.inc_by(n as u64);
    }
    pub fn unchanged(&self, n: usize) {
        self.unchanged.inc_by(n as u64);
    }
    pub fn under_replicated(&self) {
        self.under_replicated.inc();
    }
    pub fn deleted(&self, n: usize) {
        self.deleted.inc_by(n as u64);
    }
    pub fn acked(&self, n: usize) {
        self.acked.inc_by(n as u64);
    }
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
        self.dead_lettered_total.fetch_add(1, Ordering::Relaxed);
    }
    /// Dead letters removed by the stream's MAXLEN cap.
    pub fn dead_letters_trimmed(&self, n: u64) {
        self.dead_letters_trimmed.inc_by(n);
    }
    pub fn dead_letters_trimmed_total(&self) -> u64 {
        self.dead_letters_trimmed.get()
    }
    /// Entries whose idle time a renewal reset, and held entries found owned by another consumer.
    pub fn leases(&self, renewed: usize, lost: usize) {
        self.leases_renewed.inc_by(renewed as u64);
        self.leases_lost.inc_by(lost as u64);
    }
    pub fn leases_lost_total(&self) -> u64 {
        self.leases_lost.get()
    }
    /// An error of `kind` ("redis", "model", ...) that was handled (retried or isolated).
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }
    pub fn batch(&self, docs: usize, padded_tokens: usize) {
        self.batch_docs.observe(docs as f64);
        self.batch_padded_tokens.observe(padded_tokens as f64);
        self.totals.model_calls.fetch_add(1, Ordering::Relaxed);
        self.totals
            .padded_tokens
            .fetch_add(padded_tokens as u64, Ordering::Relaxed);
    }
    fn stage_histogram(&self, stage: Stage) -> Histogram {
        self.stages.get_or_create_owned(&StageLabel {
            stage: stage.as_str(),
        })
    }
    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stage_histogram(stage).observe(took.as_secs_f64());
        self.totals.stage_micros[stage as usize]
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
    /// The entries just acked: each one's time since its XADD (the ms in its ID, on the Redis
    /// server's clock) to now on this host's. IDs that are not `<ms>-<seq>` are skipped.
    pub fn indexing_delay(&self, acked_entry_ids: &[String]) {
        self.indexing_delay_at(freshness::now_ms(), acked_entry_ids);
    }
    fn indexing_delay_at(&self, now_ms: u64, acked_entry_ids: &[String]) {
        for age in acked_entry_ids
            .iter()
            .filter_map(|id| freshness::age(now_ms, id))
        {
            self.indexing_delay.observe(age.as_secs_f64());
        }
    }
    /// The age of the group's oldest pending entry (zero when nothing is pending).
    pub fn oldest_pending_age(&self, age: Duration) {
        // From integer milliseconds, so the text is the short decimal ("1.761", not the
        // "1.7610000000000001" of Duration::as_secs_f64) that every parser reads alike.
        self.oldest_pending_age.set(age.as_millis() as f64 / 1e3);
    }
    /// The index's counts, as the probe last read them.
    pub fn index_progress(&self, progress: &IndexProgress) {
        self.index.set(progress);
    }
    pub fn group_state(&self, pending: u64, lag: u64) {
        self.group_pending.set(pending as i64);
        self.stream_lag.set(lag as i64);
    }
    /// The model in use (called once, when it is loaded): the one series of `model_info`.
    pub fn model_info(&self, name: &str, dimension: usize) {
        self.model.clear();
        self.model
            .get_or_create(&ModelLabels {
                name: name.to_string(),
                dimension: dimension.to_string(),
            })
            .set(1);
    }

    /// (model calls, padded tokens fed to the model) so far.
    pub fn batch_totals(&self) -> (u64, u64) {
        (
            self.totals.model_calls.load(Ordering::Relaxed),
            self.totals.padded_tokens.load(Ordering::Relaxed),
        )
    }

    /// Total seconds spent in `stage` so far.
    pub fn stage_seconds(&self, stage: Stage) -> f64 {
        self.totals.stage_micros[stage as usize].load(Ordering::Relaxed) as f64 / 1e6
    }

    pub fn acked_total(&self) -> u64 {
        self.acked.get()
    }
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered_total.load(Ordering::Relaxed)
    }

    /// This process's resident set size as reported: read at each scrape, but moved only when it
    /// differs by at least `RESIDENT_STEP` from the value last reported, so an idle worker's
    /// series stays flat instead of following every page malloc touches.
    fn resident_memory(&self) -> u64 {
        let now = resident_set_bytes().unwrap_or(0);
        let last = self.resident.get() as u64;
        if now.abs_diff(last) >= RESIDENT_STEP || (now == 0) != (last == 0) {
            self.resident.set(now as i64);
            return now;
        }
        last
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.encode(Format::PrometheusText, &[])
    }

    /// Every metric, then those of `more` registries (e.g. readiness, from
    /// [`super::Health::registry`]), in `format`.
    pub fn encode(&self, format: Format, more: &[&Registry]) -> String {
        self.resident_memory();
        let mut out = String::new();
        let written = std::iter::once(&self.registry)
            .chain(more.iter().copied())
            .try_for_each(|r| match format {
                Format::PrometheusText => prometheus_text::encode(&mut out, r),
                Format::OpenMetrics => openmetrics::encode_registry(&mut out, r),
            })
            .and_then(|()| match format {
                Format::PrometheusText => Ok(()),
                Format::OpenMetrics => openmetrics::encode_eof(&mut out),
            });
        written.expect("encoding into a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn counters_and_labels_render_with_their_values() {
        let m = Metrics::default();
        m.embedded(5);
        m.written(5);
        m.acked(4);
        m.dead_lettered("missing_text");
        m.dead_lettered("missing_text");
        m.error("redis");
        m.model_info("all-MiniLM-L6-v2", 384);
        let text = m.render();
        assert_eq!(
            sample(&text, "embed_worker_documents_embedded_total"),
            Some("5")
        );
        assert_eq!(
            sample(&text, "embed_worker_documents_acked_total"),
            Some("4")
        );
        assert_eq!(
            sample(
                &text,
                "embed_worker_dead_letters_total{reason=\"missing_text\"}"
            ),
            Some("2")
        );
        // Declared series exist at 0 before their first event.
        assert_eq!(
            sample(
                &text,
                "embed_worker_dead_letters_total{reason=\"model_error\"}"
            ),
            Some("0")
        );
        assert_eq!(
            sample(&text, "embed_worker_errors_total{kind=\"model\"}"),
            Some("0")
        );
        assert_eq!(
            sample(&text, "embed_worker_errors_total{kind=\"redis\"}"),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "embed_worker_model_info{name=\"all-MiniLM-L6-v2\",dimension=\"384\"}"
            ),
            Some("1")
        );
        assert_eq!(m.dead_lettered_total(), 2);
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        m.batch(3, 300);
        m.batch(32, 4000);
        m.stage(Stage::Model, Duration::from_millis(30));
        let text = m.render();
        let docs = "embed_worker_batch_documents";
        assert_eq!(
            sample(&text, &format!("{docs}_bucket{{le=\"2\"}}")),
            Some("0")
        );
        assert_eq!(
            sample(&text, &format!("{docs}_bucket{{le=\"4\"}}")),
            Some("1")
        );
        assert_eq!(
            sample(&text, &format!("{docs}_bucket{{le=\"32\"}}")),
            Some("2")
        );
        assert_eq!(
            sample(&text, &format!("{docs}_bucket{{le=\"+Inf\"}}")),
            Some("2")
        );
        assert_eq!(sample(&text, &format!("{docs}_sum")), Some("35.0"));
        assert_eq!(sample(&text, &format!("{docs}_count")), Some("2"));
        let stage = "embed_worker_stage_duration_seconds";
        assert_eq!(
            sample(
                &text,
                &format!("{stage}_bucket{{stage=\"model\",le=\"0.025\"}}")
            ),
            Some("0")
        );
        assert_eq!(
            sample(
                &text,
                &format!("{stage}_bucket{{stage=\"model\",le=\"0.05\"}}")
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, &format!("{stage}_count{{stage=\"model\"}}")),
            Some("1")
        );
        assert_eq!(
            sample(&text, &format!("{stage}_count{{stage=\"write\"}}")),
            Some("0")
        );
    }

    #[test]
    fn indexing_delay_counts_each_acked_id_by_its_age_and_the_oldest_pending_age_is_a_gauge() {
        let m = Metrics::default();
        let delay = "embed_worker_indexing_delay_seconds";
        let age = "embed_worker_oldest_pending_age_seconds";
        // Before anything: every bucket at 0, the gauge at 0.
        let text = m.render();
        assert_eq!(
            sample(&text, &format!("{delay}_bucket{{le=\"0.01\"}}")),
            Some("0")
        );
        assert_eq!(
            sample(&text, &format!("{delay}_bucket{{le=\"600\"}}")),
            Some("0")
        );
        assert_eq!(sample(&text, &format!("{delay}_count")), Some("0"));
        assert_eq!(sample(&text, age), Some("0.0"));

        let now = 1_700_000_100_000;
        m.indexing_delay_at(
            now,
            &[
                "1700000099995-0".to_string(), // 5 ms
                "1700000099700-3".to_string(), // 300 ms
                "1700000040000-0".to_string(), // 60 s
                "1700000200000-0".to_string(), // Redis's clock ahead: 0
                "not-an-id".to_string(),       // skipped
            ],
        );
        m.oldest_pending_age(Duration::from_millis(12_345));
        let text = m.render();
        let bucket = |le: &str| sample(&text, &format!("{delay}_bucket{{le=\"{le}\"}}"));
        assert_eq!(bucket("0.01"), Some("2"));
        assert_eq!(bucket("0.25"), Some("2"));
        assert_eq!(bucket("0.5"), Some("3"));
        assert_eq!(bucket("30"), Some("3"));
        assert_eq!(bucket("60"), Some("4"));
        assert_eq!(bucket("600"), Some("4"));
        assert_eq!(bucket("+Inf"), Some("4"));
        assert_eq!(sample(&text, &format!("{delay}_count")), Some("4"));
        assert_eq!(sample(&text, &format!("{delay}_sum")), Some("60.305"));
        assert!(text.contains(&format!("# TYPE {delay} histogram\n")));
        assert_eq!(sample(&text, age), Some("12.345"));
        assert!(text.contains(&format!("# TYPE {age} gauge\n")));
        m.oldest_pending_age(Duration::from_millis(1_761));
        assert_eq!(sample(&m.render(), age), Some("1.761"));
        m.oldest_pending_age(Duration::ZERO);
        assert_eq!(sample(&m.render(), age), Some("0.0"));

        // The public form reads the clock: an ID from 2 s ago lands between 1 and 10 s.
        let m = Metrics::default();
        let two_seconds_ago = format!("{}-0", freshness::now_ms() - 2_000);
        m.indexing_delay(&[two_seconds_ago]);
        let text = m.render();
        assert_eq!(
            sample(&text, &format!("{delay}_bucket{{le=\"1\"}}")),
            Some("0")
        );
        assert_eq!(
            sample(&text, &format!("{delay}_bucket{{le=\"10\"}}")),
            Some("1")
        );
    }

    #[test]
    fn resident_memory_is_this_process_to_the_nearest_mib() {
        let m = Metrics::default();
        let reported: u64 = sample(&m.render(), "embed_worker_resident_memory_bytes")
            .unwrap()
            .parse()
            .unwrap();
        let actual = resident_set_bytes().expect("Linux: /proc/self/status has VmRSS");
        assert!(
            reported > 0 && reported.abs_diff(actual) < 64 << 20,
            "{reported} vs {actual}"
        );
        // Below the step, the value reported stays put.
        m.resident.set((actual + RESIDENT_STEP / 2) as i64);
        assert_eq!(m.resident_memory(), actual + RESIDENT_STEP / 2);
        m.resident.set((actual + 4 * RESIDENT_STEP) as i64);
        assert!(m.resident_memory().abs_diff(actual) < RESIDENT_STEP * 2);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.model_info("a\"b\\c\nd", 1);
        assert!(m
            .render()
            .contains(r#"embed_worker_model_info{name="a\"b\\c\nd",dimension="1"} 1"#));
    }
}
