//! Where keys live on a Redis Cluster: a key's hash slot (CRC16 of the key or of its hash tag),
//! and the keys of one document that must share its slot (its chunks and its tombstone), since
//! one document function touches them all and a cluster refuses a call over several slots.

use std::sync::OnceLock;

use super::documents::CHUNK_SEPARATOR;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key, as the cluster computes it: CRC16 (XMODEM) of the key, or of its
/// hash tag (what lies between the first `{` and the next `}`, when that is not empty).
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

/// The hash tag of `key`: what lies between the first `{` and the next `}`, when not empty.
/// A key without one hashes whole.
pub fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (0..8).fold(crc ^ (u16::from(b) << 8), |c, _| {
            if c & 0x8000 != 0 {
                (c << 1) ^ 0x1021
            } else {
                c << 1
            }
        })
    })
}

/// The keys derived from a document's key. On one server `key#n` and `<tombstones>{key}`; on a
/// cluster in the document's slot.
#[derive(Debug)]
pub struct DocKeys {
    /// `index.prefix`.
    prefix: String,
    /// `index.tombstone_prefix`.
    tombstone_prefix: String,
    /// Whether the server is a Redis Cluster: known once start-up has connected.
    cluster: OnceLock<bool>,
}

impl DocKeys {
    pub fn new(prefix: &str, tombstone_prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            tombstone_prefix: tombstone_prefix.to_string(),
            cluster: OnceLock::new(),
        }
    }

    /// Says, once (start-up), whether the server is a Redis Cluster. There, refuses prefixes
    /// that cannot keep a document's keys in one slot ([`slot_problem`]), naming the fix.
    pub fn set_cluster(&self, cluster: bool) -> Result<(), String> {
        if cluster {
            if let Some(problem) = slot_problem(&self.prefix, &self.tombstone_prefix) {
                return Err(problem);
            }
        }
        let _ = self.cluster.set(cluster);
        Ok(())
    }

    pub fn on_cluster(&self) -> bool {
        self.cluster.get().copied().unwrap_or(false)
    }

    /// The key of chunk `n` of the multi-chunk document at `key`: `key#n`, which on one server
    /// is all it needs. On a cluster it must hash to the document's slot: a key with a hash tag
    /// keeps it (`doc:{a}#0`); any other is wrapped as the tag, after the index prefix so the
    /// chunk stays indexed (`doc:{doc:42}#0`, in the slot of `doc:42`).
    pub fn chunk(&self, key: &str, n: usize) -> String {
        if !self.on_cluster() || hash_tag(key.as_bytes()).is_some() {
            return format!("{key}{CHUNK_SEPARATOR}{n}");
        }
        format!("{}{{{key}}}{CHUNK_SEPARATOR}{n}", self.prefix)
    }

    /// The tombstone of the document at `key`: outside the index prefix, and in the document's
    /// slot so one FCALL may touch both: tagged with the key (`embed:tomb:{doc:42}`), or, for
    /// a key with its own hash tag on a cluster, carrying that tag (`embed:tomb:doc:{a}`).
    pub fn tombstone(&self, key: &str) -> String {
        if self.on_cluster() && hash_tag(key.as_bytes()).is_some() {
            return format!("{}{key}", self.tombstone_prefix);
        }
        format!("{}{{{key}}}", self.tombstone_prefix)
    }
}

