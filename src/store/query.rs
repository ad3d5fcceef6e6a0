//! KNN queries, as the docs page runs them: on one index, or on every primary's own index of a
//! cluster without search coordinator, merged.

use crate::store::cluster::Conn;
use ::redis::Value;

use super::coordinator;
use super::fanout::{self, FanoutError};
use super::index::json_path;
use super::reply::{pairs, text};
use crate::settings::Storage;

/// One KNN hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub key: String,
    /// The distance exactly as Redis printed it.
    pub distance: String,
    pub fields: Vec<(String, String)>,
}

impl Hit {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Little-endian float32 bytes, the layout FT indexes read from a hash field.
pub fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `FT.SEARCH index "<filter>=>[KNN k @field $vec AS vector_distance]"`, nearest first. On a
/// cluster without search coordinator, the same query on every primary's own index at once,
/// merged (see [`merge_nearest`]), then the returned fields read from the `k` documents
/// themselves ([`load_fields`]); a primary that keeps failing, or has no index, fails the whole
/// query rather than leave its documents out.
pub async fn knn(conn: &mut Conn, q: &Knn<'_>) -> Result<Vec<Hit>, FanoutError> {
    if !coordinator::per_shard(conn).await {
        let reply: Value = q.cmd(q.index, q.return_fields).query_async(conn).await?;
        return Ok(parse_search(&reply));
    }
    let shards = fanout::shards(conn, q.index).await?;
    let mut targets = Vec::new();
    for shard in shards {
        let Some(name) = shard.index else {
            return Err(FanoutError::Unindexed {
                node: shard.node,
                index: q.index.to_string(),
            });
        };
        // The distance alone: the fields come from the documents once merged.
        let cmd = q.cmd(&name, &[]);
        targets.push((shard.node, cmd));
    }
    // Routed by the shard index's name, so after a failover the query follows its slot to the
    // promoted replica (which holds the same index).
    let replies = futures::future::join_all(targets.iter().map(|(node, cmd)| {
        let conn = conn.clone();
        async move {
            fanout::retrying(node, || {
                let mut conn = conn.clone();
                async move { cmd.query_async::<Value>(&mut conn).await }
            })
            .await
        }
    }))
    .await;
    let lists = replies
        .into_iter()
        .map(|r| r.map(|reply| parse_search(&reply)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hits = merge_nearest(lists, q.k);
    load_fields(conn, &mut hits, q.return_fields, q.storage).await?;
    Ok(hits)
}

/// Reads `fields` of each hit from its document, after `vector_distance`. A shard index's
/// FT.SEARCH returns only what it computed: the module (with no coordinator) loads no document
/// outside its index name's own slot, so it answers the key and distance alone. A field the
/// document lacks is left out, as FT.SEARCH leaves it out.
async fn load_fields(
    conn: &mut Conn,
    hits: &mut [Hit],
    fields: &[&str],
    storage: Storage,
) -> Result<(), FanoutError> {
    if hits.is_empty() || fields.is_empty() {
        return Ok(());
    }
    let mut pipe = ::redis::pipe();
    for hit in hits.iter() {
        match storage {
            Storage::Hash => pipe.cmd("HMGET").arg(&hit.key).arg(fields),
            Storage::Json => pipe
                .cmd("JSON.GET")
                .arg(&hit.key)
                .arg(fields.iter().map(|f| json_path(f)).collect::<Vec<_>>()),
        };
    }
    // Each read goes to its key's primary (the cluster connection spreads a pipeline by slot).
    let replies: Vec<Value> = fanout::retrying("the documents' primaries", || {
        let mut conn = conn.clone();
        let pipe = pipe.clone();
        async move { pipe.query_async(&mut conn).await }
    })
    .await?;
    for (hit, reply) in hits.iter_mut().zip(replies) {
        let values: Vec<Option<String>> = match storage {
            Storage::Hash => match reply {
                Value::Array(values) => values
                    .iter()
                    .map(|v| (!matches!(v, Value::Nil)).then(|| text(v)))
                    .collect(),
                _ => Vec::new(),
            },
            Storage::Json => json_values(&text(&reply), fields),
        };
        for (name, value) in fields.iter().zip(values) {
            if let Some(value) = value {
                hit.fields.push((name.to_string(), value));
            }
        }
    }
    Ok(())
}

/// JSON.GET's answer for the paths of `fields`: with one path an array of matches, with more an
/// object of path -> matches. A string as itself, anything else as its JSON text.
fn json_values(reply: &str, fields: &[&str]) -> Vec<Option<String>> {
    let Ok(parsed) = serde_json::from_str::<serde_json::Value>(reply) else {
        return Vec::new();
    };
    let first = |matches: Option<&serde_json::Value>| {
        matches
            .and_then(|m| m.as_array())
            .and_then(|m| m.first())
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    };
    match fields {
        [_] => vec![first(Some(&parsed))],
        _ => fields
            .iter()
            .map(|f| first(parsed.get(json_path(f))))
            .collect(),
    }
}

/// One KNN query: what `search` asks.
#[derive(Debug, Clone, Copy)]
pub struct Knn<'a> {
    pub index: &'a str,
    pub vector_field: &'a str,
    pub vector: &'a [f32],
    pub k: usize,
    /// A query filter (`@genre:{pets}`), or every document.
    pub filter: Option<&'a str>,
    /// Fields returned beside `vector_distance`.
    pub return_fields: &'a [&'a str],
    pub storage: Storage,
}

impl Knn<'_> {
    /// The FT.SEARCH of this query on `index`, returning `return_fields`.
    fn cmd(&self, index: &str, return_fields: &[&str]) -> ::redis::Cmd {
        let (vector_field, vector, k) = (self.vector_field, self.vector, self.k);
        let filter = self
            .filter
            .map(|f| format!("({f})"))
            .unwrap_or_else(|| "*".into());
        let query = format!("{filter}=>[KNN {k} @{vector_field} $vec AS vector_distance]");
        let mut cmd = ::redis::cmd("FT.SEARCH");
        cmd.arg(index)
            .arg(query)
            .arg("RETURN")
            .arg(return_fields.len() + 1)
            .arg("vector_distance");
        for f in return_fields {
            cmd.arg(*f);
        }
        cmd.arg("SORTBY").arg("vector_distance").arg("ASC");
        cmd.arg("PARAMS")
            .arg(2)
            .arg("vec")
            .arg(vector_bytes(vector));
        cmd.arg("LIMIT").arg(0).arg(k).arg("DIALECT").arg(2);
        cmd
    }
}

