//! `embed-worker search TEXT [-k N] [--filter EXPR] [--chunks] [--json] [--return FIELD...]`.
//! By default it prints the docs page's lines, one per document:
//! `ID: doc:0, Distance:0.114169843495, Content:'That is a very happy person'`. A document cut
//! into chunks is shown once, by its best chunk; `--chunks` shows every chunk hit instead. On a
//! cluster without search coordinator the query runs on every primary's own index and the hits
//! are merged first (store::query::knn), so the output is the same as on one server.

use std::process::ExitCode;

use crate::model::Model;
use crate::settings::Settings;
use crate::store::documents::CHUNK_SEPARATOR;
use crate::store::fanout::FanoutError;
use crate::store::query::{self, Hit};
use crate::store::{generation, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Query text.
    pub text: String,
    /// Number of documents (of chunks with --chunks).
    #[arg(short, default_value_t = 3)]
    pub k: usize,
    /// Pre-filter in query syntax, e.g. '@genre:{pets}'.
    #[arg(long)]
    pub filter: Option<String>,
    /// One line per chunk hit, not per document.
    #[arg(long)]
    pub chunks: bool,
    /// A JSON array of {"id", "distance", <field>: <value>...} instead of the docs' lines.
    #[arg(long)]
    pub json: bool,
    /// Fields to return (the FT.SEARCH RETURN list); default: the text field.
    #[arg(long = "return", num_args = 1..)]
    pub return_fields: Vec<String>,
}

