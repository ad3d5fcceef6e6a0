//! An index on a Redis Cluster whose search module has no coordinator: one shard-local index
//! per primary, each over that primary's own documents, and every query sent to all of them
//! and merged, as a coordinator would.
//!
//! Without a coordinator the module declares the index name as each FT.* command's key, so the
//! cluster answers MOVED on every primary but the one serving the name's slot: one name reaches
//! one primary, never all. Each primary's index therefore has a name of its own that hashes to
//! a slot it serves: the index name itself on the primary serving its slot (so an index made
//! before this is adopted there), elsewhere `<name>{<n>}` with the smallest n that lands on the
//! primary. FT._LIST (keyless) says which indexes a primary holds, and its own CLUSTER NODES
//! line which of those names it still serves. A reshard that moves such a name's slot away
//! strands that index (it still indexes, but every command on it goes elsewhere): the next
//! `ensure` makes the primary a new one, and `index info` names the stranded one.

use std::future::Future;
use std::time::Duration;

use ::redis::{RedisError, RedisResult, Value};

use super::cluster::Conn;
use super::connect::{classify, Backoff, Disposition};
use super::reply::text;
use super::slots::{hash_tag, key_slot, SLOTS};

/// Tries of one primary's command before the whole answer fails. With the back-off below they
/// span about 5 to 10 s: enough for a failover under a short `cluster-node-timeout` (1 s: about
/// 3 s), not under the default 15 s, after which the caller (the worker's periodic ensure, or a
/// person rerunning `search`) tries again.
const TRIES: u32 = 8;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// A cluster answer that would leave out some primary's documents.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// A primary kept failing (a failover or a restart in progress, or a node down).
    #[error(
        "primary {node} did not answer ({error}; {tries} tries): an answer without its documents \
         would be partial, so there is none"
    )]
    Shard {
        node: String,
        tries: u32,
        error: RedisError,
    },
    /// A primary without the index yet (one added since it was created).
    #[error(
        "primary {node} has no {index} index yet, so its documents cannot be searched. Fix: \
         `embed-worker index create`, or let a running worker create it"
    )]
    Unindexed { node: String, index: String },
    /// An index name with a hash tag lands on one slot, so on one primary, whatever follows it.
    #[error(
        "index name {0:?} has a hash tag ({{...}}): without a search coordinator each primary needs \
         an index name of its own slot. Fix: set index.name to a name without braces"
    )]
    HashTag(String),
}

/// One primary, its slots, and its shard index of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// "host:port".
    pub node: String,
    /// The slot ranges it serves, by its own account.
    pub slots: Vec<(u16, u16)>,
    /// Its index of the name, by a name it serves; None when it has none yet.
    pub index: Option<String>,
    /// Its indexes of the name whose slot moved away: they still index, but cannot be reached.
    pub stranded: Vec<String>,
}

impl Shard {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    /// The name a new index here takes: see the module doc.
    pub fn new_index_name(&self, base: &str) -> Result<String, FanoutError> {
        shard_index_name(base, |slot| self.serves(slot))
    }
}

/// `base` when `serves` its slot, else `base{n}` with the smallest n whose slot it serves.
pub fn shard_index_name(base: &str, serves: impl Fn(u16) -> bool) -> Result<String, FanoutError> {
    if serves(key_slot(base.as_bytes())) {
        return Ok(base.to_string());
    }
    if hash_tag(base.as_bytes()).is_some() {
        // It fixes the slot of every `base{n}` too.
        return Err(FanoutError::HashTag(base.to_string()));
    }
    // A primary serving a single slot is found within a few times SLOTS tries.
    (0..u32::from(SLOTS) * 64)
        .map(|n| format!("{base}{{{n}}}"))
        .find(|name| serves(key_slot(name.as_bytes())))
        .ok_or_else(|| FanoutError::HashTag(base.to_string()))
}

