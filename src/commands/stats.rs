//! `embed-worker stats [--json]`: the queue and the index at a glance, from Redis alone (works
//! with no worker running): stream length, group lag and pending, consumers and their idle
//! times, dead letters, indexed documents and indexing failures, and the index's model.

use std::process::ExitCode;

use crate::store::cluster::Conn;
use ::redis::{RedisError, Value};
use serde::Serialize;

use crate::settings::Settings;
use crate::store::reply::{self, GroupInfo};
use crate::store::{generation, index, stream, Store};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    /// `stream.name`, with the length of every shard together.
    pub stream: StreamStats,
    /// `None` when the stream or the group does not exist (yet) on some shard; with shards,
    /// lag and pending summed over them.
    pub group: Option<GroupStats>,
    /// Each stream shard (one, `stream.name` itself, with `stream.shards = 1`).
    pub shards: Vec<ShardStats>,
    pub consumers: Vec<ConsumerStats>,
    pub dead_letters: StreamStats,
    /// `None` when the index does not exist (yet).
    pub index: Option<IndexStats>,
}

#[derive(Debug, Serialize)]
pub struct ShardStats {
    pub stream: StreamStats,
    pub group: Option<GroupStats>,
}

#[derive(Debug, Serialize)]
pub struct StreamStats {
    pub name: String,
    /// XLEN (0 for a missing stream).
    pub length: u64,
}

/// The group as XINFO GROUPS reports it.
pub type GroupStats = GroupInfo;

