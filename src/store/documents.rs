//! The documents: where one version of a document is written or deleted. Each change is checked
//! against the stored version and applied atomically on the server by the Redis Functions in
//! `documents.lua` (FCALL), so the newest version wins whatever order workers write in.
//!
//! Storage today is a hash per document; everything the pipeline knows about storage goes
//! through [`DocStore`] and [`Change`], so another storage is a change here, not in the pipeline.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::connect::{classify, Disposition};
use super::library::{is_missing_function, load_library, DocFn};
use super::query::vector_bytes;
use super::reply::text;
use super::slots::DocKeys;
use crate::settings::{Settings, Storage};

/// Bookkeeping fields of every document hash: the producer version ("0" when the entry had
/// none) and the stream entry ID of the version stored; the fingerprints of the models whose
/// vectors it holds (space-separated: one, or two while `reindex` adds the next model's); the
/// digest of the text and chunking rule its vectors were made from; in each chunk of a
/// multi-chunk document also the number of chunks. Not in the index schema, so never indexed
/// (but the next model's index during `reindex` indexes `__ew_model` as a TAG, to find what it
/// still lacks); an entry carrying a field of any of these names is refused (reserved_field).
pub const VERSION_FIELD: &str = "__ew_version";
pub const ENTRY_FIELD: &str = "__ew_entry";
pub const CHUNKS_FIELD: &str = "__ew_chunks";
pub const MODEL_FIELD: &str = "__ew_model";
pub const DIGEST_FIELD: &str = "__ew_digest";
pub const BOOKKEEPING_FIELDS: [&str; 5] = [
    VERSION_FIELD,
    ENTRY_FIELD,
    CHUNKS_FIELD,
    MODEL_FIELD,
    DIGEST_FIELD,
];

/// The fields of each chunk of a multi-chunk document, besides the parent TAG
/// (`chunk.parent_field`), its text and the entry's other fields: its number from 0, and its
/// span in characters of the document's text (end exclusive).
pub const CHUNK_FIELD: &str = "chunk";
pub const CHUNK_START_FIELD: &str = "chunk_start";
pub const CHUNK_END_FIELD: &str = "chunk_end";
pub const CHUNK_FIELDS: [&str; 3] = [CHUNK_FIELD, CHUNK_START_FIELD, CHUNK_END_FIELD];

/// Between a document key and its chunk number in a chunk's key: `doc:42#3`.
pub const CHUNK_SEPARATOR: char = '#';

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

/// How documents are stored: key layout, chunk fields, tombstones, and which model writes.
#[derive(Debug)]
pub struct DocStore {
    pub storage: Storage,
    /// The schema's NUMERIC fields: JSON numbers on JSON.
    numeric: Vec<String>,
    text_field: String,
    parent_field: String,
    /// The keys of one document, which a cluster must keep in its slot.
    pub keys: DocKeys,
    tombstone_ttl: Duration,
    /// The index's model record (see [`super::generation`]).
    record_key: String,
    /// This writer's model and the hash field its vectors go to: known once start-up has
    /// checked the model against the index's record.
    writer: OnceLock<Writer>,
}

/// Who writes: the model's fingerprint, and the hash field its vectors go to (the index's
/// vector field, as its model record names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub fingerprint: String,
    pub vector_field: String,
}

impl DocStore {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            storage: s.index.storage,
            numeric: s.index.numeric_fields(),
            text_field: s.stream.text_field.clone(),
            parent_field: s.chunk.parent_field.clone(),
            keys: DocKeys::new(&s.index.prefix, &s.index.tombstone_prefix),
            tombstone_ttl: s.index.tombstone_ttl,
            record_key: super::generation::record_key(&s.index.name),
            writer: OnceLock::new(),
        }
    }

    /// A field's value as stored: as given in a hash; on JSON, a JSON number for a NUMERIC
    /// field and a JSON string otherwise (the reader checked both: `entry::number`, UTF-8).
    pub fn value<'v>(&self, name: &[u8], value: &'v [u8]) -> Cow<'v, [u8]> {
        match self.storage {
            Storage::Hash => Cow::Borrowed(value),
            Storage::Json => {
                if self.numeric.iter().any(|n| n.as_bytes() == name) {
                    if let Some(n) = json_number(value) {
                        return Cow::Owned(n.into_bytes());
                    }
                }
                let text = String::from_utf8_lossy(value);
                Cow::Owned(
                    serde_json::Value::String(text.into_owned())
                        .to_string()
                        .into_bytes(),
                )
            }
        }
    }

    /// A vector as stored: little-endian float32 bytes in a hash, an array of numbers on JSON.
    pub fn vector(&self, vector: &[f32]) -> Vec<u8> {
        match self.storage {
            Storage::Hash => vector_bytes(vector),
            Storage::Json => serde_json::to_vec(vector).expect("floats serialise"),
        }
    }

    /// Sets who writes, once (start-up, after the model check).
    pub fn set_writer(&self, writer: Writer) {
        let _ = self.writer.set(writer);
    }

    fn writer(&self) -> &Writer {
        self.writer
            .get()
            .expect("the writer is set at start-up, before any write")
    }

    /// The model record as a document function's KEYS[3]: on a cluster it is in another slot,
    /// so the document key stands in (documents.lua `record_in_reach`).
    fn record_arg<'k>(&'k self, key: &'k str) -> &'k str {
        if self.keys.on_cluster() {
            key
        } else {
            &self.record_key
        }
    }
}