/// Whether `name` is one of `base`'s shard index names: `base` or `base{<digits>}`.
pub fn is_shard_index_of(name: &str, base: &str) -> bool {
    match name.strip_prefix(base) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Every primary with its shard index of `base`, in node order. Two commands on each primary
/// (FT._LIST, CLUSTER NODES), retried while a primary fails.
pub async fn shards(conn: &mut Conn, base: &str) -> Result<Vec<Shard>, FanoutError> {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut tries = 0;
    loop {
        tries += 1;
        match list_shards(conn, base).await {
            Ok(shards) => return Ok(shards),
            Err((node, error)) if tries < TRIES && classify(&error) == Disposition::Retry => {
                tracing::debug!(node, error = %error, "listing the shard indexes: retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err((node, error)) => return Err(FanoutError::Shard { node, tries, error }),
        }
    }
}

async fn list_shards(conn: &mut Conn, base: &str) -> Result<Vec<Shard>, (String, RedisError)> {
    let every = |e: RedisError| ("every primary".to_string(), e);
    let mut other = conn.clone();
    let (list, nodes) = (list_cmd(), nodes_cmd());
    let (lists, views) = futures::join!(conn.on_primaries(&list), other.on_primaries(&nodes));
    let (lists, views) = (lists.map_err(every)?, views.map_err(every)?);
    let mut shards = Vec::new();
    let mut seen = Vec::new();
    for view in views {
        let node = view.node;
        let listed = match lists.iter().find(|l| l.node == node) {
            Some(l) => l.reply.clone(),
            None => Err(RedisError::from((
                ::redis::ErrorKind::ClusterConnectionNotFound,
                "no FT._LIST answer from the primary",
            ))),
        };
        // A node the crate's slot map still takes for a primary may be a replica now (a
        // failover it has not seen yet), or a primary without slots: it holds no documents, so
        // it needs no index; whoever serves its old slots is found below.
        let shard = shard_of(node, view.reply, listed, base, &mut seen)?;
        if !shard.slots.is_empty() {
            shards.push(shard);
        }
    }
    // The crate sends "every primary" commands to the primaries of its slot map, which it
    // refreshes only when a keyed command meets MOVED or a dead node: a primary that is down
    // does not answer, and one just promoted is not asked. Every slot must be served by a
    // primary that answered, so the ones the others name as serving the rest are asked by
    // address; one that cannot answer fails the listing, named.
    while let Some(slot) = (0..SLOTS).find(|&slot| !shards.iter().any(|s| s.serves(slot))) {
        let owner = seen
            .iter()
            .filter(|l| l.serves(slot) && !shards.iter().any(|s| s.node == l.address))
            .min_by_key(|l| l.failed)
            .map(|l| l.address.clone());
        let Some(owner) = owner else {
            let error = RedisError::from((
                ::redis::ErrorKind::ClusterConnectionNotFound,
                "no primary answers for a slot",
                format!("slot {slot} is served by no primary that answered (a reshard or a failover in progress)"),
            ));
            return Err((format!("the primary of slot {slot}"), error));
        };
        let (view, listed) = {
            let mut other = conn.clone();
            futures::join!(conn.on_node(&owner, &nodes), other.on_node(&owner, &list))
        };
        let shard = shard_of(owner.clone(), view, listed, base, &mut seen)?;
        if !shard.serves(slot) {
            let error = RedisError::from((
                ::redis::ErrorKind::ClusterConnectionNotFound,
                "no answer from the primary",
                format!("it is said to serve slot {slot} and does not (down, or failing over)"),
            ));
            return Err((owner, error));
        }
        shards.push(shard);
    }
    shards.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(shards)
}

fn list_cmd() -> ::redis::Cmd {
    ::redis::cmd("FT._LIST")
}

fn nodes_cmd() -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("CLUSTER");
    cmd.arg("NODES");
    cmd
}

/// One primary's shard from its CLUSTER NODES and FT._LIST answers; the other primaries its
/// view names go to `seen`.
fn shard_of(
    node: String,
    view: RedisResult<Value>,
    listed: RedisResult<Value>,
    base: &str,
    seen: &mut Vec<NodeLine>,
) -> Result<Shard, (String, RedisError)> {
    let fail = |e: RedisError| (node.clone(), e);
    let view = match view.map_err(fail)? {
        Value::ServerError(e) => return Err(fail(e.into())),
        v => v,
    };
    let names = match listed.map_err(fail)? {
        Value::ServerError(e) => return Err(fail(e.into())),
        v => index_names(&v),
    };
    let lines = node_lines(&::redis::from_redis_value::<String>(view).unwrap_or_default());
    let slots = lines
        .iter()
        .find(|l| l.myself && l.primary)
        .map(|l| l.slots.clone())
        .unwrap_or_default();
    seen.extend(lines.into_iter().filter(|l| l.primary && !l.myself));
    let mut shard = Shard {
        node,
        slots,
        index: None,
        stranded: Vec::new(),
    };
    for name in names.into_iter().filter(|n| is_shard_index_of(n, base)) {
        if shard.index.is_none() && shard.serves(key_slot(name.as_bytes())) {
            shard.index = Some(name);
        } else {
            shard.stranded.push(name);
        }
    }
    Ok(shard)
}

/// FT._LIST's names (an array, or a set on RESP3).
fn index_names(reply: &Value) -> Vec<String> {
    match reply {
        Value::Array(names) | Value::Set(names) => names.iter().map(text).collect(),
        _ => Vec::new(),
    }
}

/// One line of CLUSTER NODES.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    /// "host:port" (without the bus port and hostname).
    address: String,
    /// The answering node's own line.
    myself: bool,
    primary: bool,
    /// Marked failed (`fail`) by the answering node.
    failed: bool,
    /// The slot ranges it serves (a migration in progress, `[slot->-id]`, is not a slot served).
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// `<id> <ip:port@bus[,hostname]> <flags> <primary|-> <ping> <pong> <epoch> <link> <slot>...`
fn node_lines(cluster_nodes: &str) -> Vec<NodeLine> {
    cluster_nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let flags: Vec<&str> = fields[2].split(',').collect();
            Some(NodeLine {
                address: fields[1].split(['@', ',']).next()?.to_string(),
                myself: flags.contains(&"myself"),
                primary: flags.contains(&"master"),
                failed: flags.contains(&"fail"),
                slots: fields[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|n| (n, n)),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// `attempt` until it succeeds, fails in a way a retry cannot fix, or has failed `TRIES` times;
/// the failure names `node`.
pub async fn retrying<T, F, Fut>(node: &str, mut attempt: F) -> Result<T, FanoutError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(error) if tries < TRIES && classify(&error) == Disposition::Retry => {
                tracing::debug!(node, error = %error, "a primary failed: retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => {
                return Err(FanoutError::Shard {
                    node: node.to_string(),
                    tries,
                    error,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_primary_gets_a_name_of_its_own_slots() {
        let ranges = [(0u16, 5460u16), (5461, 10922), (10923, 16383)];
        let names: Vec<String> = ranges
            .iter()
            .map(|&(a, b)| shard_index_name("vector_idx", |s| (a..=b).contains(&s)).unwrap())
            .collect();
        for (name, &(a, b)) in names.iter().zip(&ranges) {
            assert!((a..=b).contains(&key_slot(name.as_bytes())), "{name}");
            assert!(is_shard_index_of(name, "vector_idx"), "{name}");
        }
        // The primary serving the name's own slot keeps the plain name.
        assert_eq!(names.iter().filter(|n| *n == "vector_idx").count(), 1);
        // A primary of one slot still gets one.
        let one = shard_index_name("vector_idx", |s| s == 77).unwrap();
        assert_eq!(key_slot(one.as_bytes()), 77);
        assert!(matches!(
            shard_index_name("idx{tag}", |s| s == 77),
            Err(FanoutError::HashTag(_))
        ));
        assert!(!is_shard_index_of("vector_idx2", "vector_idx"));
        assert!(!is_shard_index_of("vector_idx{}", "vector_idx"));
        assert!(!is_shard_index_of("vector_idx{a1}", "vector_idx"));
        assert!(!is_shard_index_of("vector_idx@fp{1}", "vector_idx"));
    }

    #[test]
    fn cluster_nodes_lines_give_addresses_roles_and_slots() {
        let nodes = "a 127.0.0.1:7001@17001 master - 0 1 1 connected 10922-16383\n\
                     b 127.0.0.1:7000@17000,host myself,master - 0 0 0 connected 0-5460 7000 [5461->-a]\n\
                     c 127.0.0.1:7002@17002 slave b 0 1 1 connected\n";
        let lines = node_lines(nodes);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1],
            NodeLine {
                address: "127.0.0.1:7000".into(),
                myself: true,
                primary: true,
                failed: false,
                slots: vec![(0, 5460), (7000, 7000)],
            }
        );
        assert!(lines[0].primary && !lines[0].myself && lines[0].serves(16383));
        assert!(!lines[2].primary && lines[2].slots.is_empty());
        assert!(node_lines("").is_empty());
    }
}
