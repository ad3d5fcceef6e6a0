//! Freshness: how old a stream entry is, read from its ID. An entry ID is `<ms>-<seq>`, where
//! `<ms>` is the Redis server's clock at XADD (or whatever a producer gave as an explicit ID), so
//! every age here is this host's clock minus Redis's: hosts kept in sync by NTP make that error a
//! few milliseconds; a skewed clock shifts every age by the skew (ahead of the worker's clock reads
//! as 0, never negative).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use crate::store::reply;

/// Milliseconds since the Unix epoch on this host (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The millisecond timestamp of an entry ID `<ms>-<seq>`; None for anything else.
pub fn entry_id_ms(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    seq.parse::<u64>().ok()?;
    ms.parse().ok()
}

/// How long before `now_ms` the entry `id` was added: clamped at zero (a Redis clock ahead of
/// this host's), None when `id` is not an entry ID.
pub fn age(now_ms: u64, id: &str) -> Option<Duration> {
    entry_id_ms(id).map(|ms| Duration::from_millis(now_ms.saturating_sub(ms)))
}

/// The smallest ID in the group's pending entries list (XPENDING's summary form, which Redis
/// answers from the PEL's radix tree without walking it); None when nothing is pending or the
/// stream or group is gone.
pub async fn oldest_pending_id(
    conn: &mut Conn,
    stream: &str,
    group: &str,
) -> Result<Option<String>, RedisError> {
    let reply: Result<Value, RedisError> = ::redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await;
    match reply {
        Ok(v) => Ok(smallest_pending(&v)),
        // Deleted between the probe's XINFO GROUPS and this: nothing pending any more.
        Err(e) if reply::is_missing_stream(&e) || e.code() == Some("NOGROUP") => Ok(None),
        Err(e) => Err(e),
    }
}

/// `[count, smallest, greatest, consumers]` -> the smallest ID when count > 0.
fn smallest_pending(v: &Value) -> Option<String> {
    let Value::Array(items) = v else { return None };
    match (items.first(), items.get(1)) {
        (Some(Value::Int(n)), Some(smallest)) if *n > 0 => {
            Some(reply::text(smallest)).filter(|id| !id.is_empty())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_give_their_milliseconds_and_nothing_else_does() {
        assert_eq!(entry_id_ms("1700000000123-0"), Some(1_700_000_000_123));
        assert_eq!(entry_id_ms("5-18"), Some(5));
        for bad in ["", "5", "-1", "5-", "a-1", "5-x", "1-2-3", "doc:0"] {
            assert_eq!(entry_id_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ages_are_clamped_at_zero() {
        assert_eq!(age(10_500, "10000-3"), Some(Duration::from_millis(500)));
        assert_eq!(age(10_000, "12000-0"), Some(Duration::ZERO));
        assert_eq!(age(10_000, "nope"), None);
    }

    #[test]
    fn the_xpending_summary_gives_the_smallest_id_only_when_something_is_pending() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let some = Value::Array(vec![
            Value::Int(2),
            bulk("7-0"),
            bulk("9-1"),
            Value::Array(vec![Value::Array(vec![bulk("c"), bulk("2")])]),
        ]);
        assert_eq!(smallest_pending(&some), Some("7-0".to_string()));
        let none = Value::Array(vec![Value::Int(0), Value::Nil, Value::Nil, Value::Nil]);
        assert_eq!(smallest_pending(&none), None);
        assert_eq!(smallest_pending(&Value::Nil), None);
    }
}
