//! Configuration: `config/default.toml`, then an optional `--config FILE`, then
//! `EMBED_WORKER__SECTION__KEY` environment variables. Every key is documented in
//! `config/default.toml`; unknown keys are an error, so a typo never becomes a silent default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod validate;

/// The built-in defaults, so the binary works from any directory.
const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub redis: RedisSettings,
    pub stream: StreamSettings,
    pub index: IndexSettings,
    pub chunk: ChunkSettings,
    pub model: ModelSettings,
    pub batch: BatchSettings,
    pub worker: WorkerSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL: redis:// or rediss:// (TLS).
    pub url: String,
    /// ACL user; empty = the URL's user or "default".
    pub username: String,
    /// Password; empty = the URL's or none. Wrapped so it never reaches a log line.
    pub password: Secret,
    /// CA bundle (PEM) for rediss://; empty = system roots.
    pub tls_ca_file: String,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert_file: String,
    /// Client key (PEM) for mutual TLS.
    pub tls_key_file: String,
    /// Limit on one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit on one command round trip.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// First reconnect delay after a transient error.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Cap of the exponential reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// One server or a Redis Cluster: detected from the URL's server, or forced.
    pub cluster: ClusterMode,
    /// Replicas that must hold a batch's document writes before its entries are acked (WAIT);
    /// 0 = ack once the primary has them.
    pub wait_replicas: u32,
    /// How long one WAIT may take; a shortfall is retried, never acked.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
}

/// `redis.cluster`: "auto" asks the server (INFO cluster), `true` and `false` force it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMode {
    Auto,
    Cluster,
    Single,
}

impl<'de> Deserialize<'de> for ClusterMode {
    /// A string or a boolean: environment values are parsed, so `true` arrives as a bool.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(ClusterMode::Cluster),
            Raw::Bool(false) => Ok(ClusterMode::Single),
            Raw::Text(t) => match t.to_lowercase().as_str() {
                "auto" => Ok(ClusterMode::Auto),
                "true" => Ok(ClusterMode::Cluster),
                "false" => Ok(ClusterMode::Single),
                other => Err(serde::de::Error::custom(format!(
                    "redis.cluster must be \"auto\", true or false, got {other:?}"
                ))),
            },
        }
    }
}

