//! The FT index: created when missing, checked against the model when present, and how far
//! the module has indexed. On a cluster whose search module has no coordinator every function
//! here covers every primary's own index ([`super::shard_index`]).

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};

use super::connect::{Store, StoreError};
use super::coordinator;
use super::reply::{pairs, text};
use super::shard_index;
use crate::settings::{IndexSettings, Storage};

pub use super::coordinator::per_shard;

/// The vector field facts an existing index must agree with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VectorSpec {
    pub dim: usize,
    pub data_type: String,
    pub metric: String,
}

/// Which FT index, over which hash field of vectors. The first model's index is `index.name`
/// over `index.vector_field`; after a `reindex` the name is an alias of the model's own index
/// (`<index.name>@<fingerprint>`) over its own field (`<vector_field>@<fingerprint>`, queried
/// as `vector_field`: `... AS embedding`, so every query reads the same).
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    pub name: &'a str,
    pub vector_field: &'a str,
    /// Also index `__ew_model` as a TAG: the next model's index, to find what it still lacks.
    pub model_tag: bool,
}

impl<'a> Layout<'a> {
    /// The first model's: `index.name` over `index.vector_field`.
    pub fn first(settings: &'a IndexSettings) -> Self {
        Self {
            name: &settings.name,
            vector_field: &settings.vector_field,
            model_tag: false,
        }
    }
}

/// The index a caller needs: the settings' schema and storage, its layout, the TAG field holding
/// a chunk's parent document id (while chunking is on) and the model's dimension.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub settings: &'a IndexSettings,
    pub layout: Layout<'a>,
    pub parent: Option<&'a str>,
    pub dim: usize,
}

/// The FT.CREATE arguments for the settings, the layout and the model's dimension; `parent` is
/// the TAG field holding a chunk's parent document id (while chunking is on).
pub fn create_args(
    settings: &IndexSettings,
    layout: &Layout,
    parent: Option<&str>,
    dim: usize,
) -> Vec<String> {
    let storage = settings.storage;
    let mut args: Vec<String> = vec![
        layout.name.to_string(),
        "ON".into(),
        match storage {
            Storage::Hash => "HASH",
            Storage::Json => "JSON",
        }
        .into(),
        "PREFIX".into(),
        "1".into(),
        settings.prefix.clone(),
        "SCHEMA".into(),
    ];
    // A field is named by its identifier; on JSON that is a path, queried by the field's name.
    let mut field = |name: &str, rest: &mut dyn Iterator<Item = String>| {
        args.extend(named(storage, name, name));
        args.extend(rest);
    };
    for f in &settings.schema {
        let mut words = f.split_whitespace().map(str::to_string);
        let name = words.next().unwrap_or_default();
        field(&name, &mut words);
    }
    if let Some(parent) = parent.filter(|p| !declares(settings, p)) {
        field(parent, &mut ["TAG".to_string()].into_iter());
    }
    if layout.model_tag {
        let tag = ["TAG", "SEPARATOR", " "].map(str::to_string);
        field(crate::store::documents::MODEL_FIELD, &mut tag.into_iter());
    }
    let algorithm = settings.algorithm.to_uppercase();
    let mut attrs: Vec<String> = vec![
        "TYPE".into(),
        "FLOAT32".into(),
        "DIM".into(),
        dim.to_string(),
        "DISTANCE_METRIC".into(),
        settings.distance_metric.to_uppercase(),
    ];
    if algorithm == "HNSW" {
        attrs.extend([
            "M".into(),
            settings.m.to_string(),
            "EF_CONSTRUCTION".into(),
            settings.ef_construction.to_string(),
        ]);
    }
    args.extend(named(storage, layout.vector_field, &settings.vector_field));
    args.extend(["VECTOR".into(), algorithm, attrs.len().to_string()]);
    args.extend(attrs);
    args
}

/// The identifier of the stored field `name`: the hash field itself, or on JSON its path
/// (`$.content`, or `$["embedding@3f2a..."]` for a name that is not a plain identifier).
pub fn identifier(storage: Storage, name: &str) -> String {
    match storage {
        Storage::Hash => name.to_string(),
        Storage::Json => json_path(name),
    }
}

