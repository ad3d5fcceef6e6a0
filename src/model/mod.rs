//! The model seam: texts -> token ids -> vectors.
//!
//! * [`tokenize`]: `tokenizer.json` with truncation at the model's max length and no fixed padding.
//! * [`onnx`]: the ONNX Runtime session, padding, pooling and normalisation.
//! * [`thread`]: the OS thread that owns a session, so no tokio worker ever runs the model.
//!
//! [`Embedder`] is the one trait in the crate: the pipeline is tested against a fast fake too.

pub mod config;
pub mod fingerprint;
pub mod onnx;
pub mod pooling;
pub mod thread;
pub mod tokenize;

use std::path::PathBuf;

pub use config::EmbeddingConfig;
pub use fingerprint::Fingerprint;
pub use thread::ModelHandle;
pub use tokenize::{Encoded, TextTokenizer, Tokens};

/// Something that turns tokenised texts into vectors of `dimension()` floats.
pub trait Embedder: Send + 'static {
    /// One vector per input, in input order.
    fn embed(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<f32>>, ModelError>;
    /// Length of every vector returned.
    fn dimension(&self) -> usize;
    /// A short name for logs and metrics.
    fn name(&self) -> &str;
}

/// Errors at the model seam. Load errors stop the process; run errors retry the batch split.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "ONNX Runtime library {path}: {reason}. Fix: run `make setup` (it installs onnxruntime==1.32.0 into .venv), \
         or set ORT_DYLIB_PATH / model.ort_library to a libonnxruntime.so of version 1.31 or newer"
    )]
    Runtime { path: String, reason: String },
    #[error("model file {}: {reason}. Fix: run `make model`, or point model.dir / model.file at an ONNX export", path.display())]
    ModelFile { path: PathBuf, reason: String },
    #[error("model {}: {reason}. Fix: use a BERT-style export with inputs input_ids/attention_mask[/token_type_ids] and output [batch, sequence, dim] (see onnx/README.md)", path.display())]
    Signature { path: PathBuf, reason: String },
    #[error("tokenizer {}: {reason}. Fix: run `make model` to copy tokenizer.json beside the model", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("embedding config {}: {reason}. Fix: run `make model` (it writes embedding.json)", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("tokenising failed: {0}")]
    Tokenize(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the model thread has stopped")]
    ThreadGone,
}

impl ModelError {
    /// True for errors of loading (configuration or installation): the process cannot go on.
    pub fn is_fatal(&self) -> bool {
        match self {
            ModelError::Runtime { .. }
            | ModelError::ModelFile { .. }
            | ModelError::Signature { .. }
            | ModelError::Tokenizer { .. }
            | ModelError::Config { .. }
            | ModelError::ThreadGone => true,
            ModelError::Tokenize(_) | ModelError::Inference(_) => false,
        }
    }
}

pub mod fake;

use crate::settings::Settings;

/// Everything needed to embed texts: the tokenizer, the model thread and the model's facts.
#[derive(Clone)]
pub struct Model {
    pub tokenizer: std::sync::Arc<TextTokenizer>,
    pub handle: ModelHandle,
    pub config: EmbeddingConfig,
    /// Which vector space this model writes in (checked against the index's record).
    pub fingerprint: Fingerprint,
}

impl Model {
    /// Loads the ORT library, the session, the tokenizer and embedding.json as the settings say.
    pub fn load(settings: &Settings) -> Result<Self, ModelError> {
        let dir = &settings.model.dir;
        let config = EmbeddingConfig::load(dir)?;
        let tokenizer = TextTokenizer::load(dir, config.max_seq_length)?;
        let options = onnx::OnnxOptions::from_settings(settings);
        let fingerprint =
            Fingerprint::of_files(&options.model_path, &dir.join("tokenizer.json"), &config)?;
        let embedder = onnx::OnnxEmbedder::load(&options, &config)?;
        Ok(Self {
            fingerprint,
            tokenizer: std::sync::Arc::new(tokenizer),
            handle: ModelHandle::spawn(embedder),
            config,
        })
    }

    /// Tokenises and embeds `texts` (blocking; for commands, not for the async pipeline).
    pub fn embed_texts_blocking(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let encoded = self.tokenizer.encode(texts)?;
        self.handle.embed_blocking(encoded)
    }
}
