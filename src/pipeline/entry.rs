//! A stream entry becomes a document to embed, or a rejection with a reason.
//! Pure and total: any bytes from the outside world map to one of the two, never a panic.

use std::fmt;

/// Why an entry can never be indexed. Each becomes a dead letter (then an ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The text field is absent.
    MissingText,
    /// The text is not valid UTF-8 (never guessed at).
    InvalidUtf8,
    /// The text is empty or only whitespace: its vector would mean nothing.
    EmptyText,
    /// The text exceeds `stream.max_text_bytes`.
    TextTooLong,
    /// The id is empty, too long, not UTF-8, or holds characters that make keys ambiguous.
    InvalidId,
    /// A field would overwrite the vector field.
    ReservedField,
    /// Delivered more than `stream.max_deliveries` times without success.
    MaxDeliveries,
    /// The model failed on this document alone (after the batch was split to isolate it).
    ModelError,
    /// Redis refused the hash write for this document alone (e.g. the key holds another type).
    WriteError,
}

impl DeadReason {
    pub const ALL: [DeadReason; 9] = [
        DeadReason::MissingText,
        DeadReason::InvalidUtf8,
        DeadReason::EmptyText,
        DeadReason::TextTooLong,
        DeadReason::InvalidId,
        DeadReason::ReservedField,
        DeadReason::MaxDeliveries,
        DeadReason::ModelError,
        DeadReason::WriteError,
    ];

    /// The label used in dead letters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MissingText => "missing_text",
            DeadReason::InvalidUtf8 => "invalid_utf8",
            DeadReason::EmptyText => "empty_text",
            DeadReason::TextTooLong => "text_too_long",
            DeadReason::InvalidId => "invalid_id",
            DeadReason::ReservedField => "reserved_field",
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::ModelError => "model_error",
            DeadReason::WriteError => "write_error",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A raw stream entry: its ID and field/value pairs, bytes as Redis gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// How often the group has delivered it (1 on a first read).
    pub deliveries: u64,
}

/// A document ready to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// The entry as read (kept whole so a failure later can dead-letter it unchanged).
    pub entry: RawEntry,
    /// The hash key: prefix + id.
    pub key: String,
    pub text: String,
    /// The id field's name: every field but this one is copied into the hash.
    pub id_field: Vec<u8>,
}

impl Doc {
    pub fn entry_id(&self) -> &str {
        &self.entry.id
    }

    /// Fields copied into the hash beside the vector: all but the id field.
    pub fn hash_fields(&self) -> impl Iterator<Item = &(Vec<u8>, Vec<u8>)> {
        self.entry
            .fields
            .iter()
            .filter(|(k, _)| *k != self.id_field)
    }
}

/// An entry that goes to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub entry: RawEntry,
    pub reason: DeadReason,
    pub detail: String,
}

/// The rules an entry is checked against (from the settings).
#[derive(Debug, Clone)]
pub struct EntryRules {
    pub text_field: String,
    pub id_field: String,
    pub vector_field: String,
    pub prefix: String,
    pub max_text_bytes: usize,
    pub max_id_bytes: usize,
    pub max_deliveries: u64,
}

impl EntryRules {
    pub fn from_settings(s: &crate::settings::Settings) -> Self {
        Self {
            text_field: s.stream.text_field.clone(),
            id_field: s.stream.id_field.clone(),
            vector_field: s.index.vector_field.clone(),
            prefix: s.index.prefix.clone(),
            max_text_bytes: s.stream.max_text_bytes,
            max_id_bytes: s.stream.max_id_bytes,
            max_deliveries: s.stream.max_deliveries,
        }
    }
}

/// Characters an id may not hold: whitespace and controls (invisible, ambiguous in logs and
/// tools) and glob metacharacters (an id like `*` would turn `KEYS`/`SCAN MATCH prefix+id` and
/// ACL key patterns into wildcards).
fn bad_id_char(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '*' | '?' | '[' | ']' | '\\' | '{' | '}')
}