/// The JSONPath of the top-level member `name`.
pub fn json_path(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        format!("$.{name}")
    } else {
        format!("$[{}]", serde_json::Value::String(name.to_string()))
    }
}

/// A schema field's words before its type: the identifier, and `AS attribute` where the two
/// differ (always on JSON; on a hash for another model's vector field).
fn named(storage: Storage, stored: &str, attribute: &str) -> Vec<String> {
    let id = identifier(storage, stored);
    if id == attribute {
        vec![id]
    } else {
        vec![id, "AS".into(), attribute.to_string()]
    }
}

/// Whether `index.schema` declares a field of this name.
fn declares(settings: &IndexSettings, name: &str) -> bool {
    settings
        .schema
        .iter()
        .any(|f| f.split_whitespace().next() == Some(name))
}

/// The names (identifiers) of an index's fields, from FT.INFO.
pub fn field_names(info: &[(String, Value)]) -> Vec<String> {
    let Some((_, Value::Array(list))) = info
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("attributes"))
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|attr| {
            pairs(attr)
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("identifier"))
                .map(|(_, v)| text(&v))
        })
        .collect()
}

/// FT.INFO as a flat map of top-level keys; `None` when the index does not exist. On a cluster
/// without search coordinator, every primary's index in one: the first one's schema, with
/// `index_name` the name asked for and the counts merged ([`shard_index::merge_infos`]); `None`
/// when no primary has one.
pub async fn info(conn: &mut Conn, name: &str) -> Result<Option<Vec<(String, Value)>>, RedisError> {
    if coordinator::per_shard(conn).await {
        let shards = shard_index::infos(conn, name)
            .await
            .map_err(shard_index::into_redis)?;
        return Ok(shard_index::merge_infos(name, &shards));
    }
    info_of(conn, name).await
}

/// FT.INFO of one index (routed by its name).
pub(super) async fn info_of(
    conn: &mut Conn,
    name: &str,
) -> Result<Option<Vec<(String, Value)>>, RedisError> {
    let reply: Result<Value, _> = ::redis::cmd("FT.INFO").arg(name).query_async(conn).await;
    match reply {
        Ok(value) => Ok(Some(pairs(&value))),
        Err(e) if is_unknown_index(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_unknown_index(e: &::redis::RedisError) -> bool {
    // RediSearch answers "Unknown index name" (2.x: error code "Unknown"), newer ones "no such index".
    let text = e.to_string().to_lowercase();
    (text.contains("unknown") && text.contains("index name")) || text.contains("no such index")
}

/// What an index indexes, from FT.INFO's index_definition: "HASH" or "JSON".
pub fn key_type(info: &[(String, Value)]) -> Option<String> {
    let (_, definition) = info
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("index_definition"))?;
    pairs(definition)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("key_type"))
        .map(|(_, v)| text(&v))
}

/// Reads the vector field's spec from an FT.INFO reply.
pub fn vector_spec(info: &[(String, Value)], field: &str) -> Option<VectorSpec> {
    let attributes = info
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("attributes"))?;
    let Value::Array(list) = &attributes.1 else {
        return None;
    };
    list.iter().find_map(|attr| {
        let kv = pairs(attr);
        let get = |key: &str| {
            kv.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| text(v))
        };
        if get("identifier")? != field || get("type")?.to_uppercase() != "VECTOR" {
            return None;
        }
        Some(VectorSpec {
            dim: get("dim")?.parse().ok()?,
            data_type: get("data_type")?.to_uppercase(),
            metric: get("distance_metric")?.to_uppercase(),
        })
    })
}

