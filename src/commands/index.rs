//! `embed-worker index create|drop|info`.

use std::process::ExitCode;

use crate::model::EmbeddingConfig;
use crate::settings::Settings;
use crate::store::{index, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Create the index for the model's dimension (no-op if it exists and agrees).
    Create,
    /// Drop the index; documents stay unless --delete-docs.
    Drop {
        #[arg(long)]
        delete_docs: bool,
    },
    /// Print FT.INFO's main facts.
    Info,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::new(&settings.redis)?;
    super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        match args.action {
            Action::Create => {
                // The dimension comes from the model's facts, not a constant.
                let dim = EmbeddingConfig::load(&settings.model.dir)?.dimension;
                let created = index::ensure(
                    &store,
                    &mut conn,
                    &settings.index,
                    settings.parent_field(),
                    dim,
                )
                .await?;
                println!(
                    "{} {}",
                    settings.index.name,
                    if created {
                        "created"
                    } else {
                        "already exists and agrees"
                    }
                );
            }
            Action::Drop { delete_docs } => {
                index::drop(&mut conn, &settings.index.name, delete_docs)
                    .await
                    .map_err(|e| store.error(e))?;
                println!("{} dropped", settings.index.name);
            }
            Action::Info => match index::info(&mut conn, &settings.index.name)
                .await
                .map_err(|e| store.error(e))?
            {
                None => {
                    println!("{} does not exist", settings.index.name);
                    return Ok(ExitCode::FAILURE);
                }
                Some(info) => {
                    for key in [
                        "index_name",
                        "num_docs",
                        "hash_indexing_failures",
                        "indexing",
                        "percent_indexed",
                    ] {
                        if let Some((_, v)) = info.iter().find(|(k, _)| k == key) {
                            println!("{key}: {}", crate::store::reply::text(v));
                        }
                    }
                    if let Some(spec) = index::vector_spec(&info, &settings.index.vector_field) {
                        println!(
                            "vector: {} DIM {} {}",
                            spec.data_type, spec.dim, spec.metric
                        );
                    }
                }
            },
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
