//! A stream entry becomes an [`Op`]: an upsert to embed, a delete, or a dead letter with a
//! reason. Pure and total: any bytes from the outside world map to one of them, never a panic.

use std::sync::Arc;

use super::op::{Completion, DeadLetter, Delete, Doc, Op};
pub use super::reason::DeadReason;
use crate::store::documents::{
    EntryId, Version, BOOKKEEPING_FIELDS, CHUNK_FIELDS, CHUNK_SEPARATOR,
};
pub use crate::store::stream::RawEntry;

/// The rules an entry is checked against (from the settings).
#[derive(Debug, Clone)]
pub struct EntryRules {
    pub text_field: String,
    pub id_field: String,
    pub op_field: String,
    pub version_field: String,
    pub vector_field: String,
    pub prefix: String,
    pub max_text_bytes: usize,
    pub max_entry_bytes: usize,
    pub max_id_bytes: usize,
    pub max_deliveries: u64,
    control: Arc<[Vec<u8>; 3]>,
    /// Fields an upsert may not carry: the vector, the bookkeeping fields, and the chunk fields
    /// while chunking is on.
    reserved: Arc<[String]>,
    /// Chunking is on.
    chunked: bool,
    /// The chunking rule, part of every text's digest (see [`super::unchanged::digest`]).
    digest_rule: Arc<str>,
    /// The schema's NUMERIC fields: their values must be numbers.
    numeric: Arc<[String]>,
    /// Stored as JSON: every stored field name and value must be UTF-8.
    json: bool,
}

impl EntryRules {
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        let st = &s.stream;
        Self {
            text_field: st.text_field.clone(),
            id_field: st.id_field.clone(),
            op_field: st.op_field.clone(),
            version_field: st.version_field.clone(),
            vector_field: s.index.vector_field.clone(),
            prefix: s.index.prefix.clone(),
            max_text_bytes: st.max_text_bytes,
            max_entry_bytes: st.max_entry_bytes,
            max_id_bytes: st.max_id_bytes,
            max_deliveries: st.max_deliveries,
            control: Arc::new([
                st.id_field.clone().into_bytes(),
                st.op_field.clone().into_bytes(),
                st.version_field.clone().into_bytes(),
            ]),
            reserved: reserved_fields(s).into(),
            chunked: s.parent_field().is_some(),
            digest_rule: super::unchanged::rule(s).into(),
            numeric: s.index.numeric_fields().into(),
            json: s.index.storage == crate::settings::Storage::Json,
        }
    }
}

/// The fields the worker writes itself, which an entry may not carry.
fn reserved_fields(s: &crate::settings::Settings) -> Vec<String> {
    let mut names = vec![s.index.vector_field.clone()];
    names.extend(BOOKKEEPING_FIELDS.iter().map(|f| f.to_string()));
    if s.chunk.strategy == crate::settings::ChunkStrategy::Tokens {
        names.push(s.chunk.parent_field.clone());
        names.extend(CHUNK_FIELDS.iter().map(|f| f.to_string()));
    }
    names
}

/// A stored field that cannot be stored as the schema and storage need: a NUMERIC field that
/// holds no number, or (on JSON) a name or value that is not UTF-8.
fn stored_values_problem(entry: &RawEntry, rules: &EntryRules) -> Option<(DeadReason, String)> {
    let control = |k: &[u8]| rules.control.iter().any(|c| c.as_slice() == k);
    for (k, v) in entry.fields.iter().filter(|(k, _)| !control(k)) {
        let name = String::from_utf8_lossy(k);
        if rules.numeric.iter().any(|n| n.as_bytes() == k.as_slice()) && number(v).is_none() {
            let shown = String::from_utf8_lossy(&v[..v.len().min(64)]).into_owned();
            return Some((
                DeadReason::InvalidNumber,
                format!("field {name:?} is NUMERIC in index.schema but holds {shown:?}"),
            ));
        }
        if rules.json && (std::str::from_utf8(k).is_err() || std::str::from_utf8(v).is_err()) {
            return Some((
                DeadReason::NotJsonText,
                format!(
                    "field {name:?}: its {} is not UTF-8, so it cannot be a JSON string \
                     (index.storage = \"json\")",
                    if std::str::from_utf8(k).is_err() {
                        "name"
                    } else {
                        "value"
                    }
                ),
            ));
        }
    }
    None
}