/// The most neighbours one query asks for while looking for `k` distinct documents.
const MAX_KNN: usize = 10_000;

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let model = Model::load(&settings)?;
    let vector = model
        .embed_texts_blocking(&[args.text.as_str()])?
        .pop()
        .expect("one text in, one vector out");
    let store = Store::new(&settings.redis)?;
    let text_field = settings.stream.text_field.clone();
    let parent = settings.chunk.parent_field.clone();
    let shown: Vec<String> = if args.return_fields.is_empty() {
        vec![text_field.clone()]
    } else {
        args.return_fields.clone()
    };
    let mut asked: Vec<&str> = shown.iter().map(String::as_str).collect();
    if !asked.contains(&parent.as_str()) {
        asked.push(&parent);
    }
    let hits = super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        // A query vector from another model than the index's ranks garbage: refuse it.
        let key = generation::record_key(&settings.index.name);
        if let Some(r) = generation::load(&mut conn, &key)
            .await
            .map_err(|e| anyhow::Error::from(store.error(e)))?
        {
            if r.current.fingerprint != model.fingerprint.id {
                anyhow::bail!(
                    "model mismatch: index {} holds vectors of {} [{}], and this query's model is {}. \
                     Fix: set model.file (EMBED_WORKER__MODEL__FILE) to the index's model",
                    settings.index.name,
                    r.current.model,
                    r.current.fingerprint,
                    model.fingerprint
                );
            }
        }
        // Chunks of one document compete for the k places: ask for more neighbours until k
        // documents are found or the index has no more.
        let mut knn = if args.chunks {
            args.k
        } else {
            args.k.saturating_mul(4).max(10)
        };
        loop {
            let q = query::Knn {
                index: &settings.index.name,
                vector_field: &settings.index.vector_field,
                vector: &vector,
                k: knn,
                filter: args.filter.as_deref(),
                return_fields: &asked,
                storage: settings.index.storage,
            };
            let hits = query::knn(&mut conn, &q)
            .await
            .map_err(|e| match e {
                FanoutError::Redis(e) => anyhow::Error::from(store.error(e)),
                other => anyhow::anyhow!("redis {}: {other}", store.url),
            })?;
            if args.chunks {
                return Ok::<_, anyhow::Error>(hits);
            }
            let found = hits.len();
            let docs = best_per_document(hits, &parent);
            if docs.len() >= args.k || found < knn || knn >= MAX_KNN {
                return Ok(docs.into_iter().take(args.k).collect());
            }
            knn = (knn * 4).min(MAX_KNN);
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&as_json(&hits, &shown))?);
    } else {
        for hit in hits {
            println!(
                "ID: {}, Distance:{}, Content:'{}'",
                hit.key,
                hit.distance,
                hit.field(&text_field).unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Hits (nearest first) grouped by document: each document once, by its nearest chunk, keyed
/// by the document key. A chunk (it has the `parent` field, which a one-chunk document cannot
/// have while chunking is on) is `<document key>#<n>`; a one-chunk document is its own key.
pub fn best_per_document(hits: Vec<Hit>, parent: &str) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for mut hit in hits {
        let key = match (hit.field(parent), hit.key.rsplit_once(CHUNK_SEPARATOR)) {
            (Some(_), Some((document, _))) => document.to_string(),
            _ => hit.key.clone(),
        };
        if seen.insert(key.clone()) {
            hit.key = key;
            out.push(hit);
        }
    }
    out
}

/// The hits as JSON objects: id, distance (a number), then the shown fields.
fn as_json(hits: &[Hit], shown: &[String]) -> serde_json::Value {
    let rows = hits
        .iter()
        .map(|h| {
            let mut row = serde_json::Map::new();
            row.insert("id".into(), h.key.clone().into());
            let distance = h
                .distance
                .parse::<f64>()
                .map_or(serde_json::Value::Null, serde_json::Value::from);
            row.insert("distance".into(), distance);
            for name in shown {
                if name == "id" || name == "distance" {
                    continue;
                }
                if let Some(v) = h.field(name) {
                    row.insert(name.clone(), v.into());
                }
            }
            serde_json::Value::Object(row)
        })
        .collect();
    serde_json::Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(key: &str, distance: &str, parent: Option<&str>) -> Hit {
        let mut fields = vec![("content".to_string(), format!("text of {key}"))];
        if let Some(p) = parent {
            fields.push(("parent".into(), p.into()));
        }
        Hit {
            key: key.into(),
            distance: distance.into(),
            fields,
        }
    }

    #[test]
    fn a_document_shows_once_by_its_best_chunk() {
        let hits = vec![
            hit("doc:42#3", "0.1", Some("42")),
            hit("doc:7", "0.2", None),
            hit("doc:42#0", "0.3", Some("42")),
            hit("doc:8#1", "0.4", Some("8")),
        ];
        let docs = best_per_document(hits, "parent");
        let got: Vec<(&str, &str, &str)> = docs
            .iter()
            .map(|h| {
                (
                    h.key.as_str(),
                    h.distance.as_str(),
                    h.field("content").unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("doc:42", "0.1", "text of doc:42#3"),
                ("doc:7", "0.2", "text of doc:7"),
                ("doc:8", "0.4", "text of doc:8#1"),
            ]
        );
        // Without chunking a document may have its own "parent" field: it keeps its key.
        let docs = best_per_document(vec![hit("doc:9", "0.5", Some("x"))], "parent");
        assert_eq!(docs[0].key, "doc:9");
    }

    #[test]
    fn chunks_merged_from_shards_show_once_per_document() {
        // A document's chunks share its slot, so its shard: after the merge, each document is
        // shown by its nearest chunk, in distance order, as on one node.
        let merged = query::merge_nearest(
            vec![
                vec![
                    hit("doc:1#0", "0.1", Some("1")),
                    hit("doc:1#1", "0.35", Some("1")),
                ],
                vec![
                    hit("doc:2#3", "0.2", Some("2")),
                    hit("doc:2#0", "0.3", Some("2")),
                    hit("doc:3", "0.4", None),
                ],
            ],
            4,
        );
        let docs = best_per_document(merged, "parent");
        let got: Vec<(&str, &str)> = docs
            .iter()
            .map(|h| (h.key.as_str(), h.distance.as_str()))
            .collect();
        // doc:3 (0.4) fell outside the 4 nearest chunks; `search` then asks for more.
        assert_eq!(got, [("doc:1", "0.1"), ("doc:2", "0.2")]);
    }

    #[test]
    fn json_rows_carry_id_distance_and_the_fields_asked_for() {
        let rows = as_json(&[hit("doc:0", "0.114169843495", None)], &["content".into()]);
        assert_eq!(
            rows,
            serde_json::json!([{"id": "doc:0", "distance": 0.114169843495, "content": "text of doc:0"}])
        );
    }
}
