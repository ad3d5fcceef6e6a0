//! One connection type for one server and for a Redis Cluster. On a cluster each command goes to
//! its slot's primary (the redis crate follows MOVED and ASK and refreshes the slot map after a
//! failover); a pipeline of commands on many slots is sent as concurrent single commands, since
//! the crate only pipelines within one slot. Keyless commands that must reach every primary (the
//! index without a coordinator) use [`Conn::on_primaries`].

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, ServerError, Value};
use futures::FutureExt;

use super::coordinator::Memo;

/// A connection to one server or to a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    /// With the longest any one call may take, retries inside the crate included: its own
    /// response timeout does not bound a request queued behind a node it is reconnecting to (a
    /// primary SIGKILLed), which then waits for as long as that node stays dead. And with the
    /// `Store`'s answer to whether the search module has a coordinator.
    Cluster(ClusterConnection, Duration, Arc<Memo>),
}

/// One primary's reply to a command sent to every primary.
#[derive(Debug)]
pub struct NodeReply {
    /// "host:port".
    pub node: String,
    pub reply: RedisResult<Value>,
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(..))
    }

    /// `cmd` on every primary (the one server when not a cluster), each reply by itself.
    pub async fn on_primaries(&mut self, cmd: &Cmd) -> RedisResult<Vec<NodeReply>> {
        match self {
            Conn::Single(c) => Ok(vec![NodeReply {
                node: String::new(),
                reply: cmd.query_async(c).await,
            }]),
            Conn::Cluster(c, limit, _) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let Value::Map(replies) =
                    bounded(*limit, c.route_command(cmd.clone(), routing)).await?
                else {
                    return Err(RedisError::from((
                        ::redis::ErrorKind::UnexpectedReturnType,
                        "a command to every primary did not answer per node",
                    )));
                };
                Ok(replies
                    .into_iter()
                    .map(|(node, reply)| NodeReply {
                        node: ::redis::from_redis_value(node).unwrap_or_default(),
                        reply: match reply {
                            Value::ServerError(e) => Err(e.into()),
                            v => Ok(v),
                        },
                    })
                    .collect())
            }
        }
    }

    /// `cmd` on the node at "host:port" (any command on one server).
    pub async fn on_node(&mut self, node: &str, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c, limit, _) => {
                let (host, port) = node.rsplit_once(':').unwrap_or((node, "6379"));
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_string(),
                    port: port.parse().unwrap_or(6379),
                });
                bounded(*limit, c.route_command(cmd.clone(), routing)).await
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, limit, _) => bounded(*limit, c.req_packed_command(cmd)).boxed(),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c, limit, _) => {
                if pipeline.is_transaction() {
                    // A transaction must be on one slot; the server refuses it otherwise.
                    bounded(*limit, c.req_packed_commands(pipeline, offset, count)).boxed()
                } else {
                    bounded(*limit, spread(c.clone(), pipeline)).boxed()
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, ..) => c.get_db(),
        }
    }
}

/// A plain pipeline on a cluster: each command by itself, all at once, replies in order. A
/// command's server error becomes its reply (as in a pipeline on one server); a connection
/// error fails the whole pipeline.
/// `call`, or a transient I/O error once `limit` has passed.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(done) => done,
        Err(_) => Err(RedisError::from((
            ::redis::ErrorKind::Io,
            "no reply from the cluster in time",
            format!(
                "nothing within {} (redis.command_timeout): a node failing over or down",
                humantime::format_duration(limit)
            ),
        ))),
    }
}

async fn spread(conn: ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let replies = futures::future::join_all(pipeline.cmd_iter().map(|cmd| {
        let mut c = conn.clone();
        async move { c.req_packed_command(cmd).await }
    }))
    .await;
    replies
        .into_iter()
        .map(|r| match r {
            Ok(v) => Ok(v),
            Err(e) => match ServerError::try_from(e) {
                Ok(server) => Ok(Value::ServerError(server)),
                Err(e) => Err(e),
            },
        })
        .collect()
}
