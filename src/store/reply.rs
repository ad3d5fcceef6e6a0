//! Reply parsing shared by every command the store sends: values as text or bytes, flat
//! key/value replies as pairs, and XINFO GROUPS read once, by one set of rules.

use ::redis::Value;

/// A reply value as text (bulk strings, simple strings, numbers).
pub fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        Value::Nil => String::new(),
        other => format!("{other:?}"),
    }
}

/// A reply value as bytes (bulk strings as given; anything else as its text).
/// A bulk string's bytes, moved out of the reply (texts may be megabytes).
pub fn into_bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        other => text(&other).into_bytes(),
    }
}

pub fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => text(other).into_bytes(),
    }
}

/// A flat [k, v, k, v, ...] array (or a RESP3 map) as pairs.
pub fn pairs(v: &Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (text(&c[0]), c[1].clone()))
            .collect(),
        Value::Map(items) => items.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        _ => Vec::new(),
    }
}

/// The value of `key` in a pairs list.
pub fn get<'a>(kv: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A non-negative integer field (None when absent, nil or negative).
pub fn uint(kv: &[(String, Value)], key: &str) -> Option<u64> {
    match get(kv, key) {
        Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    }
}

/// One consumer group, as XINFO GROUPS reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    /// Entries not yet delivered to the group; None when Redis cannot tell (after deletions).
    pub lag: Option<u64>,
    /// Entries delivered and not yet acknowledged, all consumers together.
    pub pending: u64,
    pub last_delivered_id: String,
}

/// The group called `name` in an XINFO GROUPS reply, if it is there.
pub fn group_info(reply: &Value, name: &str) -> Option<GroupInfo> {
    let groups = match reply {
        Value::Array(groups) | Value::Set(groups) => groups,
        _ => return None,
    };
    groups.iter().map(pairs).find_map(|kv| {
        let found = get(&kv, "name").map(text)?;
        (found == name).then(|| GroupInfo {
            pending: uint(&kv, "pending").unwrap_or(0),
            lag: uint(&kv, "lag"),
            last_delivered_id: get(&kv, "last-delivered-id").map(text).unwrap_or_default(),
            name: found,
        })
    })
}

/// XINFO on a stream that does not exist answers an error; callers read it as "nothing yet".
pub fn is_missing_stream(e: &::redis::RedisError) -> bool {
    e.to_string().to_lowercase().contains("no such key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn group_info_reads_the_named_group_and_a_nil_lag_as_unknown() {
        let group = |name: &str, pending: i64, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("consumers"),
                Value::Int(1),
                bulk("pending"),
                Value::Int(pending),
                bulk("last-delivered-id"),
                bulk("5-0"),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![
            group("a", 1, Value::Int(2)),
            group("b", 3, Value::Nil),
        ]);
        let b = group_info(&reply, "b").unwrap();
        assert_eq!(
            (b.pending, b.lag, b.last_delivered_id.as_str()),
            (3, None, "5-0")
        );
        assert_eq!(group_info(&reply, "a").unwrap().lag, Some(2));
        assert_eq!(group_info(&reply, "c"), None);
        assert_eq!(group_info(&Value::Nil, "a"), None);
    }
}
