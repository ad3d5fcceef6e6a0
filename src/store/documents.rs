//! The documents: where one version of a document is written or deleted. Each change is checked
//! against the stored version and applied atomically on the server by the Redis Functions in
//! `documents.lua` (FCALL), so the newest version wins whatever order workers write in.
//!
//! Storage today is a hash per document; everything the pipeline knows about storage goes
//! through [`DocStore`] and [`Change`], so another storage is a change here, not in the pipeline.

use std::fmt;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};

use super::connect::{classify, Disposition};
use super::query::vector_bytes;
use super::reply::text;
use crate::settings::Settings;

/// The function library, loaded with FUNCTION LOAD REPLACE when the server lacks this version.
pub const LIBRARY: &str = include_str!("documents.lua");
/// Must equal `LIBRARY_VERSION` in documents.lua (a unit test checks); bump both on any change.
const LIBRARY_VERSION: &str = "2";

/// Bookkeeping fields of every document hash: the producer version ("0" when the entry had
/// none) and the stream entry ID of the version stored. Not in the index schema, so never
/// indexed; an entry carrying a field of either name is refused (reserved_field).
pub const VERSION_FIELD: &str = "__ew_version";
pub const ENTRY_FIELD: &str = "__ew_entry";
pub const BOOKKEEPING_FIELDS: [&str; 2] = [VERSION_FIELD, ENTRY_FIELD];

/// A document version, ordered as it wins: by the producer's version (0 when the entry had
/// none), then by stream entry ID (XADD order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub producer: u64,
    pub entry: EntryId,
}

/// A stream entry ID, `<ms>-<seq>`, ordered as Redis orders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    /// None for anything Redis would not hand out as an entry ID.
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// How documents are stored: key layout and tombstones.
#[derive(Debug, Clone)]
pub struct DocStore {
    vector_field: String,
    tombstone_prefix: String,
    tombstone_ttl: Duration,
}

impl DocStore {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            vector_field: s.index.vector_field.clone(),
            tombstone_prefix: s.index.tombstone_prefix.clone(),
            tombstone_ttl: s.index.tombstone_ttl,
        }
    }

    /// The tombstone of the document at `key`: outside the index prefix, and hash-tagged with
    /// the document key so both live in one slot (one FCALL may touch them together).
    pub fn tombstone_key(&self, key: &str) -> String {
        format!("{}{{{key}}}", self.tombstone_prefix)
    }
}

/// One change to one document.
#[derive(Debug)]
pub enum Change<'a> {
    /// Replace the document with exactly these fields and the vector, unless a newer version is stored.
    Upsert {
        key: &'a str,
        version: Version,
        fields: Vec<(&'a [u8], &'a [u8])>,
        vector: &'a [f32],
    },
    /// Remove the document and leave a tombstone, unless a newer version is stored.
    Delete { key: &'a str, version: Version },
}

/// What the server did with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The document now holds this version.
    Written,
    /// The document was removed (a tombstone holds the version).
    Deleted,
    /// A delete of a document that was not there: only the tombstone was written.
    Absent,
    /// A newer version is stored (or tombstoned): nothing changed.
    Superseded,
    /// This very version was applied before (a redelivery after a crash before the ack).
    Current,
}

/// A change's outcome: applied, or refused for the document alone (e.g. its key holds another
/// type), with the server's words.
pub type Outcome = Result<Applied, String>;

/// Applies `changes` in one pipeline; one outcome per change, in order. An error that is not the
/// document's own (connection, OOM, permissions, ...) fails the whole call: the caller retries
/// it or stops, and a retry is safe because every change is version-checked (what was applied
/// answers `Current`).
pub async fn apply(
    conn: &mut MultiplexedConnection,
    store: &DocStore,
    changes: &[Change<'_>],
) -> Result<Vec<Outcome>, RedisError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    match apply_once(conn, store, changes).await {
        // The server lost the library (restarted without persistence, FUNCTION FLUSH): load it
        // and apply again.
        Err(e) if is_missing_function(&e) => {
            load_library(conn).await?;
            apply_once(conn, store, changes).await
        }
        other => other,
    }
}

