//! The dead-letter stream from the operator's side (`embed-worker dlq`): read it back into the
//! original entries, send them to the stream again, delete them. A dead letter is the original
//! entry's fields, as given, followed by exactly the [`DEAD_FIELDS`] block
//! ([`super::stream::add_dead_letters`]); stripping that block gives the entry back byte for byte.

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::reply::{bytes, text};
use super::stream::DEAD_FIELDS;

/// One dead letter, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its ID in the dead-letter stream.
    pub id: String,
    /// The original entry's fields, as the producer sent them.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub reason: String,
    pub detail: String,
    /// The original entry's ID in its stream.
    pub entry_id: String,
    /// The stream it came from.
    pub stream: String,
    pub worker: String,
    pub deliveries: String,
}

impl DeadLetter {
    /// Splits a dead-letter stream entry into the original fields and the metadata; `None` when
    /// the entry does not end in the metadata block (not written by embed-worker).
    pub fn parse(id: String, mut fields: Vec<(Vec<u8>, Vec<u8>)>) -> Option<Self> {
        let at = fields.len().checked_sub(DEAD_FIELDS.len())?;
        let meta = fields.split_off(at);
        if at == 0
            || !meta
                .iter()
                .zip(DEAD_FIELDS)
                .all(|((k, _), name)| k == name.as_bytes())
        {
            return None;
        }
        let mut values = meta
            .into_iter()
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
        let mut next = || values.next().unwrap_or_default();
        Some(Self {
            id,
            fields,
            reason: next(),
            detail: next(),
            entry_id: next(),
            stream: next(),
            worker: next(),
            deliveries: next(),
        })
    }
}

/// Which dead letters an operation applies to. Empty parts match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this reason (e.g. `missing_text`).
    pub reason: Option<String>,
    /// Only dead letters at or after this dead-letter stream ID (or millisecond time).
    pub since: Option<String>,
    /// Only these, by dead-letter ID or by the original entry's ID.
    pub ids: Vec<String>,
}

impl Filter {
    pub fn matches(&self, l: &DeadLetter) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == l.reason)
            && (self.ids.is_empty() || self.ids.iter().any(|id| *id == l.id || *id == l.entry_id))
    }

    pub fn is_empty(&self) -> bool {
        self.reason.is_none() && self.since.is_none() && self.ids.is_empty()
    }
}

/// Every dead letter matching `filter`, oldest first, and the IDs of entries in the stream that
/// are not dead letters embed-worker wrote (left alone by every operation).
pub async fn scan(
    conn: &mut Conn,
    dead_stream: &str,
    filter: &Filter,
) -> Result<(Vec<DeadLetter>, Vec<String>), RedisError> {
    const PAGE: usize = 500;
    let mut letters = Vec::new();
    let mut foreign = Vec::new();
    let mut start = filter.since.clone().unwrap_or_else(|| "-".into());
    loop {
        let reply: Value = ::redis::cmd("XRANGE")
            .arg(dead_stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await?;
        let Value::Array(items) = reply else { break };
        let n = items.len();
        let mut last = None;
        for item in items {
            let Value::Array(parts) = item else { continue };
            let Some(id) = parts.first().map(text) else {
                continue;
            };
            last = Some(id.clone());
            let fields = match parts.get(1) {
                Some(Value::Array(kv)) => kv
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (bytes(&c[0]), bytes(&c[1])))
                    .collect(),
                Some(Value::Map(kv)) => kv.iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
                _ => Vec::new(),
            };
            match DeadLetter::parse(id.clone(), fields) {
                Some(l) if filter.matches(&l) => letters.push(l),
                Some(_) => {}
                None => foreign.push(id),
            }
        }
        match last {
            Some(id) if n >= PAGE => start = format!("({id}"),
            _ => break,
        }
    }
    Ok((letters, foreign))
}

/// Sends each dead letter's original fields to its stream in `streams` (XADD, a new entry ID), and only once
/// all of a chunk's XADDs have succeeded deletes those dead letters (XDEL). A failure or a crash
/// in between leaves a dead letter that was also replayed: a duplicate (harmless: the newest
/// version wins), never a loss. Returns the new entry IDs, in order.
pub async fn replay(
    conn: &mut Conn,
    streams: &[String],
    dead_stream: &str,
    letters: &[DeadLetter],
) -> Result<Vec<String>, RedisError> {
    let mut added = Vec::with_capacity(letters.len());
    for (chunk, streams) in letters.chunks(100).zip(streams.chunks(100)) {
        let mut pipe = ::redis::pipe();
        for (l, stream) in chunk.iter().zip(streams) {
            let cmd = pipe.cmd("XADD").arg(stream).arg("*");
            for (k, v) in &l.fields {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        let ids: Vec<String> = pipe.query_async(conn).await?;
        let dead: Vec<&str> = chunk.iter().map(|l| l.id.as_str()).collect();
        delete(conn, dead_stream, &dead).await?;
        added.extend(ids);
    }
    Ok(added)
}

/// XDEL these dead letters; returns how many were there.
pub async fn delete(conn: &mut Conn, dead_stream: &str, ids: &[&str]) -> Result<u64, RedisError> {
    let mut removed = 0;
    for chunk in ids.chunks(500) {
        let n: u64 = ::redis::cmd("XDEL")
            .arg(dead_stream)
            .arg(chunk)
            .query_async(conn)
            .await?;
        removed += n;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn meta(reason: &str) -> Vec<(&'static str, String)> {
        DEAD_FIELDS
            .iter()
            .zip([reason, "why", "5-0", "s", "w", "1"])
            .map(|(k, v)| (*k, v.to_string()))
            .collect()
    }

    #[test]
    fn the_original_fields_come_back_even_when_named_like_the_metadata() {
        let mut fields = kv(&[("body", "x"), ("dead_reason", "mine"), ("dead_detail", "d")]);
        for (k, v) in meta("missing_text") {
            fields.push((k.as_bytes().to_vec(), v.into_bytes()));
        }
        let l = DeadLetter::parse("9-0".into(), fields).unwrap();
        assert_eq!(
            l.fields,
            kv(&[("body", "x"), ("dead_reason", "mine"), ("dead_detail", "d")])
        );
        assert_eq!(
            (l.reason.as_str(), l.entry_id.as_str()),
            ("missing_text", "5-0")
        );
        let f = Filter {
            reason: Some("missing_text".into()),
            ids: vec!["5-0".into()],
            ..Filter::default()
        };
        assert!(f.matches(&l));
        assert!(!Filter {
            reason: Some("empty_text".into()),
            ..Filter::default()
        }
        .matches(&l));
    }

    #[test]
    fn entries_without_the_metadata_block_are_not_dead_letters() {
        assert_eq!(
            DeadLetter::parse("1-0".into(), kv(&[("content", "x")])),
            None
        );
        // The block alone, with no original field, is not one either.
        let only: Vec<_> = meta("r")
            .into_iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
            .collect();
        assert_eq!(DeadLetter::parse("1-0".into(), only), None);
    }
}
