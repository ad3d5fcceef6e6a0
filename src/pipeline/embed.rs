//! The embed stage: takes every tokenised read that queued while the model was busy, cuts their
//! chunks into length-aware batches (the one place batches are cut, [`batch::plan`](super::batch::plan)),
//! and runs each through the model thread. A document's chunks may fall in different batches:
//! it goes to the writer, as one change, once its last chunk is embedded. A batch the model
//! rejects is split in halves until the culprit is alone; the document it belongs to is
//! dead-lettered whole.
//!
//! The watchdog: a call running longer than `model.timeout` means the model thread is stuck (a
//! text that makes it hang). It cannot be interrupted, so the worker turns unready, stops
//! renewing its leases, logs the batch's entries and exits non-zero; the entries go back to the
//! group with their delivery counts raised. Entries delivered [`SUSPECT_DELIVERIES`] times or
//! more are embedded apart from every other document (their own chunks batched together), so
//! after two such failures the innocent batch-mates of a hanging text get through, and only
//! the text itself runs into `max_deliveries`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::batch::{padded_tokens, plan, BatchLimits};
use super::chunk::Span;
use super::op::{Doc, Embedded, EmbeddedChunk, Write};
use super::reason::DeadReason;
use super::shared::Ctx;
use super::tokenize::Tokenized;
use super::WorkerError;
use crate::model::{Encoded, Model, ModelHandle};
use crate::observe::metrics::{Metrics, Stage};

/// Entries delivered this often (they were in hand when a worker died or hung at least twice)
/// are embedded apart from other documents.
pub const SUSPECT_DELIVERIES: u64 = 3;