/// One change to one document.
#[derive(Debug)]
pub enum Change<'a> {
    /// Replace the document with exactly this body, unless a newer version is stored.
    Upsert {
        key: &'a str,
        version: Version,
        /// The digest of the text and chunking rule (see `pipeline::unchanged`).
        digest: &'a str,
        body: Body<'a>,
    },
    /// Replace the document's fields and version but keep its vectors, if it holds this
    /// digest's vectors of this writer's model (`Unchanged`); else change nothing (`Changed`).
    Touch {
        key: &'a str,
        version: Version,
        digest: &'a str,
        /// The document id, the chunks' parent.
        parent: &'a str,
        /// Every field the entry stores, its text included.
        fields: Vec<(&'a [u8], &'a [u8])>,
    },
    /// Remove the document (every chunk) and leave a tombstone, unless a newer version is stored.
    Delete { key: &'a str, version: Version },
}

/// What an upsert stores.
#[derive(Debug)]
pub enum Body<'a> {
    /// A document that fits one chunk: one hash at its key, these fields and the vector.
    Whole {
        fields: Vec<(&'a [u8], &'a [u8])>,
        vector: &'a [f32],
    },
    /// A longer document: one hash per chunk (`<key>#<n>`), each holding the parent id, the
    /// `shared` fields (the entry's fields but the text) and its own text, number, span and vector.
    Chunks {
        parent: &'a str,
        shared: Vec<(&'a [u8], &'a [u8])>,
        chunks: Vec<ChunkBody<'a>>,
    },
}

/// One chunk of a multi-chunk document.
#[derive(Debug)]
pub struct ChunkBody<'a> {
    pub text: &'a str,
    /// Character offsets in the document's text, end exclusive.
    pub chars: std::ops::Range<usize>,
    pub vector: &'a [f32],
}

impl Change<'_> {
    /// Chunk keys to declare when nothing is known of the stored document: as many as this
    /// change writes (at least chunk 0, where a multi-chunk document keeps its version).
    fn chunk_keys_needed(&self) -> usize {
        match self {
            Change::Upsert {
                body: Body::Chunks { chunks, .. },
                ..
            } => chunks.len(),
            _ => 1,
        }
    }

    fn key(&self) -> &str {
        match self {
            Change::Upsert { key, .. } | Change::Touch { key, .. } | Change::Delete { key, .. } => {
                key
            }
        }
    }
}

/// What the server did with a change.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// A touch: the stored document had this text's vectors of this model; its fields and
    /// version were replaced, its vectors kept.
    Unchanged,
    /// A touch: the stored document is absent or differs; nothing changed (embed it).
    Changed,
    /// The index's model record does not list this writer's model among its writers (the
    /// index moved to another model, or is moving): nothing changed, and no write of this
    /// writer will ever be taken. Holds the index's fingerprint ("none": no record).
    WrongModel(String),
}

/// A change's outcome: applied, or refused for the document alone (e.g. its key holds another
/// type), with the server's words.
pub type Outcome = Result<Applied, String>;

