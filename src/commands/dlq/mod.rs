//! `embed-worker dlq list|replay|purge`: the dead-letter stream (`stream.dead_letter_stream`)
//! inspected by reason, sent back to the stream once the cause is fixed, or deleted. Runs
//! against Redis alone (no model), one file per subcommand.

pub mod list;
pub mod purge;
pub mod replay;

use std::process::ExitCode;

use crate::store::cluster::Conn;

use crate::settings::Settings;
use crate::store::dead_letters::{self, DeadLetter, Filter};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Show dead letters: entry, reason, detail, deliveries, fields in brief.
    List(list::Args),
    /// XADD the original fields back to the stream, then delete the dead letters.
    Replay(replay::Args),
    /// Delete dead letters (a filter or --all is required).
    Purge(purge::Args),
}

/// Which dead letters a subcommand applies to.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Only this reason (missing_text, empty_text, max_deliveries, ...).
    #[arg(long, value_name = "R")]
    pub reason: Option<String>,
    /// Only dead letters at or after this dead-letter stream ID (or Unix time in milliseconds).
    #[arg(long, value_name = "ID")]
    pub since: Option<String>,
    /// Only these: a dead-letter ID or the original entry's ID (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            reason: self.reason.clone(),
            since: self.since.clone(),
            ids: self.ids.clone(),
        }
    }
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    crate::commands::runtime()?.block_on(async {
        let store = Store::new(&settings.redis)?;
        let mut conn = store.connect().await?;
        match args.action {
            Action::List(a) => list::run(&settings, &store, &mut conn, a).await,
            Action::Replay(a) => replay::run(&settings, &store, &mut conn, a).await,
            Action::Purge(a) => purge::run(&settings, &store, &mut conn, a).await,
        }
    })
}

/// The dead letters matching `filter`; entries that are not dead letters are reported on
/// stderr and left alone.
async fn select(
    settings: &Settings,
    store: &Store,
    conn: &mut Conn,
    filter: &Filter,
) -> anyhow::Result<Vec<DeadLetter>> {
    let dead_stream = settings.dead_letter_stream();
    let (letters, foreign) = dead_letters::scan(conn, &dead_stream, filter)
        .await
        .map_err(|e| store.error(e))?;
    if !foreign.is_empty() {
        eprintln!(
            "{dead_stream}: {} entries are not embed-worker dead letters (no dead_* block at the end); left alone (first: {})",
            foreign.len(),
            foreign[0]
        );
    }
    Ok(letters)
}

/// A value in brief: text up to `max` characters (escaped), or its size when it is not UTF-8.
pub(crate) fn brief(value: &[u8], max: usize) -> String {
    match std::str::from_utf8(value) {
        Ok(s) if s.chars().count() <= max => format!("{s:?}"),
        Ok(s) => format!(
            "{:?}... ({} bytes)",
            s.chars().take(max).collect::<String>(),
            value.len()
        ),
        Err(_) => format!("<{} bytes, not UTF-8>", value.len()),
    }
}
