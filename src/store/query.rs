//! KNN queries, as the docs page runs them.

use crate::store::cluster::Conn;
use ::redis::Value;

use super::reply::{pairs, text};

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

/// `FT.SEARCH index "<filter>=>[KNN k @field $vec AS vector_distance]"`, nearest first.
pub async fn knn(
    conn: &mut Conn,
    index: &str,
    vector_field: &str,
    vector: &[f32],
    k: usize,
    filter: Option<&str>,
    return_fields: &[&str],
) -> Result<Vec<Hit>, ::redis::RedisError> {
    let filter = filter
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
    let reply: Value = cmd.query_async(conn).await?;
    Ok(parse_search(&reply))
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
