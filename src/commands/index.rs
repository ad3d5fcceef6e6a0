//! `embed-worker index create|drop|info`. On a cluster without search coordinator each covers
//! every primary's own index, and `info` shows each primary's after the sums.

use std::process::ExitCode;

use crate::model::EmbeddingConfig;
use crate::settings::Settings;
use crate::store::fanout::FanoutError;
use crate::store::generation::{self, Generation};
use crate::store::reply::text;
use crate::store::shard_index::{self, ShardInfo};
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
                let wanted = index::Wanted {
                    settings: &settings.index,
                    layout,
                    parent: settings.parent_field(),
                    dim,
                };
                let created = index::ensure(&store, &mut conn, &wanted).await?;
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
            Action::Info => {
                // Without a search coordinator: every primary's own index, summed, then each.
                let shards = if index::per_shard(&mut conn).await {
                    let shards = shard_index::infos(&mut conn, &settings.index.name)
                        .await
                        .map_err(|e| match e {
                            FanoutError::Redis(e) => anyhow::Error::from(store.error(e)),
                            other => anyhow::anyhow!("redis {}: {other}", store.url),
                        })?;
                    Some(shards)
                } else {
                    None
                };
                let info = match &shards {
                    Some(shards) => shard_index::merge_infos(&settings.index.name, shards),
                    None => index::info(&mut conn, &settings.index.name)
                        .await
                        .map_err(|e| store.error(e))?,
                };
                let Some(info) = info else {
                    println!("{} does not exist", settings.index.name);
                    return Ok(ExitCode::FAILURE);
                };
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
                if let Some(shards) = &shards {
                    print_shards(shards);
                    // A primary without its index: searches fail until it has one.
                    if shards.iter().any(|s| s.index.is_none()) {
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// One line per primary: its index's counts, or what is wrong with it.
fn print_shards(shards: &[ShardInfo]) {
    println!(
        "primaries: {} (no search coordinator: an index on each)",
        shards.len()
    );
    for shard in shards {
        match &shard.index {
            Some((name, info)) => {
                let get = |key: &str| {
                    info.iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| text(v))
                        .unwrap_or_default()
                };
                println!(
                    "  {} {name}: num_docs {}, hash_indexing_failures {}, indexing {}, percent_indexed {}",
                    shard.node,
                    get("num_docs"),
                    get("hash_indexing_failures"),
                    get("indexing"),
                    get("percent_indexed")
                );
            }
            None => println!(
                "  {} no index: its documents cannot be searched (`embed-worker index create`)",
                shard.node
            ),
        }
        for stranded in &shard.stranded {
            println!(
                "  {} stranded {stranded}: a reshard moved its name's slot to another primary; \
                 it still indexes there, but no command reaches it until the slot moves back",
                shard.node
            );
        }
    }
}
