//! Tokenisation with the model's own `tokenizer.json`, overriding what it has baked in:
//! truncation at the model's max sequence length (not the file's 128) and no fixed padding
//! (the model thread pads each batch to its longest member). [`TextTokenizer::tokens`] gives
//! the whole text, untruncated, with offsets, for cutting into chunks.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::ModelError;

/// One tokenised text, unpadded: the model's input ids (special tokens included). Its token
/// type ids are all 0 (one sequence), so they are not kept: 4 bytes a token, where the
/// tokenizer's own encoding takes ~60.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
}

/// A whole text tokenised, untruncated: the text's token ids with each one's byte offsets in
/// the text, and the special tokens the model expects before and after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The first slice of a long text tokenised when it is to be truncated anyway (see
/// [`TextTokenizer::encode_one`]); grown x4 until it holds the model's longest input.
const PREFIX_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct TextTokenizer {
    /// Truncating at the model's longest input.
    inner: Tokenizer,
    max_len: usize,
    /// The same, without truncation.
    whole: Tokenizer,
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
        inner.with_padding(None);
        let mut whole = inner.clone();
        whole
            .with_truncation(None)
            .map_err(|e| err(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            inner,
            max_len,
            whole,
            path,
        })
    }

    /// Tokenises texts (with special tokens), each truncated, none padded.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Encoded>, ModelError> {
        texts.iter().map(|t| self.encode_one(t)).collect()
    }

    /// One text, truncated at the model's longest input. A long text is tokenised from a prefix
    /// cut at whitespace, grown until it yields the longest input: the tokenizer splits words at
    /// whitespace first, so those tokens are the whole text's first ones, and a megabyte text
    /// costs what 16 KB do instead of a full tokenisation thrown away by truncation.
    pub fn encode_one(&self, text: &str) -> Result<Encoded, ModelError> {
        let mut len = PREFIX_BYTES;
        while len < text.len() {
            let end = (0..=len)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            if let Some(cut) = text[..end].rfind(char::is_whitespace).filter(|&c| c > 0) {
                let enc = self.encode_exact(&text[..cut])?;
                if enc.len() >= self.max_len {
                    return Ok(enc);
                }
            }
            len = len.saturating_mul(4);
        }
        self.encode_exact(text)
    }

    /// Tokenises (truncating) exactly `text`.
    fn encode_exact(&self, text: &str) -> Result<Encoded, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenize(format!("{}: {e}", self.path.display())))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
        })
    }

    /// Tokenises `text` whole and truncates, without the prefix shortcut (to check it).
    pub fn encode_one_in_full(&self, text: &str) -> Result<Encoded, ModelError> {
        self.encode_exact(text)
    }

    /// The whole text, untruncated, with byte offsets (for [`crate::pipeline::chunk::cut`]).
    pub fn tokens(&self, text: &str) -> Result<Tokens, ModelError> {
        let enc = self
            .whole
            .encode(text, true)
            .map_err(|e| ModelError::Tokenize(format!("{}: {e}", self.path.display())))?;
        let special = enc.get_special_tokens_mask();
        let ids = enc.get_ids();
        let lead = special.iter().take_while(|&&m| m == 1).count();
        let trail = special[lead..]
            .iter()
            .rev()
            .take_while(|&&m| m == 1)
            .count();
        let body = lead..ids.len() - trail;
        Ok(Tokens {
            ids: ids[body.clone()].to_vec(),
            offsets: enc.get_offsets()[body.clone()].to_vec(),
            prefix: ids[..body.start].to_vec(),
            suffix: ids[body.end..].to_vec(),
        })
    }
}
