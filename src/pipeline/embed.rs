//! The embed stage: tokenise a window of documents (off the async workers), cut it into
//! length-aware batches, run each through the model thread. A batch the model rejects is split
//! in halves until the culprit is alone; only it is dead-lettered.

use std::sync::Arc;
use std::time::Instant;

use super::batch::{padded_tokens, plan, BatchLimits};
use super::entry::{DeadReason, Doc};
use super::write::DeadLetter;
use crate::model::{Encoded, ModelError, ModelHandle, TextTokenizer};
use crate::observe::metrics::{Metrics, Stage};

/// Documents with their token ids, in the order the batcher chose.
pub struct Tokenized {
    pub docs: Vec<Doc>,
    pub encoded: Vec<Encoded>,
}

/// Tokenises texts on the blocking pool. A text the tokenizer refuses is dead-lettered.
pub async fn tokenize(
    tokenizer: Arc<TextTokenizer>,
    docs: Vec<Doc>,
    metrics: Arc<Metrics>,
) -> (Tokenized, Vec<DeadLetter>) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut out = Tokenized {
            docs: Vec::with_capacity(docs.len()),
            encoded: Vec::with_capacity(docs.len()),
        };
        let mut dead = Vec::new();
        for doc in docs {
            match tokenizer.encode_one(&doc.text) {
                Ok(enc) => {
                    out.docs.push(doc);
                    out.encoded.push(enc);
                }
                Err(e) => dead.push(DeadLetter {
                    entry: doc.entry,
                    reason: DeadReason::ModelError,
                    detail: e.to_string(),
                }),
            }
        }
        metrics.stage(Stage::Tokenize, started.elapsed());
        (out, dead)
    })
    .await
    .expect("tokenising never panics on input; a panic here is a bug worth crashing for")
}

/// Splits a tokenised window into batches under the limits.
pub fn batches(t: Tokenized, limits: BatchLimits) -> Vec<Tokenized> {
    let lengths: Vec<usize> = t.encoded.iter().map(Encoded::len).collect();
    let plan = plan(&lengths, limits);
    let mut docs: Vec<Option<Doc>> = t.docs.into_iter().map(Some).collect();
    let mut encoded: Vec<Option<Encoded>> = t.encoded.into_iter().map(Some).collect();
    plan.into_iter()
        .map(|idx| Tokenized {
            docs: idx
                .iter()
                .map(|&i| docs[i].take().expect("plan lists each index once"))
                .collect(),
            encoded: idx
                .iter()
                .map(|&i| encoded[i].take().expect("plan lists each index once"))
                .collect(),
        })
        .collect()
}

/// Plans several batches again as one window (a single batch is returned as it is).
pub fn replan(queued: Vec<Tokenized>, limits: BatchLimits) -> Vec<Tokenized> {
    if queued.len() < 2 {
        return queued;
    }
    let mut all = Tokenized {
        docs: Vec::new(),
        encoded: Vec::new(),
    };
    for t in queued {
        all.docs.extend(t.docs);
        all.encoded.extend(t.encoded);
    }
    batches(all, limits)
}

/// Embeds one batch. Returns the embedded documents and the ones the model failed on alone.
/// A fatal model error (the thread is gone) is returned as an error: the worker stops.
pub async fn embed_batch(
    model: &ModelHandle,
    batch: Tokenized,
    metrics: &Metrics,
) -> Result<(Vec<(Doc, Vec<f32>)>, Vec<DeadLetter>), ModelError> {
    let mut done = Vec::with_capacity(batch.docs.len());
    let mut dead = Vec::new();
    // Work list of sub-batches; a failing one is split until single documents remain.
    let mut work = vec![batch];
    while let Some(b) = work.pop() {
        if b.docs.is_empty() {
            continue;
        }
        let started = Instant::now();
        metrics.batch(
            b.docs.len(),
            padded_tokens(b.encoded.iter().map(Encoded::len)),
        );
        match model.embed(b.encoded.clone()).await {
            Ok(vectors) => {
                metrics.stage(Stage::Model, started.elapsed());
                metrics.embedded(vectors.len());
                done.extend(b.docs.into_iter().zip(vectors));
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                metrics.error("model");
                if b.docs.len() == 1 {
                    let doc = b.docs.into_iter().next().expect("len is 1");
                    tracing::debug!(entry = %doc.entry.id, error = %e, "model failed on this document alone");
                    dead.push(DeadLetter {
                        entry: doc.entry,
                        reason: DeadReason::ModelError,
                        detail: e.to_string(),
                    });
                } else {
                    tracing::warn!(docs = b.docs.len(), error = %e, "model failed on a batch; splitting it to isolate the culprit");
                    let Tokenized {
                        mut docs,
                        mut encoded,
                    } = b;
                    let half = docs.len() / 2;
                    let right = Tokenized {
                        docs: docs.split_off(half),
                        encoded: encoded.split_off(half),
                    };
                    work.push(right);
                    work.push(Tokenized { docs, encoded });
                }
            }
        }
    }
    Ok((done, dead))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::entry::RawEntry;

    fn tokenized(lengths: &[usize], first_id: usize) -> Tokenized {
        let docs = (0..lengths.len())
            .map(|i| Doc {
                entry: RawEntry {
                    id: format!("{}-0", first_id + i),
                    fields: Vec::new(),
                    deliveries: 1,
                },
                key: format!("doc:{}", first_id + i),
                text: "x".into(),
                id_field: b"id".to_vec(),
            })
            .collect();
        let encoded = lengths
            .iter()
            .map(|&n| Encoded {
                ids: vec![1; n],
                type_ids: vec![0; n],
            })
            .collect();
        Tokenized { docs, encoded }
    }

    #[test]
    fn queued_small_batches_become_one_call_and_lose_nothing() {
        let limits = BatchLimits {
            max_docs: 32,
            max_tokens: 2048,
        };
        let queued = vec![
            tokenized(&[20, 22], 0),
            tokenized(&[21], 2),
            tokenized(&[19, 25], 3),
        ];
        let out = replan(queued, limits);
        assert_eq!(out.len(), 1, "five short texts fit one call");
        let mut keys: Vec<&str> = out[0].docs.iter().map(|d| d.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["doc:0", "doc:1", "doc:2", "doc:3", "doc:4"]);
        // Each document keeps its own token ids.
        for (d, e) in out[0].docs.iter().zip(&out[0].encoded) {
            let want = [20, 22, 21, 19, 25][d.key[4..].parse::<usize>().unwrap()];
            assert_eq!(e.len(), want, "{}", d.key);
        }
        // One batch passes through as it is.
        assert_eq!(replan(vec![tokenized(&[300], 9)], limits).len(), 1);
    }
}
