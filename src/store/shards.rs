//! Stream shards: with `stream.shards = N > 1` the documents are spread over N streams, each on
//! its own hash slot, so a cluster's primaries share the reads and the writes. A document id
//! always maps to the same shard, so the versions of one document stay in order in one stream
//! (the newest-wins rule compares entry IDs of one stream).
//!
//! The rule, for producers in any language (docs/OPERATIONS.md "Sharded streams"):
//! shard = CRC32(id bytes) mod N, CRC-32/ISO-HDLC as zlib.crc32; the key of shard i is
//! `<stream.name>{<i>-ew}`. The `{i-ew}` hash tags were picked so that 2 to 6 primaries with an
//! even slot layout (as `redis-cli --cluster create` makes it) each get an equal share of
//! N = k * primaries shards.

use crate::settings::StreamSettings;

/// The key of shard `i` of `shards` streams named `name`.
pub fn key(name: &str, shards: u32, i: usize) -> String {
    if shards <= 1 {
        name.to_string()
    } else {
        format!("{name}{{{i}-ew}}")
    }
}

/// Every shard's key, shard 0 first.
pub fn keys(s: &StreamSettings) -> Vec<String> {
    (0..s.shards.max(1) as usize)
        .map(|i| key(&s.name, s.shards, i))
        .collect()
}

/// Picks the stream an entry goes to: the shard of its id field, or, for an entry without one
/// (its document id is its entry ID, so no order is at stake), the next shard in turn.
pub struct Router {
    keys: Vec<String>,
    id_field: Vec<u8>,
    next: std::cell::Cell<usize>,
}

impl Router {
    pub fn new(s: &StreamSettings) -> Self {
        Self {
            keys: keys(s),
            id_field: s.id_field.as_bytes().to_vec(),
            next: std::cell::Cell::new(0),
        }
    }

    /// The stream for an entry of these fields.
    pub fn key_for<'a, K: AsRef<[u8]> + 'a, V: AsRef<[u8]> + 'a>(
        &self,
        fields: impl IntoIterator<Item = &'a (K, V)>,
    ) -> &str {
        let id = fields
            .into_iter()
            .find(|(k, _)| k.as_ref() == self.id_field.as_slice())
            .map(|(_, v)| v.as_ref());
        let shard = match id {
            Some(id) => of(id, self.keys.len() as u32),
            None => {
                let n = self.next.get();
                self.next.set((n + 1) % self.keys.len());
                n
            }
        };
        &self.keys[shard]
    }

    /// Whether `stream` is one of the shards.
    pub fn holds(&self, stream: &str) -> bool {
        self.keys.iter().any(|k| k == stream)
    }
}

/// The shard of the document `id`.
pub fn of(id: &[u8], shards: u32) -> usize {
    if shards <= 1 {
        0
    } else {
        (crc32fast::hash(id) % shards) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_matches_zlib_crc32_and_the_documented_keys() {
        // python3 -c 'import zlib; print(hex(zlib.crc32(b"123456789")))' prints 0xcbf43926.
        assert_eq!(
            crc32fast::hash(b"123456789"),
            0xCBF4_3926,
            "CRC-32/ISO-HDLC check value"
        );
        assert_eq!(of(b"123456789", 3), (0xCBF4_3926u32 % 3) as usize);
        assert_eq!(of(b"anything", 1), 0);
        assert_eq!(key("embed:docs", 1, 0), "embed:docs");
        assert_eq!(key("embed:docs", 3, 2), "embed:docs{2-ew}");
    }

    /// The slot of a key's hash tag (CRC16/XMODEM mod 16384), as Redis Cluster computes it.
    fn slot(tag: &str) -> u16 {
        let mut crc: u16 = 0;
        for b in tag.bytes() {
            crc ^= (b as u16) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc % 16384
    }

    #[test]
    fn the_shard_tags_spread_evenly_over_an_even_slot_layout() {
        for (shards, primaries) in [(2, 2), (3, 3), (4, 4), (6, 3), (6, 6), (9, 3), (12, 4)] {
            let mut per = vec![0; primaries];
            for i in 0..shards {
                let s = slot(&format!("{i}-ew")) as usize;
                per[(s * primaries / 16384).min(primaries - 1)] += 1;
            }
            assert!(
                per.iter().all(|&n| n == shards / primaries),
                "{shards} shards on {primaries} primaries: {per:?}"
            );
        }
    }
}
