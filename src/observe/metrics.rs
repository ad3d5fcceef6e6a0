//! Prometheus metrics (prefix `embed_worker_`), kept as atomics and rendered as text format.
//! Hand-rolled on purpose: a dozen series, no registry crate, no global state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::freshness;

/// Counters by a label value (reason, kind, stage).
#[derive(Debug, Default)]
struct Labeled(Mutex<BTreeMap<String, u64>>);

impl Labeled {
    /// Series that exist from the start at 0, so `rate()` and alerts see them before the first event.
    fn declared(labels: &[&str]) -> Self {
        Self(Mutex::new(
            labels.iter().map(|l| (l.to_string(), 0)).collect(),
        ))
    }
    fn add(&self, label: &str, n: u64) {
        let mut map = self
            .0
            .lock()
            .expect("metrics lock is never held across a panic");
        *map.entry(label.to_string()).or_default() += n;
    }
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .expect("metrics lock is never held across a panic")
            .clone()
    }
}

/// A histogram with fixed upper bounds.
#[derive(Debug)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    // Sum in micro-units so it stays an integer atomic.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
    fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// The stages whose durations are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tokenize,
    Model,
    Write,
}

impl Stage {
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

#[derive(Debug)]
pub struct Metrics {
    embedded: AtomicU64,
    written: AtomicU64,
    superseded: AtomicU64,
    deleted: AtomicU64,
    acked: AtomicU64,
    dead_lettered: Labeled,
    dead_letters_trimmed: AtomicU64,
    leases_renewed: AtomicU64,
    leases_lost: AtomicU64,
    errors: Labeled,
    batch_docs: Histogram,
    batch_padded_tokens: Histogram,
    stage_tokenize: Histogram,
    stage_model: Histogram,
    stage_write: Histogram,
    indexing_delay: Histogram,
    stream_lag: AtomicU64,
    group_pending: AtomicU64,
    /// Milliseconds (entry IDs have no finer grain), rendered as seconds.
    oldest_pending_age_ms: AtomicU64,
    /// The resident set size last reported, in bytes (see `resident_memory`).
    resident_bytes: AtomicU64,
    model: Mutex<(String, usize)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            embedded: AtomicU64::new(0),
            written: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            dead_letters_trimmed: AtomicU64::new(0),
            leases_renewed: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            dead_lettered: Labeled::declared(
                &crate::pipeline::entry::DeadReason::ALL.map(|r| r.as_str()),
            ),
            errors: Labeled::declared(&["model", "redis"]),
            batch_docs: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            batch_padded_tokens: Histogram::new(&[
                64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
            ]),
            stage_tokenize: Histogram::new(SECONDS),
            stage_model: Histogram::new(SECONDS),
            stage_write: Histogram::new(SECONDS),
            indexing_delay: Histogram::new(DELAY_SECONDS),
            stream_lag: AtomicU64::new(0),
            group_pending: AtomicU64::new(0),
            oldest_pending_age_ms: AtomicU64::new(0),
            resident_bytes: AtomicU64::new(0),
            model: Mutex::new((String::new(), 0)),
        }
    }
}