/// Most stream shards.
pub const MAX_SHARDS: u32 = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Stream producers XADD to; with `shards` > 1, the stem of the shards' keys.
    pub name: String,
    /// Streams the documents are spread over (CRC32 of the id mod shards); 1 = `name` alone.
    pub shards: u32,
    /// Consumer group shared by all workers.
    pub group: String,
    /// This worker's consumer name; empty = "<hostname>-<pid>".
    pub consumer: String,
    /// Field carrying the text.
    pub text_field: String,
    /// Field carrying the document id.
    pub id_field: String,
    /// Field carrying the operation: "upsert" (also when absent) or "delete".
    pub op_field: String,
    /// Field carrying an optional producer version (a non-negative integer); the highest wins.
    pub version_field: String,
    /// Most entries per XREADGROUP.
    pub read_count: usize,
    /// Tokens' worth of entries per XREADGROUP (estimated from recent documents' mean length).
    pub read_tokens: usize,
    /// XREADGROUP BLOCK time.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Pending entries idle longer than this are reclaimed from their (presumed dead) consumer.
    /// A live worker renews the entries it holds every third of this, so it is the failover
    /// time of a dead worker, not a bound on how long a batch may take.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// How often to look for such entries.
    #[serde(with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Idle consumers owning nothing are deleted after this long.
    #[serde(with = "humantime_serde")]
    pub consumer_idle_delete: Duration,
    /// Deliveries after which an entry is dead-lettered.
    pub max_deliveries: u64,
    /// Dead-letter stream; empty = "<name>:dead".
    pub dead_letter_stream: String,
    /// Approximate cap of the dead-letter stream in entries (XADD MAXLEN ~); 0 = no cap.
    pub dead_letter_maxlen: u64,
    /// Most bytes of entries one read may bring in (several XREADGROUPs of at most
    /// `read_bytes / max_entry_bytes` entries each).
    pub read_bytes: usize,
    /// Largest accepted entry, in bytes (field names and values); larger ones are dead-lettered.
    pub max_entry_bytes: usize,
    /// Longest accepted text, in bytes.
    pub max_text_bytes: usize,
    /// Longest accepted document id, in bytes.
    pub max_id_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSettings {
    /// FT index name.
    pub name: String,
    /// How each document is stored: a hash, or a RedisJSON document.
    pub storage: Storage,
    /// Hash key prefix.
    pub prefix: String,
    /// Hash field receiving the vector bytes.
    pub vector_field: String,
    /// "HNSW" or "FLAT".
    pub algorithm: String,
    /// "L2", "COSINE" or "IP".
    pub distance_metric: String,
    /// HNSW M.
    pub m: u32,
    /// HNSW EF_CONSTRUCTION.
    pub ef_construction: u32,
    /// Other schema fields, "NAME TYPE [options]".
    pub schema: Vec<String>,
    /// Key prefix of delete tombstones (outside `prefix`, so never indexed).
    pub tombstone_prefix: String,
    /// How long a tombstone keeps an older upsert that arrives late from bringing a deleted
    /// document back.
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkSettings {
    /// "tokens" (long texts are cut into chunks, each its own vector) or "none" (truncated).
    pub strategy: ChunkStrategy,
    /// Tokens per chunk, counting the model's [CLS] and [SEP]; at most its max_seq_length.
    pub size: usize,
    /// Tokens two consecutive chunks share.
    pub overlap: usize,
    /// Most chunks per document; a longer document is dead-lettered (too_many_chunks).
    pub max_chunks: usize,
    /// TAG field holding the parent document's id in each chunk of a multi-chunk document.
    pub parent_field: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// A hash per document (and per chunk): fields as given, the vector as float32 bytes.
    Hash,
    /// A RedisJSON document per document (and per chunk): fields as JSON strings (numbers for
    /// the schema's NUMERIC fields), the vector as an array of numbers.
    Json,
}

impl IndexSettings {
    /// The schema's NUMERIC fields (stored as JSON numbers, and checked as numbers).
    pub fn numeric_fields(&self) -> Vec<String> {
        self.schema
            .iter()
            .filter_map(|f| {
                let mut words = f.split_whitespace();
                let name = words.next()?;
                words
                    .next()
                    .filter(|t| t.eq_ignore_ascii_case("NUMERIC"))
                    .map(|_| name.to_string())
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkStrategy {
    Tokens,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Directory with the ONNX file, tokenizer.json and embedding.json.
    pub dir: PathBuf,
    /// ONNX file name inside `dir`.
    pub file: String,
    /// libonnxruntime.so path; empty = $ORT_DYLIB_PATH.
    pub ort_library: String,
    /// ORT intra-op threads; 0 = CPUs available to this process.
    pub intra_threads: usize,
    /// Let ORT's idle intra-op threads spin between operators (lower latency per call, but
    /// they burn the CPU the tokeniser and the Redis I/O need on a small quota).
    pub intra_spinning: bool,
    /// ORT graph optimisation level: "disable", "basic", "extended" or "all".
    pub optimization: String,
    /// Longest one model call may run before the model thread counts as stuck: the worker then
    /// stops renewing its entries, turns unready and exits non-zero.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Most documents per model call.
    pub max_docs: usize,
    /// Most padded tokens per model call.
    pub max_tokens: usize,
    /// Longest wait for batch-mates.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Time allowed after SIGTERM to finish the batch in hand.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// An upsert whose text (and chunking rule) and model equal the stored document's skips the
    /// model: its fields and version are replaced, its vectors kept.
    pub skip_unchanged: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Metrics/health listen address; empty disables it.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// "human" or "json".
    pub format: String,
    /// tracing filter directive.
    pub level: String,
}

/// A string that never prints itself.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl Settings {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::Invalid(format!(
                    "config file {} not found",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env_map = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("EMBED_WORKER__"))
            .collect::<std::collections::HashMap<_, _>>();
        builder = builder.add_source(
            config::Environment::with_prefix("EMBED_WORKER")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("index.schema")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// The TAG field of a chunk's parent id while chunking is on.
    pub fn parent_field(&self) -> Option<&str> {
        (self.chunk.strategy == ChunkStrategy::Tokens).then_some(self.chunk.parent_field.as_str())
    }

    /// The consumer name: configured, or "<hostname>-<pid>".
    pub fn consumer_name(&self) -> String {
        if !self.stream.consumer.is_empty() {
            return self.stream.consumer.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    }

    /// The dead-letter stream: configured, or "<stream>:dead".
    pub fn dead_letter_stream(&self) -> String {
        if self.stream.dead_letter_stream.is_empty() {
            format!("{}:dead", self.stream.name)
        } else {
            self.stream.dead_letter_stream.clone()
        }
    }

    /// How often a worker renews the entries it holds: a third of `claim_idle`, so two
    /// renewals can fail (a slow round trip, a short outage) before anyone may reclaim them.
    pub fn lease_renew_interval(&self) -> Duration {
        self.stream.claim_idle / 3
    }

    /// The ONNX file to load.
    pub fn model_path(&self) -> PathBuf {
        self.model.dir.join(&self.model.file)
    }
}

/// A URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_reproduce_the_docs_page() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.stream.name, "embed:docs");
        assert_eq!(s.stream.group, "embedders");
        assert_eq!(s.index.name, "vector_idx");
        assert_eq!(s.index.prefix, "doc:");
        assert_eq!(s.index.schema, vec!["content TEXT", "genre TAG"]);
        assert_eq!(s.dead_letter_stream(), "embed:docs:dead");
        assert_eq!(s.stream.claim_idle, Duration::from_secs(15));
        assert_eq!(s.stream.dead_letter_maxlen, 100_000);
        assert_eq!(s.model.timeout, Duration::from_secs(30));
    }

    #[test]
    fn environment_overrides_every_section() {
        let s = Settings::load_from(
            None,
            env(&[
                ("EMBED_WORKER__REDIS__URL", "redis://10.0.0.1:7000"),
                ("EMBED_WORKER__REDIS__PASSWORD", "hunter2"),
                ("EMBED_WORKER__STREAM__CLAIM_IDLE", "5s"),
                ("EMBED_WORKER__STREAM__MAX_DELIVERIES", "3"),
                ("EMBED_WORKER__INDEX__SCHEMA", "title TEXT,lang TAG"),
                ("EMBED_WORKER__BATCH__MAX_DOCS", "8"),
                ("EMBED_WORKER__MODEL__FILE", "model_int8.onnx"),
                ("EMBED_WORKER__HTTP__LISTEN", ""),
            ]),
        )
        .unwrap();
        assert_eq!(s.redis.url, "redis://10.0.0.1:7000");
        assert_eq!(s.redis.password.expose(), "hunter2");
        assert_eq!(s.stream.claim_idle, Duration::from_secs(5));
        assert_eq!(s.stream.max_deliveries, 3);
        assert_eq!(s.index.schema, vec!["title TEXT", "lang TAG"]);
        assert_eq!(s.batch.max_docs, 8);
        assert_eq!(s.model.file, "model_int8.onnx");
        assert_eq!(s.http.listen, "");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Settings::load_from(None, env(&[("EMBED_WORKER__STREAM__NAEM", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("naem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[batch]\nmax_dcos = 3\n").unwrap();
        let err = Settings::load_from(Some(&file), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_dcos"), "{err}");
    }

    #[test]
    fn file_layer_sits_between_defaults_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[stream]\nname = \"from-file\"\ngroup = \"g\"\n").unwrap();
        let s = Settings::load_from(Some(&file), env(&[("EMBED_WORKER__STREAM__GROUP", "env")]))
            .unwrap();
        assert_eq!(s.stream.name, "from-file");
        assert_eq!(s.stream.group, "env");
        let missing = Settings::load_from(Some(&dir.path().join("nope.toml")), env(&[]));
        assert!(missing.unwrap_err().to_string().contains("nope.toml"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::load_from(None, env(&[("EMBED_WORKER__REDIS__PASSWORD", "hunter2")]))
            .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(redact_url("redis://u:hunter2@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = Settings::load_from(
            None,
            env(&[("EMBED_WORKER__INDEX__DISTANCE_METRIC", "manhattan")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("distance_metric"), "{err}");
        let err = Settings::load_from(None, env(&[("EMBED_WORKER__MODEL__OPTIMIZATION", "max")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.optimization"), "{err}");
    }
}
