//! `embedding.json`: the sentence-transformers facts the raw ONNX graph does not carry
//! (max sequence length, pooling, normalisation), written by `onnx/export.py`.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingConfig {
    /// Model name, for logs and the metrics info gauge.
    pub name: String,
    /// Tokens kept per text (longer texts are truncated, as sentence-transformers does).
    pub max_seq_length: usize,
    /// Expected vector length; checked against the ONNX output shape.
    pub dimension: usize,
    /// How token vectors become one vector.
    pub pooling: Pooling,
    /// L2-normalise the pooled vector.
    pub normalize: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps.
    Mean,
    /// The first ([CLS]) token.
    Cls,
    /// Element-wise max over the kept tokens.
    Max,
}

impl EmbeddingConfig {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("embedding.json");
        let err = |reason: String| ModelError::Config {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if config.max_seq_length == 0 || config.dimension == 0 {
            return Err(err("max_seq_length and dimension must be > 0".into()));
        }
        Ok(config)
    }
}
