//! The stream and its consumer group: reading new entries, this consumer's own pending entries
//! (after a restart) and entries reclaimed from dead consumers (XAUTOCLAIM); acks; dead letters.

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};

use super::reply::{self, bytes, text, GroupInfo};

/// A raw stream entry: its ID and field/value pairs, bytes as Redis gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// How often the group has delivered it (1 on a first read).
    pub deliveries: u64,
}

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

/// The group's state from XINFO GROUPS; None when the stream or the group does not exist.
pub async fn group_info(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<Option<GroupInfo>, RedisError> {
    let reply: Result<Value, RedisError> = ::redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await;
    match reply {
        Ok(v) => Ok(reply::group_info(&v, group)),
        Err(e) if reply::is_missing_stream(&e) => Ok(None),
        Err(e) => Err(e),
    }
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
            let kv = reply::pairs(&c);
            let name = reply::get(&kv, "name").map(text).unwrap_or_default();
            let pending = reply::uint(&kv, "pending").unwrap_or(0) > 0;
            let idle_ms = reply::uint(&kv, "idle").unwrap_or(0);
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

/// XACK the given entry IDs.
pub async fn ack(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    ids: &[String],
) -> Result<u64, RedisError> {
    if ids.is_empty() {
        return Ok(0);
    }
    ::redis::cmd("XACK")
        .arg(&g.stream)
        .arg(&g.group)
        .arg(ids)
        .query_async(conn)
        .await
}

/// A dead letter as written: the entry, why, and in what words.
pub struct DeadLetterRecord<'a> {
    pub entry: &'a RawEntry,
    pub reason: &'a str,
    pub detail: &'a str,
}

/// XADD each dead letter to `dead_stream`: the original fields as given, then the `dead_*`
/// metadata (so a reader folding the entry into a map sees the real metadata even when the
/// document carried a field named like it). The caller acks the entries once this returns: a
/// failure in between gives a duplicate dead letter on retry, never a lost one.
pub async fn add_dead_letters(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    dead_stream: &str,
    letters: &[DeadLetterRecord<'_>],
) -> Result<(), RedisError> {
    if letters.is_empty() {
        return Ok(());
    }
    let mut pipe = ::redis::pipe();
    for l in letters {
        let cmd = pipe.cmd("XADD").arg(dead_stream).arg("*");
        for (k, v) in &l.entry.fields {
            cmd.arg(k.as_slice()).arg(v.as_slice());
        }
        cmd.arg("dead_reason").arg(l.reason);
        cmd.arg("dead_detail").arg(l.detail);
        cmd.arg("dead_entry_id").arg(&l.entry.id);
        cmd.arg("dead_stream").arg(&g.stream);
        cmd.arg("dead_worker").arg(&g.consumer);
        cmd.arg("dead_deliveries").arg(l.entry.deliveries);
    }
    let _: Vec<Value> = pipe.query_async(conn).await?;
    Ok(())
}
