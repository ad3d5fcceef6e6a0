//! The stream and its consumer group: reading new entries, this consumer's own pending entries
//! (after a restart) and entries reclaimed from dead consumers (XAUTOCLAIM); acks; dead letters.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::reply::{self, into_bytes, text, GroupInfo};

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
pub async fn ensure_group(conn: &mut Conn, g: &GroupRef) -> Result<bool, RedisError> {
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
/// pending ones (delivery counts looked up; one XPENDING cannot report is `unknown_deliveries`,
/// see [`fill_deliveries`]).
pub async fn read(
    conn: &mut Conn,
    g: &GroupRef,
    cursor: &str,
    count: usize,
    block: Option<Duration>,
    unknown_deliveries: u64,
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
    // Consumed, not borrowed: each field's bytes move into the entry instead of being copied.
    match reply {
        Value::Array(streams) | Value::Set(streams) => {
            for s in streams {
                if let Value::Array(mut pair) = s {
                    if pair.len() > 1 {
                        parse_entries(pair.swap_remove(1), &mut read);
                    }
                }
            }
        }
        Value::Map(streams) => {
            for (_, entries) in streams {
                parse_entries(entries, &mut read);
            }
        }
        _ => {}
    }
    if cursor != ">" && !read.entries.is_empty() {
        let counts = delivery_counts(conn, g, &read.entries).await?;
        fill_deliveries(&mut read.entries, &counts, unknown_deliveries);
    }
    Ok(read)
}

/// XAUTOCLAIM entries idle longer than `min_idle` from any consumer, starting at `start`.
/// Returns the cursor to continue from ("0-0" when the scan wrapped). Delivery counts as in
/// [`read`].
pub async fn autoclaim(
    conn: &mut Conn,
    g: &GroupRef,
    min_idle: Duration,
    start: &str,
    count: usize,
    unknown_deliveries: u64,
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
    if let Value::Array(parts) = reply {
        let mut parts = parts.into_iter();
        if let Some(cursor) = parts.next() {
            next = text(&cursor);
        }
        if let Some(entries) = parts.next() {
            parse_entries(entries, &mut read);
        }
        // Entries deleted from the stream: XAUTOCLAIM already removed them from the PEL.
    }
    if !read.entries.is_empty() {
        let counts = delivery_counts(conn, g, &read.entries).await?;
        fill_deliveries(&mut read.entries, &counts, unknown_deliveries);
    }
    Ok((next, read))
}

/// Sets each entry's delivery count from `counts`. The poison guard fails closed: an entry whose
/// count is unknown (XPENDING did not report it, even when asked again) gets `unknown`, the
/// caller's worst case (`max_deliveries + 1`: a dead letter), never 1, so an entry whose count
/// cannot be read cannot circulate past `max_deliveries`.
pub fn fill_deliveries(entries: &mut [RawEntry], counts: &HashMap<String, u64>, unknown: u64) {
    for e in entries {
        e.deliveries = match counts.get(&e.id) {
            Some(&n) => n,
            None => {
                tracing::warn!(entry = %e.id, deliveries = unknown,
                    "XPENDING did not report this entry's delivery count; taking the worst case");
                unknown
            }
        };
    }
}

/// Delivery counts of `entries` (all pending on this consumer), from XPENDING's extended form:
/// one range query for this consumer, then one query per entry it did not report (a reply cut
/// by COUNT, or an entry that moved to another consumer in between), for any consumer.
async fn delivery_counts(
    conn: &mut Conn,
    g: &GroupRef,
    entries: &[RawEntry],
) -> Result<HashMap<String, u64>, RedisError> {
    let mut counts = pending_counts(conn, g, entries).await?;
    let missing: Vec<&str> = entries
        .iter()
        .map(|e| e.id.as_str())
        .filter(|id| !counts.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        let mut pipe = ::redis::pipe();
        for id in &missing {
            pipe.cmd("XPENDING")
                .arg(&g.stream)
                .arg(&g.group)
                .arg(*id)
                .arg(*id)
                .arg(1);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        for reply in replies {
            parse_pending_rows(reply, &mut counts);
        }
    }
    Ok(counts)
}

/// XPENDING rows (id, consumer, idle, deliveries) into `counts`.
fn parse_pending_rows(reply: Value, counts: &mut HashMap<String, u64>) {
    if let Value::Array(rows) = reply {
        for row in rows {
            if let Value::Array(cols) = row {
                if let (Some(id), Some(Value::Int(n))) = (cols.first(), cols.get(3)) {
                    counts.insert(text(id), (*n).max(0) as u64);
                }
            }
        }
    }
}

/// XPENDING's extended form over the range of `entries`, this consumer only.
async fn pending_counts(
    conn: &mut Conn,
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
    parse_pending_rows(reply, &mut counts);
    Ok(counts)
}

/// Which of the entries a worker holds are still its own, and renews those: resets their idle
/// time with `XCLAIM <stream> <group> <self> 0 <ids> JUSTID`, which (unlike a read) leaves
/// their delivery counts alone, so no other worker's XAUTOCLAIM takes them while this one is
/// alive. XCLAIM takes an entry from whoever owns it, so only entries XPENDING still lists under
/// this consumer are renewed: one reclaimed while this worker was cut off stays with the
/// consumer that took it (it is `lost`, and done twice, never lost). Returns (renewed, lost).
pub async fn renew(
    conn: &mut Conn,
    g: &GroupRef,
    held: &[String],
) -> Result<(Vec<String>, Vec<String>), RedisError> {
    let (Some(first), Some(last)) = (
        held.iter().min_by_key(|id| id_key(id)),
        held.iter().max_by_key(|id| id_key(id)),
    ) else {
        return Ok((Vec::new(), Vec::new()));
    };
    // This consumer's pending IDs from the first held to the last, page by page.
    const PAGE: usize = 1000;
    let mut own: BTreeSet<String> = BTreeSet::new();
    let mut start = first.clone();
    loop {
        let reply: Value = ::redis::cmd("XPENDING")
            .arg(&g.stream)
            .arg(&g.group)
            .arg(&start)
            .arg(last)
            .arg(PAGE)
            .arg(&g.consumer)
            .query_async(conn)
            .await?;
        let mut page = HashMap::new();
        parse_pending_rows(reply, &mut page);
        let full = page.len() >= PAGE;
        let max = page.keys().max_by_key(|id| id_key(id)).cloned();
        own.extend(page.into_keys());
        match (full, max) {
            (true, Some(max)) => start = format!("({max}"),
            _ => break,
        }
    }
    let (renewed, lost): (Vec<String>, Vec<String>) =
        held.iter().cloned().partition(|id| own.contains(id));
    for chunk in renewed.chunks(PAGE) {
        let _: Value = ::redis::cmd("XCLAIM")
            .arg(&g.stream)
            .arg(&g.group)
            .arg(&g.consumer)
            .arg(0)
            .arg(chunk)
            .arg("JUSTID")
            .query_async(conn)
            .await?;
    }
    Ok((renewed, lost))
}

/// Sets the delivery counts of pending entries (this consumer's), `(ID, count)`, with
/// `XCLAIM ... RETRYCOUNT n JUSTID`; used by the model watchdog so that entries that were only
/// queued behind a stuck batch do not pay for it.
pub async fn set_delivery_counts(
    conn: &mut Conn,
    g: &GroupRef,
    counts: &[(String, u64)],
) -> Result<(), RedisError> {
    let mut by_count: HashMap<u64, Vec<&str>> = HashMap::new();
    for (id, n) in counts {
        by_count.entry(*n).or_default().push(id);
    }
    let mut pipe = ::redis::pipe();
    for (n, ids) in &by_count {
        for chunk in ids.chunks(1000) {
            pipe.cmd("XCLAIM")
                .arg(&g.stream)
                .arg(&g.group)
                .arg(&g.consumer)
                .arg(0)
                .arg(chunk)
                .arg("RETRYCOUNT")
                .arg(*n)
                .arg("JUSTID");
        }
    }
    let _: Vec<Value> = pipe.query_async(conn).await?;
    Ok(())
}

/// A stream entry ID as numbers, for ordering ("5-10" after "5-9").
fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The group's state from XINFO GROUPS; None when the stream or the group does not exist.
pub async fn group_info(
    conn: &mut Conn,
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
    conn: &mut Conn,
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

fn parse_entries(entries: Value, read: &mut Read) {
    let Value::Array(list) = entries else { return };
    for item in list {
        let Value::Array(parts) = item else { continue };
        let mut parts = parts.into_iter();
        let Some(id) = parts.next().map(|v| text(&v)) else {
            continue;
        };
        let fields: Vec<(Vec<u8>, Vec<u8>)> = match parts.next() {
            Some(Value::Array(kv)) => {
                let mut kv = kv.into_iter();
                let mut fields = Vec::with_capacity(kv.len() / 2);
                while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    fields.push((into_bytes(k), into_bytes(v)));
                }
                fields
            }
            Some(Value::Map(kv)) => kv
                .into_iter()
                .map(|(k, v)| (into_bytes(k), into_bytes(v)))
                .collect(),
            // A pending entry whose stream entry was deleted or trimmed.
            _ => {
                read.deleted.push(id);
                continue;
            }
        };
        read.entries.push(RawEntry {
            id,
            fields,
            deliveries: 1,
        });
    }
}

/// XACK the given entry IDs.
pub async fn ack(conn: &mut Conn, g: &GroupRef, ids: &[&str]) -> Result<u64, RedisError> {
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
    /// The stream (shard) it was read from.
    pub stream: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
}

/// XADD each dead letter to `dead_stream`: the original fields as given, then the `dead_*`
/// metadata (so a reader folding the entry into a map sees the real metadata even when the
/// document carried a field named like it). With `maxlen` > 0 each XADD trims the stream to about
/// that many entries (MAXLEN ~). The caller acks the entries once this returns: a failure in
/// between gives a duplicate dead letter on retry, never a lost one.
///
/// Returns how many dead letters the cap trimmed: XLEN before and after the XADDs, in the same
/// pipeline (not a MULTI: the worker's ACL has none), so `before + added - after`. Redis runs one
/// client's pipelined commands back to back as they arrive, so this is exact unless another
/// worker's dead letters land in between (then theirs are counted here too, or ours missed).
pub async fn add_dead_letters(
    conn: &mut Conn,
    consumer: &str,
    dead_stream: &str,
    maxlen: u64,
    letters: &[DeadLetterRecord<'_>],
) -> Result<u64, RedisError> {
    if letters.is_empty() {
        return Ok(0);
    }
    let mut pipe = ::redis::pipe();
    pipe.cmd("XLEN").arg(dead_stream);
    for l in letters {
        let cmd = pipe.cmd("XADD").arg(dead_stream);
        if maxlen > 0 {
            cmd.arg("MAXLEN").arg("~").arg(maxlen);
        }
        cmd.arg("*");
        for (k, v) in &l.entry.fields {
            cmd.arg(k.as_slice()).arg(v.as_slice());
        }
        for (k, v) in dead_metadata(l, consumer) {
            cmd.arg(k).arg(v);
        }
    }
    pipe.cmd("XLEN").arg(dead_stream);
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let len = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => (*n).max(0) as u64,
        _ => 0,
    };
    let before = len(replies.first());
    let after = len(replies.last());
    Ok((before + letters.len() as u64).saturating_sub(after))
}

/// The metadata fields of a dead letter, in the order they are written (after the original
/// fields). [`super::dead_letters`] strips exactly this block to recover the original entry.
pub const DEAD_FIELDS: [&str; 6] = [
    "dead_reason",
    "dead_detail",
    "dead_entry_id",
    "dead_stream",
    "dead_worker",
    "dead_deliveries",
];

fn dead_metadata(
    l: &DeadLetterRecord<'_>,
    consumer: &str,
) -> impl Iterator<Item = (&'static str, String)> {
    let values = [
        l.reason.to_string(),
        l.detail.to_string(),
        l.entry.id.clone(),
        l.stream.to_string(),
        consumer.to_string(),
        l.entry.deliveries.to_string(),
    ];
    DEAD_FIELDS.into_iter().zip(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> RawEntry {
        RawEntry {
            id: id.into(),
            fields: vec![(b"content".to_vec(), b"x".to_vec())],
            deliveries: 0,
        }
    }

    #[test]
    fn an_unreported_delivery_count_is_the_worst_case_never_one() {
        let mut entries = vec![entry("1-0"), entry("2-0")];
        let counts = HashMap::from([("1-0".to_string(), 2)]);
        fill_deliveries(&mut entries, &counts, 6);
        assert_eq!(entries[0].deliveries, 2);
        assert_eq!(entries[1].deliveries, 6, "fails closed");
    }

    #[test]
    fn ids_order_numerically() {
        assert!(id_key("5-10") > id_key("5-9"));
        assert!(id_key("10-0") > id_key("9-99"));
    }
}
