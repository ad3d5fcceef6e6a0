//! A real local Redis Cluster: redis-server nodes with the search and JSON modules, each on a
//! free port (and its cluster bus port, +10000) in a temp dir of its own, formed with cluster
//! commands the way `redis-cli --cluster create` forms one (there is no redis-cli here), and
//! killed on drop. Failover (by SIGKILL or CLUSTER FAILOVER) and slot migration (as
//! `redis-cli --cluster reshard` moves a slot) wait until every live node agrees again.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::redis::{Cmd, FromRedisValue, RedisResult, ToRedisArgs, Value};

use crate::common::{bin, load_modules, redis_server_bin, Names};

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// A node's cluster bus listens on its port + 10000, so both must be free and the port < 55535.
const BUS_OFFSET: u16 = 10000;
/// Formation, failover and migration on a loaded 2-core machine running tests in parallel take
/// seconds; a minute means something is wrong.
const SETTLE: Duration = Duration::from_secs(60);
/// How long one node may take to answer after it is spawned (module loading included).
const NODE_UP: Duration = Duration::from_secs(20);
/// Spawns on a fresh port after a node fails to come up (its port taken in between by a test
/// running in parallel).
const START_ATTEMPTS: usize = 5;
/// Keys per MIGRATE, and its timeout in milliseconds (redis-cli's reshard uses 10 and 60000).
const MIGRATE_BATCH: usize = 100;
const MIGRATE_TIMEOUT_MS: u64 = 10_000;
/// How long a manual failover may take before CLUSTER FAILOVER is sent again (the server gives
/// up on one after 5 s).
const MANUAL_FAILOVER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    /// Replicates the primary on this port.
    Replica {
        of: u16,
    },
}

/// A live node as it describes itself (its own CLUSTER NODES line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    pub id: String,
    pub role: Role,
    /// The slots it serves (none for a replica).
    pub slots: Vec<RangeInclusive<u16>>,
}

/// One node's line about another in CLUSTER NODES, without what only that node sees (the
/// `myself` flag, ping times, a migration in progress), so views can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    port: u16,
    /// The primary's id, for a replica.
    primary: Option<String>,
    flags: Vec<String>,
    slots: Vec<(u16, u16)>,
}

/// One redis-server process; killed on drop, so a cluster that fails to form leaves none.
struct Server {
    port: u16,
    id: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its replicas when it was killed: the candidates for [`RedisCluster::wait_failover`].
    replicas_at_kill: Vec<u16>,
}

