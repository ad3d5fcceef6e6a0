//! The index on a real Redis Cluster whose search module has no coordinator (redis-stack's
//! RediSearch 2.10 here): `index create` makes every primary an index of its own, `search`
//! merges every primary's nearest into exactly the brute-force top k over all documents, a
//! reshard that strands a primary's index is repaired by the next `index create`, and a primary
//! that does not answer fails the search, naming it, instead of leaving its documents out.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cluster_support::RedisCluster;
use crate::common::{assert_docs_search_lines, embed, run_ok, squared_l2, Names, DOCS, QUERY};

/// Documents per test: ~100 on each of 3 primaries.
const DOCUMENTS: usize = 300;
/// Model dimension (all-MiniLM-L6-v2).
const DIM: usize = 384;

/// The binary pointed at the cluster and `names`.
fn cli(cluster: &RedisCluster, names: &Names) -> Command {
    cluster.worker_cmd(names)
}

/// FLAT: every shard's answer is exact, so the test checks the merge and nothing else.
fn flat(cluster: &RedisCluster, names: &Names) -> Command {
    let mut cmd = cli(cluster, names);
    cmd.env("EMBED_WORKER__INDEX__ALGORITHM", "FLAT");
    cmd
}

/// A unit vector of its own for document `i` (xorshift, so the same on every run).
fn vector(i: usize) -> Vec<f32> {
    let mut state = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..DIM)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// HSETs `DOCUMENTS` hashes with known vectors under the prefix through a cluster client (keys
/// over every slot range); the keys and vectors.
fn write_documents(cluster: &RedisCluster, names: &Names) -> Vec<(String, Vec<f32>)> {
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    let docs: Vec<(String, Vec<f32>)> = (0..DOCUMENTS)
        .map(|i| (format!("{}{i}", names.prefix), vector(i)))
        .collect();
    for (key, v) in &docs {
        ::redis::cmd("HSET")
            .arg(key)
            .arg("content")
            .arg(format!("text of {key}"))
            .arg("embedding")
            .arg(bytes(v))
            .exec(&mut conn)
            .unwrap();
    }
    for port in cluster.primaries() {
        let held: i64 = ::redis::cmd("DBSIZE")
            .query(&mut cluster.conn(port))
            .unwrap();
        assert!(
            held > 0,
            "primary {port} holds no document: keys not spread"
        );
    }
    docs
}

/// `index info` until it counts `n` documents and no scan runs.
fn wait_indexed(cmd: impl Fn() -> Command, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cmd().args(["index", "info"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success()
            && text.contains(&format!("num_docs: {n}\n"))
            && text.contains("indexing: 0\n")
        {
            return text;
        }
        assert!(Instant::now() < deadline, "not indexed in time:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `search --json`'s ids and distances.
pub fn search(mut cmd: Command, query: &str, k: usize) -> Vec<(String, f64)> {
    let out = run_ok(cmd.args(["search", query, "-k", &k.to_string(), "--json"]));
    parse_rows(&out)
}

pub fn parse_rows(out: &Output) -> Vec<(String, f64)> {
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{r}"))
                    .to_string(),
                r["distance"].as_f64().unwrap_or_else(|| panic!("{r}")),
            )
        })
        .collect()
}

/// The exact `k` nearest by squared L2 (what the index reports for L2), over every document.
pub fn brute_force(docs: &[(String, Vec<f32>)], query: &[f32], k: usize) -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = docs
        .iter()
        .map(|(key, v)| (key.clone(), squared_l2(query, v)))
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1));
    all.truncate(k);
    all
}

pub fn assert_same_ranking(got: &[(String, f64)], want: &[(String, f64)]) {
    let keys = |rows: &[(String, f64)]| rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        keys(got),
        keys(want),
        "the merged top k is not brute force's"
    );
    for (g, w) in got.iter().zip(want) {
        assert!((g.1 - w.1).abs() < 1e-4, "{g:?} vs {w:?}");
    }
}

