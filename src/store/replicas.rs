//! Writes acknowledged only once replicated (`redis.wait_replicas`): after a batch's writes,
//! `WAIT R timeout` on every primary (the one server, or each primary of a cluster, through the
//! connections that carried the writes), and only then XACK.
//!
//! A primary that answers fewer than R within the timeout while it has R replicas connected is
//! lagging: a transient error, so the caller writes again and waits again (never acks). A
//! primary that has fewer than R replicas at all (its replica was promoted when it died, and
//! nothing replaced it) cannot ever answer R: there the writes count as replicated once every
//! replica it has holds them, so a failover does not stop the fleet. Such acks are reported to
//! the caller (a metric and a warning): their documents live on fewer copies than asked.

use std::time::Duration;

use ::redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::cluster::Conn;

/// A primary whose writes were acked on fewer replicas than asked, because it has no more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    /// "host:port" (empty on one server).
    pub node: String,
    /// Replicas connected to it.
    pub replicas: u64,
}

/// Waits until `want` replicas of every primary hold this connection's writes. `Ok` with the
/// primaries that have fewer replicas than `want` (acked on all they have); `Err` (transient:
/// TRYAGAIN) when a primary with enough replicas did not confirm within `timeout`.
pub async fn wait(conn: &mut Conn, want: u32, timeout: Duration) -> Result<Vec<Short>, RedisError> {
    let mut cmd = ::redis::cmd("WAIT");
    cmd.arg(want).arg(timeout.as_millis().max(1) as u64);
    let mut short = Vec::new();
    for node in conn.on_primaries(&cmd).await? {
        let acked: u64 = ::redis::from_redis_value(node.reply?)?;
        if acked >= u64::from(want) {
            continue;
        }
        let replicas = connected_replicas(conn, &node.node).await?;
        if replicas <= acked {
            short.push(Short {
                node: node.node,
                replicas,
            });
            continue;
        }
        return Err(RedisError::from((
            ErrorKind::Server(ServerErrorKind::TryAgain),
            "WAIT: fewer replicas than redis.wait_replicas confirmed the writes in time",
            format!(
                "{} acknowledged {acked} of {want} within {} ({replicas} connected)",
                shown(&node.node),
                humantime::format_duration(timeout)
            ),
        )));
    }
    Ok(short)
}

fn shown(node: &str) -> &str {
    if node.is_empty() {
        "the server"
    } else {
        node
    }
}

/// `connected_slaves` from INFO replication on `node`.
async fn connected_replicas(conn: &mut Conn, node: &str) -> Result<u64, RedisError> {
    let mut cmd = ::redis::cmd("INFO");
    cmd.arg("replication");
    let info: Value = conn.on_node(node, &cmd).await?;
    let text: String = ::redis::from_redis_value(info)?;
    Ok(parse_connected(&text))
}

fn parse_connected(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn connected_replicas_are_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=...\r\n";
        assert_eq!(super::parse_connected(info), 2);
        assert_eq!(
            super::parse_connected("# Replication\r\nrole:master\r\n"),
            0
        );
    }
}
