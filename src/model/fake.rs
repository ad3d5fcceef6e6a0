//! A fast, deterministic stand-in for the real model, for pipeline tests only.
//! Vectors depend on the token ids alone (never on batch-mates), like a correct model's.

use super::{Embedder, Encoded, ModelError};

pub struct FakeEmbedder {
    pub dimension: usize,
    /// A token id that makes the whole batch fail, to exercise batch isolation.
    pub poison_token: Option<i64>,
}

impl Embedder for FakeEmbedder {
    fn embed(&mut self, batch: &[Encoded]) -> Result<Vec<Vec<f32>>, ModelError> {
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
