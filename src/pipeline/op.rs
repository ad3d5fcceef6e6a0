//! The messages between stages: what becomes of each stream entry ([`Op`], decided by the
//! reader; an upsert's [`Doc`]), what the writer does ([`Write`]), and the per-entry
//! [`Completion`] that says when an entry may be acked.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::chunk::Span;
use super::reason::DeadReason;
use crate::store::documents::Version;
use crate::store::stream::RawEntry;

/// Acks one stream entry once every part of it is done. An entry is one part: a document cut
/// into chunks is still written as one change, after its last chunk is embedded; a part of
/// work split off an entry would split its completion, and only the last part to finish
/// yields the entry ID. A part dropped unfinished (a crash, a shutdown cut short) never yields
/// it: the entry stays pending for a redelivery.
pub struct Completion {
    inner: Arc<Inner>,
}

struct Inner {
    entry: EntryRef,
    parts_left: AtomicUsize,
}

/// A stream entry: which shard's stream (0 with one stream), and its ID there. Entry IDs are
/// unique only within one stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryRef {
    pub shard: usize,
    pub id: String,
}

impl EntryRef {
    pub fn new(shard: usize, id: &str) -> Self {
        Self {
            shard,
            id: id.to_string(),
        }
    }
}

impl fmt::Display for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id)
    }
}

impl Completion {
    /// The completion of the entry `entry_id` of shard `shard`, as one part.
    pub fn new(shard: usize, entry_id: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                entry: EntryRef::new(shard, entry_id),
                parts_left: AtomicUsize::new(1),
            }),
        }
    }

    pub fn entry_id(&self) -> &str {
        &self.inner.entry.id
    }

    pub fn shard(&self) -> usize {
        self.inner.entry.shard
    }

    /// This part as `n` parts (n >= 1), each of which must finish.
    pub fn split(self, n: usize) -> Vec<Completion> {
        assert!(n >= 1, "an entry has at least one part");
        self.inner.parts_left.fetch_add(n - 1, Ordering::AcqRel);
        let mut parts = Vec::with_capacity(n);
        for _ in 1..n {
            parts.push(Completion {
                inner: self.inner.clone(),
            });
        }
        parts.push(self);
        parts
    }

    /// Marks this part done: the entry ID once the entry's last part is done (ack it now).
    pub fn finish(self) -> Option<EntryRef> {
        (self.inner.parts_left.fetch_sub(1, Ordering::AcqRel) == 1)
            .then(|| self.inner.entry.clone())
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Completion({}, {} left)",
            self.inner.entry.id,
            self.inner.parts_left.load(Ordering::Relaxed)
        )
    }
}

/// A document version ready to embed.
///
/// The text is moved out of the entry, not copied (a text may be a megabyte): `entry` holds an
/// empty value in its place until [`Doc::into_entry`] puts it back.
#[derive(Debug)]
pub struct Doc {
    /// The entry as read, less its text (so a failure later can dead-letter it unchanged).
    pub entry: RawEntry,
    /// The document key: prefix + id.
    pub key: String,
    /// Where the id starts in `key`.
    id_at: usize,
    pub text: String,
    /// The index of the text's field in `entry.fields`.
    text_at: usize,
    pub version: Version,
    /// The digest of the text and the chunking rule, stored with the vectors: an upsert whose
    /// digest (and model) equal the stored ones skips the model.
    pub digest: String,
    /// The control fields (id, op, version): every other field is stored in the document.
    control: Arc<[Vec<u8>; 3]>,
    pub done: Completion,
}

/// Where a document's parts lie: the id in its key, the text among the entry's fields, and the
/// control fields (id, op, version) that are not stored.
#[derive(Debug)]
pub struct DocPlace {
    pub id_at: usize,
    pub text_at: usize,
    pub control: Arc<[Vec<u8>; 3]>,
    /// The chunking rule the digest covers.
    pub digest_rule: Arc<str>,
    /// The stream shard the entry was read from.
    pub shard: usize,
}

impl Doc {
    /// The document of `entry`, its text (checked as UTF-8) moved out of `place.text_at`.
    pub fn taking_text(
        mut entry: RawEntry,
        key: String,
        version: Version,
        place: DocPlace,
    ) -> Self {
        let text = String::from_utf8(std::mem::take(&mut entry.fields[place.text_at].1))
            .expect("checked as UTF-8");
        Doc {
            digest: super::unchanged::digest(&place.digest_rule, &text),
            done: Completion::new(place.shard, &entry.id),
            key,
            id_at: place.id_at,
            text,
            text_at: place.text_at,
            version,
            control: place.control,
            entry,
        }
    }

    /// The document id (the key without the prefix).
    pub fn id(&self) -> &str {
        &self.key[self.id_at..]
    }

