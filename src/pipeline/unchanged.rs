//! The unchanged stage, between the reader and the tokeniser: an upsert whose text (and
//! chunking rule) and model equal what is stored skips the model. One `ew_touch` per document,
//! pipelined per read, replaces its fields and advances its version on the server, keeping its
//! vectors; only the documents it answers "changed" go on to be embedded. Re-feeding a corpus
//! (a nightly full sync, a producer's replay) then costs a round trip per read, not a model run
//! per document.

use std::sync::Arc;
use std::time::Duration;

use crate::store::cluster::Conn;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::op::{AckOnly, AckWhy, Doc, Write};
use super::shared::Ctx;
use super::WorkerError;
use crate::settings::{ChunkStrategy, Settings};
use crate::store::documents::{self, Applied, Change};

/// Hex digits of a text's digest: 128 bits of SHA-256.
const DIGEST_HEX: usize = 32;

/// The chunking rule a digest covers: the same text cut another way has other vectors.
pub fn rule(s: &Settings) -> String {
    match s.chunk.strategy {
        ChunkStrategy::Tokens => format!("tokens {} {}", s.chunk.size, s.chunk.overlap),
        ChunkStrategy::None => "none".to_string(),
    }
}

/// The digest of `text` embedded under `rule`, stored with its vectors (`__ew_digest`).
pub fn digest(rule: &str, text: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(rule.as_bytes());
    hash.update([0u8]);
    hash.update(text.as_bytes());
    crate::model::fingerprint::hex(&hash.finalize(), DIGEST_HEX)
}

pub async fn sifter(
    ctx: Arc<Ctx>,
    mut upserts: mpsc::Receiver<Vec<Doc>>,
    changed_tx: mpsc::Sender<Vec<Doc>>,
    writes: mpsc::Sender<Vec<Write>>,
) -> Result<(), WorkerError> {
    let never_stop = watch::channel(false).1;
    let mut conn: Option<Conn> = None;
    let mut backoff = ctx.backoff();
    while let Some(docs) = upserts.recv().await {
        let outcomes = loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    conn = ctx.connect_with_retry(&never_stop, Duration::ZERO).await?;
                    continue;
                }
            };
            match touch(&ctx, c, &docs).await {
                Ok(outcomes) => break outcomes,
                Err(e) => {
                    ctx.retry_or_stop(e)?;
                    conn = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        backoff.reset();
        let mut changed = Vec::new();
        let mut done = Vec::new();
        for (doc, outcome) in docs.into_iter().zip(outcomes) {
            match outcome {
                Ok(Applied::Unchanged) => {
                    ctx.metrics.unchanged(1);
                    done.push(Write::AckOnly(AckOnly {
                        why: AckWhy::Unchanged,
                        done: doc.done,
                    }));
                }
                Ok(Applied::Superseded) => {
                    ctx.metrics.superseded(1);
                    done.push(Write::AckOnly(AckOnly {
                        why: AckWhy::Superseded,
                        done: doc.done,
                    }));
                }
                Ok(Applied::Current) => done.push(Write::AckOnly(AckOnly {
                    why: AckWhy::Current,
                    done: doc.done,
                })),
                Ok(Applied::WrongModel(index)) => {
                    return Err(ctx.model_retired(index));
                }
                // Changed, or refused for itself (the upsert will say why, or dead-letter it).
                Ok(_) | Err(_) => changed.push(doc),
            }
        }
        if !done.is_empty() && writes.send(done).await.is_err() {
            return Ok(());
        }
        if !changed.is_empty() && changed_tx.send(changed).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

async fn touch(
    ctx: &Ctx,
    conn: &mut Conn,
    docs: &[Doc],
) -> Result<Vec<documents::Outcome>, ::redis::RedisError> {
    let changes: Vec<Change> = docs
        .iter()
        .map(|d| Change::Touch {
            key: &d.key,
            version: d.version,
            digest: &d.digest,
            parent: d.id(),
            fields: d.stored_fields().collect(),
        })
        .collect();
    documents::apply(conn, &ctx.docs, &changes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_the_text_and_the_rule() {
        let d = digest("tokens 192 32", "hello");
        assert_eq!(d.len(), DIGEST_HEX);
        assert_eq!(d, digest("tokens 192 32", "hello"));
        assert_ne!(d, digest("tokens 128 32", "hello"));
        assert_ne!(d, digest("none", "hello"));
        assert_ne!(d, digest("tokens 192 32", "hello "));
        // No ambiguity between where the rule ends and the text starts.
        assert_ne!(digest("a", "bc"), digest("ab", "c"));
    }
}
