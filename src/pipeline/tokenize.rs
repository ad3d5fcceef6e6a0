//! The tokeniser stage: one read's upserts at a time, tokenised on the blocking pool (never on
//! an async worker). Each tokenised read updates the read size ([`ReadAhead`](super::read_ahead::ReadAhead))
//! and goes to the embedder whole: batches are cut there, in one place. A text the tokenizer
//! refuses is dead-lettered.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::entry::{DeadReason, Doc};
use super::op::Write;
use super::shared::Ctx;
use super::WorkerError;
use crate::model::{Encoded, Model, TextTokenizer};
use crate::observe::metrics::{Metrics, Stage};

/// Documents with their token ids, position by position.
pub struct Tokenized {
    pub docs: Vec<Doc>,
    pub encoded: Vec<Encoded>,
}

pub async fn tokenizer(
    ctx: Arc<Ctx>,
    model: Model,
    mut reads: mpsc::Receiver<Vec<Doc>>,
    tokenized: mpsc::Sender<Tokenized>,
    writes: mpsc::Sender<Vec<Write>>,
) -> Result<(), WorkerError> {
    while let Some(docs) = reads.recv().await {
        let (read, dead) = tokenize(model.tokenizer.clone(), docs, ctx.metrics.clone()).await;
        let tokens = read.encoded.iter().map(Encoded::len).sum();
        ctx.read_ahead.observe(read.docs.len(), tokens);
        ctx.budget_grew.notify_one();
        if !dead.is_empty() && writes.send(dead).await.is_err() {
            break;
        }
        if !read.docs.is_empty() && tokenized.send(read).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Tokenises texts on the blocking pool; the ones the tokenizer refuses come back as dead letters.
async fn tokenize(
    tokenizer: Arc<TextTokenizer>,
    docs: Vec<Doc>,
    metrics: Arc<Metrics>,
) -> (Tokenized, Vec<Write>) {
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
                Err(e) => dead.push(Write::DeadLetter(
                    doc.into_dead_letter(DeadReason::ModelError, e.to_string()),
                )),
            }
        }
        metrics.stage(Stage::Tokenize, started.elapsed());
        (out, dead)
    })
    .await
    .expect("tokenising never panics on input; a panic here is a bug worth crashing for")
}