    /// The fields stored in the document beside the vector: all but the control fields, as given.
    pub fn stored_fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entry
            .fields
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| !self.control.contains(k))
            .map(|(i, (k, v))| {
                let v = if i == self.text_at {
                    self.text.as_bytes()
                } else {
                    v.as_slice()
                };
                (k.as_slice(), v)
            })
    }

    /// The stored fields but the text field (every value of it): what each chunk of a
    /// multi-chunk document shares.
    pub fn other_fields<'a>(
        &'a self,
        text_field: &'a str,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        self.stored_fields()
            .filter(move |(k, _)| *k != text_field.as_bytes())
    }

    /// The entry, whole again.
    pub fn into_entry(mut self) -> (RawEntry, Completion) {
        self.entry.fields[self.text_at].1 = self.text.into_bytes();
        (self.entry, self.done)
    }

    /// As a dead letter (the model or Redis refused it alone).
    pub fn into_dead_letter(self, reason: DeadReason, detail: String) -> DeadLetter {
        let (entry, done) = self.into_entry();
        DeadLetter {
            entry,
            reason,
            detail,
            done,
        }
    }
}

/// What becomes of one stream entry.
#[derive(Debug)]
pub enum Op {
    /// Embed the text, then replace the document with this version unless a newer one is stored.
    Upsert(Doc),
    /// Remove the document (leaving a tombstone) unless a newer version is stored.
    Delete(Delete),
    /// Copy the entry to the dead-letter stream with its reason, then ack it.
    DeadLetter(DeadLetter),
    /// Nothing to write: ack it.
    AckOnly(AckOnly),
}

/// What the writer is given: every [`Op`] but an upsert arrives as it was read, an upsert with
/// its vector.
#[derive(Debug)]
pub enum Write {
    Upsert(Embedded),
    Delete(Delete),
    DeadLetter(DeadLetter),
    AckOnly(AckOnly),
}

/// An upsert with its vectors: one per chunk, in order (one for a text that fits the model).
#[derive(Debug)]
pub struct Embedded {
    pub doc: Doc,
    pub chunks: Vec<EmbeddedChunk>,
}

/// One chunk's place in the text and its vector.
#[derive(Debug)]
pub struct EmbeddedChunk {
    pub span: Span,
    pub vector: Vec<f32>,
}

/// A delete of the document at `key`.
#[derive(Debug)]
pub struct Delete {
    /// Kept whole so a refusal can dead-letter it unchanged.
    pub entry: RawEntry,
    pub key: String,
    pub version: Version,
    pub done: Completion,
}

/// An entry that can never be indexed, with the reason.
#[derive(Debug)]
pub struct DeadLetter {
    pub entry: RawEntry,
    pub reason: DeadReason,
    pub detail: String,
    pub done: Completion,
}

/// An entry acked without a write.
#[derive(Debug)]
pub struct AckOnly {
    pub why: AckWhy,
    pub done: Completion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckWhy {
    /// A newer entry for the same document came in the same read.
    Superseded,
    /// The entry was deleted from the stream (XDEL, trimming) while it was pending.
    DeletedFromStream,
    /// Its text and model equal the stored document's: fields and version were replaced with
    /// no model run (the unchanged stage).
    Unchanged,
    /// This very version was applied before (a redelivery after a crash before the ack).
    Current,
}

impl Op {
    /// The document this op changes, and the version it would leave there.
    fn target(&self) -> Option<(&str, Version)> {
        match self {
            Op::Upsert(d) => Some((&d.key, d.version)),
            Op::Delete(d) => Some((&d.key, d.version)),
            Op::DeadLetter(_) | Op::AckOnly(_) => None,
        }
    }