pub async fn embedder(
    ctx: Arc<Ctx>,
    model: Model,
    mut reads: mpsc::Receiver<Tokenized>,
    writes: mpsc::Sender<Vec<Write>>,
) -> Result<(), WorkerError> {
    let limits = BatchLimits::from_settings(&ctx.settings.batch);
    while let Some(first) = reads.recv().await {
        // Reads that queued while the model was busy are planned together: under a steady
        // trickle they are small, and one fuller call instead of several small ones is what
        // lets the queue drain (each call has a fixed cost).
        let mut queued = vec![first];
        while let Ok(more) = reads.try_recv() {
            queued.push(more);
        }
        let mut assembly = Assembly::default();
        for batch in assembly.batches(queued, limits) {
            let results = match embed_batch(
                &model.handle,
                batch,
                |slot| assembly.entry_id(slot),
                &ctx.metrics,
                ctx.settings.model.timeout,
            )
            .await
            {
                Ok(results) => results,
                Err(e) => {
                    if let WorkerError::ModelStuck { entries, timeout } = &e {
                        ctx.health.set_model_stuck();
                        ctx.leases.stop();
                        tracing::error!(timeout = %humantime::format_duration(*timeout),
                            entries = %entries.join(" "),
                            "model call past model.timeout: the model thread is stuck; no more lease renewals, exiting");
                        spare_the_bystanders(&ctx, entries).await;
                    }
                    return Err(e);
                }
            };
            let done = assembly.fill(results);
            if !done.is_empty() && writes.send(done).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The entries held but not in the stuck batch were only queued behind it: their delivery
/// counts are set back to what they were before this delivery, so the redelivery that follows
/// the exit does not push them towards `max_deliveries` for a text they do not contain. Best
/// effort, on a fresh connection: if it fails, their counts rise by one, as after a crash.
async fn spare_the_bystanders(ctx: &Ctx, stuck: &[String]) {
    let mut bystanders: std::collections::BTreeMap<usize, Vec<(String, u64)>> = Default::default();
    for (e, n) in ctx.leases.held_with_deliveries() {
        if !stuck.contains(&e.id) {
            bystanders
                .entry(e.shard)
                .or_default()
                .push((e.id, n.saturating_sub(1)));
        }
    }
    if bystanders.is_empty() {
        return;
    }
    let count: usize = bystanders.values().map(Vec::len).sum();
    let reset = async {
        let mut conn = ctx.store.connect().await.map_err(|e| e.to_string())?;
        for (shard, entries) in &bystanders {
            crate::store::stream::set_delivery_counts(&mut conn, ctx.group(*shard), entries)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(ctx.settings.redis.command_timeout, reset).await {
        Ok(Ok(())) => {
            tracing::info!(entries = count, "delivery counts of the entries queued behind the stuck batch set back")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not set back the delivery counts of the entries queued behind the stuck batch")
        }
        Err(_) => tracing::warn!(
            "timed out setting back the delivery counts of the entries queued behind the stuck batch"
        ),
    }
}

/// One chunk's model input, and whose it is.
#[derive(Debug)]
pub struct Piece {
    /// The document's place in the [`Assembly`].
    slot: usize,
    /// The chunk's number in its document.
    chunk: usize,
    encoded: Encoded,
}

/// Documents whose chunks are being embedded, each until its last chunk is done.
#[derive(Default)]
pub struct Assembly {
    slots: Vec<Option<InProgress>>,
}

struct InProgress {
    doc: Doc,
    spans: Vec<Span>,
    vectors: Vec<Option<Vec<f32>>>,
    left: usize,
    /// The first chunk the model refused, with its words.
    failed: Option<String>,
}

impl Assembly {
    /// Takes in tokenised reads and cuts their chunks into batches under the limits. Suspects
    /// (delivered [`SUSPECT_DELIVERIES`] times or more) and documents of `max_docs` chunks or
    /// more come first, each document apart; the others share batches.
    pub fn batches(&mut self, reads: Vec<Tokenized>, limits: BatchLimits) -> Vec<Vec<Piece>> {
        let mut shared = Vec::new();
        let mut alone = Vec::new();
        for t in reads {
            for chunked in t.docs {
                let slot = self.slots.len();
                let suspect = chunked.doc.entry.deliveries >= SUSPECT_DELIVERIES;
                let n = chunked.chunks.len();
                let mut spans = Vec::with_capacity(n);
                let mut pieces = Vec::with_capacity(n);
                for (chunk, c) in chunked.chunks.into_iter().enumerate() {
                    spans.push(c.span);
                    pieces.push(Piece {
                        slot,
                        chunk,
                        encoded: c.encoded,
                    });
                }
                self.slots.push(Some(InProgress {
                    doc: chunked.doc,
                    spans,
                    vectors: (0..n).map(|_| None).collect(),
                    left: n,
                    failed: None,
                }));
                // A document of a batch's worth of chunks or more is planned on its own: its
                // chunks sort into full batches among themselves, and it is written as soon as
                // they are done instead of waiting, vectors in hand, for every other document.
                if suspect || n >= limits.max_docs {
                    alone.extend(planned(pieces, limits));
                } else {
                    shared.extend(pieces);
                }
            }
        }
        alone.into_iter().chain(planned(shared, limits)).collect()
    }

    fn entry_id(&self, slot: usize) -> &str {
        self.slots[slot]
            .as_ref()
            .map_or("", |p| p.doc.entry.id.as_str())
    }

    /// Records embedded (or refused) chunks; returns the documents now complete, each as an
    /// upsert, or as a dead letter if the model refused any of its chunks.
    pub fn fill(&mut self, results: Vec<(Piece, Result<Vec<f32>, String>)>) -> Vec<Write> {
        let mut done = Vec::new();
        for (piece, result) in results {
            let Some(p) = self.slots[piece.slot].as_mut() else {
                continue;
            };
            match result {
                Ok(v) => p.vectors[piece.chunk] = Some(v),
                Err(e) => {
                    let total = p.vectors.len();
                    p.failed.get_or_insert_with(|| {
                        if total == 1 {
                            e
                        } else {
                            format!("chunk {} of {total}: {e}", piece.chunk)
                        }
                    });
                }
            }
            p.left -= 1;
            if p.left == 0 {
                let p = self.slots[piece.slot].take().expect("in progress");
                done.push(p.finish());
            }
        }
        done
    }
}

impl InProgress {
    fn finish(self) -> Write {
        if let Some(detail) = self.failed {
            tracing::debug!(entry = %self.doc.entry.id, error = %detail, "model failed on this document alone");
            return Write::DeadLetter(self.doc.into_dead_letter(DeadReason::ModelError, detail));
        }
        let chunks = self
            .spans
            .into_iter()
            .zip(self.vectors)
            .map(|(span, v)| EmbeddedChunk {
                span,
                vector: v.expect("every chunk embedded"),
            })
            .collect();
        Write::Upsert(Embedded {
            doc: self.doc,
            chunks,
        })
    }
}

/// `pieces` cut into batches by length.
fn planned(pieces: Vec<Piece>, limits: BatchLimits) -> Vec<Vec<Piece>> {
    let lengths: Vec<usize> = pieces.iter().map(|p| p.encoded.len()).collect();
    let mut pieces: Vec<Option<Piece>> = pieces.into_iter().map(Some).collect();
    plan(&lengths, limits)
        .into_iter()
        .map(|idx| {
            idx.iter()
                .map(|&i| pieces[i].take().expect("plan lists each index once"))
                .collect()
        })
        .collect()
}

/// Embeds one batch: each chunk with its vector, or, when the model failed on it alone, with
/// the model's words. A fatal model error (the thread is gone) stops the worker, and so does a
/// call longer than `timeout` (the thread is stuck). `entry_id` names a piece's entry.
pub async fn embed_batch<'a>(
    model: &ModelHandle,
    batch: Vec<Piece>,
    entry_id: impl Fn(usize) -> &'a str,
    metrics: &Metrics,
    timeout: Duration,
) -> Result<Vec<(Piece, Result<Vec<f32>, String>)>, WorkerError> {
    let mut out = Vec::with_capacity(batch.len());
    // Work list of sub-batches; a failing one is split until single chunks remain.
    let mut work = vec![batch];
    while let Some(mut b) = work.pop() {
        if b.is_empty() {
            continue;
        }
        let started = Instant::now();
        metrics.batch(b.len(), padded_tokens(b.iter().map(|p| p.encoded.len())));
        let inputs: Vec<Encoded> = b.iter().map(|p| p.encoded.clone()).collect();
        let call = tokio::time::timeout(timeout, model.embed(inputs)).await;
        let Ok(result) = call else {
            let mut entries: Vec<String> = b.iter().map(|p| entry_id(p.slot).to_string()).collect();
            entries.sort();
            entries.dedup();
            return Err(WorkerError::ModelStuck { timeout, entries });
        };
        match result {
            Ok(vectors) => {
                metrics.stage(Stage::Model, started.elapsed());
                metrics.embedded(vectors.len());
                out.extend(b.into_iter().zip(vectors.into_iter().map(Ok)));
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                metrics.error("model");
                if b.len() == 1 {
                    let piece = b.pop().expect("len is 1");
                    out.push((piece, Err(e.to_string())));
                } else {
                    tracing::warn!(chunks = b.len(), error = %e, "model failed on a batch; splitting it to isolate the culprit");
                    let right = b.split_off(b.len() / 2);
                    work.push(right);
                    work.push(b);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::chunk::Chunk;
    use crate::pipeline::entry::{parse, EntryRules};
    use crate::pipeline::op::Op;
    use crate::pipeline::tokenize::Chunked;
    use crate::store::stream::RawEntry;

    const LIMITS: BatchLimits = BatchLimits {
        max_docs: 32,
        max_tokens: 2048,
    };

    /// Documents `first_id`, `first_id + 1`, ..., each with chunks of the given lengths.
    fn tokenized(docs: &[&[usize]], first_id: usize) -> Tokenized {
        let s = crate::settings::Settings::load_from(None, Vec::new()).unwrap();
        let rules = EntryRules::from_settings(&s);
        let docs = docs
            .iter()
            .enumerate()
            .map(|(i, lengths)| {
                let id = (first_id + i).to_string();
                let raw = RawEntry {
                    id: format!("{id}-0"),
                    fields: vec![
                        (b"id".to_vec(), id.into_bytes()),
                        (b"content".to_vec(), b"x".to_vec()),
                    ],
                    deliveries: 1,
                };
                let doc = match parse(raw, &rules, 0) {
                    Op::Upsert(d) => d,
                    other => panic!("{other:?}"),
                };
                let chunks = lengths
                    .iter()
                    .map(|&n| Chunk {
                        encoded: Encoded { ids: vec![1; n] },
                        span: Span {
                            bytes: 0..1,
                            chars: 0..1,
                        },
                    })
                    .collect();
                Chunked { doc, chunks }
            })
            .collect();
        Tokenized { docs }
    }

    fn keys(batch: &[Piece], a: &Assembly) -> Vec<String> {
        batch
            .iter()
            .map(|p| format!("{}#{}", a.entry_id(p.slot), p.chunk))
            .collect()
    }

    #[test]
    fn queued_reads_are_planned_together_and_lose_nothing() {
        let mut a = Assembly::default();
        let queued = vec![
            tokenized(&[&[20], &[22]], 0),
            tokenized(&[&[21]], 2),
            tokenized(&[&[19], &[25]], 3),
        ];
        let out = a.batches(queued, LIMITS);
        assert_eq!(out.len(), 1, "five short texts fit one call");
        let mut got = keys(&out[0], &a);
        got.sort();
        assert_eq!(got, ["0-0#0", "1-0#0", "2-0#0", "3-0#0", "4-0#0"]);
        // A read longer than one batch is cut by length.
        let mut a = Assembly::default();
        let out = a.batches(vec![tokenized(&[&[300], &[5], &[300], &[6]], 9)], LIMITS);
        assert_eq!(out.iter().map(Vec::len).sum::<usize>(), 4);
        assert!(out
            .iter()
            .all(|b| padded_tokens(b.iter().map(|p| p.encoded.len())) <= 2048 || b.len() == 1));
    }

    #[test]
    fn a_document_is_written_once_its_last_chunk_is_embedded() {
        let mut a = Assembly::default();
        // Doc 0: three chunks; doc 1: one. Batches hold at most 2 x 256 tokens.
        let limits = BatchLimits {
            max_docs: 32,
            max_tokens: 512,
        };
        let out = a.batches(vec![tokenized(&[&[256, 256, 100], &[10]], 0)], limits);
        assert!(out.len() >= 2, "{}", out.len());
        let mut written = Vec::new();
        for (i, batch) in out.into_iter().enumerate() {
            let results = batch
                .into_iter()
                .map(|p| {
                    let v = vec![p.chunk as f32; 4];
                    (p, Ok(v))
                })
                .collect();
            for w in a.fill(results) {
                match w {
                    Write::Upsert(e) => {
                        written.push((i, e.doc.key.clone(), e.chunks.len()));
                        let numbers: Vec<f32> = e.chunks.iter().map(|c| c.vector[0]).collect();
                        assert_eq!(
                            numbers,
                            (0..e.chunks.len()).map(|n| n as f32).collect::<Vec<_>>()
                        );
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        let last = written.iter().map(|w| w.0).max().unwrap();
        assert!(
            written.contains(&(last, "doc:0".to_string(), 3)),
            "{written:?}"
        );
        assert!(written.iter().any(|w| w.1 == "doc:1" && w.2 == 1));
        assert_eq!(written.len(), 2);
    }

    #[test]
    fn one_refused_chunk_dead_letters_the_whole_document() {
        let mut a = Assembly::default();
        let out = a.batches(vec![tokenized(&[&[30, 30, 30]], 0)], LIMITS);
        let results = out
            .into_iter()
            .flatten()
            .map(|p| {
                let r = if p.chunk == 1 {
                    Err("refused".to_string())
                } else {
                    Ok(vec![0.0; 4])
                };
                (p, r)
            })
            .collect();
        let done = a.fill(results);
        assert_eq!(done.len(), 1);
        match &done[0] {
            Write::DeadLetter(d) => {
                assert_eq!(d.reason, DeadReason::ModelError);
                assert_eq!(d.detail, "chunk 1 of 3: refused");
                assert_eq!(d.entry.fields[1].1, b"x", "the text is back in the entry");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn suspects_are_embedded_apart_and_first() {
        let mut a = Assembly::default();
        let mut read = tokenized(&[&[20], &[21], &[22], &[23, 24]], 0);
        read.docs[1].doc.entry.deliveries = SUSPECT_DELIVERIES;
        read.docs[3].doc.entry.deliveries = SUSPECT_DELIVERIES + 1;
        read.docs[2].doc.entry.deliveries = SUSPECT_DELIVERIES - 1;
        let out = a.batches(vec![read], LIMITS);
        let got: Vec<Vec<String>> = out.iter().map(|b| keys(b, &a)).collect();
        assert_eq!(got[0], ["1-0#0"]);
        assert_eq!(
            got[1],
            ["3-0#0", "3-0#1"],
            "a suspect's own chunks share a call"
        );
        assert_eq!(got.len(), 3, "the others still share one call: {got:?}");
        assert_eq!(out[2].len(), 2);
    }
}
