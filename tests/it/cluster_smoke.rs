//! The cluster harness against a real 3-primary, 3-replica Redis Cluster: no key is lost to a
//! SIGKILLed primary, a manual failover or a slot migration, and what the product relies on from
//! the search module holds (here it has no coordinator: an index is per shard, and every FT.*
//! command is routed by the index name's slot).

use std::collections::HashMap;
use std::time::Instant;

use ::redis::{ConnectionLike, ErrorKind, ServerErrorKind, Value};

use crate::cluster_support::{even_slot_ranges, RedisCluster, Role};
use crate::common::unique;

/// Enough keys that every primary holds many, and most slots none.
const KEYS: usize = 3000;

fn started(primaries: usize, replicas: usize) -> RedisCluster {
    let t = Instant::now();
    let cluster = RedisCluster::start(primaries, replicas);
    eprintln!("{primaries}+{replicas} cluster formed in {:?}", t.elapsed());
    cluster
}

/// SETs `KEYS` keys through a cluster client, one in ten in one slot (a hash tag, so a slot
/// migration takes several MIGRATE batches); the keys and their values.
fn write_keys(cluster: &RedisCluster, tag: &str) -> HashMap<String, String> {
    let prefix = unique(tag);
    let keys: HashMap<String, String> = (0..KEYS)
        .map(|i| {
            let key = if i % 10 == 0 {
                hot_key(&prefix, i)
            } else {
                format!("{prefix}:{i}")
            };
            (key, format!("value {i} of {prefix}"))
        })
        .collect();
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    for (k, v) in &keys {
        ::redis::cmd("SET").arg(k).arg(v).exec(&mut conn).unwrap();
    }
    keys
}

/// A key in the one slot of `prefix`'s hash tag.
fn hot_key(prefix: &str, i: usize) -> String {
    format!("{{{prefix}hot}}:{i}")
}

/// Every key reads back with its value through a new cluster client.
fn assert_all_read_back(cluster: &RedisCluster, keys: &HashMap<String, String>) {
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    let lost: Vec<&String> = keys
        .iter()
        .filter(|(k, v)| {
            let got: Option<String> = ::redis::cmd("GET").arg(*k).query(&mut conn).unwrap();
            got.as_ref() != Some(*v)
        })
        .map(|(k, _)| k)
        .collect();
    assert!(lost.is_empty(), "{} of {KEYS} keys lost", lost.len());
}

fn ft_create(
    conn: &mut impl ConnectionLike,
    index: &str,
    prefix: &str,
) -> ::redis::RedisResult<()> {
    ::redis::cmd("FT.CREATE")
        .arg(index)
        .arg(&[
            "ON", "HASH", "PREFIX", "1", prefix, "SCHEMA", "body", "TEXT",
        ])
        .exec(conn)
}

/// FT.SEARCH's total for `query` on `index` of the node on `port`.
fn search_total(cluster: &RedisCluster, port: u16, index: &str, query: &str) -> i64 {
    let reply: Value = ::redis::cmd("FT.SEARCH")
        .arg(index)
        .arg(query)
        .arg(&["LIMIT", "0", "0"])
        .query(&mut cluster.conn(port))
        .unwrap_or_else(|e| panic!("FT.SEARCH {index} on {port}: {e}"));
    match reply {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n,
            other => panic!("FT.SEARCH total: {other:?}"),
        },
        other => panic!("FT.SEARCH reply: {other:?}"),
    }
}

/// HSETs `n` documents under `prefix` through a cluster client, one in five (the first among
/// them) in one slot; the keys. Document `i` has the word `w<i>x`.
fn write_docs(cluster: &RedisCluster, prefix: &str, n: usize) -> Vec<String> {
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    (0..n)
        .map(|i| {
            let key = if i % 5 == 0 {
                format!("{prefix}{{hot}}{i}")
            } else {
                format!("{prefix}{i}")
            };
            ::redis::cmd("HSET")
                .arg(&key)
                .arg("body")
                .arg(format!("common w{i}x"))
                .exec(&mut conn)
                .unwrap();
            key
        })
        .collect()
}

/// How many of `keys` the primary on `port` serves.
fn served_by(cluster: &RedisCluster, port: u16, keys: &[String]) -> i64 {
    keys.iter()
        .filter(|k| cluster.primary_for_slot(cluster.slot_of(k)) == port)
        .count() as i64
}

