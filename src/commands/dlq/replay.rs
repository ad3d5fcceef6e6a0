//! `embed-worker dlq replay [--reason R] [--since ID] [--id ID ...] [--dry-run]`: once the cause
//! is fixed (a producer, or a setting such as `stream.text_field`), each dead letter's original
//! fields go back to `stream.name` as a new entry, and only then is the dead letter deleted. A
//! crash in between leaves both: a duplicate, never a loss.

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
    /// Say what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(
    settings: &Settings,
    store: &Store,
    conn: &mut Conn,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let stream = &settings.stream.name;
    let router = crate::store::shards::Router::new(&settings.stream);
    let dead_stream = settings.dead_letter_stream();
    let letters = select(settings, store, conn, &args.filter.filter()).await?;
    // A shared dead-letter stream may hold other streams' entries: those go back to theirs,
    // which this command (configured for one stream) does not decide for them.
    let (mine, others): (Vec<_>, Vec<_>) =
        letters.into_iter().partition(|l| router.holds(&l.stream));
    if !others.is_empty() {
        eprintln!(
            "skipped {} dead letter(s) from other streams (first: {} from {})",
            others.len(),
            others[0].id,
            others[0].stream
        );
    }
    if args.dry_run {
        for l in &mine {
            println!("would replay {} (entry {}, {})", l.id, l.entry_id, l.reason);
        }
        println!(
            "dry run: {} dead letter(s) would be replayed to {stream}",
            mine.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Each back to the shard its id belongs to now (the one it came from unless
    // `stream.shards` changed since).
    let targets: Vec<String> = mine
        .iter()
        .map(|l| router.key_for(&l.fields).to_string())
        .collect();
    let added = dead_letters::replay(conn, &targets, &dead_stream, &mine)
        .await
        .map_err(|e| store.error(e))?;
    for (l, new_id) in mine.iter().zip(&added) {
        println!(
            "replayed {} (entry {}, {}) as {new_id}",
            l.id, l.entry_id, l.reason
        );
    }
    println!(
        "replayed {} dead letter(s) to {stream} and removed them from {dead_stream}",
        added.len()
    );
    Ok(ExitCode::SUCCESS)
}
