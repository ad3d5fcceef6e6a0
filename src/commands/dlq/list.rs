//! `embed-worker dlq list [--reason R] [--since ID] [--id ID ...] [--json]`.

use std::process::ExitCode;

use crate::store::cluster::Conn;
use serde::Serialize;

use super::{brief, select, FilterArgs};
use crate::settings::Settings;
use crate::store::dead_letters::DeadLetter;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// One JSON array instead of the listing.
    #[arg(long)]
    pub json: bool,
}

/// A dead letter as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub id: String,
    pub reason: String,
    pub detail: String,
    pub entry_id: String,
    pub stream: String,
    pub worker: String,
    pub deliveries: String,
    /// The original fields in brief: name, size, the start of the value.
    pub fields: Vec<ListedField>,
}

#[derive(Debug, Serialize)]
pub struct ListedField {
    pub name: String,
    pub bytes: usize,
    pub preview: String,
}

impl From<&DeadLetter> for Listed {
    fn from(l: &DeadLetter) -> Self {
        Listed {
            id: l.id.clone(),
            reason: l.reason.clone(),
            detail: l.detail.clone(),
            entry_id: l.entry_id.clone(),
            stream: l.stream.clone(),
            worker: l.worker.clone(),
            deliveries: l.deliveries.clone(),
            fields: l
                .fields
                .iter()
                .map(|(k, v)| ListedField {
                    name: String::from_utf8_lossy(k).into_owned(),
                    bytes: v.len(),
                    preview: brief(v, 60),
                })
                .collect(),
        }
    }
}

pub async fn run(
    settings: &Settings,
    store: &Store,
    conn: &mut Conn,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let letters = select(settings, store, conn, &args.filter.filter()).await?;
    if args.json {
        let listed: Vec<Listed> = letters.iter().map(Listed::from).collect();
        println!("{}", serde_json::to_string(&listed)?);
        return Ok(ExitCode::SUCCESS);
    }
    for l in &letters {
        println!(
            "{}  {}  entry {}  deliveries {}  {}",
            l.id, l.reason, l.entry_id, l.deliveries, l.detail
        );
        let fields: Vec<String> = l
            .fields
            .iter()
            .take(4)
            .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), brief(v, 40)))
            .collect();
        let more = l.fields.len().saturating_sub(4);
        let more = if more > 0 {
            format!(" (+{more} more)")
        } else {
            String::new()
        };
        println!("    {}{more}", fields.join(" "));
    }
    eprintln!(
        "{} dead letter(s) in {}",
        letters.len(),
        settings.dead_letter_stream()
    );
    Ok(ExitCode::SUCCESS)
}
