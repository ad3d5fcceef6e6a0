//! What `embed-worker reindex` sends to Redis besides the model record ([`super::generation`]):
//! stored documents walked with SCAN, the next index asked what still lacks its vector, an index
//! waited on until it has scanned the keys, stored fields read back per storage, and vectors
//! written with `ew_reembed`.

use std::time::{Duration, Instant};

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::index;
use super::reply::text;
use crate::settings::Storage;

/// Reads `names` of each stored document in `keys` (one pipeline): decoded values, `None` where
/// a field or the key is absent. On JSON each name is a top-level member.
pub async fn read_fields(
    conn: &mut Conn,
    storage: Storage,
    keys: &[String],
    names: &[&str],
) -> Result<Vec<Vec<Option<Vec<u8>>>>, RedisError> {
    let mut pipe = ::redis::pipe();
    for key in keys {
        match storage {
            Storage::Hash => {
                pipe.cmd("HMGET").arg(key).arg(names);
            }
            Storage::Json => {
                let cmd = pipe.cmd("JSON.GET").arg(key);
                for n in names {
                    cmd.arg(index::json_path(n));
                }
            }
        }
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    Ok(replies
        .into_iter()
        .map(|reply| match storage {
            Storage::Hash => match reply {
                Value::Array(values) => values
                    .into_iter()
                    .map(|v| match v {
                        Value::Nil => None,
                        other => Some(super::reply::into_bytes(other)),
                    })
                    .collect(),
                _ => vec![None; names.len()],
            },
            Storage::Json => json_members(&reply, names),
        })
        .collect())
}

/// The members `names` of a JSON.GET reply for their paths (one path: `[v]`; several:
/// `{"<path>": [v], ...}`), strings as their text, other values as JSON text.
fn json_members(reply: &Value, names: &[&str]) -> Vec<Option<Vec<u8>>> {
    let parsed: Option<serde_json::Value> = match reply {
        Value::BulkString(b) => serde_json::from_slice(b).ok(),
        _ => None,
    };
    names
        .iter()
        .map(|n| {
            let matches = match &parsed {
                Some(serde_json::Value::Array(a)) if names.len() == 1 => a.first(),
                Some(serde_json::Value::Object(o)) => o
                    .get(&index::json_path(n))
                    .and_then(|m| m.as_array())
                    .and_then(|a| a.first()),
                _ => None,
            }?;
            Some(match matches {
                serde_json::Value::String(s) => s.clone().into_bytes(),
                serde_json::Value::Null => return None,
                other => other.to_string().into_bytes(),
            })
        })
        .collect()
}

/// Keys per SCAN step, and per query for what lacks a vector.
pub const SCAN_COUNT: usize = 500;

/// Waits until the Query Engine has scanned every existing key into `index` (a new index over
/// existing documents fills in the background; until then it cannot say what lacks a vector).
pub async fn wait_indexed(
    conn: &mut Conn,
    index: &str,
    progress_every: Duration,
) -> Result<(), RedisError> {
    let mut said = Instant::now();
    loop {
        let info = index::info(conn, index).await?.unwrap_or_default();
        let get = |k: &str| {
            info.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| text(v))
                .unwrap_or_default()
        };
        let percent: f64 = get("percent_indexed").parse().unwrap_or(0.0);
        if get("indexing") == "0" || percent >= 1.0 {
            return Ok(());
        }
        if said.elapsed() >= progress_every {
            said = Instant::now();
            eprintln!(
                "reindex: {index} is scanning the documents: {:.0}%",
                percent * 100.0
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A batch's `ew_reembed` calls, in flight while the next batch is embedded: their answers.
pub type Written = tokio::task::JoinHandle<Result<Vec<String>, RedisError>>;

/// Writes `vectors` to the hashes `rows` (key, version, entry ID read with the text).
pub async fn write_vectors(
    mut conn: Conn,
    function: &'static str,
    record: String,
    fingerprint: String,
    rows: Vec<(String, String, String)>,
    vectors: Vec<Vec<u8>>,
) -> Result<Vec<String>, RedisError> {
    let mut pipe = ::redis::pipe();
    for ((key, version, entry), vector) in rows.iter().zip(&vectors) {
        pipe.cmd("FCALL")
            .arg(function)
            .arg(2)
            .arg(key)
            .arg(&record)
            .arg(version)
            .arg(entry)
            .arg(&fingerprint)
            .arg(vector.as_slice());
    }
    pipe.query_async(&mut conn).await
}

/// How many hashes the next index finds without the next vector, and up to SCAN_COUNT of their
/// keys from `offset`.
pub async fn lacking(
    conn: &mut Conn,
    index: &str,
    query: &str,
    offset: usize,
) -> Result<(u64, Vec<String>), RedisError> {
    let reply: Value = ::redis::cmd("FT.SEARCH")
        .arg(index)
        .arg(query)
        .arg("NOCONTENT")
        .arg("LIMIT")
        .arg(offset)
        .arg(SCAN_COUNT)
        .arg("DIALECT")
        .arg(2)
        .query_async(conn)
        .await?;
    let Value::Array(items) = reply else {
        return Ok((0, Vec::new()));
    };
    let total = items
        .first()
        .map(text)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    Ok((total, items.iter().skip(1).map(text).collect()))
}

/// One SCAN step over the stored documents matching `pattern`: the next cursor and the keys.
pub async fn scan(
    conn: &mut Conn,
    storage: Storage,
    cursor: u64,
    pattern: &str,
) -> Result<(u64, Vec<String>), RedisError> {
    ::redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .arg("TYPE")
        .arg(match storage {
            Storage::Hash => "hash",
            Storage::Json => "ReJSON-RL",
        })
        .query_async(conn)
        .await
}

/// `prefix` as a SCAN MATCH pattern that matches it literally.
pub fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_matched_literally() {
        assert_eq!(glob_escape("doc:"), "doc:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