/// Why, on a cluster, a document's chunks or tombstone could not share its slot with these
/// prefixes; None when they can. Ids hold no braces (`entry`), so a key's hash tag is its
/// prefix's. Untagged, the key itself becomes the chunks' and tombstone's tag, which a brace
/// inside it breaks (the tag would start at its `{` or end at its `}`); a tombstone prefix with
/// a `{` moves where the tombstone's tag starts, which is harmless only when it is a whole tag
/// and the same as the prefix's.
pub fn slot_problem(prefix: &str, tombstone_prefix: &str) -> Option<String> {
    if hash_tag(prefix.as_bytes()).is_none() && prefix.contains(['{', '}']) {
        return Some(format!(
            "configuration: index.prefix {prefix:?} has a brace but no whole hash tag, so on \
             a Redis Cluster a document's chunks and tombstone would hash to other slots than the \
             document, and every write would be refused (CROSSSLOT). Fix: an index.prefix \
             (EMBED_WORKER__INDEX__PREFIX) without braces, or with a whole tag such as \
             \"doc:{{tenant}}:\" (which puts all documents in that tag's one slot)"
        ));
    }
    let own_tag = hash_tag(tombstone_prefix.as_bytes());
    if tombstone_prefix.contains('{')
        && !(own_tag.is_some() && own_tag == hash_tag(prefix.as_bytes()))
    {
        return Some(format!(
            "configuration: index.tombstone_prefix {tombstone_prefix:?} has a '{{' that is not \
             index.prefix's own hash tag, so on a Redis Cluster a document's tombstone would hash \
             to another slot than the document, and every delete would be refused (CROSSSLOT). \
             Fix: an index.tombstone_prefix (EMBED_WORKER__INDEX__TOMBSTONE_PREFIX) without '{{'"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(settings: &crate::settings::Settings) -> DocKeys {
        DocKeys::new(&settings.index.prefix, &settings.index.tombstone_prefix)
    }

    #[test]
    fn slots_are_the_clusters() {
        // CLUSTER KEYSLOT on a real server: foo 12182, t1 8943, t2 4748; tags hash alone.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"t1"), 8943);
        assert_eq!(key_slot(b"t2"), 4748);
        assert_eq!(key_slot(b"{t1}anything"), 8943);
        assert_eq!(key_slot(b"x{}y"), crc16(b"x{}y") % SLOTS);
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
    }

    #[test]
    fn a_documents_keys_share_its_slot_on_a_cluster_and_stay_as_they_were_on_one_server() {
        let settings = crate::settings::Settings::load_from(None, Vec::new()).unwrap();
        let single = keys_of(&settings);
        single.set_cluster(false).unwrap();
        assert_eq!(single.chunk("doc:42", 1), "doc:42#1");
        assert_eq!(single.tombstone("doc:42"), "embed:tomb:{doc:42}");
        assert_eq!(single.tombstone("doc:{a}"), "embed:tomb:{doc:{a}}");
        let cluster = keys_of(&settings);
        cluster.set_cluster(true).unwrap();
        assert_eq!(cluster.chunk("doc:42", 0), "doc:{doc:42}#0");
        assert_eq!(cluster.tombstone("doc:42"), "embed:tomb:{doc:42}");
        assert_eq!(cluster.chunk("doc:{a}", 2), "doc:{a}#2");
        assert_eq!(cluster.tombstone("doc:{a}"), "embed:tomb:doc:{a}");
        // Each derived key hashes like its document.
        let slot_of = |k: &str| key_slot(k.as_bytes());
        for key in ["doc:42", "doc:{a}", "doc:{open"] {
            for derived in [cluster.chunk(key, 3), cluster.tombstone(key)] {
                assert_eq!(slot_of(&derived), slot_of(key), "{derived} for {key}");
            }
        }
        assert_eq!(hash_tag(b"a{b}c{d}"), Some(&b"b"[..]));
        assert_eq!(hash_tag(b"a{}b"), None);
        assert_eq!(hash_tag(b"a{b"), None);
    }

    #[test]
    fn prefixes_are_refused_on_a_cluster_exactly_when_they_would_split_a_documents_keys() {
        let slot_of = |k: &str| key_slot(k.as_bytes());
        let prefixes = [
            "doc:",
            "doc:{t}:",
            "doc:{t}}:",
            "doc:{open",
            "a}b:",
            "a}{b",
            "x{}:",
            "}",
            "{}{a}",
        ];
        let mut refused = 0;
        for prefix in prefixes {
            for tombstones in ["embed:tomb:", "t}:", "t{:", "{t}"] {
                let mut settings = crate::settings::Settings::load_from(None, Vec::new()).unwrap();
                settings.index.prefix = prefix.into();
                settings.index.tombstone_prefix = tombstones.into();
                let problem = keys_of(&settings).set_cluster(true).err();
                // The keys the worker would make on a cluster, refused or not.
                let docs = keys_of(&settings);
                docs.cluster.set(true).unwrap();
                let key = format!("{prefix}42");
                let split = [docs.chunk(&key, 0), docs.tombstone(&key)]
                    .iter()
                    .any(|derived| slot_of(derived) != slot_of(&key));
                assert_eq!(
                    problem.is_some(),
                    split,
                    "prefix {prefix:?}, tombstones {tombstones:?}: {problem:?}"
                );
                refused += usize::from(split);
                // One server has no slots: nothing is refused.
                assert!(keys_of(&settings).set_cluster(false).is_ok());
            }
        }
        assert!(
            (10..36).contains(&refused),
            "both outcomes are exercised: {refused}"
        );
    }
}
