//! `warren check-queues` about queues named with `--queue NAME`: asked on the clusters, so a warren
//! instance that never saw the queue declared (restarted, or another instance behind the load
//! balancer) answers the same as the one that did.
//!
//! The live tests start in-process proxies in front of `shard-a`, `shard-b` (shards) and `control`
//! from `WARREN_TEST_CLUSTERS` and run the `warren` binary as a monitoring system would.

mod support;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use warren::ProxyHandle;
use warren::config::Config;

use support::{STEP, within};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// The configuration of a test proxy: shard-a and shard-b as shards, control, the admin endpoint
/// on `admin`.
fn config_text(admin: &str) -> String {
    let nodes = |name: &str| {
        support::cluster(name)
            .nodes
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "listen = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"{admin}\"\ntoken = \"t0ken-for-admin-queues\"\n\n\
         [timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 3000\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        nodes("shard-a"),
        nodes("shard-b"),
        nodes("control")
    )
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-queues-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", support::unique(name)));
    std::fs::write(&path, text).unwrap();
    path
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An in-process proxy, and the configuration file a check run next to it would be given (its
/// `[admin] listen` is the proxy's real admin address).
struct Instance {
    handle: ProxyHandle,
    admin: SocketAddr,
    config: PathBuf,
}

impl Instance {
    async fn start(name: &str) -> Instance {
        support::init_tracing();
        let first = temp_file(name, &config_text("127.0.0.1:0"));
        let config = Config::load(&first).expect("test config");
        let _ = std::fs::remove_file(first);
        let handle = warren::start(Arc::new(config)).await.expect("start");
        let admin = handle.admin_addr().expect("admin endpoint");
        let config = temp_file(name, &config_text(&admin.to_string()));
        Instance {
            handle,
            admin,
            config,
        }
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    async fn stop(self) {
        within("proxy shutdown", self.handle.shutdown()).await;
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Runs `warren check-queues ARGS`: (exit code, its one line).
async fn check_queues(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(WARREN)
            .arg("check-queues")
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run warren check-queues");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            stdout.lines().count(),
            1,
            "exactly one line for {args:?}: {stdout:?} (stderr {:?})",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code().expect("exit code"),
            stdout.trim_end().to_owned(),
        )
    })
    .await
    .unwrap()
}

/// Ready messages of `queue` on each shard cluster, asked directly.
async fn direct_counts(queue: &str) -> (u32, u32) {
    let mut counts = Vec::new();
    for name in ["shard-a", "shard-b"] {
        let conn = support::connect(support::cluster(name).first_node()).await;
        let (ch, _events) = support::open_channel(&conn).await;
        counts.push(support::queue_counts(&ch, queue).await.0);
        let _ = tokio::time::timeout(STEP, conn.close()).await;
    }
    (counts[0], counts[1])
}

async fn delete_everywhere(queue: &str) {
    for name in ["shard-a", "shard-b", "control"] {
        let conn = support::connect(support::cluster(name).first_node()).await;
        let (ch, _events) = support::open_channel(&conn).await;
        support::delete_queue(&ch, queue).await;
        let _ = tokio::time::timeout(STEP, conn.close()).await;
    }
}

/// Declares `queue` through the proxy at `addr` and publishes `n` messages to it (confirmed).
async fn declare_and_fill(addr: SocketAddr, queue: &str, n: usize) {
    let conn = support::connect(addr).await;
    let (ch, _events) = support::open_channel(&conn).await;
    support::declare_queue(&ch, queue).await;
    support::confirm_select(&ch).await;
    for i in 0..n {
        support::publish(&ch, "", queue, format!("m{i}").as_bytes()).await;
    }
    support::eventually(&format!("{n} messages in {queue}"), || async {
        let (a, b) = direct_counts(queue).await;
        (a as usize + b as usize == n).then_some(())
    })
    .await;
    support::close_connection(conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_answers_for_a_named_queue() {
    if support::skip_live() {
        return;
    }
    let queue = support::unique("ux-w");
    // Declared and filled through one instance, which then goes away (a restart).
    let first = Instance::start("first").await;
    declare_and_fill(first.handle.amqp_addr(), &queue, 150).await;
    first.stop().await;
    let (a, b) = direct_counts(&queue).await;
    assert_eq!(a + b, 150);
    assert!(a > 0 && b > 0, "spread over both shards: {a} + {b}");
    let split = format!("'{queue}@shard-a'={a};;;0; '{queue}@shard-b'={b};;;0;");

    // A fresh instance, started after the publishes, never saw the declare.
    let fresh = Instance::start("fresh").await;
    let (code, line) = check_queues(&[
        "--config",
        fresh.config(),
        "-q",
        &queue,
        "-w",
        "10",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 2, "{line}");
    assert_eq!(
        line,
        format!("QUEUES CRITICAL - {queue}=150 (>= 100) | '{queue}'=150;10;100;0; {split}")
    );
    let (code, line) = check_queues(&[
        "-f",
        fresh.config(),
        "-q",
        &queue,
        "-w",
        "100",
        "-c",
        "1000",
    ])
    .await;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with(&format!("QUEUES WARNING - {queue}=150 (>= 100) | ")),
        "{line}"
    );
    let (code, line) = check_queues(&[
        "--config",
        fresh.config(),
        "--queue",
        &queue,
        "--warning",
        "1000",
        "--critical",
        "2000",
    ])
    .await;
    assert_eq!(code, 0, "{line}");
    assert_eq!(
        line,
        format!(
            "QUEUES OK - 1 queue below 1000, deepest {queue}=150 | '{queue}'=150;1000;2000;0; {split}"
        )
    );

    // /queues with the exact name asks the clusters too.
    let body = http_get(fresh.admin, &format!("/queues?queue={queue}")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("/queues JSON");
    assert_eq!(v["total_messages"], 150, "{v:#}");
    assert_eq!(v["queues"][0]["name"], queue.as_str(), "{v:#}");

    // Without a name, the instance's own declared queues, and the line says so.
    let (code, line) = check_queues(&["--config", fresh.config(), "-w", "10", "-c", "100"]).await;
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with(
            "QUEUES OK - no sharded queues declared through this warren since it started"
        ),
        "{line}"
    );

    delete_everywhere(&queue).await;
    fresh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_elsewhere_is_missing() {
    if support::skip_live() {
        return;
    }
    let base = support::unique("admin-gone");
    let queue = format!("{base}.q");
    let one = Instance::start("one").await;
    declare_and_fill(one.handle.amqp_addr(), &queue, 3).await;
    // Deleted through another instance: the first one still lists it as declared.
    let other = Instance::start("other").await;
    {
        let conn = support::connect(other.handle.amqp_addr()).await;
        let (ch, _events) = support::open_channel(&conn).await;
        support::delete_queue(&ch, &queue).await;
        support::close_connection(conn).await;
    }
    other.stop().await;
    support::eventually("the queue gone on every shard cluster", || async {
        let mut gone = true;
        for name in ["shard-a", "shard-b"] {
            let conn = support::connect(support::cluster(name).first_node()).await;
            let (ch, _events) = support::open_channel(&conn).await;
            let passive = amqprs::channel::QueueDeclareArguments::new(&queue)
                .passive(true)
                .finish();
            gone &= ch.queue_declare(passive).await.is_err();
            let _ = tokio::time::timeout(STEP, conn.close()).await;
        }
        gone.then_some(())
    })
    .await;

    // Named: CRITICAL (2), whatever the thresholds, from the instance that declared it or not.
    let (code, line) = check_queues(&[
        "--config",
        one.config(),
        "-q",
        &queue,
        "-w",
        "10",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 2, "{line}");
    assert_eq!(
        line,
        format!("QUEUES CRITICAL - {queue} missing on every shard cluster")
    );
    // A name that never existed, next to one that is fine: still CRITICAL.
    let never = format!("{base}.never");
    let (code, line) = check_queues(&[
        "--config",
        one.config(),
        "-q",
        &never,
        "-q",
        &queue,
        "-w",
        "10",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 2, "{line}");
    assert!(line.contains(&format!("{never} missing")), "{line}");

    // The declared set of the first instance leaves it out instead of showing an empty queue.
    let admin = format!("http://{}", one.admin);
    let pattern = format!("{base}.*");
    let (code, line) =
        check_queues(&["--admin", &admin, "-q", &pattern, "-w", "10", "-c", "100"]).await;
    assert_eq!(code, 3, "{line}");
    assert!(
        line.contains(&format!(
            "1 declared queue no longer exists on any shard cluster: {queue}"
        )),
        "{line}"
    );
    let (code, line) = check_queues(&["--admin", &admin, "-w", "10", "-c", "100"]).await;
    assert_eq!(code, 0, "{line}");
    assert!(line.contains("no longer exists"), "{line}");
    assert!(!line.contains('|'), "no performance data for it: {line}");

    one.stop().await;
}

/// `-w`/`-c` as in every Nagios plugin; the configuration file is `--config` or `-f`. No broker
/// needed: the check gets as far as asking an endpoint nothing listens on.
#[tokio::test]
async fn nagios_options_parse() {
    let dead = format!("http://127.0.0.1:{}", closed_port());
    for args in [
        &["--admin", &dead, "-w", "10", "-c", "100"][..],
        &["--admin", &dead, "--warning", "10", "--critical", "100"],
        &[
            "--admin", &dead, "-w", "10", "-C", "100", "-q", "a*", "-q", "b*",
        ],
    ] {
        let (code, line) = check_queues(args).await;
        assert_eq!(code, 3, "{args:?}: {line}");
        assert!(
            line.starts_with("QUEUES UNKNOWN - admin endpoint 127.0.0.1:"),
            "{args:?}: {line}"
        );
    }
    // The old `-c FILE`: UNKNOWN, saying what -c is now.
    let (code, line) = check_queues(&["-c", "proxy.toml", "-w", "10"]).await;
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("-c is --critical"), "{line}");
    // Named queues need the clusters of a configuration file (or an admin endpoint).
    let (code, line) = check_queues(&["-q", "ux-w", "-w", "10", "-c", "100"]).await;
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("--config"), "{line}");
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-warren.toml");
    let (code, line) = check_queues(&[
        "-f",
        missing.to_str().unwrap(),
        "-q",
        "ux-w",
        "-w",
        "10",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("cannot read the configuration"), "{line}");

    // The help shows the Sensu and Nagios definitions.
    let out = Command::new(WARREN)
        .args(["check-queues", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "-c, --critical",
        "-f, --config",
        "output_metric_format: nagios_perfdata",
        "define command",
        "check_warren_queue!celery!500!1000",
    ] {
        assert!(help.contains(needle), "{needle:?} in:\n{help}");
    }
}

/// GET `path` on an admin endpoint; the response body.
async fn http_get(admin: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: warren\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    support::within("the admin's answer", s.read_to_end(&mut buf))
        .await
        .expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
