//! `embed-worker run [--drain]`: the worker, until SIGTERM/SIGINT (or, with --drain, until done).

use std::process::ExitCode;
use std::sync::Arc;

use crate::model::Model;
use crate::observe::{Health, Metrics};
use crate::pipeline::{self, RunOptions};
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Exit 0 once the group has nothing new or pending (backfills, jobs, benchmarks).
    #[arg(long)]
    pub drain: bool,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    // The model first: a missing library or model file is a configuration error, reported
    // before anything touches Redis.
    let model = Model::load(&settings)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Two async workers suffice: the model has its own thread and tokenising uses the
        // blocking pool; more would only compete with ONNX Runtime for the cores.
        .worker_threads(2)
        .enable_all()
        .build()?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let summary = runtime.block_on(async {
        crate::observe::serve(&settings.http, metrics.clone(), health.clone()).await?;
        // Keeps /readyz and the lag/pending gauges current whatever the pipeline is doing.
        crate::observe::probe::spawn(
            crate::redis::Store::new(&settings.redis)?,
            crate::observe::probe::Target::from_settings(&settings),
            health.clone(),
            metrics.clone(),
        );
        let options = RunOptions { drain: args.drain };
        anyhow::Ok(
            pipeline::run(settings, model, metrics, health, options, shutdown_signal()).await?,
        )
    })?;
    if summary.timed_out {
        tracing::warn!(
            "stopped at shutdown_timeout; some entries remain pending for other workers"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail on Unix");
    let mut int =
        signal(SignalKind::interrupt()).expect("installing a SIGINT handler cannot fail on Unix");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in hand"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in hand"),
    }
}
