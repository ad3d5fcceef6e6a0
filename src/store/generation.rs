//! The index's model record: which model's vectors the index holds, so vector spaces never mix.
//!
//! One hash beside the index, `embed:index:{<index.name>}` (e.g. `embed:index:{vector_idx}`):
//!
//! | field | holds |
//! |---|---|
//! | `fingerprint`, `model` | the index's model: its [`Fingerprint`](crate::model::Fingerprint) and name |
//! | `index`, `vector_field` | the FT index holding its vectors (`index.name` itself, or after a `reindex` the index that name is an alias of) and the hash field of its vectors |
//! | `writers` | the fingerprints whose writes the document functions take (space-separated; empty while `reindex` switches) |
//! | `next_*`, `state` | during `reindex`: the next model's fingerprint, name, index and vector field; `migrating` or `switching` |
//! | `old_*` | after a switch, until `reindex --drop-old`: the previous model's |
//!
//! The first worker of an index creates it (`ew_adopt`); every worker compares its model with
//! it before it writes anything, and every document function checks `writers` as it writes.

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::reply::{pairs, text};

/// The record's key for the index `index_name` (hash-tagged by the index name).
pub fn record_key(index_name: &str) -> String {
    format!("embed:index:{{{index_name}}}")
}

/// One model's vectors in the index: whose, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub fingerprint: String,
    pub model: String,
    /// The FT index over them.
    pub index: String,
    /// The hash field holding them.
    pub vector_field: String,
}

/// A generation's fields in the record, after its prefix ("", "next_" or "old_").
const MEMBERS: [&str; 4] = ["fingerprint", "model", "index", "vector_field"];

impl Generation {
    fn values(&self) -> [&str; 4] {
        [
            &self.fingerprint,
            &self.model,
            &self.index,
            &self.vector_field,
        ]
    }

    /// `HSET` arguments naming this generation under `prefix`.
    fn hset_args(&self, prefix: &str) -> Vec<String> {
        MEMBERS
            .iter()
            .zip(self.values())
            .flat_map(|(m, v)| [format!("{prefix}{m}"), v.to_string()])
            .collect()
    }
}

/// The record's fields of the generation under `prefix`.
fn member_names(prefix: &str) -> [String; 4] {
    MEMBERS.map(|m| format!("{prefix}{m}"))
}

/// What a `reindex` is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Adding the next model's vectors while the current model's workers write.
    Migrating,
    /// Writers are held off for the last documents, then the name moves.
    Switching,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub current: Generation,
    pub writers: Vec<String>,
    /// During a reindex: the model it moves to, and how far it is.
    pub next: Option<(Generation, Phase)>,
    /// After a switch, until the old vectors are removed.
    pub old: Option<Generation>,
}

/// What a worker of one model may do with the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write: the index holds this model's vectors.
    Write(Generation),
    /// Wait: a reindex is moving the index to this model; it writes once the switch is done.
    Wait,
    /// Never write: the index holds another model's vectors.
    Refuse,
}

impl Record {
    fn parse(reply: &Value) -> Option<Self> {
        let kv: Vec<(String, String)> = pairs(reply)
            .into_iter()
            .map(|(k, v)| (k, text(&v)))
            .collect();
        let get = |k: &str| kv.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let generation = |p: &str| {
            let [fingerprint, model, index, vector_field] = member_names(p).map(|n| get(&n));
            Some(Generation {
                fingerprint: fingerprint?,
                model: model.unwrap_or_default(),
                index: index?,
                vector_field: vector_field?,
            })
        };
        let phase = match get("state").as_deref() {
            Some("switching") => Phase::Switching,
            _ => Phase::Migrating,
        };
        Some(Self {
            current: generation("")?,
            writers: get("writers")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            next: generation("next_").map(|g| (g, phase)),
            old: generation("old_"),
        })
    }

    /// What a worker whose model has `fingerprint` may do.
    pub fn verdict(&self, fingerprint: &str) -> Verdict {
        if self.writers.iter().any(|w| w == fingerprint) {
            Verdict::Write(self.current.clone())
        } else if self
            .next
            .as_ref()
            .is_some_and(|(g, _)| g.fingerprint == fingerprint)
        {
            Verdict::Wait
        } else {
            Verdict::Refuse
        }
    }
}

