//! Tokenisation with the model's own `tokenizer.json`, overriding what it has baked in:
//! truncation at the model's max sequence length (not the file's 128) and no fixed padding
//! (the model thread pads each batch to its longest member).

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::ModelError;

/// One tokenised text, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and sets truncation to `max_len` tokens, padding off.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let err = |reason: String| ModelError::Tokenizer {
            path: path.clone(),
            reason,
        };
        if !path.is_file() {
            return Err(err("file not found".into()));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| err(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner, path })
    }

    /// Tokenises texts (with special tokens), each truncated, none padded.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoded>, ModelError> {
        texts.iter().map(|t| self.encode_one(t)).collect()
    }

    pub fn encode_one(&self, text: &str) -> Result<Encoded, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenize(format!("{}: {e}", self.path.display())))?;
        Ok(Encoded {
            ids: enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
            type_ids: enc.get_type_ids().iter().map(|&i| i64::from(i)).collect(),
        })
    }
}