/// Creates the index when missing; refuses an existing one whose vector field disagrees. An
/// existing index without the `parent` TAG field (made before chunking) gets it (FT.ALTER ...
/// SCHEMA ADD, which indexes the documents already there in the background). True when it
/// created one.
///
/// On a cluster without search coordinator: the same on every primary's own index, each made
/// under a name of its own slots where missing (a primary added since is picked up), all at
/// once (`shard_index::ensure_each`). Safe to call often: where every primary has its index
/// it costs two commands on each primary (FT._LIST, CLUSTER NODES; COMMAND INFO once a minute)
/// and one FT.INFO, concurrently, so about two round trips; on one server or with a coordinator
/// one FT.INFO, as before.
pub async fn ensure(
    store: &Store,
    conn: &mut Conn,
    wanted: &Wanted<'_>,
) -> Result<bool, StoreError> {
    if !coordinator::per_shard(conn).await {
        return ensure_one(store, conn, wanted, None).await;
    }
    shard_index::ensure_each(store, conn, wanted).await
}

/// [`ensure`] for one index; FT.CREATE goes to `create_on` when given (a keyless route: the
/// crate sends FT.CREATE to a random node).
pub(super) async fn ensure_one(
    store: &Store,
    conn: &mut Conn,
    wanted: &Wanted<'_>,
    create_on: Option<&str>,
) -> Result<bool, StoreError> {
    let Wanted {
        settings,
        layout,
        parent,
        dim,
    } = *wanted;
    let wanted = VectorSpec {
        dim,
        data_type: "FLOAT32".into(),
        metric: settings.distance_metric.to_uppercase(),
    };
    match info_of(conn, layout.name)
        .await
        .map_err(|e| store.error(e))?
    {
        Some(existing) => {
            let wanted_type = match settings.storage {
                Storage::Hash => "HASH",
                Storage::Json => "JSON",
            };
            if let Some(kind) = key_type(&existing).filter(|k| !k.eq_ignore_ascii_case(wanted_type))
            {
                return Err(StoreError::Setup {
                    url: store.url.clone(),
                    message: format!(
                        "index {:?} indexes {kind} documents but index.storage is {:?}. Fix: set \
                         index.storage (EMBED_WORKER__INDEX__STORAGE) to {:?}, or use a new \
                         index.name and index.prefix for the other storage",
                        layout.name,
                        wanted_type.to_lowercase(),
                        kind.to_lowercase()
                    ),
                });
            }
            let found = vector_spec(
                &existing,
                &identifier(settings.storage, layout.vector_field),
            );
            match found {
                Some(spec) if spec == wanted => {
                    if let Some(parent) = parent {
                        let id = identifier(settings.storage, parent);
                        if !field_names(&existing).contains(&id) {
                            let _: () = ::redis::cmd("FT.ALTER")
                                .arg(layout.name)
                                .arg("SCHEMA")
                                .arg("ADD")
                                .arg(named(settings.storage, parent, parent))
                                .arg("TAG")
                                .query_async(conn)
                                .await
                                .map_err(|e| store.error(e))?;
                            tracing::info!(index = %layout.name, field = parent,
                                "added the chunks' parent TAG field to the index (FT.ALTER)");
                        }
                    }
                    Ok(false)
                }
                other => Err(StoreError::Setup {
                    url: store.url.clone(),
                    message: format!(
                        "index {:?} exists but its vector field {:?} is {} while the model needs {} DIM {} {}. \
                         Fix: drop it (`embed-worker index drop`; documents stay) or set index.name to a new index",
                        layout.name,
                        layout.vector_field,
                        other.map_or("missing".to_string(), |s| format!("{} DIM {} {}", s.data_type, s.dim, s.metric)),
                        wanted.data_type,
                        wanted.dim,
                        wanted.metric
                    ),
                }),
            }
        }
        None => {
            let mut create = ::redis::cmd("FT.CREATE");
            create.arg(create_args(settings, &layout, parent, dim));
            let result: Result<(), RedisError> = match create_on {
                None => create.query_async(conn).await,
                Some(node) => match conn.on_node(node, &create).await {
                    Ok(Value::ServerError(e)) => Err(e.into()),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => Ok(true),
                // Another worker created it between our FT.INFO and FT.CREATE.
                Err(e) if e.to_string().contains("already exists") => Ok(false),
                Err(e) => Err(store.error(e)),
            }
        }
    }
}

/// The Query Engine's PARTIAL_INDEXED_DOCS: whether a write of fields outside every schema
/// leaves the indexed document alone. `None` when it cannot be read (an older module, or an ACL
/// user without FT.CONFIG).
pub async fn partial_indexed_docs(conn: &mut Conn) -> Option<bool> {
    let reply: Value = ::redis::cmd("FT.CONFIG")
        .arg("GET")
        .arg("PARTIAL_INDEXED_DOCS")
        .query_async(conn)
        .await
        .ok()?;
    let value = pairs(&reply)
        .into_iter()
        .next()
        .map(|(_, v)| text(&v))
        .or_else(|| match &reply {
            Value::Array(rows) => rows.first().map(|row| match row {
                Value::Array(kv) => kv.get(1).map(text).unwrap_or_default(),
                other => text(other),
            }),
            _ => None,
        })?;
    match value.to_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Drops the index (documents stay unless `delete_docs`). On a cluster without search
/// coordinator, every primary's own index of the name (a stranded one cannot be reached, so it
/// stays; `index info` names it).
pub async fn drop(conn: &mut Conn, name: &str, delete_docs: bool) -> Result<(), RedisError> {
    let dropindex = |index: &str| {
        let mut cmd = ::redis::cmd("FT.DROPINDEX");
        cmd.arg(index);
        if delete_docs {
            cmd.arg("DD");
        }
        cmd
    };
    if coordinator::per_shard(conn).await {
        // None anywhere: the plain command below answers as on one server ("Unknown index name").
        if let Some(dropped) = shard_index::drop_each(conn, name, dropindex).await {
            return dropped;
        }
    }
    dropindex(name).query_async(conn).await
}

/// How far the module has indexed what was written: `stats` and the metrics report it, so that
/// a document the worker wrote and acked is not taken for one a query finds already. On one
/// server a write is indexed before it returns (the vector too: a tiered HNSW index searches the
/// vectors its worker threads have not linked into the graph yet), except while the module
/// scans documents that predate the index.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IndexProgress {
    /// Documents in the index (FT.INFO num_docs; a chunked document counts once per chunk),
    /// summed over primaries: what a query can find now.
    pub docs: u64,
    /// The module is scanning keys that existed before the index (after FT.CREATE over existing
    /// documents, or FT.ALTER): until it ends, written documents may be missing from results.
    /// FT.INFO `indexing`; true if any primary is scanning.
    pub indexing: bool,
    /// That scan's progress, 0.0 to 1.0: FT.INFO `percent_indexed` (1.0 when no scan runs), the
    /// least advanced primary's.
    pub percent_indexed: f64,
    /// Documents the module could not index (FT.INFO hash_indexing_failures, summed): written,
    /// never searchable until rewritten.
    pub failures: u64,
    /// Jobs waiting for the module's worker threads (INFO search `search_workers_*_pending_jobs`,
    /// Redis 8 with search-workers > 0; vector inserts into HNSW graphs and queries, of every
    /// index), summed over primaries; None where the module reports none (RediSearch 2.10, which
    /// indexes on the main thread). FT.INFO has no per-index backlog field.
    pub pending_jobs: Option<u64>,
    /// Primaries without the index (cluster without search coordinator): their documents
    /// cannot be searched until `ensure` creates it. Empty otherwise.
    pub unindexed: Vec<String>,
}

/// The index's [`IndexProgress`]; None when it does not exist (anywhere).
pub async fn progress(conn: &mut Conn, name: &str) -> Result<Option<IndexProgress>, RedisError> {
    let (info, unindexed) = if coordinator::per_shard(conn).await {
        let shards = shard_index::infos(conn, name)
            .await
            .map_err(shard_index::into_redis)?;
        let unindexed = shards
            .iter()
            .filter(|s| s.index.is_none())
            .map(|s| s.node.clone())
            .collect();
        (shard_index::merge_infos(name, &shards), unindexed)
    } else {
        (info_of(conn, name).await?, Vec::new())
    };
    let Some(info) = info else {
        return Ok(None);
    };
    let number = |key: &str| {
        info.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| text(v).parse::<f64>().ok())
    };
    // Best effort: an ACL user without INFO still gets the rest.
    let queued = conn
        .on_primaries(::redis::cmd("INFO").arg("search"))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.reply.ok())
        .filter_map(|v| pending_jobs(&text(&v)))
        .reduce(|a, b| a + b);
    Ok(Some(IndexProgress {
        docs: number("num_docs").unwrap_or(0.0) as u64,
        indexing: number("indexing") == Some(1.0),
        percent_indexed: number("percent_indexed").unwrap_or(1.0),
        failures: number("hash_indexing_failures").unwrap_or(0.0) as u64,
        pending_jobs: queued,
        unindexed,
    }))
}