impl Metrics {
    pub fn embedded(&self, n: usize) {
        self.embedded.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn written(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn superseded(&self, n: usize) {
        self.superseded.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn deleted(&self, n: usize) {
        self.deleted.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn acked(&self, n: usize) {
        self.acked.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered.add(reason, 1);
    }
    /// An error of `kind` ("redis", "model", ...) that was handled (retried or isolated).
    /// Dead letters removed by the stream's MAXLEN cap.
    pub fn dead_letters_trimmed(&self, n: u64) {
        self.dead_letters_trimmed.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dead_letters_trimmed_total(&self) -> u64 {
        self.dead_letters_trimmed.load(Ordering::Relaxed)
    }
    /// Entries whose idle time a renewal reset, and held entries found owned by another consumer.
    pub fn leases(&self, renewed: usize, lost: usize) {
        self.leases_renewed
            .fetch_add(renewed as u64, Ordering::Relaxed);
        self.leases_lost.fetch_add(lost as u64, Ordering::Relaxed);
    }
    pub fn leases_lost_total(&self) -> u64 {
        self.leases_lost.load(Ordering::Relaxed)
    }
    pub fn error(&self, kind: &str) {
        self.errors.add(kind, 1);
    }
    pub fn batch(&self, docs: usize, padded_tokens: usize) {
        self.batch_docs.observe(docs as f64);
        self.batch_padded_tokens.observe(padded_tokens as f64);
    }
    fn stage_histogram(&self, stage: Stage) -> &Histogram {
        match stage {
            Stage::Tokenize => &self.stage_tokenize,
            Stage::Model => &self.stage_model,
            Stage::Write => &self.stage_write,
        }
    }
    pub fn stage(&self, stage: Stage, took: Duration) {
        self.stage_histogram(stage).observe(took.as_secs_f64());
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
        self.oldest_pending_age_ms
            .store(age.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn group_state(&self, pending: u64, lag: u64) {
        self.group_pending.store(pending, Ordering::Relaxed);
        self.stream_lag.store(lag, Ordering::Relaxed);
    }
    pub fn model_info(&self, name: &str, dimension: usize) {
        *self
            .model
            .lock()
            .expect("metrics lock is never held across a panic") = (name.to_string(), dimension);
    }

    /// (model calls, padded tokens fed to the model) so far.
    pub fn batch_totals(&self) -> (u64, u64) {
        let h = &self.batch_padded_tokens;
        (
            h.count.load(Ordering::Relaxed),
            h.sum_micros.load(Ordering::Relaxed) / 1_000_000,
        )
    }

    /// Total seconds spent in `stage` so far.
    pub fn stage_seconds(&self, stage: Stage) -> f64 {
        self.stage_histogram(stage)
            .sum_micros
            .load(Ordering::Relaxed) as f64
            / 1e6
    }

    pub fn acked_total(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.snapshot().values().sum()
    }

    /// This process's resident set size as reported: read at each scrape, but moved only when it
    /// differs by at least `RESIDENT_STEP` from the value last reported, so an idle worker's
    /// series stays flat instead of following every page malloc touches.
    fn resident_memory(&self) -> u64 {
        let now = resident_set_bytes().unwrap_or(0);
        let last = self.resident_bytes.load(Ordering::Relaxed);
        if now.abs_diff(last) >= RESIDENT_STEP || (now == 0) != (last == 0) {
            self.resident_bytes.store(now, Ordering::Relaxed);
            return now;
        }
        last
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP embed_worker_{name} {help}\n# TYPE embed_worker_{name} counter\nembed_worker_{name} {v}");
        };
        counter(
            &mut out,
            "documents_embedded_total",
            "Documents turned into vectors by the model (a document is counted again if it is redelivered).",
            self.embedded.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "documents_written_total",
            "Document versions Redis stored: the whole document replaced by the entry's fields and vector.",
            self.written.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "documents_superseded_total",
            "Upserts and deletes not applied because a newer version of the document was stored, tombstoned, or came later in the same read; acked.",
            self.superseded.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "documents_deleted_total",
            "Deletes applied: the document removed (or already absent) and a tombstone written.",
            self.deleted.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "documents_acked_total",
            "Stream entries acknowledged (XACK) once done: written, deleted, superseded, or already applied. Dead letters are acked too but counted only in embed_worker_dead_letters_total, so every entry handled is acked_total + dead_letters_total.",
            self.acked.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "dead_letters_trimmed_total",
            "Dead letters removed from the dead-letter stream by its cap (stream.dead_letter_maxlen), estimated from XLEN before and after the XADDs (in the same pipeline).",
            self.dead_letters_trimmed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leases_renewed_total",
            "Renewals of held entries (XCLAIM JUSTID resets their idle time, so no other worker reclaims them); one per entry per renewal.",
            self.leases_renewed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leases_lost_total",
            "Entries this worker still held that another consumer had already reclaimed (this worker was cut off from Redis or stalled past claim_idle); not renewed, so the work is done twice, never lost.",
            self.leases_lost.load(Ordering::Relaxed),
        );
        for (name, help, labeled, label) in [
            (
                "dead_letters_total",
                "Entries copied to the dead-letter stream and then acked, by reason (missing_text, model_error, ...).",
                &self.dead_lettered,
                "reason",
            ),
            (
                "errors_total",
                "Handled errors by kind: redis (connection or command failed; retried with back-off), model (a batch failed; split to isolate the document).",
                &self.errors,
                "kind",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP embed_worker_{name} {help}\n# TYPE embed_worker_{name} counter"
            );
            for (value, n) in labeled.snapshot() {
                let _ = writeln!(
                    out,
                    "embed_worker_{name}{{{label}=\"{}\"}} {n}",
                    escape(&value)
                );
            }
        }
        let _ = writeln!(out, "# HELP embed_worker_batch_documents Documents per model call.\n# TYPE embed_worker_batch_documents histogram");
        self.batch_docs
            .render(&mut out, "embed_worker_batch_documents", "");
        let _ = writeln!(out, "# HELP embed_worker_batch_padded_tokens Padded tokens (docs x longest) per model call.\n# TYPE embed_worker_batch_padded_tokens histogram");
        self.batch_padded_tokens
            .render(&mut out, "embed_worker_batch_padded_tokens", "");
        let _ = writeln!(out, "# HELP embed_worker_stage_duration_seconds Time per batch in each stage.\n# TYPE embed_worker_stage_duration_seconds histogram");
        for (stage, h) in [
            (Stage::Tokenize, &self.stage_tokenize),
            (Stage::Model, &self.stage_model),
            (Stage::Write, &self.stage_write),
        ] {
            h.render(
                &mut out,
                "embed_worker_stage_duration_seconds",
                &format!("stage=\"{}\"", stage.as_str()),
            );
        }
        let _ = writeln!(out, "# HELP embed_worker_indexing_delay_seconds Time from an entry's XADD (the milliseconds in its ID, on the Redis server's clock) to its XACK (on this host's clock, so clock skew shifts it; clamped at 0), one observation per acked entry, dead letters included. A redelivered entry counts from its first XADD.\n# TYPE embed_worker_indexing_delay_seconds histogram");
        self.indexing_delay
            .render(&mut out, "embed_worker_indexing_delay_seconds", "");
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP embed_worker_{name} {help}\n# TYPE embed_worker_{name} gauge\nembed_worker_{name} {v}");
        };
        gauge(
            &mut out,
            "stream_lag",
            "Entries in the stream not yet delivered to the consumer group (XINFO GROUPS lag, refreshed every second).",
            self.stream_lag.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "group_pending",
            "Entries delivered to the consumer group and not yet acknowledged, all consumers together (XINFO GROUPS pending, refreshed every second).",
            self.group_pending.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP embed_worker_oldest_pending_age_seconds Age of the group's oldest pending entry (delivered, not yet acked, any consumer): now on this host minus the milliseconds in its ID (XPENDING summary, refreshed every second); 0 when nothing is pending.\n# TYPE embed_worker_oldest_pending_age_seconds gauge\nembed_worker_oldest_pending_age_seconds {}",
            // From integer milliseconds, so the text is the short decimal ("1.761", not the
            // "1.7610000000000001" of Duration::as_secs_f64) that every parser reads alike.
            self.oldest_pending_age_ms.load(Ordering::Relaxed) as f64 / 1e3
        );
        gauge(
            &mut out,
            "resident_memory_bytes",
            "Resident set size of this process (VmRSS), read at each scrape and reported again only when it has moved by 1 MiB or more; 0 where /proc/self/status cannot be read.",
            self.resident_memory(),
        );
        let (name, dim) = self
            .model
            .lock()
            .expect("metrics lock is never held across a panic")
            .clone();
        let _ = writeln!(
            out,
            "# HELP embed_worker_model_info The model in use: name and embedding dimension as labels, value always 1.\n# TYPE embed_worker_model_info gauge\nembed_worker_model_info{{name=\"{}\",dimension=\"{dim}\"}} 1",
            escape(&name)
        );
        out
    }
}

/// The resident-memory gauge's resolution (1 MiB): far below what a dashboard or an alert on a
/// ~300 MB worker looks at, far above an idle process's page-level noise.
const RESIDENT_STEP: u64 = 1 << 20;

/// VmRSS from /proc/self/status (Linux), in bytes.
fn resident_set_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        assert_eq!(sample(&text, &format!("{docs}_sum")), Some("35"));
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
        assert_eq!(sample(&text, age), Some("0"));

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
        assert_eq!(sample(&m.render(), age), Some("0"));

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
        m.resident_bytes
            .store(actual + RESIDENT_STEP / 2, Ordering::Relaxed);
        assert_eq!(m.resident_memory(), actual + RESIDENT_STEP / 2);
        m.resident_bytes
            .store(actual + 4 * RESIDENT_STEP, Ordering::Relaxed);
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