/// Applies `changes` in one pipeline; one outcome per change, in order. An error that is not the
/// document's own (connection, OOM, permissions, ...) fails the whole call: the caller retries
/// it or stops, and a retry is safe because every change is version-checked (what was applied
/// answers `Current`).
pub async fn apply(
    conn: &mut Conn,
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

/// Attempts at one change that each find more stored chunks than declared (another worker
/// keeps growing the document in between) before the call fails as transient.
const MAX_KEY_ROUNDS: usize = 8;

/// What one FCALL answered.
enum Reply {
    Done(Outcome),
    /// The stored document has this many chunks: call again declaring them.
    NeedKeys(usize),
}

async fn apply_once(
    conn: &mut Conn,
    store: &DocStore,
    changes: &[Change<'_>],
) -> Result<Vec<Outcome>, RedisError> {
    let mut outcomes: Vec<Option<Outcome>> = changes.iter().map(|_| None).collect();
    // (change index, chunk keys to declare) still to send.
    let mut todo: Vec<(usize, usize)> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.chunk_keys_needed()))
        .collect();
    for _ in 0..MAX_KEY_ROUNDS {
        if todo.is_empty() {
            break;
        }
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for &(i, declared) in &todo {
            push_call(&mut pipe, store, &changes[i], declared);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut again = Vec::new();
        for (&(i, declared), reply) in todo.iter().zip(replies) {
            match parse_reply(reply)? {
                Reply::Done(outcome) => outcomes[i] = Some(outcome),
                Reply::NeedKeys(n) => again.push((i, n.max(declared + 1))),
            }
        }
        todo = again;
    }
    if let Some(&(i, _)) = todo.first() {
        return Err(RedisError::from((
            ::redis::ErrorKind::Server(::redis::ServerErrorKind::TryAgain),
            "document kept growing while being written",
            changes[i].key().to_string(),
        )));
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every change answered"))
        .collect())
}

/// Adds the FCALL of `change` to `pipe`, declaring `chunk_keys` chunk keys.
fn push_call(
    pipe: &mut ::redis::Pipeline,
    store: &DocStore,
    change: &Change<'_>,
    chunk_keys: usize,
) {
    let function = match change {
        Change::Upsert { .. } => DocFn::Upsert,
        Change::Touch { .. } => DocFn::Touch,
        Change::Delete { .. } => DocFn::Delete,
    }
    .name(store.storage);
    let key = change.key();
    let writer = store.writer();
    let cmd = pipe
        .cmd("FCALL")
        .arg(function)
        .arg(3 + chunk_keys)
        .arg(key)
        .arg(store.keys.tombstone(key))
        .arg(store.record_arg(key));
    for n in 0..chunk_keys {
        cmd.arg(store.keys.chunk(key, n));
    }
    match change {
        Change::Touch {
            version,
            digest,
            parent,
            fields,
            ..
        } => {
            cmd.arg(version.producer)
                .arg(version.entry.to_string())
                .arg(&writer.fingerprint)
                .arg(*digest)
                .arg(&store.text_field)
                .arg(&store.parent_field)
                .arg(*parent)
                .arg(fields.len());
            for (k, v) in fields {
                cmd.arg(*k).arg(store.value(k, v).as_ref());
            }
            cmd.arg(&writer.vector_field);
        }
        Change::Upsert {
            version,
            digest,
            body,
            ..
        } => {
            cmd.arg(version.producer)
                .arg(version.entry.to_string())
                .arg(&writer.fingerprint)
                .arg(*digest);
            match body {
                Body::Whole { fields, vector } => {
                    cmd.arg(1).arg(0).arg(fields.len() + 1);
                    for (k, v) in fields {
                        cmd.arg(*k).arg(store.value(k, v).as_ref());
                    }
                    cmd.arg(&writer.vector_field).arg(store.vector(vector));
                }
                Body::Chunks {
                    parent,
                    shared,
                    chunks,
                } => {
                    cmd.arg(chunks.len()).arg(shared.len() + 1);
                    cmd.arg(&store.parent_field)
                        .arg(store.value(b"", parent.as_bytes()).as_ref());
                    for (k, v) in shared {
                        cmd.arg(*k).arg(store.value(k, v).as_ref());
                    }
                    for (n, c) in chunks.iter().enumerate() {
                        cmd.arg(5)
                            .arg(&store.text_field)
                            .arg(store.value(b"", c.text.as_bytes()).as_ref())
                            .arg(CHUNK_FIELD)
                            // Digits: the same text in a hash and a JSON number.
                            .arg(n)
                            .arg(CHUNK_START_FIELD)
                            .arg(c.chars.start)
                            .arg(CHUNK_END_FIELD)
                            .arg(c.chars.end)
                            .arg(&writer.vector_field)
                            .arg(store.vector(c.vector));
                    }
                }
            }
        }
        Change::Delete { version, .. } => {
            let ttl_ms = store.tombstone_ttl.as_millis().max(1) as u64;
            cmd.arg(version.producer)
                .arg(version.entry.to_string())
                .arg(ttl_ms)
                .arg(&writer.fingerprint);
        }
    }
}

/// A NUMERIC value as JSON number text: an integer as such, anything else as a float.
fn json_number(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(i) = text.parse::<i64>() {
        return Some(i.to_string());
    }
    let f = crate::pipeline::entry::number(value)?;
    serde_json::Number::from_f64(f).map(|n| n.to_string())
}

/// One FCALL's reply: its outcome, or an error that is not the document's own (the caller
/// fails the whole call).
fn parse_reply(reply: Value) -> Result<Reply, RedisError> {
    Ok(Reply::Done(match reply {
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
            "unchanged" => Applied::Unchanged,
            "changed" => Applied::Changed,
            answer => {
                if let Some(n) = answer.strip_prefix("keys ").and_then(|n| n.parse().ok()) {
                    return Ok(Reply::NeedKeys(n));
                }
                if let Some(fingerprint) = answer.strip_prefix("model ") {
                    return Ok(Reply::Done(Ok(Applied::WrongModel(
                        fingerprint.to_string(),
                    ))));
                }
                return Err(RedisError::from((
                    ::redis::ErrorKind::UnexpectedReturnType,
                    "embed_worker function answered",
                    answer.to_string(),
                )));
            }
        }),
    }))
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
