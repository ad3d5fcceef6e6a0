//! Why an entry can never be indexed: the reasons of dead letters, as labels and metrics name them.

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
    /// The op field is neither "upsert" nor "delete".
    InvalidOp,
    /// The version field is not a non-negative integer below 2^63, or the entry ID is not one.
    InvalidVersion,
    /// A field would overwrite the vector field or a bookkeeping field.
    ReservedField,
    /// Delivered more than `stream.max_deliveries` times without success.
    MaxDeliveries,
    /// The model failed on this document alone (after the batch was split to isolate it).
    ModelError,
    /// Redis refused the write for this document alone (e.g. the key holds another type).
    WriteError,
    /// The entry (field names and values) exceeds `stream.max_entry_bytes`.
    EntryTooLarge,
    /// The text cuts into more than `chunk.max_chunks` chunks.
    TooManyChunks,
    /// A field the schema declares NUMERIC holds no number (never stored as a silent zero).
    InvalidNumber,
    /// With `index.storage = "json"`: a field name or value is not UTF-8, so it cannot be a JSON
    /// string (never re-encoded or guessed at).
    NotJsonText,
}

impl DeadReason {
    pub const ALL: [DeadReason; 15] = [
        DeadReason::MissingText,
        DeadReason::InvalidUtf8,
        DeadReason::EmptyText,
        DeadReason::TextTooLong,
        DeadReason::InvalidId,
        DeadReason::InvalidOp,
        DeadReason::InvalidVersion,
        DeadReason::ReservedField,
        DeadReason::MaxDeliveries,
        DeadReason::ModelError,
        DeadReason::WriteError,
        DeadReason::EntryTooLarge,
        DeadReason::TooManyChunks,
        DeadReason::InvalidNumber,
        DeadReason::NotJsonText,
    ];

    /// The label used in dead letters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MissingText => "missing_text",
            DeadReason::InvalidUtf8 => "invalid_utf8",
            DeadReason::EmptyText => "empty_text",
            DeadReason::TextTooLong => "text_too_long",
            DeadReason::InvalidId => "invalid_id",
            DeadReason::InvalidOp => "invalid_op",
            DeadReason::InvalidVersion => "invalid_version",
            DeadReason::ReservedField => "reserved_field",
            DeadReason::MaxDeliveries => "max_deliveries",
            DeadReason::ModelError => "model_error",
            DeadReason::WriteError => "write_error",
            DeadReason::EntryTooLarge => "entry_too_large",
            DeadReason::TooManyChunks => "too_many_chunks",
            DeadReason::InvalidNumber => "invalid_number",
            DeadReason::NotJsonText => "not_json_text",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
