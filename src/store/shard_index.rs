//! Every primary's own index of a name, on a cluster whose search module has no coordinator
//! ([`super::fanout`] names them): their FT.INFO read at once and merged into one, `ensure` and
//! FT.DROPINDEX on each, and errors that name the primary they came from.

use ::redis::{ErrorKind, RedisError, Value};

use super::cluster::Conn;
use super::connect::{Store, StoreError};
use super::fanout::{self, FanoutError};
use super::index::{self, Layout, Wanted};
use super::reply::text;

/// One primary's own index of a name, on a cluster without search coordinator.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    /// "host:port".
    pub node: String,
    /// Its index's name and FT.INFO; None when it has none.
    pub index: Option<(String, Vec<(String, Value)>)>,
    /// Its indexes of the name that no command can reach any more (see [`super::fanout`]).
    pub stranded: Vec<String>,
}

/// Every primary's index of `name` and its FT.INFO, in node order (FT.INFO on each at once).
pub async fn infos(conn: &mut Conn, name: &str) -> Result<Vec<ShardInfo>, FanoutError> {
    let shards = fanout::shards(conn, name).await?;
    let infos = futures::future::join_all(shards.into_iter().map(|shard| {
        let conn = conn.clone();
        async move {
            let index = match shard.index {
                None => None,
                Some(index) => fanout::retrying(&shard.node, || {
                    let mut conn = conn.clone();
                    let index = index.clone();
                    async move { index::info_of(&mut conn, &index).await }
                })
                .await?
                .map(|info| (index, info)),
            };
            Ok::<_, FanoutError>(ShardInfo {
                node: shard.node,
                index,
                stranded: shard.stranded,
            })
        }
    }))
    .await;
    infos.into_iter().collect()
}

/// Shards' FT.INFO as one index's: the first index's schema and options, `index_name` = `name`,
/// num_docs, num_records and hash_indexing_failures summed, `indexing` if any shard is,
/// `percent_indexed` the least. `None` when no primary has the index.
pub fn merge_infos(name: &str, shards: &[ShardInfo]) -> Option<Vec<(String, Value)>> {
    let infos: Vec<&Vec<(String, Value)>> = shards
        .iter()
        .filter_map(|s| s.index.as_ref().map(|(_, info)| info))
        .collect();
    let mut merged = (*infos.first()?).clone();
    let number = |info: &[(String, Value)], key: &str| {
        info.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| text(v).parse::<f64>().ok())
    };
    let sum = |key: &str| infos.iter().filter_map(|i| number(i, key)).sum::<f64>();
    let least = |key: &str| {
        infos
            .iter()
            .filter_map(|i| number(i, key))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
    };
    for (key, value) in merged.iter_mut() {
        *value = match key.as_str() {
            "index_name" => Value::BulkString(name.as_bytes().to_vec()),
            "num_docs" | "num_records" | "hash_indexing_failures" => Value::Int(sum(key) as i64),
            "indexing" => {
                Value::Int(infos.iter().any(|i| number(i, "indexing") == Some(1.0)) as i64)
            }
            "percent_indexed" => match least(key) {
                Some(p) => Value::BulkString(p.to_string().into_bytes()),
                None => continue,
            },
            _ => continue,
        };
    }
    Some(merged)
}

/// A fan-out failure as the Redis error the callers of [`index::info`] and [`index::drop`] expect.
pub(super) fn into_redis(e: FanoutError) -> RedisError {
    match e {
        FanoutError::Redis(error) | FanoutError::Shard { error, .. } => error,
        other => RedisError::from((ErrorKind::Client, "index", other.to_string())),
    }
}

/// [`index::ensure`] on every primary's own index, each made under a name of its own slots
/// where missing (a primary added since is picked up), all at once.
pub(super) async fn ensure_each(
    store: &Store,
    conn: &mut Conn,
    wanted: &Wanted<'_>,
) -> Result<bool, StoreError> {
    let shards = fanout::shards(conn, wanted.layout.name)
        .await
        .map_err(|e| fanout_error(store, e))?;
    let results = futures::future::join_all(shards.iter().map(|shard| {
        let mut conn = conn.clone();
        async move {
            let on_node = |e: StoreError| at_node(e, &shard.node);
            let name = match &shard.index {
                Some(name) => name.clone(),
                None => shard
                    .new_index_name(wanted.layout.name)
                    .map_err(|e| on_node(fanout_error(store, e)))?,
            };
            let own = Wanted {
                layout: Layout {
                    name: &name,
                    ..wanted.layout
                },
                ..*wanted
            };
            let created = index::ensure_one(store, &mut conn, &own, Some(&shard.node))
                .await
                .map_err(on_node)?;
            if created {
                tracing::info!(index = %name, node = %shard.node, "created the primary's own index");
            }
            Ok::<_, StoreError>(created)
        }
    }))
    .await;
    // Once per index and primary: the workers' check finds it again every few seconds.
    static WARNED: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    for shard in &shards {
        for stranded in &shard.stranded {
            let seen = (shard.node.clone(), stranded.clone());
            let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
            if warned.contains(&seen) {
                continue;
            }
            warned.push(seen);
            tracing::warn!(index = %stranded, node = %shard.node,
                "a reshard moved this index name's slot off its primary: the index still indexes \
                 there but no command can reach it (not even FT.DROPINDEX) until the slot moves back");
        }
    }
    let mut created = false;
    for result in results {
        created |= result?;
    }
    Ok(created)
}

/// A fan-out failure as a store error, naming the primary that failed.
fn fanout_error(store: &Store, e: FanoutError) -> StoreError {
    match e {
        FanoutError::Redis(error) => store.error(error),
        FanoutError::Shard { node, error, .. } => at_node(store.error(error), &node),
        other @ (FanoutError::Unindexed { .. } | FanoutError::HashTag(_)) => StoreError::Setup {
            url: store.url.clone(),
            message: other.to_string(),
        },
    }
}

/// The error with the primary it came from beside the URL.
fn at_node(e: StoreError, node: &str) -> StoreError {
    match e {
        StoreError::Redis { url, error } => StoreError::Redis {
            url: format!("{url} (primary {node})"),
            error,
        },
        StoreError::Setup { url, message } => StoreError::Setup {
            url: format!("{url} (primary {node})"),
            message,
        },
        other @ StoreError::TlsFile { .. } => other,
    }
}

/// FT.DROPINDEX (as `dropindex` makes it) on every primary's own index of `name`, at once; None
/// when no primary has one. A stranded one cannot be reached, so it stays (`index info` names it).
pub(super) async fn drop_each(
    conn: &mut Conn,
    name: &str,
    dropindex: impl Fn(&str) -> ::redis::Cmd,
) -> Option<Result<(), RedisError>> {
    let shards = match fanout::shards(conn, name).await {
        Ok(shards) => shards,
        Err(e) => return Some(Err(into_redis(e))),
    };
    let names: Vec<&String> = shards.iter().filter_map(|s| s.index.as_ref()).collect();
    if names.is_empty() {
        return None;
    }
    let dropped = futures::future::join_all(names.into_iter().map(|index| {
        let mut conn = conn.clone();
        let cmd = dropindex(index);
        async move { cmd.query_async::<()>(&mut conn).await }
    }))
    .await;
    Some(dropped.into_iter().collect())
}
