//! Writing: each document's hash (fields + vector bytes) in one pipeline, then XACK of exactly
//! the entries whose hash Redis confirmed. Dead letters: XADD to the dead-letter stream with the
//! original fields, then XACK. Nothing is acked that was not written first.

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};

use super::consume::GroupRef;
use super::entry::{DeadReason, Doc, RawEntry};
use crate::redis::connect::{classify, Disposition};
use crate::redis::query::vector_bytes;

/// Outcome of writing one batch: which entries are written (to ack) and which Redis refused
/// for themselves alone (to dead-letter).
#[derive(Debug, Default)]
pub struct Written {
    pub ok: Vec<String>,
    pub refused: Vec<(usize, String)>,
}

/// HSET every document. A connection-level error fails the whole call (retry the batch);
/// a per-command error (e.g. WRONGTYPE) is reported for that document alone.
pub async fn write_hashes(
    conn: &mut MultiplexedConnection,
    docs: &[(Doc, Vec<f32>)],
    vector_field: &str,
) -> Result<Written, RedisError> {
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    for (doc, vector) in docs {
        let cmd = pipe.cmd("HSET").arg(&doc.key);
        for (k, v) in doc.hash_fields() {
            cmd.arg(k.as_slice()).arg(v.as_slice());
        }
        cmd.arg(vector_field).arg(vector_bytes(vector));
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let mut written = Written::default();
    for (i, ((doc, _), reply)) in docs.iter().zip(replies).enumerate() {
        match reply {
            Value::ServerError(e) => {
                let detail = format!("{e:?}");
                let err = RedisError::from(e);
                if refused_for_itself(&err) {
                    written.refused.push((i, detail));
                } else {
                    // The server's state, not the document (OOM, NOPERM, LOADING, READONLY...):
                    // fail the whole call so the caller retries or stops; the hashes already
                    // written are rewritten unchanged by the retry.
                    return Err(err);
                }
            }
            _ => written.ok.push(doc.entry.id.clone()),
        }
    }
    Ok(written)
}

/// Whether a per-command error belongs to the document alone (WRONGTYPE: its key holds another
/// type; an unknown `ERR`): dead-letter it. Errors about the server or our permissions would
/// refuse every document, so they must never turn a whole stream into dead letters.
fn refused_for_itself(err: &RedisError) -> bool {
    match classify(err) {
        Disposition::Retry => false,
        Disposition::Stop => !matches!(err.code(), Some("NOPERM" | "NOAUTH" | "WRONGPASS")),
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

/// A dead letter ready to send.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub entry: RawEntry,
    pub reason: DeadReason,
    pub detail: String,
}

/// XADD each dead letter (the original fields as given, then the `dead_*` metadata, so a reader
/// folding the entry into a map sees the real metadata even when the document carried a field
/// named like it); only once every XADD succeeded, XACK them.
pub async fn dead_letter(
    conn: &mut MultiplexedConnection,
    g: &GroupRef,
    dead_stream: &str,
    letters: &[DeadLetter],
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
        cmd.arg("dead_reason").arg(l.reason.as_str());
        cmd.arg("dead_detail").arg(&l.detail);
        cmd.arg("dead_entry_id").arg(&l.entry.id);
        cmd.arg("dead_stream").arg(&g.stream);
        cmd.arg("dead_worker").arg(&g.consumer);
        cmd.arg("dead_deliveries").arg(l.entry.deliveries);
    }
    // If any XADD fails the call errors before the XACK: the entries stay pending and the whole
    // step is retried (a retry may add a duplicate dead letter, never lose one).
    let _: Vec<Value> = pipe.query_async(conn).await?;
    let ids: Vec<String> = letters.iter().map(|l| l.entry.id.clone()).collect();
    ack(conn, g, &ids).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(line: &str) -> RedisError {
        match ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap() {
            Value::ServerError(e) => RedisError::from(e),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn only_the_documents_own_refusals_become_dead_letters() {
        let own = [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR odd",
        ];
        for line in own {
            assert!(refused_for_itself(&server_error(line)), "{line}");
        }
        let servers = [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "NOPERM User has no permissions to access the 'x' key",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "BUSY Redis is busy running a script.",
        ];
        for line in servers {
            assert!(!refused_for_itself(&server_error(line)), "{line}");
        }
    }
}