/// The `k` nearest of every shard's hits. Each shard answers its own `k` nearest, and each of
/// the `k` nearest of all is among its own shard's `k` nearest, so the union holds them all and
/// the merge is exact (as exact as each shard's answer). A key in two lists (its slot migrating
/// while the query ran) counts once, by its nearer distance. Ties go by key, so the order does
/// not depend on which shard answered first; a distance that does not parse sorts last.
pub fn merge_nearest(lists: Vec<Vec<Hit>>, k: usize) -> Vec<Hit> {
    let distance = |h: &Hit| h.distance.parse::<f64>().unwrap_or(f64::INFINITY);
    let mut all: Vec<Hit> = lists.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        distance(a)
            .total_cmp(&distance(b))
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut seen = std::collections::HashSet::new();
    all.retain(|h| seen.insert(h.key.clone()));
    all.truncate(k);
    all
}

/// Parses a RESP2 FT.SEARCH reply: [total, key, [field, value, ...], ...].
fn parse_search(reply: &Value) -> Vec<Hit> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .get(1..)
        .unwrap_or_default()
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let fields: Vec<(String, String)> = pairs(&c[1])
                .into_iter()
                .map(|(k, v)| (k, text(&v)))
                .collect();
            let distance = fields
                .iter()
                .find(|(k, _)| k == "vector_distance")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            Hit {
                key: text(&c[0]),
                distance,
                fields,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(key: &str, distance: &str) -> Hit {
        Hit {
            key: key.into(),
            distance: distance.into(),
            fields: vec![("vector_distance".into(), distance.into())],
        }
    }

    fn keys(hits: &[Hit]) -> Vec<&str> {
        hits.iter().map(|h| h.key.as_str()).collect()
    }

    #[test]
    fn the_merge_keeps_the_nearest_k_of_all_shards() {
        let shards = vec![
            vec![hit("a", "0.1"), hit("b", "0.5"), hit("c", "0.9")],
            vec![hit("d", "0.2"), hit("e", "0.3"), hit("f", "0.4")],
            vec![],
        ];
        let merged = merge_nearest(shards, 4);
        assert_eq!(keys(&merged), ["a", "d", "e", "f"]);
        // The distance stays as the shard printed it.
        assert_eq!(merged[0].distance, "0.1");
    }

    #[test]
    fn json_fields_read_back_as_ft_search_returns_them() {
        assert_eq!(
            json_values(r#"["a dog"]"#, &["content"]),
            [Some("a dog".to_string())]
        );
        assert_eq!(
            json_values(
                r#"{"$.content":["a dog"],"$.year":[2024],"$.parent":[]}"#,
                &["content", "year", "parent"]
            ),
            [Some("a dog".to_string()), Some("2024".to_string()), None]
        );
        assert!(json_values("", &["content"]).is_empty());
    }

    #[test]
    fn k_larger_than_every_hit_returns_them_all_in_order() {
        let shards = vec![vec![hit("b", "2")], vec![hit("a", "1"), hit("c", "3")]];
        assert_eq!(keys(&merge_nearest(shards, 100)), ["a", "b", "c"]);
        assert!(merge_nearest(vec![vec![], vec![]], 3).is_empty());
        assert!(merge_nearest(vec![vec![hit("a", "1")]], 0).is_empty());
    }

    #[test]
    fn ties_go_by_key_whatever_shard_answered_first() {
        let one = merge_nearest(
            vec![
                vec![hit("y", "0.5")],
                vec![hit("x", "0.5"), hit("z", "0.5")],
            ],
            2,
        );
        let other = merge_nearest(
            vec![
                vec![hit("x", "0.5"), hit("z", "0.5")],
                vec![hit("y", "0.5")],
            ],
            2,
        );
        assert_eq!(keys(&one), ["x", "y"]);
        assert_eq!(one, other);
        // Printed differently, the same number ties too.
        let printed = merge_nearest(vec![vec![hit("b", "0.50")], vec![hit("a", "5e-1")]], 2);
        assert_eq!(keys(&printed), ["a", "b"]);
    }

    #[test]
    fn a_key_on_two_shards_counts_once_by_its_nearer_distance() {
        let merged = merge_nearest(
            vec![
                vec![hit("moving", "0.4"), hit("b", "0.6")],
                vec![hit("moving", "0.3"), hit("c", "0.7")],
            ],
            3,
        );
        assert_eq!(keys(&merged), ["moving", "b", "c"]);
        assert_eq!(merged[0].distance, "0.3");
        let unparsable = merge_nearest(vec![vec![hit("nan", "?"), hit("a", "9")]], 2);
        assert_eq!(keys(&unparsable), ["a", "nan"]);
    }
}
