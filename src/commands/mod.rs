//! The command line: one module per subcommand.

pub mod bench;
pub mod dlq;
pub mod embed;
pub mod enqueue;
pub mod index;
pub mod reindex;
pub mod run;
pub mod search;
pub mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "embed-worker",
    version,
    about = "Redis Stream -> ONNX embeddings -> Redis vector index"
)]
pub struct Cli {
    /// Configuration file layered over config/default.toml (env EMBED_WORKER__SECTION__KEY wins over both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: read the stream, embed, write hashes, ack.
    Run(run::Args),
    /// Print one JSON array of floats per text, one per line (texts from arguments, or stdin lines).
    Embed(embed::Args),
    /// KNN search: embed TEXT and print the nearest documents, as the Redis docs page does.
    Search(search::Args),
    /// XADD JSON lines ({"id":..,"content":..,...}) to the stream.
    Enqueue(enqueue::Args),
    /// Create, drop or describe the index.
    Index(index::Args),
    /// Move the index to another model without downtime: re-embed every document from its
    /// stored text into a new index, then switch index.name to it.
    Reindex(reindex::Args),
    /// Dead letters: list them, replay them to the stream once fixed, or purge them.
    Dlq(dlq::Args),
    /// Queue and index at a glance: stream length, lag, pending, consumers, dead letters, documents.
    Stats(stats::Args),
    /// Model-only throughput over texts from stdin, with no Redis (for `make bench`).
    #[command(hide = true)]
    BenchModel(bench::Args),
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    crate::observe::logging::init(&settings.log);
    match cli.command {
        Command::Run(args) => run::execute(settings, args),
        Command::Embed(args) => embed::execute(settings, args),
        Command::Search(args) => search::execute(settings, args),
        Command::Enqueue(args) => enqueue::execute(settings, args),
        Command::Index(args) => index::execute(settings, args),
        Command::Reindex(args) => reindex::execute(settings, args),
        Command::BenchModel(args) => bench::execute(settings, args),
        Command::Stats(args) => stats::execute(settings, args),
        Command::Dlq(args) => dlq::execute(settings, args),
    }
}

/// A current-thread runtime for the short-lived commands.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
