//! The tokeniser stage: one read's upserts at a time, tokenised on the blocking pool (never on
//! an async worker) and cut into chunks ([`chunk::cut`](super::chunk::cut)) unless chunking is
//! off, when a text is truncated at the model's longest input. Each tokenised read updates the
//! read size ([`ReadAhead`](super::read_ahead::ReadAhead)) and goes to the embedder whole:
//! batches are cut there, in one place. A text the tokenizer refuses, or one of more than
//! `chunk.max_chunks` chunks, is dead-lettered.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::chunk::{self, Chunk, ChunkRule, Span};
use super::op::Doc;
use super::op::Write;
use super::reason::DeadReason;
use super::shared::Ctx;
use super::WorkerError;
use crate::model::{Model, TextTokenizer};
use crate::observe::metrics::{Metrics, Stage};
use crate::settings::{ChunkSettings, ChunkStrategy};

/// One read's documents, each with its chunks (one for a text that fits the model).
pub struct Tokenized {
    pub docs: Vec<Chunked>,
}

/// A document and the chunks its text was cut into, in order.
pub struct Chunked {
    pub doc: Doc,
    pub chunks: Vec<Chunk>,
}

impl Tokenized {
    pub fn tokens(&self) -> usize {
        self.docs
            .iter()
            .flat_map(|d| &d.chunks)
            .map(|c| c.encoded.len())
            .sum()
    }
}

/// How texts become model inputs.
#[derive(Debug, Clone, Copy)]
pub enum Cutting {
    /// Truncated at the model's longest input: one chunk per document.
    Truncate,
    /// Cut into chunks, at most `max_chunks` of them.
    Chunks { rule: ChunkRule, max_chunks: usize },
}

impl Cutting {
    /// From the settings and the model's longest input (`max_len` tokens).
    pub fn new(c: &ChunkSettings, max_len: usize) -> Self {
        match c.strategy {
            ChunkStrategy::None => Cutting::Truncate,
            ChunkStrategy::Tokens => Cutting::Chunks {
                rule: ChunkRule {
                    whole: max_len,
                    size: c.size,
                    overlap: c.overlap,
                },
                max_chunks: c.max_chunks,
            },
        }
    }
}

pub async fn tokenizer(
    ctx: Arc<Ctx>,
    model: Model,
    mut reads: mpsc::Receiver<Vec<Doc>>,
    tokenized: mpsc::Sender<Tokenized>,
    writes: mpsc::Sender<Vec<Write>>,
) -> Result<(), WorkerError> {
    let cutting = Cutting::new(&ctx.settings.chunk, model.config.max_seq_length);
    while let Some(docs) = reads.recv().await {
        let (read, dead) =
            tokenize(model.tokenizer.clone(), docs, cutting, ctx.metrics.clone()).await;
        ctx.read_ahead.observe(read.docs.len(), read.tokens());
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

/// Tokenises (and cuts) texts on the blocking pool; the ones refused come back as dead letters.
async fn tokenize(
    tokenizer: Arc<TextTokenizer>,
    docs: Vec<Doc>,
    cutting: Cutting,
    metrics: Arc<Metrics>,
) -> (Tokenized, Vec<Write>) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut out = Tokenized {
            docs: Vec::with_capacity(docs.len()),
        };
        let mut dead = Vec::new();
        for doc in docs {
            match chunks_of(&tokenizer, &doc.text, cutting) {
                Ok(chunks) => out.docs.push(Chunked { doc, chunks }),
                Err((reason, detail)) => {
                    dead.push(Write::DeadLetter(doc.into_dead_letter(reason, detail)))
                }
            }
        }
        metrics.stage(Stage::Tokenize, started.elapsed());
        (out, dead)
    })
    .await
    .expect("tokenising never panics on input; a panic here is a bug worth crashing for")
}

/// The model inputs of one text.
pub fn chunks_of(
    tokenizer: &TextTokenizer,
    text: &str,
    cutting: Cutting,
) -> Result<Vec<Chunk>, (DeadReason, String)> {
    let refused = |e: crate::model::ModelError| (DeadReason::ModelError, e.to_string());
    match cutting {
        Cutting::Truncate => {
            let encoded = tokenizer.encode_one(text).map_err(refused)?;
            Ok(vec![Chunk {
                encoded,
                span: Span {
                    bytes: 0..text.len(),
                    chars: 0..text.chars().count(),
                },
            }])
        }
        Cutting::Chunks { rule, max_chunks } => {
            let tokens = tokenizer.tokens(text).map_err(refused)?;
            let chunks = chunk::cut(text, &tokens, rule);
            if chunks.len() > max_chunks {
                let detail = format!(
                    "{} tokens cut into {} chunks of {} (max_chunks {max_chunks})",
                    tokens.ids.len(),
                    chunks.len(),
                    rule.size
                );
                return Err((DeadReason::TooManyChunks, detail));
            }
            Ok(chunks)
        }
    }
}
