//! A fast, deterministic stand-in for the real model, for pipeline tests only.
//! Vectors depend on the token ids alone (never on batch-mates), like a correct model's.

use std::sync::Arc;

use super::{Embedder, EmbeddingConfig, Encoded, Model, ModelError, ModelHandle, TextTokenizer};
use crate::settings::Settings;

/// Test-only fault hook of `embed-worker run`: with this set to a word, the worker runs the
/// real tokenizer and this fake model, which hangs for good on any batch holding that word's
/// first token (the model watchdog's test, with real processes).
pub const HANG_HOOK: &str = "EMBED_WORKER_FAULT_FAKE_MODEL_HANGS_ON";

#[derive(Default)]
pub struct FakeEmbedder {
    pub dimension: usize,
    /// A token id that makes the whole batch fail, to exercise batch isolation.
    pub poison_token: Option<u32>,
    /// A token id that makes the call never return, like a model stuck on a text.
    pub hang_token: Option<u32>,
}

impl FakeEmbedder {
    /// The real tokenizer from `model.dir` and a 384-dim fake that hangs on `word`.
    pub fn model_hanging_on(settings: &Settings, word: &str) -> Result<Model, ModelError> {
        let config = EmbeddingConfig::load(&settings.model.dir)?;
        let tokenizer = TextTokenizer::load(&settings.model.dir, config.max_seq_length)?;
        // [CLS] comes first; the word's first piece after it.
        let hang = tokenizer.encode_one(word)?.ids.get(1).copied();
        Ok(Model {
            tokenizer: Arc::new(tokenizer),
            handle: ModelHandle::spawn(FakeEmbedder {
                dimension: 384,
                hang_token: hang,
                ..FakeEmbedder::default()
            }),
            fingerprint: super::Fingerprint::of_fake(&format!("fake hanging on {word}"), &config),
            config,
        })
    }
}

impl Embedder for FakeEmbedder {
    fn embed(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<f32>>, ModelError> {
        if let Some(h) = self.hang_token {
            if batch.iter().any(|e| e.ids.contains(&h)) {
                loop {
                    std::thread::park();
                }
            }
        }
        if let Some(p) = self.poison_token {
            if batch.iter().any(|e| e.ids.contains(&p)) {
                return Err(ModelError::Inference(format!(
                    "fake model refuses token {p}"
                )));
            }
        }
        Ok(batch
            .iter()
            .map(|enc| {
                let mut v = vec![0f32; self.dimension];
                for (i, &id) in enc.ids.iter().enumerate() {
                    v[(id as usize + i) % self.dimension] += 1.0;
                }
                super::pooling::normalize(&mut v);
                v
            })
            .collect())
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn name(&self) -> &str {
        "fake"
    }
}
