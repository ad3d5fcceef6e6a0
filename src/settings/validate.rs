//! The checks on loaded settings beyond their types: ranges, URL schemes, names that must not
//! collide, the index schema's entries. Each refusal names the key and what it must be.

use std::time::Duration;

use super::{redact_url, ChunkStrategy, Settings, SettingsError, MAX_SHARDS};

impl Settings {
    /// Every check a value needs beyond its type, each refusal naming the key and the rule.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let bad = |msg: String| Err(SettingsError::Invalid(msg));
        if !(self.redis.url.starts_with("redis://") || self.redis.url.starts_with("rediss://")) {
            return bad(format!(
                "redis.url must start with redis:// or rediss://, got {:?}",
                redact_url(&self.redis.url)
            ));
        }
        if self.stream.shards == 0 || self.stream.shards > MAX_SHARDS {
            return bad(format!(
                "stream.shards must be 1 to {MAX_SHARDS}, got {}",
                self.stream.shards
            ));
        }
        if self.stream.shards > 1 && self.stream.name.contains('{') {
            return bad(format!(
                "stream.name {:?} holds a hash tag; with stream.shards > 1 each shard's key gets its own",
                self.stream.name
            ));
        }
        if self.redis.wait_replicas > 0 && self.redis.wait_timeout.is_zero() {
            return bad("redis.wait_timeout must be > 0 when redis.wait_replicas is set (0 would block forever)".into());
        }
        if self.redis.tls_cert_file.is_empty() != self.redis.tls_key_file.is_empty() {
            return bad("redis.tls_cert_file and redis.tls_key_file go together".into());
        }
        for (name, value) in [
            ("stream.name", &self.stream.name),
            ("stream.group", &self.stream.group),
            ("stream.text_field", &self.stream.text_field),
            ("stream.id_field", &self.stream.id_field),
            ("stream.op_field", &self.stream.op_field),
            ("stream.version_field", &self.stream.version_field),
            ("index.tombstone_prefix", &self.index.tombstone_prefix),
            ("index.name", &self.index.name),
            ("index.vector_field", &self.index.vector_field),
        ] {
            if value.trim().is_empty() {
                return bad(format!("{name} must not be empty"));
            }
        }
        if !["HNSW", "FLAT"].contains(&self.index.algorithm.to_uppercase().as_str()) {
            return bad(format!(
                "index.algorithm must be HNSW or FLAT, got {:?}",
                self.index.algorithm
            ));
        }
        if !["L2", "COSINE", "IP"].contains(&self.index.distance_metric.to_uppercase().as_str()) {
            return bad(format!(
                "index.distance_metric must be L2, COSINE or IP, got {:?}",
                self.index.distance_metric
            ));
        }
        if self.batch.max_docs == 0
            || self.stream.read_count == 0
            || self.stream.read_tokens == 0
            || self.batch.max_tokens == 0
        {
            return bad(
                "batch.max_docs, batch.max_tokens, stream.read_count and stream.read_tokens must be > 0"
                    .into(),
            );
        }
        let control = [
            &self.stream.text_field,
            &self.stream.id_field,
            &self.stream.op_field,
            &self.stream.version_field,
            &self.index.vector_field,
        ];
        for (i, a) in control.iter().enumerate() {
            if control[i + 1..].contains(a) {
                return bad(format!(
                    "stream.text_field, stream.id_field, stream.op_field, stream.version_field and \
                     index.vector_field must all differ; {a:?} is used twice"
                ));
            }
        }
        if self.index.tombstone_prefix.starts_with(&self.index.prefix)
            || self.index.prefix.starts_with(&self.index.tombstone_prefix)
        {
            return bad(format!(
                "index.tombstone_prefix {:?} must not overlap index.prefix {:?}: tombstones would be indexed",
                self.index.tombstone_prefix, self.index.prefix
            ));
        }
        if self.index.tombstone_ttl.is_zero() {
            return bad("index.tombstone_ttl must be > 0".into());
        }
        if self.stream.claim_idle < Duration::from_millis(300) {
            return bad(
                "stream.claim_idle must be at least 300ms (leases are renewed every third of it)"
                    .into(),
            );
        }
        if self.stream.max_entry_bytes < self.stream.max_text_bytes {
            return bad(format!(
                "stream.max_entry_bytes ({}) must be at least stream.max_text_bytes ({})",
                self.stream.max_entry_bytes, self.stream.max_text_bytes
            ));
        }
        if self.stream.read_bytes < self.stream.max_entry_bytes {
            return bad(format!(
                "stream.read_bytes ({}) must be at least stream.max_entry_bytes ({}): a read must hold the largest entry",
                self.stream.read_bytes, self.stream.max_entry_bytes
            ));
        }
        let c = &self.chunk;
        if c.strategy == ChunkStrategy::Tokens {
            if c.size < 8 {
                return bad(format!(
                    "chunk.size must be at least 8 tokens, got {}",
                    c.size
                ));
            }
            if c.overlap * 2 > c.size - 2 {
                return bad(format!(
                    "chunk.overlap ({}) must be at most half of chunk.size minus [CLS] and [SEP] ({})",
                    c.overlap,
                    (c.size - 2) / 2
                ));
            }
            if c.max_chunks == 0 {
                return bad("chunk.max_chunks must be > 0".into());
            }
            let taken = [
                &self.stream.text_field,
                &self.stream.id_field,
                &self.stream.op_field,
                &self.stream.version_field,
                &self.index.vector_field,
            ];
            if c.parent_field.trim().is_empty() || taken.contains(&&c.parent_field) {
                return bad(format!(
                    "chunk.parent_field {:?} must be a name of its own (not empty, not a stream field or the vector field)",
                    c.parent_field
                ));
            }
        }
        if self.model.timeout.is_zero() {
            return bad("model.timeout must be > 0".into());
        }
        if self.stream.max_deliveries == 0 {
            return bad("stream.max_deliveries must be > 0".into());
        }
        if !["disable", "basic", "extended", "all"].contains(&self.model.optimization.as_str()) {
            return bad(format!(
                "model.optimization must be disable, basic, extended or all, got {:?}",
                self.model.optimization
            ));
        }
        if !["human", "json"].contains(&self.log.format.as_str()) {
            return bad(format!(
                "log.format must be human or json, got {:?}",
                self.log.format
            ));
        }
        for field in &self.index.schema {
            let name = field.split_whitespace().next().unwrap_or("");
            if name.is_empty() || field.split_whitespace().count() < 2 {
                return bad(format!(
                    "index.schema entry {field:?} must be \"NAME TYPE [options]\""
                ));
            }
            if name == self.index.vector_field {
                return bad(format!(
                    "index.schema must not redefine the vector field {name:?}"
                ));
            }
        }
        Ok(())
    }
}