#[derive(Debug, Serialize)]
pub struct ConsumerStats {
    pub name: String,
    pub pending: u64,
    /// Milliseconds since its last attempted interaction (a read, even an empty one).
    pub idle_ms: u64,
    /// Milliseconds since its last successful read (Redis 7.2+; `None` before, or never read).
    pub inactive_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct IndexStats {
    pub name: String,
    pub num_docs: u64,
    pub hash_indexing_failures: u64,
    pub percent_indexed: f64,
    /// The module is still scanning documents that predate the index (or an FT.ALTER): until
    /// it ends, some written documents are missing from results.
    pub indexing: bool,
    /// Jobs queued for the module's worker threads (vector inserts, queries), summed over
    /// primaries; `None` where the module does not report them (it indexes on its main thread).
    pub pending_jobs: Option<u64>,
    /// Primaries without their own index (a cluster without search coordinator): their
    /// documents cannot be searched until a worker or `index create` makes it.
    pub unindexed_primaries: Vec<String>,
    /// The index's model, from its record (`None`: no worker has recorded one yet).
    pub model: Option<ModelStats>,
}

#[derive(Debug, Serialize)]
pub struct ModelStats {
    pub fingerprint: String,
    pub name: String,
    /// The FT index holding its vectors (`index.name`, or the index it is an alias of).
    pub index: String,
    /// During a reindex: the model it moves to, and "migrating" or "switching".
    pub reindexing_to: Option<(String, String)>,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::new(&settings.redis)?;
    let stats = super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        collect(&mut conn, &settings)
            .await
            .map_err(|e| anyhow::Error::from(store.error(e)))
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", table(&stats));
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads everything `stats` shows.
pub async fn collect(conn: &mut Conn, settings: &Settings) -> Result<Stats, RedisError> {
    let group_name = &settings.stream.group;
    let dead = settings.dead_letter_stream();
    let mut shards = Vec::new();
    let mut consumers: Vec<ConsumerStats> = Vec::new();
    for stream in crate::store::shards::keys(&settings.stream) {
        let group = stream::group_info(conn, &stream, group_name).await?;
        if group.is_some() {
            merge_consumers(
                &mut consumers,
                self::consumers(conn, &stream, group_name).await?,
            );
        }
        shards.push(ShardStats {
            stream: StreamStats {
                length: xlen(conn, &stream).await?,
                name: stream,
            },
            group,
        });
    }
    let group = sum_groups(&shards);
    let record = generation::load(conn, &generation::record_key(&settings.index.name)).await?;
    let model = record.map(|r| ModelStats {
        fingerprint: r.current.fingerprint,
        name: r.current.model,
        index: r.current.index,
        reindexing_to: r.next.map(|(g, phase)| {
            (
                format!("{} [{}]", g.model, g.fingerprint),
                format!("{phase:?}").to_lowercase(),
            )
        }),
    });
    let index = index::progress(conn, &settings.index.name)
        .await?
        .map(|p| IndexStats {
            name: settings.index.name.clone(),
            num_docs: p.docs,
            hash_indexing_failures: p.failures,
            percent_indexed: p.percent_indexed,
            indexing: p.indexing,
            pending_jobs: p.pending_jobs,
            unindexed_primaries: p.unindexed,
            model,
        });
    Ok(Stats {
        stream: StreamStats {
            name: settings.stream.name.clone(),
            length: shards.iter().map(|s| s.stream.length).sum(),
        },
        group,
        shards,
        consumers,
        dead_letters: StreamStats {
            length: xlen(conn, &dead).await?,
            name: dead,
        },
        index,
    })
}

/// The group over all shards: present when on every shard; lag known when known on each.
fn sum_groups(shards: &[ShardStats]) -> Option<GroupStats> {
    let groups: Option<Vec<&GroupStats>> = shards.iter().map(|s| s.group.as_ref()).collect();
    let groups = groups?;
    let first = groups.first()?;
    if groups.len() == 1 {
        return Some((*first).clone());
    }
    Some(GroupStats {
        name: first.name.clone(),
        lag: groups.iter().map(|g| g.lag).sum(),
        pending: groups.iter().map(|g| g.pending).sum(),
        // Entry IDs of different streams do not compare: see each shard.
        last_delivered_id: String::new(),
    })
}

/// A consumer reads every shard: its pending entries add up, its idle time is the least.
fn merge_consumers(all: &mut Vec<ConsumerStats>, shard: Vec<ConsumerStats>) {
    for c in shard {
        match all.iter_mut().find(|a| a.name == c.name) {
            Some(a) => {
                a.pending += c.pending;
                a.idle_ms = a.idle_ms.min(c.idle_ms);
                a.inactive_ms = match (a.inactive_ms, c.inactive_ms) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
            }
            None => all.push(c),
        }
    }
}

async fn xlen(conn: &mut Conn, stream: &str) -> Result<u64, RedisError> {
    ::redis::cmd("XLEN").arg(stream).query_async(conn).await
}

fn int(kv: &[(String, Value)], key: &str) -> Option<u64> {
    reply::uint(kv, key)
}

fn string(kv: &[(String, Value)], key: &str) -> String {
    reply::get(kv, key).map(reply::text).unwrap_or_default()
}

async fn consumers(
    conn: &mut Conn,
    stream: &str,
    group: &str,
) -> Result<Vec<ConsumerStats>, RedisError> {
    let reply: Value = ::redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    Ok(items
        .iter()
        .map(reply::pairs)
        .map(|kv| ConsumerStats {
            name: string(&kv, "name"),
            pending: int(&kv, "pending").unwrap_or(0),
            idle_ms: int(&kv, "idle").unwrap_or(0),
            inactive_ms: int(&kv, "inactive"),
        })
        .collect())
}

/// The human table.
pub fn table(s: &Stats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "stream        {:<28} length {}",
        s.stream.name, s.stream.length
    );
    match &s.group {
        Some(g) => {
            let lag = g.lag.map_or("unknown".to_string(), |l| l.to_string());
            let _ = writeln!(
                out,
                "group         {:<28} lag {lag}  pending {}  last delivered {}",
                g.name, g.pending, g.last_delivered_id
            );
        }
        None => {
            let _ = writeln!(out, "group         (missing: no worker has started yet)");
        }
    }
    if s.shards.len() > 1 {
        for shard in &s.shards {
            let group = match &shard.group {
                Some(g) => format!(
                    "lag {}  pending {}  last delivered {}",
                    g.lag.map_or("unknown".to_string(), |l| l.to_string()),
                    g.pending,
                    g.last_delivered_id
                ),
                None => "(no group)".to_string(),
            };
            let _ = writeln!(
                out,
                "  shard       {:<28} length {}  {group}",
                shard.stream.name, shard.stream.length
            );
        }
    }
    let _ = writeln!(
        out,
        "dead letters  {:<28} length {}",
        s.dead_letters.name, s.dead_letters.length
    );
    match &s.index {
        Some(i) => {
            let _ = writeln!(
                out,
                "index         {:<28} hashes {}  indexing failures {}  indexed {}%",
                i.name,
                i.num_docs,
                i.hash_indexing_failures,
                i.percent_indexed * 100.0
            );
            if let Some(jobs) = i.pending_jobs {
                let _ = writeln!(
                    out,
                    "              {jobs} jobs queued for the search threads"
                );
            }
            for node in &i.unindexed_primaries {
                let _ = writeln!(
                    out,
                    "              primary {node} has no index: its documents cannot be searched"
                );
            }
            match &i.model {
                Some(m) => {
                    let _ = writeln!(out, "model         {} [{}]", m.name, m.fingerprint);
                    if m.index != i.name {
                        let _ = writeln!(
                            out,
                            "              (index {} is an alias of {})",
                            i.name, m.index
                        );
                    }
                    if let Some((to, phase)) = &m.reindexing_to {
                        let _ = writeln!(out, "reindexing to {to} ({phase})");
                    }
                }
                None => {
                    let _ = writeln!(out, "model         (no record: no worker has started yet)");
                }
            }
        }
        None => {
            let _ = writeln!(out, "index         (missing: no worker has started yet)");
        }
    }
    if !s.consumers.is_empty() {
        let _ = writeln!(out, "\n{:<40} {:>8} {:>12}", "CONSUMER", "PENDING", "IDLE");
        for c in &s.consumers {
            let idle = humantime::format_duration(std::time::Duration::from_millis(c.idle_ms));
            let _ = writeln!(
                out,
                "{:<40} {:>8} {:>12}",
                c.name,
                c.pending,
                idle.to_string()
            );
        }
    }
    out
}