impl Server {
    /// Spawns a node without waiting for it; [`Server::wait_up`] does.
    fn launch() -> Server {
        let mut server = Server {
            port: 0,
            id: String::new(),
            dir: tempfile::tempdir().expect("a temp dir for a cluster node"),
            child: None,
            replicas_at_kill: Vec::new(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        self.port = cluster_port();
        let dir = self.dir.path();
        let bin = redis_server_bin();
        assert!(bin.is_file(), "{} missing; run `make setup`", bin.display());
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", "1000"])
            // A replica is always eligible for promotion, however long its link was down.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--appendonly", "yes", "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        load_modules(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display())),
        );
    }

    /// Waits until this node answers; spawns it again on another port (in a fresh directory)
    /// when it exits first, e.g. because a parallel test took its port.
    fn wait_up(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            let deadline = Instant::now() + NODE_UP;
            loop {
                if self.exited() {
                    break;
                }
                // The process id tells our node from another test's server on the same port.
                if let Ok(info) = query::<String>(self.port, ::redis::cmd("INFO").arg("server")) {
                    let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
                    if field(&info, "process_id") == Some(pid.to_string().as_str()) {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node on port {} did not answer within {NODE_UP:?}:\n{}",
                    self.port,
                    log_tail(self.dir.path())
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                attempt < START_ATTEMPTS,
                "cluster node exited {START_ATTEMPTS} times on start, last on port {}:\n{}",
                self.port,
                log_tail(self.dir.path())
            );
            self.kill();
            self.dir = tempfile::tempdir().expect("a temp dir for a cluster node");
            self.spawn();
        }
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of local nodes; every node is killed on drop (a killed one stays dead).
pub struct RedisCluster {
    servers: Vec<Server>,
}

impl RedisCluster {
    /// `primaries` primaries sharing the slots evenly in contiguous ranges (as
    /// `redis-cli --cluster create`), each with `replicas_per_primary` replicas; returns once
    /// every node reports `cluster_state:ok`, all agree on the slot map and every replica's
    /// link to its primary is up.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        assert!(primaries >= 1, "a cluster needs a primary");
        let total = primaries * (1 + replicas_per_primary);
        // All spawned first, so their module loading overlaps.
        let mut servers: Vec<Server> = (0..total).map(|_| Server::launch()).collect();
        for s in &mut servers {
            s.wait_up();
        }
        for (epoch, s) in servers.iter_mut().enumerate() {
            s.id = cluster_cmd(s.port, "MYID").expect("CLUSTER MYID");
            // Distinct config epochs from the start, as redis-cli gives them: no collisions to
            // resolve by gossip first.
            cluster_cmd::<()>(s.port, ("SET-CONFIG-EPOCH", epoch + 1))
                .expect("CLUSTER SET-CONFIG-EPOCH on a new node");
        }
        let cluster = RedisCluster { servers };
        let first = cluster.servers[0].port;
        for s in &cluster.servers[1..] {
            cluster_cmd::<()>(s.port, ("MEET", "127.0.0.1", first)).expect("CLUSTER MEET");
        }
        for (s, range) in cluster.servers.iter().zip(even_slot_ranges(primaries)) {
            cluster_cmd::<()>(s.port, ("ADDSLOTSRANGE", range.start(), range.end()))
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        for (k, replica) in cluster.servers[primaries..].iter().enumerate() {
            let primary = &cluster.servers[k % primaries];
            // Refused ("Unknown node") until gossip has told the replica about its primary.
            wait_until(
                &format!("{} to replicate {}", replica.port, primary.port),
                SETTLE,
                || {
                    cluster_cmd::<()>(replica.port, ("REPLICATE", &primary.id))
                        .map_err(|e| e.to_string())
                },
            );
        }
        cluster.wait_settled("after forming");
        cluster
    }

    /// redis://127.0.0.1:<port> of a live primary.
    pub fn url(&self) -> String {
        node_url(self.primaries()[0])
    }

    /// Every live node, as it describes itself.
    pub fn nodes(&self) -> Vec<ClusterNode> {
        self.live()
            .map(|s| {
                let view = self.view(s.port).unwrap_or_else(|e| panic!("{e}"));
                let me = view
                    .get(&s.id)
                    .unwrap_or_else(|| panic!("{} does not list itself", s.port));
                ClusterNode {
                    port: s.port,
                    id: s.id.clone(),
                    role: match &me.primary {
                        None => Role::Primary,
                        Some(id) => Role::Replica {
                            of: self.port_of(id),
                        },
                    },
                    slots: me.slots.iter().map(|&(a, b)| a..=b).collect(),
                }
            })
            .collect()
    }

    /// The ports of the live primaries.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == Role::Primary)
            .map(|n| n.port)
            .collect()
    }

    /// The ports of the live replicas of the primary on `port`.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == Role::Replica { of: port })
            .map(|n| n.port)
            .collect()
    }

    /// The port of the live primary serving `slot`.
    pub fn primary_for_slot(&self, slot: u16) -> u16 {
        self.nodes()
            .into_iter()
            .find(|n| n.role == Role::Primary && n.slots.iter().any(|r| r.contains(&slot)))
            .unwrap_or_else(|| panic!("no live primary serves slot {slot}"))
            .port
    }

    /// The slot of `key` (its hash tag's, when it has one).
    pub fn slot_of(&self, key: &str) -> u16 {
        cluster_cmd(self.url_port(), ("KEYSLOT", key)).expect("CLUSTER KEYSLOT")
    }

    /// `base` with a hash tag whose slot the primary on `port` serves: e.g. a per-shard index
    /// name (FT.* commands here are routed by the index name's slot).
    pub fn key_on(&self, port: u16, base: &str) -> String {
        let node = self.node(port);
        assert_eq!(node.role, Role::Primary, "{port} is not a primary");
        let mut conn = self.conn(port);
        (0..u32::from(SLOTS) * 8)
            .map(|n| format!("{base}{{t{n}}}"))
            .find(|key| {
                let slot: u16 = ::redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query(&mut conn)
                    .expect("CLUSTER KEYSLOT");
                node.slots.iter().any(|r| r.contains(&slot))
            })
            .unwrap_or_else(|| panic!("no hash tag lands on {port}"))
    }

    /// The binary pointed at this cluster (a live primary's URL) and `names`, logging warnings.
    pub fn worker_cmd(&self, names: &Names) -> Command {
        let mut cmd = bin();
        cmd.env("EMBED_WORKER__REDIS__URL", self.url())
            .env("EMBED_WORKER__STREAM__NAME", &names.stream)
            .env("EMBED_WORKER__STREAM__GROUP", &names.group)
            .env("EMBED_WORKER__INDEX__NAME", &names.index)
            .env("EMBED_WORKER__INDEX__PREFIX", &names.prefix)
            .env("EMBED_WORKER__LOG__LEVEL", "warn");
        cmd
    }

    /// WAIT 1 on every primary: each write so far is on a replica too.
    pub fn wait_replicated(&self) {
        for p in self.primaries() {
            let acked: i64 = ::redis::cmd("WAIT")
                .arg(1)
                .arg(10_000)
                .query(&mut self.conn(p))
                .unwrap();
            assert!(acked >= 1, "no replica of {p} acknowledged");
        }
    }

    /// A client for the node on `port` alone.
    pub fn client(&self, port: u16) -> ::redis::Client {
        ::redis::Client::open(node_url(port)).expect("a node URL")
    }

    pub fn conn(&self, port: u16) -> ::redis::Connection {
        self.client(port)
            .get_connection()
            .unwrap_or_else(|e| panic!("connecting to {port}: {e}"))
    }

    /// A cluster-aware client seeded with every live node.
    pub fn cluster_client(&self) -> ::redis::cluster::ClusterClient {
        ::redis::cluster::ClusterClient::new(self.live().map(|s| node_url(s.port)))
            .expect("cluster node URLs")
    }

    /// SIGKILLs the node on `port`; it stays dead (and Drop leaves it be).
    pub fn kill(&mut self, port: u16) {
        let replicas = self.replicas_of(port);
        let server = self.server_mut(port);
        server.replicas_at_kill = replicas;
        server.kill();
    }

    /// Waits until a replica of the killed primary on `dead_port` is promoted and every live
    /// node agrees and reports `cluster_state:ok`; the new primary's port.
    pub fn wait_failover(&self, dead_port: u16) -> u16 {
        let dead = self.server(dead_port);
        assert!(!dead.alive(), "{dead_port} is alive: kill it first");
        let candidates = dead.replicas_at_kill.clone();
        assert!(
            !candidates.is_empty(),
            "{dead_port} had no replica when killed: nothing to fail over to"
        );
        let promoted = wait_until(
            &format!("a replica of {dead_port} ({candidates:?}) to be promoted"),
            SETTLE,
            || {
                candidates
                    .iter()
                    .copied()
                    .find(|&p| self.own_line(p).is_ok_and(|me| me.primary.is_none()))
                    .ok_or_else(|| "none is a primary yet".to_string())
            },
        );
        self.wait_settled(&format!("after {promoted} took over from {dead_port}"));
        promoted
    }

    /// CLUSTER FAILOVER on the replica on `replica_port`: it takes over from its primary (which
    /// becomes its replica) once it has all of its writes; returns when every node agrees.
    pub fn graceful_failover(&self, replica_port: u16) {
        let Role::Replica { of } = self.node(replica_port).role else {
            panic!("{replica_port} is not a replica");
        };
        wait_until(
            &format!("{replica_port} to take over from {of}"),
            SETTLE,
            || {
                let promoted = |me: Seen| me.primary.is_none();
                if self.own_line(replica_port).is_ok_and(promoted) {
                    return Ok(());
                }
                cluster_cmd::<()>(replica_port, "FAILOVER").map_err(|e| e.to_string())?;
                // The server abandons a manual failover that has not finished in 5 s.
                let deadline = Instant::now() + MANUAL_FAILOVER;
                while Instant::now() < deadline {
                    if self.own_line(replica_port).is_ok_and(promoted) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err("still a replica".to_string())
            },
        );
        self.wait_settled(&format!("after {replica_port} took over from {of}"));
    }

    /// Moves `slot` and its keys to the primary on `to_port`, as `redis-cli --cluster reshard`.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        self.migrate_slots(slot..=slot, to_port);
    }

    /// Moves every slot in `slots` with its keys to the primary on `to_port`; returns when every
    /// node agrees that `to_port` serves them.
    pub fn migrate_slots(&self, slots: RangeInclusive<u16>, to_port: u16) {
        let target = self.node(to_port);
        assert_eq!(target.role, Role::Primary, "{to_port} is not a primary");
        for slot in slots.clone() {
            self.move_slot(slot, &target);
        }
        wait_until(
            &format!("every node to agree that {to_port} serves {slots:?}"),
            SETTLE,
            || {
                self.settled()?;
                match slots.clone().find(|&s| self.primary_for_slot(s) != to_port) {
                    Some(s) => Err(format!("slot {s} is not on {to_port}")),
                    None => Ok(()),
                }
            },
        );
    }

    fn move_slot(&self, slot: u16, target: &ClusterNode) {
        let from = self.primary_for_slot(slot);
        if from == target.port {
            return;
        }
        let from_id = self.server(from).id.clone();
        let setslot = |port: u16, state: &str, id: &str| {
            cluster_cmd::<()>(port, ("SETSLOT", slot, state, id))
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} on {port}: {e}"));
        };
        setslot(target.port, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &target.id);
        loop {
            let keys: Vec<Vec<u8>> = cluster_cmd(from, ("GETKEYSINSLOT", slot, MIGRATE_BATCH))
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            query::<Value>(
                from,
                ::redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(target.port)
                    .arg("")
                    .arg(0)
                    .arg(MIGRATE_TIMEOUT_MS)
                    .arg("REPLACE")
                    .arg("KEYS")
                    .arg(keys),
            )
            .unwrap_or_else(|e| panic!("MIGRATE of slot {slot} from {from}: {e}"));
        }
        // As redis-cli: the target first, then the source, then every other primary, so the
        // slot is never left without an owner that accepts it.
        let others = self
            .primaries()
            .into_iter()
            .filter(|&p| p != from && p != target.port);
        for port in [target.port, from].into_iter().chain(others) {
            setslot(port, "NODE", &target.id);
        }
    }

    fn live(&self) -> impl Iterator<Item = &Server> {
        self.servers.iter().filter(|s| s.alive())
    }

    fn url_port(&self) -> u16 {
        self.live().next().expect("no live node").port
    }

    fn server(&self, port: u16) -> &Server {
        self.servers
            .iter()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn server_mut(&mut self, port: u16) -> &mut Server {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node(&self, port: u16) -> ClusterNode {
        self.nodes()
            .into_iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no live cluster node on port {port}"))
    }

    fn port_of(&self, id: &str) -> u16 {
        self.servers
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("no cluster node has id {id}"))
            .port
    }

    /// CLUSTER NODES on `port`, by node id.
    fn view(&self, port: u16) -> Result<BTreeMap<String, Seen>, String> {
        let text: String =
            cluster_cmd(port, "NODES").map_err(|e| format!("CLUSTER NODES on {port}: {e}"))?;
        Ok(text.lines().filter_map(parse_node_line).collect())
    }

    fn own_line(&self, port: u16) -> Result<Seen, String> {
        let id = &self.server(port).id;
        self.view(port)?
            .remove(id)
            .ok_or_else(|| format!("{port} does not list itself"))
    }

    /// Ok when every live node reports `cluster_state:ok`, all of them see the same nodes, roles
    /// and slots, the dead nodes (and only those) are marked failed, and every live replica's
    /// link to its primary is up.
    fn settled(&self) -> Result<(), String> {
        let mut first: Option<(u16, BTreeMap<String, Seen>)> = None;
        for s in self.live() {
            let info: String = cluster_cmd(s.port, "INFO")
                .map_err(|e| format!("CLUSTER INFO on {}: {e}", s.port))?;
            let state = field(&info, "cluster_state").unwrap_or("?");
            if state != "ok" {
                return Err(format!("{} reports cluster_state:{state}", s.port));
            }
            let view = self.view(s.port)?;
            if view.len() != self.servers.len() {
                return Err(format!("{} knows {} nodes", s.port, view.len()));
            }
            for (id, seen) in &view {
                let alive = self.servers.iter().any(|o| &o.id == id && o.alive());
                let failed = seen.flags.iter().any(|f| f == "fail");
                let unsure = seen
                    .flags
                    .iter()
                    .any(|f| f == "fail?" || f == "handshake" || f == "noaddr");
                if unsure || failed == alive {
                    return Err(format!(
                        "{} sees {} as {}",
                        s.port,
                        seen.port,
                        seen.flags.join(",")
                    ));
                }
            }
            if view.get(&s.id).is_some_and(|me| me.primary.is_some()) {
                let replication: String = query(s.port, ::redis::cmd("INFO").arg("replication"))
                    .map_err(|e| format!("INFO replication on {}: {e}", s.port))?;
                let link = field(&replication, "master_link_status").unwrap_or("?");
                if link != "up" {
                    return Err(format!("replica {} has master_link_status:{link}", s.port));
                }
            }
            match &first {
                None => first = Some((s.port, view)),
                Some((port, seen)) if *seen != view => {
                    return Err(format!(
                        "{port} and {} disagree:\n{seen:?}\n{view:?}",
                        s.port
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn wait_settled(&self, what: &str) {
        wait_until(&format!("the cluster to settle {what}"), SETTLE, || {
            self.settled()
        });
    }
}

/// The slot ranges `redis-cli --cluster create` gives `primaries` primaries (3: 0-5460,
/// 5461-10922, 10923-16383).
pub fn even_slot_ranges(primaries: usize) -> Vec<RangeInclusive<u16>> {
    let per_node = f64::from(SLOTS) / primaries as f64;
    let mut first = 0u16;
    (0..primaries)
        .map(|i| {
            let mut last = (i as f64 * per_node + per_node - 1.0).round() as u16;
            if last >= SLOTS || i == primaries - 1 {
                last = SLOTS - 1;
            }
            let last = last.max(first);
            let range = first..=last;
            first = last + 1;
            range
        })
        .collect()
}

/// A port below 55535 that is free, and whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("a bound address").port();
        if port < u16::MAX - BUS_OFFSET
            && TcpListener::bind(("127.0.0.1", port + BUS_OFFSET)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port below 55535 with a free port 10000 above it");
}

fn node_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// One command on a fresh connection to `port`, bounded in time (a dead node fails fast).
fn query<T: FromRedisValue>(port: u16, cmd: &Cmd) -> RedisResult<T> {
    let mut conn = ::redis::Client::open(node_url(port))?
        .get_connection_with_timeout(Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    cmd.query(&mut conn)
}

/// `CLUSTER <args>` on `port`.
fn cluster_cmd<T: FromRedisValue>(port: u16, args: impl ToRedisArgs) -> RedisResult<T> {
    query(port, ::redis::cmd("CLUSTER").arg(args))
}

/// `name:value` from INFO-style text.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// `<id> <ip:port@bus> <flags> <primary|-> <ping> <pong> <epoch> <link> <slot>...`
fn parse_node_line(line: &str) -> Option<(String, Seen)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    let address = fields[1].split(['@', ',']).next()?;
    let port = address.rsplit_once(':')?.1.parse().ok()?;
    let flags = fields[2]
        .split(',')
        .filter(|f| *f != "myself")
        .map(str::to_string)
        .collect();
    let primary = (fields[3] != "-").then(|| fields[3].to_string());
    let slots = fields[8..]
        .iter()
        // "[slot->-id]" and "[slot-<-id]": a migration in progress, seen by that node only.
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let slot = s.parse().ok()?;
                Some((slot, slot))
            }
        })
        .collect();
    Some((
        fields[0].to_string(),
        Seen {
            port,
            primary,
            flags,
            slots,
        },
    ))
}

/// Calls `f` until it returns Ok or `timeout` passes, then panics with `what` and its last error.
fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let error = match f() {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}: {error}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The end of a node's log, for a panic message.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
