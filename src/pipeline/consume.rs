//! Reading the stream through the consumer group: new entries, this consumer's own pending
//! entries (after a restart), and entries reclaimed from dead consumers (XAUTOCLAIM).

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};

use super::entry::RawEntry;
use crate::redis::index::text;

/// Names that identify this worker's place in the group.
#[derive(Debug, Clone)]
pub struct GroupRef {
    pub stream: String,
    pub group: String,
    pub consumer: String,
}

/// What a read returned: entries to process, and IDs whose entries were deleted from the stream
/// while pending (nothing left to index: they are acked).
#[derive(Debug, Default)]
pub struct Read {
    pub entries: Vec<RawEntry>,
    pub deleted: Vec<String>,
}

/// XGROUP CREATE ... 0 MKSTREAM: the group starts at the beginning, so documents added before
/// the first worker ran are indexed too. An existing group is fine.
pub async fn ensure_group(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
) -> Result<bool, RedisError> {
    let created: Result<(), RedisError> = ::redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&g.stream)
        .arg(&g.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

/// XREADGROUP from `cursor`: ">" for new entries (delivery 1), "0" for this consumer's own
/// pending ones (delivery counts looked up).
pub async fn read(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    cursor: &str,
    count: usize,
    block: Option<Duration>,
) -> Result<Read, RedisError> {
    let mut cmd = ::redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(&g.group)
        .arg(&g.consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    cmd.arg("STREAMS").arg(&g.stream).arg(cursor);
    let reply: Value = cmd.query_async(conn).await?;
    let mut read = Read::default();
    if let Value::Array(streams) | Value::Set(streams) = &reply {
        for s in streams {
            if let Value::Array(pair) = s {
                if let Some(entries) = pair.get(1) {
                    parse_entries(entries, &mut read);
                }
            }
        }
    } else if let Value::Map(streams) = &reply {
        for (_, entries) in streams {
            parse_entries(entries, &mut read);
        }
    }
    if cursor != ">" && !read.entries.is_empty() {
        let counts = delivery_counts(conn, g, &read.entries).await?;
        for e in &mut read.entries {
            e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
        }
    }
    Ok(read)
}

/// XAUTOCLAIM entries idle longer than `min_idle` from any consumer, starting at `start`.
/// Returns the cursor to continue from ("0-0" when the scan wrapped).
pub async fn autoclaim(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    min_idle: Duration,
    start: &str,
    count: usize,
) -> Result<(String, Read), RedisError> {
    let reply: Value = ::redis::cmd("XAUTOCLAIM")
        .arg(&g.stream)
        .arg(&g.group)
        .arg(&g.consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(start)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    let mut read = Read::default();
    let mut next = "0-0".to_string();
    if let Value::Array(parts) = &reply {
        if let Some(cursor) = parts.first() {
            next = text(cursor);
        }
        if let Some(entries) = parts.get(1) {
            parse_entries(entries, &mut read);
        }
        // Entries deleted from the stream: XAUTOCLAIM already removed them from the PEL.
    }
    if !read.entries.is_empty() {
        let counts = delivery_counts(conn, g, &read.entries).await?;
        for e in &mut read.entries {
            e.deliveries = counts.get(&e.id).copied().unwrap_or(1);
        }
    }
    Ok((next, read))
}

/// Delivery counts of `entries` (all pending on this consumer), from XPENDING's extended form.
async fn delivery_counts(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    entries: &[RawEntry],
) -> Result<HashMap<String, u64>, RedisError> {
    let first = &entries.first().expect("called with entries").id;
    let last = &entries.last().expect("called with entries").id;
    let reply: Value = ::redis::cmd("XPENDING")
        .arg(&g.stream)
        .arg(&g.group)
        .arg(first)
        .arg(last)
        .arg(entries.len() * 2 + 16)
        .arg(&g.consumer)
        .query_async(conn)
        .await?;
    let mut counts = HashMap::new();
    if let Value::Array(rows) = reply {
        for row in rows {
            if let Value::Array(cols) = row {
                if let (Some(id), Some(Value::Int(n))) = (cols.first(), cols.get(3)) {
                    counts.insert(text(id), *n as u64);
                }
            }
        }
    }
    Ok(counts)
}

/// Group summary: (pending entries, lag) where lag is entries not yet delivered to the group
/// (None when Redis cannot tell).
pub async fn group_state(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
) -> Result<(u64, Option<u64>), RedisError> {
    let reply: Value = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&g.stream)
        .query_async(conn)
        .await?;
    if let Value::Array(groups) = reply {
        for group in groups {
            let kv = crate::redis::index::pairs(&group);
            let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            if get("name").map(|v| text(&v)).as_deref() == Some(g.group.as_str()) {
                let pending = match get("pending") {
                    Some(Value::Int(n)) => n as u64,
                    _ => 0,
                };
                let lag = match get("lag") {
                    Some(Value::Int(n)) => Some(n as u64),
                    _ => None,
                };
                return Ok((pending, lag));
            }
        }
    }
    Ok((0, None))
}

/// Deletes consumers idle longer than `idle` that own no pending entries (never this one).
pub async fn delete_idle_consumers(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    idle: Duration,
) -> Result<Vec<String>, RedisError> {
    let reply: Value = ::redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&g.stream)
        .arg(&g.group)
        .query_async(conn)
        .await?;
    let mut deleted = Vec::new();
    if let Value::Array(consumers) = reply {
        for c in consumers {
            let kv = crate::redis::index::pairs(&c);
            let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let name = get("name").map(|v| text(&v)).unwrap_or_default();
            let pending = matches!(get("pending"), Some(Value::Int(n)) if n > 0);
            let idle_ms = match get("idle") {
                Some(Value::Int(n)) => n as u64,
                _ => 0,
            };
            if name != g.consumer && !pending && idle_ms > idle.as_millis() as u64 {
                // DELCONSUMER returns the pending count it dropped; re-check it is zero.
                let dropped: i64 = ::redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&g.stream)
                    .arg(&g.group)
                    .arg(&name)
                    .query_async(conn)
                    .await?;
                if dropped > 0 {
                    // It came back to life between XINFO and DELCONSUMER (it would have to be
                    // idle for `idle` first, so this needs a consumer paused that long). Its
                    // entries are still in the stream but no longer pending: say so loudly.
                    tracing::error!(consumer = %name, dropped, "deleted a consumer that had just taken entries; they are no longer pending and need re-adding");
                }
                deleted.push(name);
            }
        }
    }
    Ok(deleted)
}

fn parse_entries(entries: &Value, read: &mut Read) {
    let Value::Array(list) = entries else { return };
    for item in list {
        let Value::Array(parts) = item else { continue };
        let Some(id) = parts.first().map(text) else {
            continue;
        };
        match parts.get(1) {
            Some(Value::Array(kv)) => {
                let fields = kv
                    .chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (bytes(&c[0]), bytes(&c[1])))
                    .collect();
                read.entries.push(RawEntry {
                    id,
                    fields,
                    deliveries: 1,
                });
            }
            Some(Value::Map(kv)) => {
                let fields = kv.iter().map(|(k, v)| (bytes(k), bytes(v))).collect();
                read.entries.push(RawEntry {
                    id,
                    fields,
                    deliveries: 1,
                });
            }
            // A pending entry whose stream entry was deleted or trimmed.
            _ => read.deleted.push(id),
        }
    }
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => text(other).into_bytes(),
    }
}