/// The record, `None` when there is none.
pub async fn load(conn: &mut Conn, key: &str) -> Result<Option<Record>, RedisError> {
    let reply: Value = ::redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok(Record::parse(&reply))
}

/// Names `next` as the model a reindex moves the index to (phase: migrating).
pub async fn name_next(conn: &mut Conn, key: &str, next: &Generation) -> Result<(), RedisError> {
    ::redis::cmd("HSET")
        .arg(key)
        .arg(next.hset_args("next_"))
        .arg("state")
        .arg("migrating")
        .query_async(conn)
        .await
}

/// Holds every writer off (phase: switching): the document functions refuse all models.
pub async fn hold_writers(conn: &mut Conn, key: &str) -> Result<(), RedisError> {
    ::redis::cmd("HSET")
        .arg(key)
        .arg("writers")
        .arg("")
        .arg("state")
        .arg("switching")
        .query_async(conn)
        .await
}

/// Adds to `tx` (a MULTI) the record's switch: `next` becomes the index's model and its only
/// writer, `current` the old one, and the reindex's fields go.
pub fn push_switch(tx: &mut ::redis::Pipeline, key: &str, current: &Generation, next: &Generation) {
    tx.cmd("HSET")
        .arg(key)
        .arg(next.hset_args(""))
        .arg("writers")
        .arg(&next.fingerprint)
        .arg(current.hset_args("old_"))
        .ignore();
    tx.cmd("HDEL")
        .arg(key)
        .arg(&member_names("next_")[..])
        .arg("state")
        .ignore();
}

/// Forgets the old model once its vectors are gone.
pub async fn forget_old(conn: &mut Conn, key: &str) -> Result<(), RedisError> {
    ::redis::cmd("HDEL")
        .arg(key)
        .arg(&member_names("old_")[..])
        .query_async(conn)
        .await
}

/// The record, created with `first` as the index's model when there is none (atomically: of
/// two workers starting at once on two models, one wins and the other is refused).
pub async fn adopt(conn: &mut Conn, key: &str, first: &Generation) -> Result<Record, RedisError> {
    let reply: Value = ::redis::cmd("FCALL")
        .arg(super::library::FN_ADOPT)
        .arg(1)
        .arg(key)
        .arg(&first.fingerprint)
        .arg(&first.model)
        .arg(&first.index)
        .arg(&first.vector_field)
        .query_async(conn)
        .await?;
    Record::parse(&reply).ok_or_else(|| {
        RedisError::from((
            ::redis::ErrorKind::UnexpectedReturnType,
            "ew_adopt answered no model record",
            format!("{reply:?}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kv: &[(&str, &str)]) -> Value {
        Value::Array(
            kv.iter()
                .flat_map(|(k, v)| {
                    [
                        Value::BulkString(k.as_bytes().to_vec()),
                        Value::BulkString(v.as_bytes().to_vec()),
                    ]
                })
                .collect(),
        )
    }

    #[test]
    fn a_worker_writes_waits_or_is_refused_by_the_record() {
        let base = [
            ("fingerprint", "aaa"),
            ("model", "m (model.onnx, 384 dims)"),
            ("index", "vector_idx"),
            ("vector_field", "embedding"),
            ("writers", "aaa"),
        ];
        let r = Record::parse(&reply(&base)).unwrap();
        assert_eq!(r.current.index, "vector_idx");
        assert!(matches!(r.verdict("aaa"), Verdict::Write(g) if g.vector_field == "embedding"));
        assert_eq!(r.verdict("bbb"), Verdict::Refuse);
        let mut moving = base.to_vec();
        moving.extend([
            ("next_fingerprint", "bbb"),
            ("next_model", "m (model_int8.onnx, 384 dims)"),
            ("next_index", "vector_idx@bbb"),
            ("next_vector_field", "embedding@bbb"),
            ("state", "switching"),
        ]);
        moving[4] = ("writers", "");
        let r = Record::parse(&reply(&moving)).unwrap();
        assert_eq!(r.next.as_ref().unwrap().1, Phase::Switching);
        assert_eq!(
            r.verdict("aaa"),
            Verdict::Refuse,
            "nobody writes while it switches"
        );
        assert_eq!(r.verdict("bbb"), Verdict::Wait);
        assert_eq!(r.verdict("ccc"), Verdict::Refuse);
        assert_eq!(Record::parse(&reply(&[])), None);
        assert_eq!(record_key("vector_idx"), "embed:index:{vector_idx}");
    }
}
