//! The model thread: one OS thread owns the [`Embedder`] (ORT's `Session::run` takes `&mut self`
//! and blocks for milliseconds), so tokio workers never run the model.

use std::sync::mpsc as std_mpsc;

use tokio::sync::oneshot;

use super::{Embedder, Encoded, ModelError};

type Job = (
    Vec<Encoded>,
    oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
);

/// A cheap, cloneable handle to the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    jobs: std_mpsc::SyncSender<Job>,
    dimension: usize,
    name: String,
}

impl ModelHandle {
    /// Moves `embedder` onto its own thread. The job queue holds one batch beyond the one running,
    /// so the next batch is ready the moment the model frees up, and no more pile up in memory.
    pub fn spawn(mut embedder: impl Embedder) -> Self {
        let dimension = embedder.dimension();
        let name = embedder.name().to_string();
        let (jobs, rx) = std_mpsc::sync_channel::<Job>(1);
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                for (batch, reply) in rx {
                    // The caller may have gone (shutdown); the result is then simply dropped.
                    let _ = reply.send(embedder.embed(&batch));
                }
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Self {
            jobs,
            dimension,
            name,
        }
    }

    /// Embeds a batch on the model thread without blocking the async runtime.
    pub async fn embed(&self, batch: Vec<Encoded>) -> Result<Vec<Vec<f32>>, ModelError> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        // `send` blocks while the queue is full: keep that off the async workers.
        tokio::task::spawn_blocking(move || jobs.send((batch, tx)))
            .await
            .map_err(|_| ModelError::ThreadGone)?
            .map_err(|_| ModelError::ThreadGone)?;
        rx.await.map_err(|_| ModelError::ThreadGone)?
    }

    /// Blocking variant, for synchronous callers (the `embed` command, benchmarks).
    pub fn embed_blocking(&self, batch: Vec<Encoded>) -> Result<Vec<Vec<f32>>, ModelError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((batch, tx))
            .map_err(|_| ModelError::ThreadGone)?;
        rx.blocking_recv().map_err(|_| ModelError::ThreadGone)?
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}