/// The sum of INFO search's `search_workers_<priority>_pending_jobs` fields; None without any.
fn pending_jobs(info: &str) -> Option<u64> {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.starts_with("search_workers_") && k.ends_with("_pending_jobs"))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_json_every_field_is_a_path_queried_by_its_name() {
        let mut s = crate::settings::Settings::load_from(None, Vec::new())
            .unwrap()
            .index;
        s.storage = Storage::Json;
        s.schema.push("year NUMERIC SORTABLE".into());
        let args = create_args(&s, &Layout::first(&s), Some("parent"), 384).join(" ");
        assert_eq!(
            args,
            "vector_idx ON JSON PREFIX 1 doc: SCHEMA $.content AS content TEXT $.genre AS genre TAG \
             $.year AS year NUMERIC SORTABLE $.parent AS parent TAG $.embedding AS embedding VECTOR \
             HNSW 10 TYPE FLOAT32 DIM 384 DISTANCE_METRIC L2 M 16 EF_CONSTRUCTION 200"
        );
        let next = Layout {
            name: "vector_idx@bbb",
            vector_field: "embedding@bbb",
            model_tag: true,
        };
        let args = create_args(&s, &next, None, 384).join(" ");
        assert!(
            args.contains("$.__ew_model AS __ew_model TAG SEPARATOR   $[\"embedding@bbb\"] AS embedding VECTOR"),
            "{args}"
        );
        assert_eq!(s.numeric_fields(), ["year"]);
        assert_eq!(json_path("a b\""), r#"$["a b\""]"#);
    }

    #[test]
    fn create_args_match_the_docs_page() {
        let s = crate::settings::Settings::load_from(None, Vec::new())
            .unwrap()
            .index;
        let first = Layout::first(&s);
        let args = create_args(&s, &first, None, 384).join(" ");
        assert_eq!(
            args,
            "vector_idx ON HASH PREFIX 1 doc: SCHEMA content TEXT genre TAG embedding VECTOR HNSW 10 \
             TYPE FLOAT32 DIM 384 DISTANCE_METRIC L2 M 16 EF_CONSTRUCTION 200"
        );
        // Chunking on: the docs' schema plus the parent TAG, unless the schema has it already.
        let args = create_args(&s, &first, Some("parent"), 384).join(" ");
        assert!(
            args.contains("genre TAG parent TAG embedding VECTOR"),
            "{args}"
        );
        let mut own = s.clone();
        own.schema.push("parent TAG SORTABLE".into());
        let args = create_args(&own, &Layout::first(&own), Some("parent"), 384).join(" ");
        assert_eq!(args.matches("parent").count(), 1, "{args}");
        // The next model's index: its own name and field, queried as `embedding`, and the TAG
        // over the models a document holds.
        let next = Layout {
            name: "vector_idx@bbb",
            vector_field: "embedding@bbb",
            model_tag: true,
        };
        let args = create_args(&s, &next, None, 384).join(" ");
        assert!(
            args.starts_with("vector_idx@bbb ON HASH PREFIX 1 doc: SCHEMA"),
            "{args}"
        );
        assert!(
            args.contains("__ew_model TAG SEPARATOR   embedding@bbb AS embedding VECTOR HNSW"),
            "{args}"
        );
    }
}