/// Runs `cmd`, killing it after `limit`: a test must fail, not hang, when a search would.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn search_merges_every_primarys_nearest_exactly_and_survives_a_reshard() {
    let cluster = RedisCluster::start(3, 0);
    let names = Names::new("clidx");
    let out = run_ok(flat(&cluster, &names).args(["index", "create"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    // Again: every primary's index exists and agrees.
    let out = run_ok(flat(&cluster, &names).args(["index", "create"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists and agrees"));
    let docs = write_documents(&cluster, &names);
    let info = wait_indexed(|| flat(&cluster, &names), DOCUMENTS);
    assert!(info.contains("vector: FLOAT32 DIM 384 L2"), "{info}");
    assert!(
        info.contains("primaries: 3 (no search coordinator"),
        "{info}"
    );
    let shard_lines: Vec<&str> = info.lines().filter(|l| l.contains(": num_docs ")).collect();
    assert_eq!(shard_lines.len(), 3, "{info}");

    let query_text = "a question no document answers in particular";
    let query = embed(&[query_text]).pop().unwrap();
    for k in [1, 10, 37] {
        let got = search(flat(&cluster, &names), query_text, k);
        assert_same_ranking(&got, &brute_force(&docs, &query, k));
    }
    // k beyond the documents: all of them, in order.
    let got = search(flat(&cluster, &names), query_text, DOCUMENTS + 50);
    assert_same_ranking(&got, &brute_force(&docs, &query, DOCUMENTS));

    // A reshard moves the slot of one primary's index name away: that index is stranded (no
    // command reaches it), so the primary has none, and searching it would be partial.
    let (port, name) = shard_lines
        .iter()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let node = words.next()?;
            let name = words.next()?.trim_end_matches(':');
            Some((
                node.rsplit_once(':')?.1.parse::<u16>().ok()?,
                name.to_string(),
            ))
        })
        .unwrap();
    let to = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != port)
        .unwrap();
    cluster.migrate_slot(cluster.slot_of(&name), to);
    let out = flat(&cluster, &names)
        .args(["index", "info"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{info}");
    assert!(info.contains(&format!("stranded {name}")), "{info}");
    assert!(info.contains("no index"), "{info}");
    let out = flat(&cluster, &names)
        .args(["search", query_text])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial result lines");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("primary 127.0.0.1:{port} has no")),
        "{err}"
    );

    // The next ensure gives it a new index (as the worker's periodic one would), and the
    // merge is exact again, the moved documents found on their new primary.
    let out = run_ok(flat(&cluster, &names).args(["index", "create"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    wait_indexed(|| flat(&cluster, &names), DOCUMENTS);
    let got = search(flat(&cluster, &names), query_text, 10);
    assert_same_ranking(&got, &brute_force(&docs, &query, 10));

    // The docs page's example, through `search` on the cluster, in its order.
    let docs_names = Names {
        prefix: "doc:".into(),
        ..Names::new("cldocs")
    };
    run_ok(cli(&cluster, &docs_names).args(["index", "create"]));
    let vectors = embed(&DOCS.map(|(text, _)| text));
    let mut conn = cluster.cluster_client().get_connection().unwrap();
    for (i, ((text, genre), v)) in DOCS.iter().zip(&vectors).enumerate() {
        ::redis::cmd("HSET")
            .arg(format!("doc:{i}"))
            .arg("content")
            .arg(text)
            .arg("genre")
            .arg(genre)
            .arg("embedding")
            .arg(bytes(v))
            .exec(&mut conn)
            .unwrap();
    }
    wait_indexed(|| cli(&cluster, &docs_names), DOCS.len());
    let out = run_ok(cli(&cluster, &docs_names).args(["search", QUERY]));
    assert_docs_search_lines(&String::from_utf8(out.stdout).unwrap());

    // Dropped everywhere.
    run_ok(flat(&cluster, &names).args(["index", "drop"]));
    let out = flat(&cluster, &names)
        .args(["index", "info"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not exist"));
}

#[test]
fn a_primary_that_does_not_answer_fails_the_search_naming_it() {
    let mut cluster = RedisCluster::start(3, 0);
    let names = Names::new("cldown");
    run_ok(flat(&cluster, &names).args(["index", "create"]));
    write_documents(&cluster, &names);
    wait_indexed(|| flat(&cluster, &names), DOCUMENTS);
    // The live primaries keep serving their slots; without this the whole cluster refuses
    // every command once the dead one is marked failed.
    for port in cluster.primaries() {
        ::redis::cmd("CONFIG")
            .arg(&["SET", "cluster-require-full-coverage", "no"])
            .exec(&mut cluster.conn(port))
            .unwrap();
    }
    // Not the primary of the index name's slot, which also holds the model record `search`
    // reads first.
    let record_slot = cluster.slot_of(&names.index);
    let dead = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != cluster.primary_for_slot(record_slot))
        .unwrap();
    cluster.kill(dead);
    for _ in 0..2 {
        let mut cmd = flat(&cluster, &names);
        cmd.args(["search", "anything", "--json"]);
        let out = output_within(cmd, Duration::from_secs(120));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a search without {dead} succeeded");
        assert!(out.stdout.is_empty(), "partial results printed");
        assert!(
            err.contains(&format!("primary 127.0.0.1:{dead} did not answer")),
            "{err}"
        );
        // Again once the others have marked it failed.
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn a_search_during_a_failover_is_exact_or_refused_then_exact() {
    let mut cluster = RedisCluster::start(3, 1);
    let names = Names::new("clfail");
    run_ok(flat(&cluster, &names).args(["index", "create"]));
    let docs = write_documents(&cluster, &names);
    wait_indexed(|| flat(&cluster, &names), DOCUMENTS);
    cluster.wait_replicated();
    let query_text = "what a failover leaves behind";
    let query = embed(&[query_text]).pop().unwrap();
    let want = brute_force(&docs, &query, 10);
    // Not the primary of the model record `search` reads first (its own retries would wait out
    // the failover): the shards' search is what is under test.
    let record_primary = cluster.primary_for_slot(cluster.slot_of(&names.index));
    let victim = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != record_primary)
        .unwrap();
    cluster.kill(victim);
    let mut cmd = flat(&cluster, &names);
    cmd.args(["search", query_text, "-k", "10", "--json"]);
    let out = output_within(cmd, Duration::from_secs(300));
    if out.status.success() {
        eprintln!("the search during the failover waited it out");
        assert_same_ranking(&parse_rows(&out), &want);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("the search during the failover was refused: {err}");
        assert!(out.stdout.is_empty(), "partial results printed");
        assert!(err.contains("did not answer"), "{err}");
    }
    cluster.wait_failover(victim);
    let got = search(flat(&cluster, &names), query_text, 10);
    assert_same_ranking(&got, &want);
}
