//! `embed-worker dlq purge [--reason R] [--since ID] [--id ID ...] [--all] [--dry-run]`: deletes
//! dead letters for good. Without a filter it needs `--all`, so a bare `purge` deletes nothing.

use std::process::ExitCode;

use crate::store::cluster::Conn;

use super::{select, FilterArgs};
use crate::settings::Settings;
use crate::store::dead_letters;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Delete every dead letter (required when no filter is given).
    #[arg(long)]
    pub all: bool,
    /// Say what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(
    settings: &Settings,
    store: &Store,
    conn: &mut Conn,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let filter = args.filter.filter();
    if filter.is_empty() && !args.all {
        anyhow::bail!("dlq purge needs --reason, --since, --id or --all");
    }
    let dead_stream = settings.dead_letter_stream();
    let letters = select(settings, store, conn, &filter).await?;
    let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
    if args.dry_run {
        println!(
            "dry run: {} dead letter(s) would be deleted from {dead_stream}",
            ids.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let removed = dead_letters::delete(conn, &dead_stream, &ids)
        .await
        .map_err(|e| store.error(e))?;
    println!("deleted {removed} dead letter(s) from {dead_stream}");
    Ok(ExitCode::SUCCESS)
}