async fn apply_once(
    conn: &mut MultiplexedConnection,
    store: &DocStore,
    changes: &[Change<'_>],
) -> Result<Vec<Outcome>, RedisError> {
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    let ttl_ms = store.tombstone_ttl.as_millis().max(1) as u64;
    for change in changes {
        match change {
            Change::Upsert {
                key,
                version,
                fields,
                vector,
            } => {
                let cmd = pipe
                    .cmd("FCALL")
                    .arg("ew_upsert")
                    .arg(2)
                    .arg(*key)
                    .arg(store.tombstone_key(key))
                    .arg(version.producer)
                    .arg(version.entry.to_string());
                for (k, v) in fields {
                    cmd.arg(*k).arg(*v);
                }
                cmd.arg(&store.vector_field).arg(vector_bytes(vector));
            }
            Change::Delete { key, version } => {
                pipe.cmd("FCALL")
                    .arg("ew_delete")
                    .arg(2)
                    .arg(*key)
                    .arg(store.tombstone_key(key))
                    .arg(version.producer)
                    .arg(version.entry.to_string())
                    .arg(ttl_ms);
            }
        }
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let mut outcomes = Vec::with_capacity(replies.len());
    for reply in replies {
        outcomes.push(match reply {
            Value::ServerError(e) => {
                let detail = format!("{e:?}");
                let err = RedisError::from(e);
                if refused_for_itself(&err) {
                    Err(detail)
                } else {
                    // The server's state, not the document (OOM, NOPERM, LOADING, a lost
                    // library...): fail the whole call.
                    return Err(err);
                }
            }
            other => Ok(match text(&other).as_str() {
                "written" => Applied::Written,
                "deleted" => Applied::Deleted,
                "absent" => Applied::Absent,
                "superseded" => Applied::Superseded,
                "current" => Applied::Current,
                unexpected => {
                    return Err(RedisError::from((
                        ::redis::ErrorKind::UnexpectedReturnType,
                        "embed_worker function answered",
                        unexpected.to_string(),
                    )))
                }
            }),
        });
    }
    Ok(outcomes)
}

/// Whether a per-command error belongs to the document alone (WRONGTYPE: its key holds another
/// type; an unknown `ERR`): dead-letter it. Errors about the server, our permissions or the
/// function library would refuse every document, so they must never turn a whole stream into
/// dead letters.
fn refused_for_itself(err: &RedisError) -> bool {
    if is_missing_function(err) || is_acl_failure(err) {
        return false;
    }
    match classify(err) {
        Disposition::Retry => false,
        Disposition::Stop => !matches!(err.code(), Some("NOPERM" | "NOAUTH" | "WRONGPASS")),
    }
}

/// A command inside the function refused by the ACL: Redis answers `ERR ACL failure in script`,
/// not NOPERM, and it is about the user's grants (an ACL file older than the library), never the
/// document.
pub fn is_acl_failure(err: &RedisError) -> bool {
    err.to_string().to_lowercase().contains("acl failure")
}

fn is_missing_function(err: &RedisError) -> bool {
    err.to_string()
        .to_lowercase()
        .contains("function not found")
}

/// Loads the function library unless the server already has this version. True if it loaded.
pub async fn ensure_library(conn: &mut MultiplexedConnection) -> Result<bool, RedisError> {
    let loaded: Result<String, RedisError> = ::redis::cmd("FCALL")
        .arg("ew_library_version")
        .arg(0)
        .query_async(conn)
        .await;
    match loaded {
        Ok(v) if v == LIBRARY_VERSION => Ok(false),
        Ok(_) => load_library(conn).await.map(|()| true),
        Err(e) if is_missing_function(&e) => load_library(conn).await.map(|()| true),
        Err(e) => Err(e),
    }
}

async fn load_library(conn: &mut MultiplexedConnection) -> Result<(), RedisError> {
    let _: String = ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async(conn)
        .await?;
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
            "WRONGTYPE Operation against a key holding the wrong kind of value script: ew_upsert",
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
            "ERR Function not found",
            "ERR ACL failure in script: User u has no permissions to run the 'hkeys' command script: ew_upsert, on @user_function:75.",
        ];
        for line in servers {
            assert!(!refused_for_itself(&server_error(line)), "{line}");
        }
    }

    #[test]
    fn the_library_declares_the_version_this_code_expects() {
        assert!(
            LIBRARY.contains(&format!("local LIBRARY_VERSION = '{LIBRARY_VERSION}'")),
            "bump LIBRARY_VERSION in documents.rs and documents.lua together"
        );
        for field in BOOKKEEPING_FIELDS {
            assert!(LIBRARY.contains(&format!("'{field}'")), "{field}");
        }
    }

    #[test]
    fn versions_order_by_producer_version_then_entry_id() {
        let v = |producer, id: &str| Version {
            producer,
            entry: EntryId::parse(id).unwrap(),
        };
        assert!(v(0, "10-0") < v(0, "10-1"));
        assert!(v(0, "9-5") < v(0, "10-0"), "numeric, not string, order");
        assert!(v(2, "1-0") > v(1, "99-0"), "the producer's version first");
        assert_eq!(EntryId::parse("1733-7").unwrap().to_string(), "1733-7");
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(EntryId::parse("17"), None);
    }
}
