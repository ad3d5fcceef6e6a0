//! Writes acknowledged only once replicated (`redis.wait_replicas`): after a batch's writes,
//! `WAIT R timeout` on every primary (the one server, or each primary of a cluster, through the
//! connections that carried the writes), and only then XACK. R is capped at each primary's
//! replica count ([`Replicas`]), re-read every few seconds.
//!
//! A primary that answers fewer than R within the timeout while it has R replicas connected is
//! lagging: a transient error, so the caller writes again and waits again (never acks). A
//! primary that has fewer than R replicas at all (its replica was promoted when it died, and
//! nothing replaced it) cannot ever answer R: there the writes count as replicated once every
//! replica it has holds them, so a failover does not stop the fleet. Such acks are reported to
//! the caller (a metric and a warning): their documents live on fewer copies than asked.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::{ErrorKind, RedisError, ServerErrorKind};

use super::cluster::Conn;

/// How long a primary's replica count is trusted before INFO replication is asked again.
const RECHECK: Duration = Duration::from_secs(5);

/// A primary whose writes were acked on fewer replicas than asked, because it has no more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    /// "host:port" (empty on one server).
    pub node: String,
    /// Replicas connected to it.
    pub replicas: u64,
}

/// When the primaries were counted, and each with its connected replicas.
type Counted = (Instant, Vec<(String, u64)>);

/// The primaries and how many replicas each had when last asked, so that WAIT asks no primary
/// for more than it has: `WAIT 1` on a primary without replicas blocks for the whole timeout,
/// on every batch, until one is added. Asked again every `RECHECK`, and after any surprise (a
/// WAIT short of what the count promised, a primary that turned replica).
#[derive(Debug, Default)]
pub struct Replicas {
    known: Mutex<Option<Counted>>,
}

impl Replicas {
    /// Waits until `want` replicas of every primary (or all it has, when fewer) hold this
    /// connection's writes. `Ok` with the primaries that have fewer than `want` (acked on all
    /// they have); `Err` (transient: TRYAGAIN) when a primary did not confirm within `timeout`
    /// what its replicas should have, or the primaries changed under it.
    pub async fn wait(
        &self,
        conn: &mut Conn,
        want: u32,
        timeout: Duration,
    ) -> Result<Vec<Short>, RedisError> {
        let primaries = self.primaries(conn).await?;
        let want = u64::from(want);
        let asked = futures::future::join_all(primaries.iter().map(|(node, connected)| {
            let mut conn = conn.clone();
            let ask = want.min(*connected);
            async move {
                if ask == 0 {
                    return Ok(0);
                }
                let mut cmd = ::redis::cmd("WAIT");
                cmd.arg(ask).arg(timeout.as_millis().max(1) as u64);
                match conn.on_node(node, &cmd).await? {
                    ::redis::Value::ServerError(e) => Err(RedisError::from(e)),
                    reply => Ok(::redis::from_redis_value(reply)?),
                }
            }
        }))
        .await;
        let mut short = Vec::new();
        for ((node, connected), acked) in primaries.iter().zip(asked) {
            let ask = want.min(*connected);
            let acked = match acked {
                Ok(acked) => acked,
                Err(e) => {
                    self.forget();
                    return Err(demoted(e, node));
                }
            };
            if acked < ask {
                self.forget();
                return Err(try_again(
                    "WAIT: fewer replicas than redis.wait_replicas confirmed the writes in time",
                    format!(
                        "{} acknowledged {acked} of {ask} within {} ({connected} connected)",
                        shown(node),
                        humantime::format_duration(timeout)
                    ),
                ));
            }
            if ask < want {
                short.push(Short {
                    node: node.clone(),
                    replicas: *connected,
                });
            }
        }
        Ok(short)
    }

    /// Every primary with its connected replicas: the cached answer, or INFO replication on
    /// every primary.
    async fn primaries(&self, conn: &mut Conn) -> Result<Vec<(String, u64)>, RedisError> {
        if let Some((at, list)) = &*self.lock() {
            if at.elapsed() < RECHECK {
                return Ok(list.clone());
            }
        }
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("replication");
        let mut list = Vec::new();
        for node in conn.on_primaries(&cmd).await? {
            let info: String = ::redis::from_redis_value(node.reply?)?;
            if info.lines().any(|l| l.trim() == "role:slave") {
                return Err(try_again(
                    "a primary of the slot map is a replica now (a failover)",
                    format!(
                        "{} is a replica; reconnecting for the new slot map",
                        shown(&node.node)
                    ),
                ));
            }
            list.push((node.node, parse_connected(&info)));
        }
        *self.lock() = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Counted>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// WAIT refused by a node that was a primary and is a replica now: transient, as the failover
/// that demoted it.
fn demoted(e: RedisError, node: &str) -> RedisError {
    if e.to_string().contains("replica") {
        try_again(
            "WAIT on a primary that is a replica now (a failover)",
            format!("{}: {e}", shown(node)),
        )
    } else {
        e
    }
}

fn try_again(what: &'static str, detail: String) -> RedisError {
    RedisError::from((ErrorKind::Server(ServerErrorKind::TryAgain), what, detail))
}

fn shown(node: &str) -> &str {
    if node.is_empty() {
        "the server"
    } else {
        node
    }
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