/// Decides what becomes of one entry.
pub fn parse(entry: RawEntry, rules: &EntryRules) -> Result<Doc, Rejected> {
    let reject = |entry: RawEntry, reason: DeadReason, detail: String| {
        Err(Rejected {
            entry,
            reason,
            detail,
        })
    };
    if entry.deliveries > rules.max_deliveries {
        let detail = format!(
            "delivered {} times (max {})",
            entry.deliveries, rules.max_deliveries
        );
        return reject(entry, DeadReason::MaxDeliveries, detail);
    }
    // A stream entry may repeat a field name; HSET keeps the last value, so read the last one
    // too: the text embedded is then the text stored beside the vector.
    let find = |name: &str| {
        entry
            .fields
            .iter()
            .rev()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v)
    };
    let text = match find(&rules.text_field) {
        None => {
            let detail = format!("no {:?} field", rules.text_field);
            return reject(entry, DeadReason::MissingText, detail);
        }
        Some(bytes) if bytes.len() > rules.max_text_bytes => {
            let detail = format!("{} bytes (max {})", bytes.len(), rules.max_text_bytes);
            return reject(entry, DeadReason::TextTooLong, detail);
        }
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(t) => t.to_string(),
            Err(e) => {
                let detail = format!("{:?} field is not UTF-8: {e}", rules.text_field);
                return reject(entry, DeadReason::InvalidUtf8, detail);
            }
        },
    };
    if text.trim().is_empty() {
        return reject(
            entry,
            DeadReason::EmptyText,
            "text is empty or whitespace".into(),
        );
    }
    let id = match find(&rules.id_field) {
        None => entry.id.clone(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Err(_) => return reject(entry, DeadReason::InvalidId, "id is not UTF-8".into()),
            Ok(id) => id.to_string(),
        },
    };
    if id.is_empty() || id.len() > rules.max_id_bytes || id.chars().any(bad_id_char) {
        let shown: String = id.chars().take(64).collect();
        let detail = format!(
            "id {shown:?} must be 1..={} bytes without whitespace, control characters or any of *?[]\\{{}}",
            rules.max_id_bytes
        );
        return reject(entry, DeadReason::InvalidId, detail);
    }
    if entry
        .fields
        .iter()
        .any(|(k, _)| k == rules.vector_field.as_bytes())
    {
        let detail = format!("field {:?} is reserved for the vector", rules.vector_field);
        return reject(entry, DeadReason::ReservedField, detail);
    }
    Ok(Doc {
        key: format!("{}{}", rules.prefix, id),
        text,
        id_field: rules.id_field.as_bytes().to_vec(),
        entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> EntryRules {
        EntryRules {
            text_field: "content".into(),
            id_field: "id".into(),
            vector_field: "embedding".into(),
            prefix: "doc:".into(),
            max_text_bytes: 100,
            max_id_bytes: 16,
            max_deliveries: 3,
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
        parse(e, &rules()).unwrap_err().reason
    }

    #[test]
    fn docs_contract() {
        let doc = parse(
            entry(&[(b"id", b"0"), (b"content", b"hi"), (b"genre", b"persons")]),
            &rules(),
        )
        .unwrap();
        assert_eq!(doc.key, "doc:0");
        assert_eq!(doc.text, "hi");
        let fields: Vec<_> = doc.hash_fields().cloned().collect();
        assert_eq!(
            fields,
            vec![
                (b"content".to_vec(), b"hi".to_vec()),
                (b"genre".to_vec(), b"persons".to_vec())
            ]
        );
        let no_id = parse(entry(&[(b"content", b"hi")]), &rules()).unwrap();
        assert_eq!(no_id.key, "doc:1-0");
    }

    #[test]
    fn every_bad_kind_has_its_reason() {
        let long_text = [b'a'; 101];
        let long_id = [b'a'; 17];
        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: [(Fields, DeadReason); 11] = [
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
        let doc = parse(
            entry(&[
                (b"content", b"first"),
                (b"id", b"a"),
                (b"content", b"last"),
                (b"id", b"b"),
            ]),
            &rules(),
        )
        .unwrap();
        assert_eq!(doc.text, "last");
        assert_eq!(doc.key, "doc:b");
        assert_eq!(
            reason(entry(&[(b"content", b"fine"), (b"content", b"   ")])),
            DeadReason::EmptyText
        );
    }

    #[test]
    fn rejection_keeps_the_whole_entry() {
        let e = entry(&[(b"content", b"\xff"), (b"other", b"\x00\x01")]);
        assert_eq!(parse(e.clone(), &rules()).unwrap_err().entry, e);
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
            match parse(e.clone(), &rules()) {
                Ok(doc) => {
                    prop_assert!(doc.key.starts_with("doc:"));
                    prop_assert!(!doc.text.trim().is_empty() && doc.text.len() <= 100);
                    prop_assert!(doc.hash_fields().all(|(k, _)| k != b"id" && k != b"embedding"));
                    // What HSET stores under "content" (the last value) is what gets embedded.
                    let stored = e.fields.iter().rev().find(|(k, _)| k == b"content").map(|(_, v)| v.clone());
                    prop_assert_eq!(stored, Some(doc.text.clone().into_bytes()));
                    prop_assert_eq!(&doc.entry, &e);
                }
                Err(r) => prop_assert_eq!(r.entry, e),
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
            match parse(e.clone(), &rules()) {
                Ok(doc) => {
                    prop_assert!(text_len > 0 && text_len <= 100 && id_len > 0 && id_len <= 16);
                    prop_assert_eq!(doc.hash_fields().count(), n_fields + 2);
                }
                Err(r) => {
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