    fn into_completion(self) -> Completion {
        match self {
            Op::Upsert(d) => d.done,
            Op::Delete(d) => d.done,
            Op::DeadLetter(d) => d.done,
            Op::AckOnly(a) => a.done,
        }
    }
}

/// Within one read, only the newest op per document is kept; the older ones become
/// `AckOnly(Superseded)` (the newest entry stays pending until it is written, so acking them
/// first loses nothing). Besides newest-wins this saves model work on repeated ids. Dead letters
/// take no part: an entry that cannot be indexed supersedes nothing.
pub fn collapse(ops: Vec<Op>) -> Vec<Op> {
    let mut newest: HashMap<String, (usize, Version)> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Some((key, version)) = op.target() {
            match newest.get_mut(key) {
                Some(best) if best.1 >= version => {}
                Some(best) => *best = (i, version),
                None => {
                    newest.insert(key.to_string(), (i, version));
                }
            }
        }
    }
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| match op.target() {
            Some((key, _)) if newest[key].0 != i => Op::AckOnly(AckOnly {
                why: AckWhy::Superseded,
                done: op.into_completion(),
            }),
            _ => op,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::entry::{parse, EntryRules};
    use proptest::prelude::*;

    #[test]
    fn an_entry_is_acked_once_its_last_part_finishes() {
        let parts = Completion::new(1, "7-0").split(3);
        let ids: Vec<Option<EntryRef>> = parts.into_iter().map(Completion::finish).collect();
        assert_eq!(ids, [None, None, Some(EntryRef::new(1, "7-0"))]);
        assert_eq!(
            Completion::new(0, "8-0").finish(),
            Some(EntryRef::new(0, "8-0"))
        );
        // A part dropped unfinished never acks.
        let mut parts = Completion::new(0, "9-0").split(2);
        drop(parts.pop());
        assert_eq!(parts.pop().unwrap().finish(), None);
    }

    fn rules() -> EntryRules {
        let s = crate::settings::Settings::load_from(None, Vec::new()).unwrap();
        EntryRules::from_settings(&s)
    }

    fn op(id: &str, fields: &[(&str, &str)]) -> Op {
        let entry = RawEntry {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            deliveries: 1,
        };
        parse(entry, &rules(), 0)
    }

    fn kept(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Upsert(d) => Some(format!("upsert {}", d.entry.id)),
                Op::Delete(d) => Some(format!("delete {}", d.entry.id)),
                Op::DeadLetter(d) => Some(format!("dead {}", d.entry.id)),
                Op::AckOnly(_) => None,
            })
            .collect()
    }

    #[test]
    fn the_newest_entry_of_an_id_wins_in_its_read() {
        let long = "a long first version ".repeat(50);
        let ops = collapse(vec![
            op("1-0", &[("id", "x"), ("content", &long)]),
            op("2-0", &[("id", "y"), ("content", "other")]),
            op("3-0", &[("id", "x"), ("content", "Version two: short.")]),
        ]);
        assert_eq!(kept(&ops), ["upsert 2-0", "upsert 3-0"]);
        assert!(matches!(
            &ops[0],
            Op::AckOnly(AckOnly { why: AckWhy::Superseded, done }) if done.entry_id() == "1-0"
        ));
        // A delete is an op like any other; a dead letter supersedes nothing.
        let ops = collapse(vec![
            op("1-0", &[("id", "x"), ("content", "v1")]),
            op("2-0", &[("id", "x"), ("op", "delete")]),
            op("3-0", &[("id", "x"), ("content", "")]),
        ]);
        assert_eq!(kept(&ops), ["delete 2-0", "dead 3-0"]);
        // A producer version outranks stream order.
        let ops = collapse(vec![
            op("1-0", &[("id", "x"), ("content", "v5"), ("version", "5")]),
            op("2-0", &[("id", "x"), ("content", "v4"), ("version", "4")]),
        ]);
        assert_eq!(kept(&ops), ["upsert 1-0"]);
    }

    proptest! {
        /// Every entry comes out exactly once, in order; per id exactly the newest op survives.
        #[test]
        fn collapse_keeps_one_op_per_id_and_loses_no_entry(
            plan in proptest::collection::vec((0u8..4, any::<bool>(), proptest::option::of(0u64..3)), 0..40),
        ) {
            let ops: Vec<Op> = plan.iter().enumerate().map(|(i, (id, delete, version))| {
                let id = id.to_string();
                let version = version.map(|v| v.to_string());
                let mut fields = vec![("id", id.as_str())];
                if *delete { fields.push(("op", "delete")) } else { fields.push(("content", "t")) }
                if let Some(v) = &version { fields.push(("version", v)) }
                op(&format!("{}-0", i + 1), &fields)
            }).collect();
            let out = collapse(ops);
            prop_assert_eq!(out.len(), plan.len());
            for (i, o) in out.iter().enumerate() {
                let entry = match o {
                    Op::Upsert(d) => d.done.entry_id().to_string(),
                    Op::Delete(d) => d.done.entry_id().to_string(),
                    Op::DeadLetter(d) => d.done.entry_id().to_string(),
                    Op::AckOnly(a) => a.done.entry_id().to_string(),
                };
                prop_assert_eq!(entry, format!("{}-0", i + 1));
            }
            for id in 0u8..4 {
                let mine: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].0 == id).collect();
                let survivors: Vec<usize> = mine.iter().copied()
                    .filter(|&i| !matches!(out[i], Op::AckOnly(_))).collect();
                if mine.is_empty() { continue; }
                let best = *mine.iter().max_by_key(|&&i| (plan[i].2.unwrap_or(0), i)).unwrap();
                prop_assert_eq!(survivors, vec![best]);
            }
        }
    }
}