#[test]
fn a_killed_primary_fails_over_with_every_key_its_index_and_its_functions() {
    let mut cluster = started(3, 1);
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 6, "{nodes:#?}");
    let primary_slots: Vec<_> = nodes
        .iter()
        .filter(|n| n.role == Role::Primary)
        .map(|n| n.slots.clone())
        .collect();
    let expected: Vec<_> = even_slot_ranges(3).into_iter().map(|r| vec![r]).collect();
    assert_eq!(primary_slots, expected, "the ranges redis-cli would give");
    for p in cluster.primaries() {
        assert_eq!(cluster.replicas_of(p).len(), 1, "{nodes:#?}");
    }

    let keys = write_keys(&cluster, "failover");
    for p in cluster.primaries() {
        let size: i64 = ::redis::cmd("DBSIZE").query(&mut cluster.conn(p)).unwrap();
        assert!(size > KEYS as i64 / 6, "{p} holds only {size} keys");
    }
    let victim = cluster.primary_for_slot(cluster.slot_of(keys.keys().next().unwrap()));
    let replica = cluster.replicas_of(victim)[0];

    let u = unique("ix");
    let index = cluster.key_on(victim, &format!("idx{u}"));
    let prefix = format!("{u}doc:");
    ft_create(&mut cluster.conn(victim), &index, &prefix).unwrap();
    let docs = write_docs(&cluster, &prefix, 200);
    let on_victim = served_by(&cluster, victim, &docs);
    assert!(on_victim > 0);
    let library = format!("lib{u}");
    ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(format!(
            "#!lua name={library}\nredis.register_function('f{u}', function() return 1 end)"
        ))
        .exec(&mut cluster.conn(victim))
        .unwrap();
    cluster.wait_replicated();

    let t = Instant::now();
    cluster.kill(victim);
    let promoted = cluster.wait_failover(victim);
    eprintln!("failover after SIGKILL took {:?}", t.elapsed());
    assert_eq!(promoted, replica);
    assert_eq!(cluster.primaries().len(), 3);
    assert_all_read_back(&cluster, &keys);

    // The index was replicated with the data: the promoted replica answers for the shard.
    assert_eq!(
        search_total(&cluster, promoted, &index, "common"),
        on_victim
    );
    // FUNCTION LOAD reaches the primary's replicas, not the other primaries.
    let has_library = |port: u16| {
        let libs: Vec<Value> = ::redis::cmd("FUNCTION")
            .arg(&["LIST", "LIBRARYNAME"])
            .arg(&library)
            .query(&mut cluster.conn(port))
            .unwrap();
        !libs.is_empty()
    };
    assert!(has_library(promoted));
    for p in cluster.primaries().into_iter().filter(|&p| p != promoted) {
        assert!(!has_library(p), "{library} reached primary {p}");
    }
}

#[test]
fn a_manual_failover_and_slot_migrations_keep_every_key() {
    let cluster = started(3, 1);
    let keys = write_keys(&cluster, "reshard");
    cluster.wait_replicated();

    let old_primary = cluster.primaries()[0];
    let replica = cluster.replicas_of(old_primary)[0];
    let t = Instant::now();
    cluster.graceful_failover(replica);
    eprintln!("CLUSTER FAILOVER took {:?}", t.elapsed());
    assert!(cluster.primaries().contains(&replica));
    assert_eq!(cluster.replicas_of(replica), vec![old_primary]);
    assert_all_read_back(&cluster, &keys);

    let slot = cluster.slot_of(keys.keys().find(|k| k.starts_with('{')).unwrap());
    let from = cluster.primary_for_slot(slot);
    let to = *cluster.primaries().iter().find(|&&p| p != from).unwrap();
    let count = |port: u16| -> i64 {
        ::redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut cluster.conn(port))
            .unwrap()
    };
    let in_slot = count(from);
    assert!(
        in_slot >= KEYS as i64 / 10,
        "{in_slot} keys in the hot slot"
    );
    let t = Instant::now();
    cluster.migrate_slot(slot, to);
    eprintln!("migrating 1 slot ({in_slot} keys) took {:?}", t.elapsed());
    assert_eq!(cluster.primary_for_slot(slot), to);
    assert_eq!((count(from), count(to)), (0, in_slot));
    let nodes: String = ::redis::cmd("CLUSTER")
        .arg("NODES")
        .query(&mut cluster.conn(from))
        .unwrap();
    assert!(!nodes.contains('['), "a migration left open:\n{nodes}");

    // Eight slots from the start of a third primary's range, to the source of the first move.
    let third = cluster
        .nodes()
        .into_iter()
        .find(|n| n.role == Role::Primary && n.port != from && n.port != to)
        .unwrap();
    let start = *third.slots[0].start();
    let t = Instant::now();
    cluster.migrate_slots(start..=start + 7, from);
    eprintln!("migrating 8 slots took {:?}", t.elapsed());
    for s in start..=start + 7 {
        assert_eq!(cluster.primary_for_slot(s), from);
    }
    assert_all_read_back(&cluster, &keys);
}

