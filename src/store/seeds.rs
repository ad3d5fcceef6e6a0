//! The nodes a cluster client starts from: the node of `redis.url`, and every node the last
//! slot map named. With the URL's node alone, a worker whose URL names a primary that then dies
//! could never connect again (every new connection starts from that one address), though the
//! rest of the cluster serves on. Each new connection learns the nodes again (CLUSTER SLOTS).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{ConnectionAddr, ConnectionInfo, RedisResult, TlsCertificates, Value};

#[derive(Clone)]
pub struct Seeds {
    first: ConnectionInfo,
    certs: Option<TlsCertificates>,
    /// host, port of every node of the last slot map.
    known: Arc<Mutex<Vec<(String, u16)>>>,
}

impl Seeds {
    pub fn new(first: ConnectionInfo, certs: Option<TlsCertificates>) -> Self {
        Self {
            first,
            certs,
            known: Arc::default(),
        }
    }

    /// A client seeded with the URL's node and every node known.
    pub fn client(&self) -> RedisResult<ClusterClient> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let nodes = std::iter::once(self.first.clone())
            .chain(known.into_iter().map(|(host, port)| self.node(host, port)))
            .collect::<Vec<_>>();
        let mut builder = ClusterClientBuilder::new(nodes);
        if let Some(certs) = &self.certs {
            builder = builder.certs(certs.clone());
        }
        builder.build()
    }

    /// Records the nodes of `conn`'s slot map; a failure (or no answer within `limit`) keeps
    /// what was known.
    pub async fn learn(&self, conn: &mut ClusterConnection, limit: Duration) {
        let mut cmd = ::redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        match tokio::time::timeout(limit, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(reply)) => {
                let nodes = nodes_of(&reply);
                if !nodes.is_empty() {
                    *self.known.lock().unwrap_or_else(|p| p.into_inner()) = nodes;
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "CLUSTER SLOTS failed; keeping the known nodes")
            }
            Err(_) => tracing::debug!("CLUSTER SLOTS did not answer; keeping the known nodes"),
        }
    }

    /// The URL's connection settings (credentials, TLS) at another node's address.
    fn node(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.first.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.first.clone().set_addr(addr)
    }
}

/// Every node address in a CLUSTER SLOTS reply: `[[start, end, [host, port, id, ...], ...], ...]`.
fn nodes_of(reply: &Value) -> Vec<(String, u16)> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    let mut nodes: Vec<(String, u16)> = ranges
        .iter()
        .filter_map(|r| match r {
            Value::Array(fields) => Some(fields.iter().skip(2)),
            _ => None,
        })
        .flatten()
        .filter_map(|node| match node {
            Value::Array(parts) => {
                let host: String = ::redis::from_redis_value(parts.first()?.clone()).ok()?;
                let port: i64 = ::redis::from_redis_value(parts.get(1)?.clone()).ok()?;
                Some((host, u16::try_from(port).ok()?))
            }
            _ => None,
        })
        .filter(|(host, _)| !host.is_empty() && host != "?")
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn cluster_slots_name_every_primary_and_replica_once() {
        let node = |port: i64| Value::Array(vec![s("127.0.0.1"), Value::Int(port), s("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node(7001)]),
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node(7000)]),
        ]);
        assert_eq!(
            nodes_of(&reply),
            [
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001),
                ("127.0.0.1".to_string(), 7003)
            ]
        );
        assert!(nodes_of(&Value::Nil).is_empty());
    }
}