/// A NUMERIC field's value as the number it spells (finite, surrounding spaces allowed).
pub fn number(v: &[u8]) -> Option<f64> {
    std::str::from_utf8(v)
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
}

/// Characters an id may not hold: whitespace and controls (invisible, ambiguous in logs and
/// tools) and glob metacharacters (an id like `*` would turn `KEYS`/`SCAN MATCH prefix+id` and
/// ACL key patterns into wildcards; braces would make a hash tag).
fn bad_id_char(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '*' | '?' | '[' | ']' | '\\' | '{' | '}')
}

/// While chunking is on, an id may not hold the chunk separator either: `doc:a#1` would be both
/// the document `a#1` and chunk 1 of the document `a`.
fn bad_chunked_id_char(c: char) -> bool {
    bad_id_char(c) || c == CHUNK_SEPARATOR
}

/// The largest producer version accepted: every client's integer type holds it.
const MAX_VERSION: u64 = i64::MAX as u64;

/// Decides what becomes of one entry, read from stream shard `shard`.
pub fn parse(entry: RawEntry, rules: &EntryRules, shard: usize) -> Op {
    match check(&entry, rules) {
        Ok(Checked::Upsert {
            key,
            text_at,
            version,
        }) => {
            let place = super::op::DocPlace {
                id_at: rules.prefix.len(),
                text_at,
                control: rules.control.clone(),
                digest_rule: rules.digest_rule.clone(),
                shard,
            };
            Op::Upsert(Doc::taking_text(entry, key, version, place))
        }
        Ok(Checked::Delete { key, version }) => Op::Delete(Delete {
            done: Completion::new(shard, &entry.id),
            key,
            version,
            entry,
        }),
        Err((reason, detail)) => Op::DeadLetter(DeadLetter {
            done: Completion::new(shard, &entry.id),
            entry,
            reason,
            detail,
        }),
    }
}

/// The index of field `name`. A stream entry may repeat a field name; HSET keeps the last
/// value, so this finds the last one too: the text embedded is then the text stored.
fn position(entry: &RawEntry, name: &str) -> Option<usize> {
    entry.fields.iter().rposition(|(k, _)| k == name.as_bytes())
}

fn find<'a>(entry: &'a RawEntry, name: &str) -> Option<&'a Vec<u8>> {
    position(entry, name).map(|i| &entry.fields[i].1)
}

/// The index of the text's field, once the text is checked.
fn checked_text(entry: &RawEntry, rules: &EntryRules) -> Result<usize, (DeadReason, String)> {
    let Some(at) = position(entry, &rules.text_field) else {
        let detail = format!("no {:?} field", rules.text_field);
        return Err((DeadReason::MissingText, detail));
    };
    let bytes = &entry.fields[at].1;
    if bytes.len() > rules.max_text_bytes {
        let detail = format!("{} bytes (max {})", bytes.len(), rules.max_text_bytes);
        return Err((DeadReason::TextTooLong, detail));
    }
    match std::str::from_utf8(bytes) {
        Ok(t) if t.trim().is_empty() => {
            Err((DeadReason::EmptyText, "text is empty or whitespace".into()))
        }
        Ok(_) => Ok(at),
        Err(e) => {
            let detail = format!("{:?} field is not UTF-8: {e}", rules.text_field);
            Err((DeadReason::InvalidUtf8, detail))
        }
    }
}

