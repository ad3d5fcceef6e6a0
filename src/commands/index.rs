//! `embed-worker index create|drop|info`.

use std::process::ExitCode;

use crate::model::EmbeddingConfig;
use crate::settings::Settings;
use crate::store::generation::{self, Generation};
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
        // The index the record names (after a reindex, the one `index.name` is an alias of).
        let record = generation::load(&mut conn, &generation::record_key(&settings.index.name))
            .await
            .map_err(|e| store.error(e))?;
        let current = record
            .as_ref()
            .map(|r| r.current.clone())
            .unwrap_or(Generation {
                fingerprint: String::new(),
                model: String::new(),
                index: settings.index.name.clone(),
                vector_field: settings.index.vector_field.clone(),
            });
        let layout = index::Layout {
            name: &current.index,
            vector_field: &current.vector_field,
            model_tag: false,
        };
        match args.action {
            Action::Create => {
                // The dimension comes from the model's facts, not a constant.
                let dim = EmbeddingConfig::load(&settings.model.dir)?.dimension;
                let created = index::ensure(
                    &store,
                    &mut conn,
                    &settings.index,
                    &layout,
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
                index::drop(&mut conn, &current.index, delete_docs)
                    .await
                    .map_err(|e| store.error(e))?;
                if current.index != settings.index.name {
                    let _: () = ::redis::cmd("FT.ALIASDEL")
                        .arg(&settings.index.name)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| store.error(e))?;
                }
                // The record goes with the index: a new index may hold another model's vectors.
                let _: () = ::redis::cmd("DEL")
                    .arg(generation::record_key(&settings.index.name))
                    .query_async(&mut conn)
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
                    if let Some(r) = &record {
                        println!("model: {} [{}]", r.current.model, r.current.fingerprint);
                        if let Some((next, phase)) = &r.next {
                            println!(
                                "reindexing to: {} [{}] ({phase:?})",
                                next.model, next.fingerprint
                            );
                        }
                    }
                    let id = index::identifier(settings.index.storage, &current.vector_field);
                    if let Some(spec) = index::vector_spec(&info, &id) {
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