#[test]
fn an_index_is_per_shard_and_migrated_hashes_are_indexed_on_the_target() {
    let cluster = started(3, 1);
    let u = unique("shard");
    let prefix = format!("{u}doc:");
    let primaries = cluster.primaries();
    let index: HashMap<u16, String> = primaries
        .iter()
        .map(|&p| (p, cluster.key_on(p, &format!("idx{u}"))))
        .collect();
    for (&p, name) in &index {
        ft_create(&mut cluster.conn(p), name, &prefix).unwrap();
    }
    // Keyed by the index name: a primary that does not serve the name's slot refuses it.
    let (a, b) = (primaries[0], primaries[1]);
    let refused = ft_create(&mut cluster.conn(a), &index[&b], &prefix).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Server(ServerErrorKind::Moved));
    assert_eq!(
        refused.redirect_node(),
        Some((
            format!("127.0.0.1:{b}").as_str(),
            cluster.slot_of(&index[&b])
        ))
    );

    let docs = write_docs(&cluster, &prefix, 300);
    for &p in &primaries {
        assert_eq!(
            search_total(&cluster, p, &index[&p], "common"),
            served_by(&cluster, p, &docs),
            "shard {p} indexes the documents it holds"
        );
    }

    // The slot of the hot documents, not of an index name (that move comes last).
    let slot = cluster.slot_of(&docs[0]);
    let name_slots: Vec<u16> = index.values().map(|n| cluster.slot_of(n)).collect();
    assert!(!name_slots.contains(&slot));
    let from = cluster.primary_for_slot(slot);
    let to = *primaries.iter().find(|&&p| p != from).unwrap();
    let moving = docs.iter().filter(|d| cluster.slot_of(d) == slot).count() as i64;
    assert!(
        moving >= docs.len() as i64 / 5,
        "{moving} documents in the hot slot"
    );
    let before = (
        search_total(&cluster, from, &index[&from], "common"),
        search_total(&cluster, to, &index[&to], "common"),
    );
    cluster.migrate_slot(slot, to);
    assert_eq!(
        (
            search_total(&cluster, from, &index[&from], "common"),
            search_total(&cluster, to, &index[&to], "common"),
        ),
        (before.0 - moving, before.1 + moving),
        "the {moving} migrated documents leave the source's index for the target's"
    );
    assert_eq!(search_total(&cluster, to, &index[&to], "@body:w0x"), 1);

    // Moving the slot of an index's name strands the index: its node now redirects the name
    // to a node that does not have it.
    let name_slot = cluster.slot_of(&index[&from]);
    cluster.migrate_slot(name_slot, to);
    let err = ::redis::cmd("FT.SEARCH")
        .arg(&index[&from])
        .arg("common")
        .query::<Value>(&mut cluster.conn(from))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server(ServerErrorKind::Moved));
    let unknown = ::redis::cmd("FT.SEARCH")
        .arg(&index[&from])
        .arg("common")
        .query::<Value>(&mut cluster.conn(to));
    assert!(unknown.is_err(), "{unknown:?}");
}

#[test]
#[should_panic(expected = "had no replica")]
fn a_failover_without_a_replica_is_refused() {
    let mut cluster = started(1, 0);
    let only = cluster.primaries()[0];
    cluster.kill(only);
    cluster.wait_failover(only);
}
