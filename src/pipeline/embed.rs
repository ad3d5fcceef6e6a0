//! The embed stage: takes every tokenised read that queued while the model was busy, cuts them
//! into length-aware batches (the one place batches are cut, [`batch::plan`](super::batch::plan)),
//! and runs each through the model thread. A batch the model rejects is split in halves until
//! the culprit is alone; only it is dead-lettered.
//!
//! The watchdog: a call running longer than `model.timeout` means the model thread is stuck (a
//! text that makes it hang). It cannot be interrupted, so the worker turns unready, stops
//! renewing its leases, logs the batch's entries and exits non-zero; the entries go back to the
//! group with their delivery counts raised. Entries delivered [`SUSPECT_DELIVERIES`] times or
//! more are embedded alone, so after two such failures the innocent batch-mates of a hanging
//! text get through, and only the text itself runs into `max_deliveries`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::batch::{padded_tokens, plan, BatchLimits};
use super::entry::DeadReason;
use super::op::{Embedded, Write};
use super::shared::Ctx;
use super::tokenize::Tokenized;
use super::WorkerError;
use crate::model::{Encoded, Model, ModelHandle};
use crate::observe::metrics::{Metrics, Stage};

/// Entries delivered this often (they were in hand when a worker died or hung at least twice)
/// are embedded one per model call.
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
        for batch in batches(queued, limits) {
            let done = match embed_batch(
                &model.handle,
                batch,
                &ctx.metrics,
                ctx.settings.model.timeout,
            )
            .await
            {
                Ok(done) => done,
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
            if writes.send(done).await.is_err() {
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
    let bystanders: Vec<(String, u64)> = ctx
        .leases
        .held_with_deliveries()
        .into_iter()
        .filter(|(id, _)| !stuck.contains(id))
        .map(|(id, n)| (id, n.saturating_sub(1)))
        .collect();
    if bystanders.is_empty() {
        return;
    }
    let reset = async {
        let mut conn = ctx.store.connect().await.map_err(|e| e.to_string())?;
        crate::store::stream::set_delivery_counts(&mut conn, &ctx.group, &bystanders)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(ctx.settings.redis.command_timeout, reset).await {
        Ok(Ok(())) => {
            tracing::info!(entries = bystanders.len(), "delivery counts of the entries queued behind the stuck batch set back")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not set back the delivery counts of the entries queued behind the stuck batch")
        }
        Err(_) => tracing::warn!(
            "timed out setting back the delivery counts of the entries queued behind the stuck batch"
        ),
    }
}

/// Cuts tokenised reads into batches under the limits; suspects (delivered
/// [`SUSPECT_DELIVERIES`] times or more) come first, one per batch.
pub fn batches(reads: Vec<Tokenized>, limits: BatchLimits) -> Vec<Tokenized> {
    let mut docs = Vec::new();
    let mut encoded = Vec::new();
    let mut alone = Vec::new();
    for t in reads {
        for (doc, enc) in t.docs.into_iter().zip(t.encoded) {
            if doc.entry.deliveries >= SUSPECT_DELIVERIES {
                alone.push(Tokenized {
                    docs: vec![doc],
                    encoded: vec![enc],
                });
            } else {
                docs.push(Some(doc));
                encoded.push(Some(enc));
            }
        }
    }
    let lengths: Vec<usize> = encoded
        .iter()
        .map(|e| e.as_ref().map_or(0, Encoded::len))
        .collect();
    let planned = plan(&lengths, limits).into_iter().map(|idx| Tokenized {
        docs: idx
            .iter()
            .map(|&i| docs[i].take().expect("plan lists each index once"))
            .collect(),
        encoded: idx
            .iter()
            .map(|&i| encoded[i].take().expect("plan lists each index once"))
            .collect(),
    });
    alone.into_iter().chain(planned).collect()
}

/// Embeds one batch: each document as an upsert with its vector, or, when the model failed on
/// it alone, as a dead letter. A fatal model error (the thread is gone) stops the worker, and so
/// does a call longer than `timeout` (the thread is stuck).
pub async fn embed_batch(
    model: &ModelHandle,
    batch: Tokenized,
    metrics: &Metrics,
    timeout: Duration,
) -> Result<Vec<Write>, WorkerError> {
    let mut out = Vec::with_capacity(batch.docs.len());
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
        let call = tokio::time::timeout(timeout, model.embed(b.encoded.clone())).await;
        let Ok(result) = call else {
            return Err(WorkerError::ModelStuck {
                timeout,
                entries: b.docs.iter().map(|d| d.entry.id.clone()).collect(),
            });
        };
        match result {
            Ok(vectors) => {
                metrics.stage(Stage::Model, started.elapsed());
                metrics.embedded(vectors.len());
                out.extend(
                    b.docs
                        .into_iter()
                        .zip(vectors)
                        .map(|(doc, vector)| Write::Upsert(Embedded { doc, vector })),
                );
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                metrics.error("model");
                if b.docs.len() == 1 {
                    let doc = b.docs.into_iter().next().expect("len is 1");
                    tracing::debug!(entry = %doc.entry.id, error = %e, "model failed on this document alone");
                    out.push(Write::DeadLetter(
                        doc.into_dead_letter(DeadReason::ModelError, e.to_string()),
                    ));
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::entry::{parse, EntryRules};
    use crate::pipeline::op::Op;
    use crate::store::stream::RawEntry;

    fn tokenized(lengths: &[usize], first_id: usize) -> Tokenized {
        let s = crate::settings::Settings::load_from(None, Vec::new()).unwrap();
        let rules = EntryRules::from_settings(&s);
        let docs = (0..lengths.len())
            .map(|i| {
                let id = (first_id + i).to_string();
                let raw = RawEntry {
                    id: format!("{id}-0"),
                    fields: vec![
                        (b"id".to_vec(), id.into_bytes()),
                        (b"content".to_vec(), b"x".to_vec()),
                    ],
                    deliveries: 1,
                };
                match parse(raw, &rules) {
                    Op::Upsert(d) => d,
                    other => panic!("{other:?}"),
                }
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
    fn queued_reads_are_planned_together_and_lose_nothing() {
        let limits = BatchLimits {
            max_docs: 32,
            max_tokens: 2048,
        };
        let queued = vec![
            tokenized(&[20, 22], 0),
            tokenized(&[21], 2),
            tokenized(&[19, 25], 3),
        ];
        let out = batches(queued, limits);
        assert_eq!(out.len(), 1, "five short texts fit one call");
        let mut keys: Vec<&str> = out[0].docs.iter().map(|d| d.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["doc:0", "doc:1", "doc:2", "doc:3", "doc:4"]);
        // Each document keeps its own token ids.
        for (d, e) in out[0].docs.iter().zip(&out[0].encoded) {
            let want = [20, 22, 21, 19, 25][d.key[4..].parse::<usize>().unwrap()];
            assert_eq!(e.len(), want, "{}", d.key);
        }
        // A read longer than one batch is cut by length.
        let out = batches(vec![tokenized(&[300, 5, 300, 6], 9)], limits);
        let sizes: Vec<usize> = out.iter().map(|b| b.docs.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 4);
        assert!(out.iter().all(
            |b| padded_tokens(b.encoded.iter().map(Encoded::len)) <= 2048 || b.docs.len() == 1
        ));
    }

    #[test]
    fn suspects_are_embedded_alone_and_first() {
        let limits = BatchLimits {
            max_docs: 32,
            max_tokens: 2048,
        };
        let mut read = tokenized(&[20, 21, 22, 23], 0);
        read.docs[1].entry.deliveries = SUSPECT_DELIVERIES;
        read.docs[3].entry.deliveries = SUSPECT_DELIVERIES + 1;
        read.docs[2].entry.deliveries = SUSPECT_DELIVERIES - 1;
        let out = batches(vec![read], limits);
        let keys: Vec<Vec<&str>> = out
            .iter()
            .map(|b| b.docs.iter().map(|d| d.key.as_str()).collect())
            .collect();
        assert_eq!(keys[0], ["doc:1"]);
        assert_eq!(keys[1], ["doc:3"]);
        assert_eq!(keys.len(), 3, "the others still share one call: {keys:?}");
        assert_eq!(out[2].encoded.len(), 2);
    }
}