/// Field names and values, in bytes: what an entry costs to hold.
pub fn entry_bytes(entry: &RawEntry) -> usize {
    entry.fields.iter().map(|(k, v)| k.len() + v.len()).sum()
}

enum Checked {
    Upsert {
        key: String,
        /// The index of the text's field in the entry.
        text_at: usize,
        version: Version,
    },
    Delete {
        key: String,
        version: Version,
    },
}

fn check(entry: &RawEntry, rules: &EntryRules) -> Result<Checked, (DeadReason, String)> {
    if entry.deliveries > rules.max_deliveries {
        let detail = format!(
            "delivered {} times (max {})",
            entry.deliveries, rules.max_deliveries
        );
        return Err((DeadReason::MaxDeliveries, detail));
    }
    let size = entry_bytes(entry);
    if size > rules.max_entry_bytes {
        let detail = format!(
            "{size} bytes of field names and values (max {})",
            rules.max_entry_bytes
        );
        return Err((DeadReason::EntryTooLarge, detail));
    }
    let find = |name: &str| find(entry, name);
    let delete = match find(&rules.op_field).map(|v| v.as_slice()) {
        None | Some(b"upsert") => false,
        Some(b"delete") => true,
        Some(other) => {
            let shown = String::from_utf8_lossy(&other[..other.len().min(64)]).into_owned();
            let detail = format!(
                "{:?} field {shown:?} must be \"upsert\" or \"delete\"",
                rules.op_field
            );
            return Err((DeadReason::InvalidOp, detail));
        }
    };
    // A delete needs only the id; an upsert's text is checked first.
    let text_at = if delete {
        0
    } else {
        checked_text(entry, rules)?
    };
    let id = match find(&rules.id_field) {
        None => entry.id.clone(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Err(_) => return Err((DeadReason::InvalidId, "id is not UTF-8".into())),
            Ok(id) => id.to_string(),
        },
    };
    let bad = if rules.chunked {
        bad_chunked_id_char
    } else {
        bad_id_char
    };
    if id.is_empty() || id.len() > rules.max_id_bytes || id.chars().any(bad) {
        let shown: String = id.chars().take(64).collect();
        let detail = format!(
            "id {shown:?} must be 1..={} bytes without whitespace, control characters or any of *?[]\\{{}}{}",
            rules.max_id_bytes,
            if rules.chunked { "#" } else { "" }
        );
        return Err((DeadReason::InvalidId, detail));
    }
    let producer = match find(&rules.version_field) {
        None => 0,
        Some(bytes) => match std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
        {
            Some(v) if v <= MAX_VERSION && !bytes.starts_with(b"+") => v,
            _ => {
                let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
                let detail = format!(
                    "{:?} field {shown:?} must be an integer from 0 to {MAX_VERSION}",
                    rules.version_field
                );
                return Err((DeadReason::InvalidVersion, detail));
            }
        },
    };
    let Some(entry_id) = EntryId::parse(&entry.id) else {
        return Err((
            DeadReason::InvalidVersion,
            format!("entry ID {:?} is not <ms>-<seq>", entry.id),
        ));
    };
    let version = Version {
        producer,
        entry: entry_id,
    };
    let key = format!("{}{}", rules.prefix, id);
    if delete {
        return Ok(Checked::Delete { key, version });
    }
    for name in rules.reserved.iter() {
        if entry.fields.iter().any(|(k, _)| k == name.as_bytes()) {
            let detail = format!("field {name:?} is reserved for the worker's own use");
            return Err((DeadReason::ReservedField, detail));
        }
    }
    if let Some(bad) = stored_values_problem(entry, rules) {
        return Err(bad);
    }
    // Each model's vectors after a reindex: `<vector_field>@<fingerprint>`.
    let model_vectors = format!("{}@", rules.vector_field);
    if let Some((k, _)) = entry
        .fields
        .iter()
        .find(|(k, _)| k.starts_with(model_vectors.as_bytes()))
    {
        let detail = format!(
            "field {:?} is reserved for the worker's own use (a model's vectors)",
            String::from_utf8_lossy(k)
        );
        return Err((DeadReason::ReservedField, detail));
    }
    Ok(Checked::Upsert {
        key,
        text_at,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> EntryRules {
        let env = [
            ("EMBED_WORKER__STREAM__MAX_TEXT_BYTES", "100"),
            ("EMBED_WORKER__STREAM__MAX_ENTRY_BYTES", "4194304"),
            ("EMBED_WORKER__STREAM__READ_BYTES", "4194304"),
            ("EMBED_WORKER__STREAM__MAX_ID_BYTES", "16"),
            ("EMBED_WORKER__STREAM__MAX_DELIVERIES", "3"),
        ];
        let env = env.map(|(k, v)| (k.to_string(), v.to_string()));
        EntryRules::from_settings(&crate::settings::Settings::load_from(None, env).unwrap())
    }

    fn doc(e: RawEntry) -> Doc {
        match parse(e, &rules(), 0) {
            Op::Upsert(d) => d,
            other => panic!("not an upsert: {other:?}"),
        }
    }

    fn dead(e: RawEntry) -> DeadLetter {
        match parse(e, &rules(), 0) {
            Op::DeadLetter(d) => d,
            other => panic!("not a dead letter: {other:?}"),
        }
    }

    fn entry(fields: &[(&[u8], &[u8])]) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            deliveries: 1,
        }
    }

    fn reason(e: RawEntry) -> DeadReason {
        dead(e).reason
    }

    #[test]
    fn docs_contract() {
        let doc = doc(entry(&[
            (b"id", b"0"),
            (b"content", b"hi"),
            (b"genre", b"persons"),
            (b"op", b"upsert"),
            (b"version", b"7"),
        ]));
        assert_eq!(doc.key, "doc:0");
        assert_eq!(doc.text, "hi");
        assert_eq!(doc.version.producer, 7);
        assert_eq!(doc.version.entry.to_string(), "1-0");
        assert_eq!(doc.id(), "0");
        let fields: Vec<_> = doc.stored_fields().collect();
        assert_eq!(
            fields,
            vec![(&b"content"[..], &b"hi"[..]), (b"genre", b"persons")]
        );
        let others: Vec<_> = doc.other_fields("content").collect();
        assert_eq!(others, vec![(&b"genre"[..], &b"persons"[..])]);
        let no_id = super::tests::doc(entry(&[(b"content", b"hi")]));
        assert_eq!(no_id.key, "doc:1-0");
        assert_eq!(
            no_id.version.producer, 0,
            "no version field: XADD order alone"
        );
    }

    #[test]
    fn a_delete_needs_only_the_id() {
        match parse(entry(&[(b"id", b"7"), (b"op", b"delete")]), &rules(), 0) {
            Op::Delete(d) => {
                assert_eq!(d.key, "doc:7");
                assert_eq!(d.done.entry_id(), "1-0");
            }
            other => panic!("{other:?}"),
        }
        // A delete without an id deletes the document named by its entry ID, like an upsert.
        assert!(matches!(
            parse(entry(&[(b"op", b"delete")]), &rules(), 0),
            Op::Delete(d) if d.key == "doc:1-0"
        ));
    }

    #[test]
    fn every_bad_kind_has_its_reason() {
        let long_text = [b'a'; 101];
        let long_id = [b'a'; 17];
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: [(Fields, DeadReason); 17] = [
            (
                &[(b"content", b"x"), (b"op", b"remove")],
                DeadReason::InvalidOp,
            ),
            (&[(b"op", b"DELETE")], DeadReason::InvalidOp),
            (
                &[(b"content", b"x"), (b"version", b"-1")],
                DeadReason::InvalidVersion,
            ),
            (
                &[(b"op", b"delete"), (b"version", b"1.5")],
                DeadReason::InvalidVersion,
            ),
            (
                &[(b"content", b"x"), (b"version", b"9223372036854775808")],
                DeadReason::InvalidVersion,
            ),
            (
                &[(b"content", b"x"), (b"__ew_entry", b"1-0")],
                DeadReason::ReservedField,
            ),
            (&[(b"id", b"1")], DeadReason::MissingText),
            (&[(b"content", b"\xff\xfe")], DeadReason::InvalidUtf8),
            (&[(b"content", b" \t\n")], DeadReason::EmptyText),
            (&[(b"content", b"")], DeadReason::EmptyText),
            (&[(b"content", &long_text)], DeadReason::TextTooLong),
            (&[(b"content", b"x"), (b"id", b"")], DeadReason::InvalidId),
            (&[(b"content", b"x"), (b"id", b"a*")], DeadReason::InvalidId),
            (
                &[(b"content", b"x"), (b"id", b"a b")],
                DeadReason::InvalidId,
            ),
            (
                &[(b"content", b"x"), (b"id", &long_id)],
                DeadReason::InvalidId,
            ),
            (
                &[(b"content", b"x"), (b"id", b"\xff")],
                DeadReason::InvalidId,
            ),
            (
                &[(b"content", b"x"), (b"embedding", b"zz")],
                DeadReason::ReservedField,
            ),
        ];
        for (fields, want) in cases {
            assert_eq!(reason(entry(fields)), want, "{fields:?}");
        }
        let mut tired = entry(&[(b"content", b"x")]);
        tired.deliveries = 4;
        assert_eq!(reason(tired), DeadReason::MaxDeliveries);
    }

    #[test]
    fn a_repeated_text_field_embeds_what_the_hash_stores() {
        // HSET keeps the last value of a repeated field; the embedded text must be that one.
        let doc = doc(entry(&[
            (b"content", b"first"),
            (b"id", b"a"),
            (b"content", b"last"),
            (b"id", b"b"),
        ]));
        assert_eq!(doc.text, "last");
        assert_eq!(doc.key, "doc:b");
        assert_eq!(
            reason(entry(&[(b"content", b"fine"), (b"content", b"   ")])),
            DeadReason::EmptyText
        );
    }

    #[test]
    fn entry_size_and_chunk_fields_have_their_reasons() {
        let env = [
            ("EMBED_WORKER__STREAM__MAX_TEXT_BYTES", "10"),
            ("EMBED_WORKER__STREAM__MAX_ENTRY_BYTES", "40"),
        ];
        let env = env.map(|(k, v)| (k.to_string(), v.to_string()));
        let rules =
            EntryRules::from_settings(&crate::settings::Settings::load_from(None, env).unwrap());
        let big = entry(&[(b"content", b"short"), (b"meta", &[b'm'; 30])]);
        assert!(
            matches!(parse(big, &rules, 0), Op::DeadLetter(d) if d.reason == DeadReason::EntryTooLarge)
        );
        let fits = entry(&[(b"content", b"short"), (b"meta", &[b'm'; 20])]);
        assert!(matches!(parse(fits, &rules, 0), Op::Upsert(_)));
        let hash = entry(&[(b"content", b"x"), (b"id", b"a#1")]);
        assert!(
            matches!(parse(hash, &rules, 0), Op::DeadLetter(d) if d.reason == DeadReason::InvalidId)
        );
        for name in [
            "parent",
            "chunk",
            "chunk_start",
            "chunk_end",
            "__ew_chunks",
            "__ew_model",
            "__ew_digest",
            "embedding@0123abcd",
        ] {
            let e = entry(&[(b"content", b"x"), (name.as_bytes(), b"1")]);
            assert!(
                matches!(parse(e, &rules, 0), Op::DeadLetter(d) if d.reason == DeadReason::ReservedField),
                "{name}"
            );
        }
        // With chunking off the chunk fields are the producer's own.
        let env = [("EMBED_WORKER__CHUNK__STRATEGY", "none")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let rules =
            EntryRules::from_settings(&crate::settings::Settings::load_from(None, env).unwrap());
        let e = entry(&[(b"content", b"x"), (b"chunk", b"1"), (b"id", b"a#1")]);
        assert!(matches!(parse(e, &rules, 0), Op::Upsert(_)));
    }

    #[test]
    fn rejection_keeps_the_whole_entry() {
        let e = entry(&[(b"content", b"\xff"), (b"other", b"\x00\x01")]);
        assert_eq!(dead(e.clone()).entry, e);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Fuzzed entries: random field names, binary values, huge fields, many fields.
        #[test]
        fn any_entry_is_a_doc_or_a_rejection(
            fields in proptest::collection::vec(
                (prop_oneof![Just(b"content".to_vec()), Just(b"id".to_vec()), Just(b"embedding".to_vec()),
                             proptest::collection::vec(any::<u8>(), 0..12)],
                 prop_oneof![proptest::collection::vec(any::<u8>(), 0..40),
                             "\\PC{0,30}".prop_map(|s| s.into_bytes()),
                             proptest::collection::vec(any::<u8>(), 90..130)]),
                0..300),
            deliveries in 0u64..6,
        ) {
            let e = RawEntry { id: "5-1".into(), fields, deliveries };
            match parse(e.clone(), &rules(), 0) {
                Op::Upsert(doc) => {
                    prop_assert!(doc.key.starts_with("doc:"));
                    prop_assert!(!doc.text.trim().is_empty() && doc.text.len() <= 100);
                    prop_assert!(doc.stored_fields().all(|(k, _)| k != b"id" && k != b"embedding"));
                    // What HSET stores under "content" (the last value) is what gets embedded.
                    let stored = e.fields.iter().rev().find(|(k, _)| k == b"content").map(|(_, v)| v.clone());
                    prop_assert_eq!(stored, Some(doc.text.clone().into_bytes()));
                    prop_assert_eq!(doc.into_entry().0, e);
                }
                Op::Delete(d) => prop_assert_eq!(d.entry, e),
                Op::DeadLetter(r) => prop_assert_eq!(r.entry, e),
                Op::AckOnly(a) => prop_assert!(false, "parse never acks alone: {:?}", a),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Few cases, big inputs: thousands of fields and values far over every limit (up to
        /// 2 MiB) still map to a document or a rejection, with the limits holding.
        #[test]
        fn thousands_of_fields_and_huge_values_never_panic(
            n_fields in 1000usize..5000,
            huge in 0usize..(2 << 20),
            text_len in 0usize..300,
            id_len in 0usize..40,
            filler in any::<u8>(),
        ) {
            let mut fields: Vec<(Vec<u8>, Vec<u8>)> = (0..n_fields)
                .map(|i| (format!("f{i}").into_bytes(), vec![filler; i % 7]))
                .collect();
            fields.push((b"blob".to_vec(), vec![filler; huge]));
            fields.push((b"id".to_vec(), vec![b'k'; id_len]));
            fields.insert(n_fields / 2, (b"content".to_vec(), vec![b'w'; text_len]));
            let e = RawEntry { id: "9-9".into(), fields, deliveries: 1 };
            match parse(e.clone(), &rules(), 0) {
                Op::Upsert(doc) => {
                    prop_assert!(text_len > 0 && text_len <= 100 && id_len > 0 && id_len <= 16);
                    prop_assert_eq!(doc.stored_fields().count(), n_fields + 2);
                }
                Op::Delete(_) | Op::AckOnly(_) => prop_assert!(false, "no op field: an upsert"),
                Op::DeadLetter(r) => {
                    let expected = if text_len == 0 { DeadReason::EmptyText }
                        else if text_len > 100 { DeadReason::TextTooLong }
                        else { DeadReason::InvalidId };
                    prop_assert_eq!(r.reason, expected);
                    prop_assert_eq!(r.entry, e);
                }
            }
        }
    }
}
