//! `embed-worker run [--drain]`: the worker, until SIGTERM/SIGINT (or, with --drain, until done).

use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Two async workers suffice: the model has its own thread and tokenising uses the
        // blocking pool; more would only compete with ONNX Runtime for the cores.
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Handlers before anything slow: a SIGTERM while the model loads (a pod stopped as it
    // starts) is then a clean stop before the first read, not the default death by signal.
    let signals = runtime.block_on(async { ShutdownSignals::install() });
    // The model next: a missing library or model file is a configuration error, reported
    // before anything touches Redis.
    let model = match std::env::var(crate::model::fake::HANG_HOOK) {
        Ok(word) if !word.is_empty() => {
            tracing::warn!(word = %word, "fault hook: the fake model, hanging on a word");
            crate::model::fake::FakeEmbedder::model_hanging_on(&settings, &word)?
        }
        _ => Model::load(&settings)?,
    };
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let result = runtime.block_on(async {
        crate::observe::serve(&settings.http, metrics.clone(), health.clone()).await?;
        // Keeps /readyz and the lag/pending gauges current whatever the pipeline is doing.
        crate::observe::probe::spawn(
            crate::store::Store::new(&settings.redis)?,
            crate::observe::probe::Target::from_settings(&settings),
            health.clone(),
            metrics.clone(),
        );
        let options = RunOptions { drain: args.drain };
        anyhow::Ok(pipeline::run(settings, model, metrics, health, options, signals.recv()).await?)
    });
    // Not a plain drop, which waits for every blocking task: after the model watchdog fired, one
    // of them waits forever on the stuck model thread.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let summary = result?;
    if summary.timed_out {
        tracing::warn!(
            "stopped at shutdown_timeout; some entries remain pending for other workers"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, caught from the moment of `install` (signals that arrive before `recv`
/// is polled are kept, not lost).
struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers; needs a runtime context.
    fn install() -> Self {
        Self {
            term: signal(SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on Unix"),
            int: signal(SignalKind::interrupt())
                .expect("installing a SIGINT handler cannot fail on Unix"),
        }
    }

    /// Resolves on SIGTERM or SIGINT.
    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: finishing the batch in hand"),
            _ = self.int.recv() => tracing::info!("SIGINT: finishing the batch in hand"),
        }
    }
}
