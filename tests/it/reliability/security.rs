//! Security: a wrong password and a wrong TLS CA fail fast with one clear line and never echo
//! the secret; TLS with the right CA runs the docs' example; the least-privilege ACL user from
//! deploy/redis-acl.conf runs the docs' example, a dead letter and a claim.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{dead_letters, text_of, wait_exit};
use crate::common::*;

/// Runs `cmd` to completion within `limit`, killing it (and failing) if it is still running:
/// a retry loop shows up as a timeout, not a hung test.
fn output_within(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if wait_exit(&mut child, limit).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "still running after {limit:?} (a retry loop?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = child.wait_with_output().unwrap();
    (out, started.elapsed())
}

/// The fail-fast contract: non-zero exit within seconds, the last stderr line is one clear
/// `embed-worker: error:` line naming `expect`, no retrying, and `secret` appears nowhere.
fn assert_fails_fast(out: &Output, took: Duration, expect: &[&str], secret: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("embed-worker: error: "), "{stderr}");
    assert!(
        expect
            .iter()
            .any(|e| last.to_lowercase().contains(&e.to_lowercase())),
        "the error should say {expect:?}: {last}"
    );
    assert!(!stderr.contains("retrying"), "no retry loop: {stderr}");
    if !secret.is_empty() {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "the password leaked:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn a_wrong_password_fails_fast_and_is_never_printed() {
    let server = RedisServer::start();
    let names = Names::new("pw");
    let mut conn = server.conn();
    let _: () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">right-Pa55", "~*", "&*", "+@all"][..])
        .query(&mut conn)
        .unwrap();
    let wrong = "Wr0ng-pa55-zq81";
    let by_url = format!("redis://alice:{wrong}@127.0.0.1:{}", server.port);
    let (out, took) = output_within(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__REDIS__URL", &by_url)
            .args(["run"]),
        Duration::from_secs(60),
    );
    assert_fails_fast(&out, took, &["authentication failed", "WRONGPASS"], wrong);

    let (out, took) = output_within(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__REDIS__USERNAME", "alice")
            .env("EMBED_WORKER__REDIS__PASSWORD", wrong)
            .args(["run"]),
        Duration::from_secs(60),
    );
    assert_fails_fast(&out, took, &["authentication failed", "WRONGPASS"], wrong);

    // The right password works (so the failures above were about the password).
    run_ok(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__REDIS__USERNAME", "alice")
            .env("EMBED_WORKER__REDIS__PASSWORD", "right-Pa55")
            .args(["run", "--drain"]),
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is needed for the TLS test (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`/`<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A server certificate for 127.0.0.1 signed by `ca`: `server.pem`/`server.key`.
fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// The redis-server in use is built without TLS ("Failed finding TLS support"), so TLS is
/// terminated by Python's ssl module (OpenSSL) in front of it: a real TLS server, byte-for-byte
/// the same Redis protocol inside.
const TLS_PROXY: &str = r#"
import asyncio, ssl, sys
cert, key, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
async def pipe(r, w):
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", target)
    except Exception:
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print(srv.sockets[0].getsockname()[1], flush=True)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
"#;

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tls_with_the_right_ca_runs_the_docs_example_and_a_wrong_ca_fails_fast() {
    let server = RedisServer::start();
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path(), "ca");
    make_ca(certs.path(), "other-ca");
    make_server_cert(certs.path(), "ca");
    let mut proxy = KillOnDrop(
        Command::new(python())
            .arg("-c")
            .arg(TLS_PROXY)
            .arg(certs.path().join("server.pem"))
            .arg(certs.path().join("server.key"))
            .arg(server.port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut port = String::new();
    BufReader::new(proxy.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let tls_url = format!("rediss://127.0.0.1:{}", port.trim());

    let names = Names::new("tls");
    let mut conn = server.conn();
    for (i, (content, genre)) in DOCS.iter().enumerate() {
        let _: String = ::redis::cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg(&["id", &i.to_string(), "content", content, "genre", genre][..])
            .query(&mut conn)
            .unwrap();
    }
    let tls = |ca: &str| {
        let mut cmd = worker_cmd(&server, &names);
        cmd.env("EMBED_WORKER__REDIS__URL", &tls_url).env(
            "EMBED_WORKER__REDIS__TLS_CA_FILE",
            certs.path().join(format!("{ca}.pem")),
        );
        cmd
    };

    // The wrong CA: refused at the handshake, once, with a message that says why.
    let (out, took) = output_within(tls("other-ca").args(["run"]), Duration::from_secs(60));
    assert_fails_fast(&out, took, &["certificate", "UnknownIssuer"], "");
    assert_eq!(pending(&mut conn, &names), 0, "nothing was read over TLS");

    // The right CA: the docs' example end to end, through the TLS endpoint.
    run_ok(tls("ca").args(["run", "--drain"]));
    let out = run_ok(tls("ca").args(["search", QUERY]));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!("ID: {}{i}, Distance:", names.prefix)),
            "{line}"
        );
        let d: f64 = line
            .split("Distance:")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!((d - EXPECTED[i]).abs() < 1e-4, "{line}");
    }
}

/// A server whose users are deploy/redis-acl.conf as `edit` leaves it, and the names its key
/// patterns are written for. Keep the directory as long as the server.
fn server_with_deployed_acl(
    edit: impl FnOnce(String) -> String,
) -> (RedisServer, Names, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let acl = std::fs::read_to_string(root().join("deploy/redis-acl.conf")).unwrap();
    let acl_file = dir.path().join("users.acl");
    std::fs::write(&acl_file, edit(acl)).unwrap();
    let server = RedisServer::start_with(&["--aclfile", &path_str(&acl_file)]);
    let names = Names {
        stream: "embed:docs".into(),
        group: "embedders".into(),
        index: "vector_idx".into(),
        prefix: "doc:".into(),
    };
    (server, names, dir)
}

#[test]
fn the_deployed_acl_user_runs_the_docs_example_a_dead_letter_and_a_claim() {
    let password = "acl-Secret-7731";
    let (server, names, _dir) =
        server_with_deployed_acl(|acl| acl.replace(">changeme", &format!(">{password}")));
    let mut admin = server.conn(); // the default user, as the harness starts it
    let xadd = |conn: &mut ::redis::Connection, fields: &[&str]| -> String {
        ::redis::cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg(fields)
            .query(conn)
            .unwrap()
    };
    let _: () = ::redis::cmd("XGROUP")
        .arg(&["CREATE", "embed:docs", "embedders", "0", "MKSTREAM"][..])
        .query(&mut admin)
        .unwrap();
    // Two entries read by a consumer that then dies: the worker must claim them. doc 0 gets
    // indexed; the other has been delivered too often already and is dead-lettered.
    xadd(
        &mut admin,
        &["id", "0", "content", DOCS[0].0, "genre", DOCS[0].1],
    );
    let tired = xadd(&mut admin, &["id", "9", "content", "delivered too often"]);
    let _: ::redis::Value = ::redis::cmd("XREADGROUP")
        .arg(
            &[
                "GROUP",
                "embedders",
                "ghost",
                "COUNT",
                "2",
                "STREAMS",
                "embed:docs",
                ">",
            ][..],
        )
        .query(&mut admin)
        .unwrap();
    let _: ::redis::Value = ::redis::cmd("XCLAIM")
        .arg(
            &[
                "embed:docs",
                "embedders",
                "ghost",
                "0",
                &tired,
                "RETRYCOUNT",
                "9",
            ][..],
        )
        .query(&mut admin)
        .unwrap();
    for (i, (content, genre)) in DOCS.iter().enumerate().skip(1) {
        xadd(
            &mut admin,
            &["id", &i.to_string(), "content", content, "genre", genre],
        );
    }
    let poison = xadd(&mut admin, &["id", "7", "genre", "no content"]);
    // The lifecycle through the user's functions: an upsert of doc 8 and its delete (collapsed
    // in one read), and a delete of doc 5, written before the run, which leaves a tombstone.
    xadd(&mut admin, &["id", "8", "content", "soon deleted"]);
    xadd(&mut admin, &["id", "8", "op", "delete"]);
    let _: () = ::redis::cmd("HSET")
        .arg(
            &[
                "doc:5",
                "content",
                "stale",
                "__ew_version",
                "0",
                "__ew_entry",
                "1-0",
            ][..],
        )
        .query(&mut admin)
        .unwrap();
    xadd(&mut admin, &["id", "5", "op", "delete"]);
    // Nothing loaded yet: the worker user loads the library itself.
    let _: () = ::redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut admin)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));

    let as_worker = || {
        let mut cmd = worker_cmd(&server, &names);
        cmd.env("EMBED_WORKER__REDIS__USERNAME", "embed-worker")
            .env("EMBED_WORKER__REDIS__PASSWORD", password)
            .env("EMBED_WORKER__STREAM__CLAIM_IDLE", "1s")
            .env("EMBED_WORKER__STREAM__CONSUMER_IDLE_DELETE", "1s");
        cmd
    };
    let out = run_ok(as_worker().args(["run", "--drain"]));
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!log.contains("NOPERM") && !log.contains(password), "{log}");
    assert!(
        log.contains("claimed entries idle on other consumers"),
        "{log}"
    );

    for i in 0..3 {
        let len: u64 = ::redis::cmd("HSTRLEN")
            .arg(format!("doc:{i}"))
            .arg("embedding")
            .query(&mut admin)
            .unwrap();
        assert_eq!(len, 1536, "doc:{i}");
    }
    assert_eq!(pending(&mut admin, &names), 0);
    for gone in ["doc:5", "doc:8"] {
        let n: u64 = ::redis::cmd("EXISTS").arg(gone).query(&mut admin).unwrap();
        assert_eq!(n, 0, "{gone}");
        let tomb: u64 = ::redis::cmd("EXISTS")
            .arg(format!("embed:tomb:{{{gone}}}"))
            .query(&mut admin)
            .unwrap();
        assert_eq!(tomb, 1, "{gone}'s tombstone");
    }
    let letters = dead_letters(&mut admin, &names);
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|l| (text_of(l, "dead_entry_id"), text_of(l, "dead_reason")))
        .collect();
    got.sort();
    let mut want = vec![
        (poison, "missing_text".to_string()),
        (tired, "max_deliveries".to_string()),
    ];
    want.sort();
    assert_eq!(got, want);
    let consumers: Vec<::redis::Value> = ::redis::cmd("XINFO")
        .arg(&["CONSUMERS", "embed:docs", "embedders"][..])
        .query(&mut admin)
        .unwrap();
    assert!(
        !format!("{consumers:?}").contains("ghost"),
        "the dead consumer was claimed from, then deleted: {consumers:?}"
    );

    // The docs' query as the same user.
    let out = run_ok(as_worker().args(["search", QUERY]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ID: doc:0, Distance:0.1141"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
}

/// An ACL older than the function library (here: without the HKEYS it now runs) must stop the
/// worker with the ACL hint, not turn every document into a write_error dead letter: Redis
/// reports a refusal inside a function as `ERR ACL failure in script`, not NOPERM.
#[test]
fn an_acl_missing_a_command_of_the_functions_stops_the_worker_and_dead_letters_nothing() {
    let (server, names, _dir) = server_with_deployed_acl(|acl| acl.replace(" +hkeys", ""));
    let mut admin = server.conn();
    let _: String = ::redis::cmd("XADD")
        .arg(&["embed:docs", "*", "id", "0", "content", DOCS[0].0][..])
        .query(&mut admin)
        .unwrap();
    let (out, took) = output_within(
        worker_cmd(&server, &names)
            .env("EMBED_WORKER__REDIS__USERNAME", "embed-worker")
            .env("EMBED_WORKER__REDIS__PASSWORD", "changeme")
            .args(["run", "--drain"]),
        Duration::from_secs(60),
    );
    assert_fails_fast(&out, took, &["ACL failure"], "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("deploy/redis-acl.conf"), "{stderr}");
    assert!(dead_letters(&mut admin, &names).is_empty());
    assert_eq!(
        pending(&mut admin, &names),
        1,
        "the entry stays pending for a fixed worker"
    );
}
