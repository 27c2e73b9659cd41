//! Shared helpers for the proxy integration tests (`tests/proxy_*.rs`).
//!
//! * **RabbitMQ.** [`clusters`] reads `WARREN_TEST_CLUSTERS`
//!   (`shard-a=127.0.0.1:P1,127.0.0.1:P2;shard-b=...;control=...`, exported by `scripts/test.sh`).
//!   When it is absent (a plain `cargo test`), every test that needs RabbitMQ returns at once
//!   ([`skip_live`]), so `cargo test` passes without a broker. With `WARREN_TEST_LOCAL_RABBIT=1`
//!   instead, a two-node `shard-a` cluster is started with
//!   `scripts/rabbit.sh up` under `target/test-rabbit` and reused by later runs (its addresses are
//!   kept in `target/test-rabbit/clusters`). Stop it with
//!   `WARREN_RABBIT_DIR=target/test-rabbit scripts/rabbit.sh down-all`.
//! * **Proxy.** [`start_proxy`] runs a proxy in-process (on a runtime of its own) on
//!   `127.0.0.1:0` in front of `shard-a`; `against_proxy_and_rabbitmq!` runs a scenario both through
//!   a proxy and against RabbitMQ directly.
//! * **amqprs.** [`connect`], [`open_channel`] (with an [`Events`] stream of the channel's
//!   asynchronous methods: close, confirms, returns, cancels), publish/consume helpers.
//! * **Raw AMQP.** [`RawClient`] speaks frames through `warren::codec`, for tests that need exact
//!   control of the bytes (protocol abuse, frame sizes, heartbeats, close codes).
//! * **Bystander.** [`Bystander`] is a well-behaved client doing publish/consume round trips in the
//!   background, to show that one client's misbehaviour does not disturb the others.
//!
//! Every wait has a deadline and fails with a message saying what was awaited.

#![allow(dead_code)]

pub mod fault;

use std::future::Future;
use std::net::{SocketAddr, TcpStream as StdTcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command as ProcessCommand, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments, Channel,
    ConsumerMessage, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use warren::ProxyHandle;
use warren::codec::{
    self, BasicProperties as WireProperties, CodecError, ContentHeader, FieldTable, FieldValue,
    FrameKind, LongStr, Method, RawFrame, ShortStr,
};
use warren::config::Config;

pub mod sharded;

/// Deadline for one step of a test (a round trip, a delivery, a close...). Generous: the test
/// machine is small and RabbitMQ mirrors every queue to a second node.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `fut`, failing the test with `what` if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

/// Runs `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
    }
}

/// Polls `check` (an async query against a broker) until it returns `Some`, or fails the test after
/// [`STEP`]. For broker-side state that has no notification (queue depths after a disconnect).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("condition not reached within {STEP:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node addresses as a TOML array's items: `"127.0.0.1:5701", "127.0.0.1:5702"`.
pub fn quoted(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A name no other test (nor an earlier run) uses: tests run in parallel against shared brokers.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros()
        % 1_000_000_000;
    format!("warren-test.{prefix}.{}.{t}.{n}", std::process::id())
}

/// Logs of the proxy go to the test's captured output (shown for failing tests). `RUST_LOG`
/// overrides the default `warren=info`.
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warren=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ clusters

/// One RabbitMQ cluster available to the tests.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    /// `host:port` of each node, in order.
    pub nodes: Vec<String>,
}

impl Cluster {
    /// The AMQP address of the cluster's first node.
    pub fn first_node(&self) -> SocketAddr {
        resolve(&self.nodes[0])
    }
}

/// Parses `name=host:port,host:port;name=...`.
pub fn parse_clusters(spec: &str) -> Vec<Cluster> {
    spec.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (name, nodes) = entry.split_once('=').unwrap_or_else(|| {
                panic!("bad cluster entry {entry:?}: expected name=host:port,host:port")
            });
            let nodes: Vec<String> = nodes
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            assert!(
                !nodes.is_empty(),
                "cluster {name:?} has no nodes in {spec:?}"
            );
            Cluster {
                name: name.trim().to_owned(),
                nodes,
            }
        })
        .collect()
}

fn resolve(addr: &str) -> SocketAddr {
    addr.to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve {addr}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{addr} resolves to nothing"))
}

/// True when this test needs RabbitMQ and none is configured: it should return at once (the
/// caller does). Live tests run when `WARREN_TEST_CLUSTERS` is set (scripts/test.sh exports it)
/// or when `WARREN_TEST_LOCAL_RABBIT=1` asks for a local shard-a under `target/test-rabbit`; so
/// `cargo test` alone passes on a machine without RabbitMQ, running every test that needs none.
pub fn skip_live() -> bool {
    static SKIP: OnceLock<bool> = OnceLock::new();
    *SKIP.get_or_init(|| {
        let configured = std::env::var("WARREN_TEST_CLUSTERS").is_ok_and(|s| !s.trim().is_empty())
            || std::env::var("WARREN_TEST_LOCAL_RABBIT").is_ok_and(|v| v == "1");
        if !configured {
            eprintln!(
                "skipping the tests that need RabbitMQ: WARREN_TEST_CLUSTERS is not set. \
                 Run scripts/test.sh (it starts the clusters), or export WARREN_TEST_CLUSTERS, or \
                 WARREN_TEST_LOCAL_RABBIT=1 for a local shard-a."
            );
        }
        !configured
    })
}

/// An external command some checks run (promtool, the venv's check-jsonschema), if `found`.
/// When it is missing the checks are skipped with a message saying how to get it, unless
/// `WARREN_REQUIRE_TOOLS=1` (scripts/test.sh installs them and sets it) or `CI` is set: then
/// a missing tool fails the test instead of skipping, so a broken install cannot pass quietly.
pub fn external_tool(what: &str, found: Option<PathBuf>, how_to_get: &str) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let required = std::env::var("WARREN_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
        || std::env::var_os("CI").is_some();
    assert!(
        !required,
        "{what} is missing, and WARREN_REQUIRE_TOOLS=1 or CI asks for it: {how_to_get}"
    );
    eprintln!("SKIPPING the checks that run {what}: it is missing ({how_to_get})");
    None
}

/// A fresh UUID-shaped name (8-4-4-4-12 lowercase hex), like Celery's rpc:// result queues.
pub fn uuid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u128;
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let pid = u128::from(std::process::id());
    let v = t ^ (pid << 64) ^ (n << 100) ^ (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) << 20);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The clusters the tests may use (see the module docs).
pub fn clusters() -> &'static [Cluster] {
    static CLUSTERS: OnceLock<Vec<Cluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| match std::env::var("WARREN_TEST_CLUSTERS") {
        Ok(spec) if !spec.trim().is_empty() => parse_clusters(&spec),
        _ => local_clusters(),
    })
}

/// The cluster called `name`.
pub fn cluster(name: &str) -> &'static Cluster {
    clusters()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no cluster {name:?} among {:?} (WARREN_TEST_CLUSTERS)",
                clusters().iter().map(|c| &c.name).collect::<Vec<_>>()
            )
        })
}

/// The cluster the test proxies put behind them.
pub fn shard_a() -> &'static Cluster {
    cluster("shard-a")
}

/// Direct AMQP address of RabbitMQ (the first node of shard-a), to compare with the proxy.
pub fn rabbit_addr() -> SocketAddr {
    shard_a().first_node()
}

pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn rabbit_script() -> PathBuf {
    repo_dir().join("scripts/rabbit.sh")
}

fn reachable(nodes: &[String]) -> bool {
    nodes.iter().all(|n| {
        n.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| StdTcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
    })
}

/// Starts (or reuses) the developer's shard-a cluster under `target/test-rabbit`.
fn local_clusters() -> Vec<Cluster> {
    let dir = repo_dir().join("target/test-rabbit");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    // Several test binaries (or cargo invocations) may get here at once: one starts the cluster.
    let lock = std::fs::File::create(dir.join("lock")).expect("create lock file");
    lock.lock().expect("lock target/test-rabbit/lock");
    let spec_file = dir.join("clusters");
    if let Ok(spec) = std::fs::read_to_string(&spec_file) {
        let clusters = parse_clusters(&spec);
        if !clusters.is_empty() && clusters.iter().all(|c| reachable(&c.nodes)) {
            return clusters;
        }
    }
    eprintln!(
        "WARREN_TEST_CLUSTERS is not set: starting RabbitMQ cluster shard-a under {} (takes ~15 s; reused by later runs)",
        dir.display()
    );
    let out = ProcessCommand::new(rabbit_script())
        .args(["up", "shard-a", "auto", "auto"])
        .env("WARREN_RABBIT_DIR", &dir)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rabbit_script().display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/rabbit.sh up shard-a failed ({}): {stdout}\nIs RabbitMQ installed (scripts/rabbit.sh install)? \
         Or export WARREN_TEST_CLUSTERS=shard-a=HOST:PORT,HOST:PORT",
        out.status
    );
    // Output: "shard-a 127.0.0.1:P1 127.0.0.1:P2"
    let line = stdout.lines().last().unwrap_or_default();
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default();
    let nodes: Vec<&str> = words.collect();
    assert!(
        name == "shard-a" && !nodes.is_empty(),
        "unexpected output of rabbit.sh up: {stdout:?}"
    );
    let spec = format!("shard-a={}", nodes.join(","));
    std::fs::write(&spec_file, &spec).expect("write target/test-rabbit/clusters");
    parse_clusters(&spec)
}

/// A private RabbitMQ cluster in its own state dir, torn down (even when the test fails) when
/// the guard is dropped.
pub struct PrivateCluster {
    pub dir: PathBuf,
    pub cluster: Cluster,
}

impl PrivateCluster {
    /// A guard over a new, empty state dir for cluster `name`, not started yet. The dir is under
    /// scripts/test.sh's state dir when there is one (its cleanup then removes what a killed
    /// test leaves), else under target/; always a dir of its own, so `down-all` in the Drop
    /// reaches nothing else. From here on the guard cleans up, whatever happens.
    fn fresh(name: &str) -> PrivateCluster {
        let base = match std::env::var_os("WARREN_RABBIT_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => repo_dir().join("target"),
        };
        let dir = base.join(format!(
            "private-{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
                % 1_000_000
        ));
        std::fs::create_dir_all(&dir).expect("create private rabbit dir");
        PrivateCluster {
            dir,
            cluster: Cluster {
                name: name.to_owned(),
                nodes: Vec::new(),
            },
        }
    }

    /// `scripts/rabbit.sh up NAME auto auto` in a fresh state dir of its own.
    pub fn start(name: &str) -> PrivateCluster {
        let mut guard = PrivateCluster::fresh(name);
        let stdout = guard.rabbit(&["up", name, "auto", "auto"]);
        let line = stdout.lines().last().unwrap_or_default().to_owned();
        let nodes: Vec<String> = line.split_whitespace().skip(1).map(str::to_owned).collect();
        assert_eq!(
            nodes.len(),
            2,
            "unexpected output of rabbit.sh up: {stdout:?}"
        );
        guard.cluster.nodes = nodes;
        guard
    }

    /// Runs `scripts/rabbit.sh ARGS` with this cluster's state dir; returns stdout, fails the test
    /// on a non-zero exit.
    pub fn rabbit(&self, args: &[&str]) -> String {
        let out = ProcessCommand::new(rabbit_script())
            .args(args)
            .env("WARREN_RABBIT_DIR", &self.dir)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run rabbit.sh: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rabbit.sh {args:?} failed ({}): {stdout}",
            out.status
        );
        stdout
    }

    /// Node names as rabbit.sh knows them: `NAME-1`, `NAME-2`.
    pub fn node_name(&self, i: usize) -> String {
        format!("{}-{}", self.cluster.name, i)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let status = ProcessCommand::new(rabbit_script())
            .arg("down-all")
            .env("WARREN_RABBIT_DIR", &self.dir)
            .stdout(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "warning: rabbit.sh down-all failed for {}: {status:?}",
                self.dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy

/// Starts a proxy on 127.0.0.1:0 in front of shard-a, with a short shutdown grace (100 ms) unless
/// `extra_toml` sets one. `extra_toml` is inserted before the `[[clusters]]` tables, so it may
/// hold `[timeouts]` / `[limits]` sections.
pub async fn start_proxy(extra_toml: &str) -> ProxyHandle {
    start_proxy_on(&shard_a().nodes, extra_toml).await
}

/// Like [`start_proxy`], with the shard cluster's nodes given.
pub async fn start_proxy_on(nodes: &[String], extra_toml: &str) -> ProxyHandle {
    init_tracing();
    let config = Config::parse(&proxy_toml(nodes, extra_toml), "test-proxy.toml")
        .unwrap_or_else(|e| panic!("test proxy config rejected: {e}"));
    // The proxy runs on its own runtime: should it ever stall its threads, the test's own timeouts
    // still fire and the test fails instead of hanging.
    let started = proxy_runtime().spawn(async move { warren::start(Arc::new(config)).await });
    within("the proxy to start", started)
        .await
        .expect("proxy start task")
        .expect("start the proxy")
}

/// The runtime every test proxy of this test binary runs on.
pub fn proxy_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("proxy-under-test")
            .enable_all()
            .build()
            .expect("proxy runtime")
    })
}

/// The configuration text [`start_proxy_on`] uses.
pub fn proxy_toml(nodes: &[String], extra_toml: &str) -> String {
    let mut extra = extra_toml.to_owned();
    if !extra.contains("shutdown_grace_ms") {
        if extra.contains("[timeouts]") {
            extra = extra.replacen("[timeouts]", "[timeouts]\nshutdown_grace_ms = 100", 1);
        } else {
            extra.push_str("\n[timeouts]\nshutdown_grace_ms = 100\n");
        }
    }
    let nodes = nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "listen = \"127.0.0.1:0\"\n{extra}\n\n[[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{nodes}]\n"
    )
}

/// Generates, for each `async fn NAME(addr: SocketAddr)` listed, a test `through_proxy::NAME`
/// (a fresh proxy in front of shard-a) and a test `direct_rabbitmq::NAME` (RabbitMQ itself), so
/// every behaviour asserted of the proxy is also shown to be RabbitMQ's.
#[allow(unused_macros)]
macro_rules! against_proxy_and_rabbitmq {
    ($($name:ident),* $(,)?) => {
        mod through_proxy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::support::skip_live() {
                        return;
                    }
                    let proxy = crate::support::start_proxy("").await;
                    super::$name(proxy.amqp_addr()).await;
                    crate::support::within("proxy shutdown", proxy.shutdown()).await;
                }
            )*
        }
        mod direct_rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::support::skip_live() {
                        return;
                    }
                    crate::support::init_tracing();
                    super::$name(crate::support::rabbit_addr()).await;
                }
            )*
        }
    };
}

// ---------------------------------------------------------------------------------------------
// amqprs helpers

/// Opens an amqprs connection as guest/guest on vhost "/".
pub async fn connect(addr: SocketAddr) -> Connection {
    let args = OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest");
    within(
        &format!("amqprs connection to {addr}"),
        Connection::open(&args),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Opens an amqprs connection with the arguments adjusted by `f`; returns the error as is.
pub async fn try_connect(
    addr: SocketAddr,
    f: impl FnOnce(&mut OpenConnectionArguments),
) -> Result<Connection, amqprs::error::Error> {
    let mut args =
        OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest");
    f(&mut args);
    within(
        &format!("amqprs connection to {addr}"),
        Connection::open(&args),
    )
    .await
}

/// Something the broker sent on a channel on its own initiative.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Close {
        code: u16,
        text: String,
    },
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    Return {
        code: u16,
        text: String,
        routing_key: String,
        body: Vec<u8>,
    },
    Cancel {
        consumer_tag: String,
    },
}

/// The asynchronous methods of one channel, in the order they arrived.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event, failing the test after [`STEP`].
    pub async fn next(&mut self) -> Event {
        within(
            "a channel event (close, confirm, return, cancel)",
            self.rx.recv(),
        )
        .await
        .expect("channel event stream ended")
    }

    /// An event already received, if any (never waits).
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Waits until publisher confirms have settled the sequence numbers `1..=n`, each exactly
    /// once (a `multiple` one settles every earlier number not settled yet); returns, in order,
    /// whether each was acked (true) or nacked (false). Fails on any other event, on a number
    /// settled twice and on one above `n`.
    pub async fn confirms(&mut self, n: u64) -> Vec<bool> {
        let mut settled = std::collections::BTreeMap::new();
        while (settled.len() as u64) < n {
            let (tag, multiple, ack) = match self.next().await {
                Event::Ack { tag, multiple } => (tag, multiple, true),
                Event::Nack { tag, multiple } => (tag, multiple, false),
                other => panic!("expected a publisher confirm, got {other:?}"),
            };
            assert!(
                (1..=n).contains(&tag),
                "confirm of {tag}: only 1..={n} were published"
            );
            let tags: Vec<u64> = if multiple {
                (1..=tag).filter(|t| !settled.contains_key(t)).collect()
            } else {
                vec![tag]
            };
            for t in tags {
                assert!(
                    settled.insert(t, ack).is_none(),
                    "sequence number {t} confirmed twice"
                );
            }
        }
        settled.into_values().collect()
    }

    /// Waits for channel.close from the broker; returns its code and text.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            if let Event::Close { code, text } = self.next().await {
                return (code, text);
            }
        }
    }
}

struct EventCallback {
    tx: mpsc::UnboundedSender<Event>,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// amqprs's callback traits are `#[async_trait]`; this is the expanded form (no extra dependency).
impl ChannelCallback for EventCallback {
    fn close<'s, 'c, 'a>(
        &'s mut self,
        _channel: &'c Channel,
        close: CloseChannel,
    ) -> BoxFut<'a, Result<(), amqprs::error::Error>>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self.tx.send(Event::Close {
            code: close.reply_code(),
            text: close.reply_text().clone(),
        });
        Box::pin(async { Ok(()) })
    }

    fn cancel<'s, 'c, 'a>(
        &'s mut self,
        _channel: &'c Channel,
        cancel: Cancel,
    ) -> BoxFut<'a, Result<(), amqprs::error::Error>>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self.tx.send(Event::Cancel {
            consumer_tag: cancel.consumer_tag().clone(),
        });
        Box::pin(async { Ok(()) })
    }

    fn flow<'s, 'c, 'a>(
        &'s mut self,
        _channel: &'c Channel,
        active: bool,
    ) -> BoxFut<'a, Result<bool, amqprs::error::Error>>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        Box::pin(async move { Ok(active) })
    }

    fn publish_ack<'s, 'c, 'a>(&'s mut self, _channel: &'c Channel, ack: Ack) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self.tx.send(Event::Ack {
            tag: ack.delivery_tag(),
            multiple: ack.mutiple(),
        });
        Box::pin(async {})
    }

    fn publish_nack<'s, 'c, 'a>(&'s mut self, _channel: &'c Channel, nack: Nack) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self.tx.send(Event::Nack {
            tag: nack.delivery_tag(),
            multiple: nack.multiple(),
        });
        Box::pin(async {})
    }

    fn publish_return<'s, 'c, 'a>(
        &'s mut self,
        _channel: &'c Channel,
        ret: Return,
        _basic_properties: BasicProperties,
        content: Vec<u8>,
    ) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self.tx.send(Event::Return {
            code: ret.reply_code(),
            text: ret.reply_text().clone(),
            routing_key: ret.routing_key().clone(),
            body: content,
        });
        Box::pin(async {})
    }
}

/// Opens a channel with a callback that turns the broker's asynchronous methods into [`Events`].
pub async fn open_channel(conn: &Connection) -> (Channel, Events) {
    open_channel_numbered(conn, None).await
}

/// [`open_channel`] with a chosen channel number.
pub async fn open_channel_numbered(conn: &Connection, id: Option<u16>) -> (Channel, Events) {
    let ch = within("channel.open", conn.open_channel(id))
        .await
        .expect("channel.open failed");
    let (tx, rx) = mpsc::unbounded_channel();
    ch.register_callback(EventCallback { tx })
        .await
        .expect("register channel callback");
    (ch, Events { rx })
}

/// Declares a transient, non-exclusive queue.
pub async fn declare_queue(ch: &Channel, name: &str) {
    within(
        &format!("queue.declare {name}"),
        ch.queue_declare(QueueDeclareArguments::new(name)),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.declare {name} failed: {e}"));
}

/// Direct reply-to, the caller: `n` requests to `queue` with `reply_to = amq.rabbitmq.reply-to`
/// and correlation ids "0", "1", ...
pub async fn send_rpc_requests(ch: &Channel, queue: &str, n: usize) {
    for i in 0..n {
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to")
            .with_correlation_id(&i.to_string())
            .finish();
        within(
            "basic.publish (request)",
            ch.basic_publish(
                props,
                format!("request {i}").into_bytes(),
                BasicPublishArguments::new("", queue),
            ),
        )
        .await
        .expect("publish a request");
    }
}

/// Direct reply-to, the server: answers `n` requests from `requests`, each to the reply-to name
/// it carries (which must be a routable `amq.rabbitmq.reply-to.*` one), with the body
/// "reply <correlation id>".
pub async fn answer_rpc_requests(
    ch: &Channel,
    requests: &mut mpsc::UnboundedReceiver<ConsumerMessage>,
    n: usize,
) {
    for _ in 0..n {
        let m = within("a request", requests.recv())
            .await
            .expect("request stream");
        let props = m.basic_properties.expect("request properties");
        let reply_to = props.reply_to().expect("reply_to").clone();
        assert!(
            reply_to.starts_with("amq.rabbitmq.reply-to."),
            "the server sees a routable reply-to name, got {reply_to:?}"
        );
        let corr = props.correlation_id().expect("correlation_id").clone();
        within(
            "basic.publish (reply)",
            ch.basic_publish(
                BasicProperties::default()
                    .with_correlation_id(&corr)
                    .finish(),
                format!("reply {corr}").into_bytes(),
                BasicPublishArguments::new("", &reply_to),
            ),
        )
        .await
        .expect("publish a reply");
    }
}

/// Direct reply-to, the caller again: `n` replies, each "reply <its correlation id>", none twice.
pub async fn receive_rpc_replies(replies: &mut mpsc::UnboundedReceiver<ConsumerMessage>, n: usize) {
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..n {
        let m = within("a reply", replies.recv())
            .await
            .expect("reply stream");
        let corr = m
            .basic_properties
            .and_then(|p| p.correlation_id().cloned())
            .expect("reply correlation_id");
        assert_eq!(
            m.content.as_deref(),
            Some(format!("reply {corr}").as_bytes())
        );
        assert!(answered.insert(corr.clone()), "reply {corr} twice");
    }
    assert_eq!(answered.len(), n);
}

/// confirm.select (the channel's publishes are acked or nacked from then on).
pub async fn confirm_select(ch: &Channel) {
    within(
        "confirm.select",
        ch.confirm_select(amqprs::channel::ConfirmSelectArguments::default()),
    )
    .await
    .expect("confirm.select");
}

/// Declares `name` with room for `max_length` messages, past which RabbitMQ refuses publishes
/// with basic.nack (`x-overflow = reject-publish`) instead of dropping the oldest.
pub async fn declare_reject_publish_queue(ch: &Channel, name: &str, max_length: i64) {
    let mut args = amqprs::FieldTable::new();
    args.insert(
        "x-max-length".try_into().unwrap(),
        amqprs::FieldValue::l(max_length),
    );
    args.insert(
        "x-overflow".try_into().unwrap(),
        amqprs::FieldValue::S("reject-publish".try_into().unwrap()),
    );
    within(
        &format!("queue.declare {name} (reject-publish)"),
        ch.queue_declare(QueueDeclareArguments::new(name).arguments(args).finish()),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.declare {name} failed: {e}"));
}

/// (ready messages, consumers) of a queue, by passive declare.
pub async fn queue_counts(ch: &Channel, name: &str) -> (u32, u32) {
    let r = within(
        &format!("passive queue.declare {name}"),
        ch.queue_declare(QueueDeclareArguments::new(name).passive(true).finish()),
    )
    .await
    .unwrap_or_else(|e| panic!("passive queue.declare {name} failed: {e}"))
    .expect("declare-ok");
    (r.1, r.2)
}

/// Deletes a queue (best effort: for cleanup at the end of a test).
pub async fn delete_queue(ch: &Channel, name: &str) {
    let _ = tokio::time::timeout(STEP, ch.queue_delete(QueueDeleteArguments::new(name))).await;
}

/// (ready messages, consumers) of a queue, asked of RabbitMQ directly on a fresh connection.
pub async fn rabbit_queue_counts(name: &str) -> (u32, u32) {
    let conn = connect(rabbit_addr()).await;
    let (ch, _events) = open_channel(&conn).await;
    let counts = queue_counts(&ch, name).await;
    let _ = tokio::time::timeout(STEP, conn.close()).await;
    counts
}

pub async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    publish_with(ch, BasicPublishArguments::new(exchange, routing_key), body).await;
}

pub async fn publish_with(ch: &Channel, args: BasicPublishArguments, body: &[u8]) {
    within(
        "basic.publish",
        ch.basic_publish(BasicProperties::default(), body.to_vec(), args),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.publish failed: {e}"));
}

/// basic.consume; `manual_ack` false means no-ack (auto-ack) mode.
pub async fn consume(
    ch: &Channel,
    queue: &str,
    manual_ack: bool,
) -> (String, mpsc::UnboundedReceiver<ConsumerMessage>) {
    let args = BasicConsumeArguments::new(queue, "")
        .manual_ack(manual_ack)
        .finish();
    within(&format!("basic.consume {queue}"), ch.basic_consume_rx(args))
        .await
        .unwrap_or_else(|e| panic!("basic.consume {queue} failed: {e}"))
}

/// One delivery, simplified.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub tag: u64,
    pub redelivered: bool,
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// The next delivery of a consumer, failing the test after [`STEP`].
pub async fn next_delivery(rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>) -> Delivery {
    let m = within("basic.deliver", rx.recv())
        .await
        .expect("consumer stream ended (channel closed?)");
    let d = m.deliver.expect("deliver");
    Delivery {
        tag: d.delivery_tag(),
        redelivered: d.redelivered(),
        routing_key: d.routing_key().clone(),
        body: m.content.unwrap_or_default(),
    }
}

/// Closes an amqprs connection politely, failing the test if that does not work.
///
/// amqprs 2.1 sometimes reports `InternalChannelError("channel closed")` from close when one of
/// its channel tasks ended first, or `ConnectionCloseError("failed to register responder ...
/// channel closed")` (both seen directly against RabbitMQ, without the proxy); that
/// client-internal race is tolerated, any other error fails the test.
pub async fn close_connection(conn: Connection) {
    match within("connection.close", conn.close()).await {
        Ok(()) => {}
        Err(amqprs::error::Error::InternalChannelError(e)) => {
            eprintln!("amqprs close race tolerated: {e}");
        }
        Err(amqprs::error::Error::ConnectionCloseError(e))
            if e.contains("failed to register responder") && e.contains("channel closed") =>
        {
            eprintln!("amqprs close race tolerated: {e}");
        }
        Err(e) => panic!("connection.close failed: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw AMQP client

/// How a raw connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The peer sent connection.close (the client answered close-ok).
    Close(CloseInfo),
    /// The peer closed the socket without connection.close.
    Eof,
}

impl Ending {
    /// The reply code, failing the test if the peer just dropped the socket.
    pub fn code(&self) -> u16 {
        match self {
            Ending::Close(c) => c.code,
            Ending::Eof => {
                panic!("expected connection.close, the peer closed the socket without one")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

/// What the client answers to connection.tune.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub vhost: String,
    /// 0: take the server's.
    pub channel_max: u16,
    /// 0: take the server's.
    pub frame_max: u32,
    pub heartbeat: u16,
}

impl Default for Login {
    fn default() -> Self {
        Login {
            user: "guest".into(),
            password: "guest".into(),
            vhost: "/".into(),
            channel_max: 0,
            frame_max: 0,
            heartbeat: 0,
        }
    }
}

/// What the server proposed in connection.tune.
#[derive(Debug, Clone, Copy)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// A hand-driven AMQP client: every frame is written and read explicitly.
pub struct RawClient {
    pub stream: TcpStream,
    rbuf: BytesMut,
    /// Frames larger than this from the server fail the test (0 = no check).
    pub frame_max: usize,
    /// Heartbeat frames received so far.
    pub heartbeats: usize,
}

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).expect("short string")
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(&format!("TCP connect to {addr}"), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        RawClient {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            frame_max: 0,
            heartbeats: 0,
        }
    }

    /// Connects and completes the handshake as guest with the given tune-ok values.
    pub async fn open(addr: SocketAddr, login: Login) -> RawClient {
        let mut c = RawClient::connect(addr).await;
        if let Err(e) = c.handshake(&login).await {
            panic!("handshake with {addr} failed: {e:?}");
        }
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within("socket write", self.stream.write_all(bytes))
            .await
            .expect("socket write failed");
    }

    pub async fn send_method(&mut self, channel: u16, method: &Method) {
        let mut out = BytesMut::new();
        codec::write_method(&mut out, channel, method);
        self.send(&out).await;
    }

    /// basic.publish with its content, body frames split to `frame_max`.
    pub async fn publish(
        &mut self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        frame_max: usize,
    ) {
        let mut out = BytesMut::with_capacity(body.len() + body.len() / 1000 + 256);
        encode_publish(&mut out, channel, exchange, routing_key, body, frame_max);
        self.send(&out).await;
    }

    /// The next frame (heartbeats included); `Ok(None)` on EOF or a reset. A frame larger than
    /// [`RawClient::frame_max`] fails the test.
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, CodecError> {
        loop {
            match codec::decode_frame(&mut self.rbuf, self.frame_max) {
                Ok(Some(f)) => {
                    if f.kind == FrameKind::Heartbeat {
                        self.heartbeats += 1;
                    }
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(CodecError::FrameTooLarge { size, max }) => {
                    panic!(
                        "the server sent a frame of {size} bytes, above the negotiated frame_max {max}"
                    )
                }
                Err(e) => return Err(e),
            }
            self.rbuf.reserve(64 * 1024);
            match within("data from the server", self.stream.read_buf(&mut self.rbuf)).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// The next method frame (heartbeats skipped). Fails the test on EOF, on a content frame, and
    /// on a connection.close (unless `allow_close`, which returns it).
    pub async fn read_method(&mut self) -> (u16, Method) {
        loop {
            let f = self
                .read_frame()
                .await
                .expect("undecodable frame from the server");
            let Some(f) = f else {
                panic!("the server closed the connection while a method was expected")
            };
            match f.kind {
                FrameKind::Heartbeat => continue,
                FrameKind::Method => {
                    let m = Method::decode(f.payload).expect("undecodable method from the server");
                    if let Method::ConnectionClose(c) = &m {
                        panic!(
                            "the server closed the connection: {} {} (on {}.{})",
                            c.reply_code, c.reply_text, c.class_id, c.method_id
                        );
                    }
                    return (f.channel, m);
                }
                other => panic!(
                    "expected a method frame, got a {other:?} frame on channel {}",
                    f.channel
                ),
            }
        }
    }

    /// Reads until connection.close (answering close-ok) or EOF, ignoring everything else.
    pub async fn read_until_close(&mut self) -> Ending {
        loop {
            let f = match self.read_frame().await {
                Ok(Some(f)) => f,
                Ok(None) => return Ending::Eof,
                Err(e) => panic!(
                    "undecodable frame from the server while waiting for connection.close: {e}"
                ),
            };
            if f.kind == FrameKind::Method
                && f.channel == 0
                && let Ok(Method::ConnectionClose(c)) = Method::decode(f.payload)
            {
                // The peer may already be gone: ignore write errors.
                let mut out = BytesMut::new();
                codec::write_method(&mut out, 0, &Method::ConnectionCloseOk(Default::default()));
                let _ = self.stream.write_all(&out).await;
                return Ending::Close(CloseInfo {
                    code: c.reply_code,
                    text: c.reply_text.as_str().into_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                });
            }
        }
    }

    /// Reads until the server closes the socket; connection.close (if any) is answered and
    /// returned. Used where the socket must really be gone.
    pub async fn read_until_eof(&mut self) -> Option<CloseInfo> {
        let mut close = None;
        loop {
            match self.read_until_close().await {
                Ending::Eof => return close,
                Ending::Close(c) => close = Some(c),
            }
        }
    }

    /// Reads the next frame that is not a heartbeat; `None` on EOF.
    async fn next_non_heartbeat(&mut self) -> Option<RawFrame> {
        loop {
            match self
                .read_frame()
                .await
                .expect("undecodable frame from the server")
            {
                Some(f) if f.kind == FrameKind::Heartbeat => continue,
                other => return other,
            }
        }
    }

    /// Next method during the handshake; a connection.close ends the handshake as an error.
    async fn handshake_method(&mut self) -> Result<Method, Ending> {
        let Some(f) = self.next_non_heartbeat().await else {
            return Err(Ending::Eof);
        };
        assert_eq!(
            f.kind,
            FrameKind::Method,
            "expected a method frame during the handshake"
        );
        let m = Method::decode(f.payload).expect("undecodable method from the server");
        if let Method::ConnectionClose(c) = m {
            let mut out = BytesMut::new();
            codec::write_method(&mut out, 0, &Method::ConnectionCloseOk(Default::default()));
            let _ = self.stream.write_all(&out).await;
            return Err(Ending::Close(CloseInfo {
                code: c.reply_code,
                text: c.reply_text.as_str().into_owned(),
                class_id: c.class_id,
                method_id: c.method_id,
            }));
        }
        Ok(m)
    }

    /// Protocol header, start-ok (PLAIN), tune-ok, open; returns what the server proposed.
    pub async fn handshake(&mut self, login: &Login) -> Result<Tune, Ending> {
        self.send(codec::PROTOCOL_HEADER).await;
        match self.handshake_method().await? {
            Method::ConnectionStart(_) => {}
            other => panic!("expected connection.start, got {}", other.name()),
        }
        let mut caps = FieldTable::default();
        for cap in [
            "authentication_failure_close",
            "consumer_cancel_notify",
            "connection.blocked",
            "basic.nack",
            "publisher_confirms",
        ] {
            caps.insert(ss(cap), FieldValue::Bool(true));
        }
        let mut props = FieldTable::default();
        props.insert(
            ss("product"),
            FieldValue::LongStr(LongStr::from("warren raw test client")),
        );
        props.insert(ss("capabilities"), FieldValue::Table(caps));
        let response = format!("\0{}\0{}", login.user, login.password);
        self.send_method(
            0,
            &Method::ConnectionStartOk(codec::ConnectionStartOk {
                client_properties: props,
                mechanism: ss("PLAIN"),
                response: LongStr::from(response),
                locale: ss("en_US"),
            }),
        )
        .await;
        let tune = match self.handshake_method().await? {
            Method::ConnectionTune(t) => Tune {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat: t.heartbeat,
            },
            other => panic!("expected connection.tune, got {}", other.name()),
        };
        let frame_max = if login.frame_max == 0 {
            tune.frame_max
        } else {
            login.frame_max
        };
        let channel_max = if login.channel_max == 0 {
            tune.channel_max
        } else {
            login.channel_max
        };
        self.send_method(
            0,
            &Method::ConnectionTuneOk(codec::ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat: login.heartbeat,
            }),
        )
        .await;
        self.send_method(
            0,
            &Method::ConnectionOpen(codec::ConnectionOpen {
                virtual_host: ss(&login.vhost),
                capabilities: ShortStr::default(),
                insist: false,
            }),
        )
        .await;
        match self.handshake_method().await? {
            Method::ConnectionOpenOk(_) => {}
            other => panic!("expected connection.open-ok, got {}", other.name()),
        }
        self.frame_max = frame_max as usize;
        Ok(tune)
    }

    /// channel.open, waiting for open-ok.
    pub async fn open_channel(&mut self, channel: u16) {
        self.send_method(channel, &Method::ChannelOpen(Default::default()))
            .await;
        match self.read_method().await {
            (ch, Method::ChannelOpenOk(_)) if ch == channel => {}
            (ch, m) => panic!(
                "expected channel.open-ok on {channel}, got {} on {ch}",
                m.name()
            ),
        }
    }

    /// Sends a synchronous method and returns the reply (the next method on that channel).
    pub async fn call(&mut self, channel: u16, method: &Method) -> Method {
        self.send_method(channel, method).await;
        loop {
            let (ch, m) = self.read_method().await;
            if ch == channel {
                return m;
            }
        }
    }

    /// Reads one delivery (basic.deliver or get-ok, its header and body frames); returns the
    /// method, the body, and the largest frame seen (whole frame, overhead included).
    pub async fn read_delivery(&mut self) -> (Method, Vec<u8>, usize) {
        let (channel, method) = self.read_method().await;
        assert!(
            method.has_content(),
            "expected a method with content, got {}",
            method.name()
        );
        let (body, largest) = self.read_content(channel).await;
        (method, body, largest)
    }

    /// Reads the next method, and its body when it carries content (a delivery, a get-ok, a
    /// return): replies and deliveries as they come.
    pub async fn read_command(&mut self) -> (Method, Option<Vec<u8>>) {
        let (channel, method) = self.read_method().await;
        if !method.has_content() {
            return (method, None);
        }
        let (body, _) = self.read_content(channel).await;
        (method, Some(body))
    }

    /// The header and body frames of a content on `channel`: the body, and the largest frame
    /// seen (whole frame, overhead included).
    async fn read_content(&mut self, channel: u16) -> (Vec<u8>, usize) {
        let mut largest = 0;
        let header = self
            .next_non_heartbeat()
            .await
            .expect("content header expected, got EOF");
        assert_eq!(
            header.kind,
            FrameKind::Header,
            "expected a content header frame"
        );
        assert_eq!(header.channel, channel, "content header on another channel");
        largest = largest.max(header.payload.len() + codec::FRAME_OVERHEAD);
        let (_, size) = codec::peek_content_header(&header.payload).expect("content header");
        let mut body = Vec::with_capacity(size as usize);
        while (body.len() as u64) < size {
            let f = self
                .next_non_heartbeat()
                .await
                .expect("body frame expected, got EOF");
            assert_eq!(
                f.kind,
                FrameKind::Body,
                "expected a body frame ({} of {size} bytes so far)",
                body.len()
            );
            assert_eq!(f.channel, channel, "body frame on another channel");
            largest = largest.max(f.payload.len() + codec::FRAME_OVERHEAD);
            body.extend_from_slice(&f.payload);
        }
        assert_eq!(
            body.len() as u64,
            size,
            "body longer than the header's body_size"
        );
        (body, largest)
    }

    /// Closes the connection politely: connection.close 200, waits for close-ok, then closes the
    /// socket (after close-ok it is the client's to close: RabbitMQ waits for it).
    pub async fn close(mut self) {
        let close = codec::ConnectionClose {
            reply_code: 200,
            reply_text: ss("bye"),
            class_id: 0,
            method_id: 0,
        };
        self.send_method(0, &Method::ConnectionClose(close)).await;
        loop {
            match self
                .read_frame()
                .await
                .expect("undecodable frame from the server")
            {
                None => panic!("the server closed the socket without connection.close-ok"),
                Some(f) if f.kind == FrameKind::Method && f.channel == 0 => {
                    if let Ok(Method::ConnectionCloseOk(_)) = Method::decode(f.payload) {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
        let _ = self.stream.shutdown().await;
    }

    /// Declares a queue, publishes to it, gets the message back (no-ack) and deletes the queue, all
    /// on `channel` (which must be open): proof that the connection does real work.
    pub async fn round_trip(&mut self, channel: u16) {
        let q = unique("raw");
        let declare = codec::QueueDeclare {
            queue: ss(&q),
            ..Default::default()
        };
        match self.call(channel, &Method::QueueDeclare(declare)).await {
            Method::QueueDeclareOk(ok) => assert_eq!(ok.queue, q.as_str()),
            m => panic!("expected queue.declare-ok, got {}", m.name()),
        }
        let frame_max = self.frame_max;
        self.publish(channel, "", &q, b"raw round trip", frame_max)
            .await;
        self.send_method(
            channel,
            &Method::BasicGet(codec::BasicGet {
                queue: ss(&q),
                no_ack: true,
                ..Default::default()
            }),
        )
        .await;
        let (m, body, _) = self.read_delivery().await;
        assert!(
            matches!(m, Method::BasicGetOk(_)),
            "expected basic.get-ok, got {}",
            m.name()
        );
        assert_eq!(body, b"raw round trip");
        match self
            .call(
                channel,
                &Method::QueueDelete(codec::QueueDelete {
                    queue: ss(&q),
                    ..Default::default()
                }),
            )
            .await
        {
            Method::QueueDeleteOk(_) => {}
            m => panic!("expected queue.delete-ok, got {}", m.name()),
        }
    }

    /// Stays connected and idle for `dur`, sending a heartbeat every `every` (`None`: sends nothing
    /// at all). Returns the number of heartbeats received meanwhile. Fails the test if the server
    /// sends anything but heartbeats, or closes the connection.
    pub async fn idle(&mut self, dur: Duration, every: Option<Duration>) -> usize {
        let end = tokio::time::Instant::now() + dur;
        let mut tick = tokio::time::interval(every.unwrap_or(dur + Duration::from_secs(1)));
        tick.tick().await;
        let before = self.heartbeats;
        loop {
            let mut beat = false;
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return self.heartbeats - before,
                _ = tick.tick(), if every.is_some() => beat = true,
                f = self.read_frame() => match f {
                    Ok(Some(f)) if f.kind == FrameKind::Heartbeat => {}
                    Ok(Some(f)) => {
                        let what = match Method::decode(f.payload.clone()) {
                            Ok(m) if f.kind == FrameKind::Method => format!("{m:?}"),
                            _ => format!("a {:?} frame", f.kind),
                        };
                        panic!("the server sent {what} on channel {} to an idle client", f.channel);
                    }
                    Ok(None) => panic!("the server dropped the idle client after {} heartbeats", self.heartbeats - before),
                    Err(e) => panic!("undecodable frame from the server: {e}"),
                },
            }
            if beat {
                let mut out = BytesMut::new();
                codec::write_heartbeat(&mut out);
                self.send(&out).await;
            }
        }
    }

    /// Drops the socket with an RST (SO_LINGER 0): the peer sees the client vanish.
    #[allow(deprecated)] // SO_LINGER 0 does not block on drop: it resets at once.
    pub fn vanish(self) {
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }
}

/// An application-level frame with arbitrary type, channel and payload.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v.push(codec::FRAME_END);
    v
}

// ---------------------------------------------------------------------------------------------
// A well-behaved client running alongside a misbehaving one

/// Publishes and consumes one message at a time on its own queue, through its own connection,
/// counting completed round trips.
pub struct Bystander {
    done: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), String>>,
}

impl Bystander {
    /// Connects, declares its queue and starts the round trips (returns after the first one).
    pub async fn start(addr: SocketAddr) -> Bystander {
        let conn = connect(addr).await;
        let (ch, _events) = open_channel(&conn).await;
        let queue = unique("bystander");
        declare_queue(&ch, &queue).await;
        let (ctag, mut rx) = consume(&ch, &queue, true).await;
        let (done_tx, done) = watch::channel(0u64);
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let _events = _events;
            let mut n: u64 = 0;
            let result = loop {
                if stop_rx.try_recv().is_ok() {
                    break Ok(());
                }
                let body = format!("bystander message {n}").into_bytes();
                let sent = ch.basic_publish(
                    BasicProperties::default(),
                    body.clone(),
                    BasicPublishArguments::new("", &queue),
                );
                if let Err(e) = tokio::time::timeout(STEP, sent)
                    .await
                    .map_err(|_| "publish timed out".to_string())
                {
                    break Err(e);
                }
                let got = match tokio::time::timeout(STEP, rx.recv()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(format!("consumer stream ended after {n} round trips")),
                    Err(_) => {
                        break Err(format!("no delivery within {STEP:?} after {n} round trips"));
                    }
                };
                if got.content.as_deref() != Some(&body[..]) {
                    break Err(format!(
                        "round trip {n}: got {:?}",
                        got.content
                            .map(|c| String::from_utf8_lossy(&c).into_owned())
                    ));
                }
                let tag = got.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
                if let Err(e) = ch.basic_ack(BasicAckArguments::new(tag, false)).await {
                    break Err(format!("ack failed: {e}"));
                }
                n += 1;
                let _ = done_tx.send(n);
            };
            // Cancel first: a broker-side cancel (queue deleted under the consumer) races
            // amqprs's connection.close.
            let cancel = BasicCancelArguments::new(&ctag);
            let _ = tokio::time::timeout(STEP, ch.basic_cancel(cancel)).await;
            delete_queue(&ch, &queue).await;
            let closed = tokio::time::timeout(STEP, conn.close()).await;
            match (result, closed) {
                (Err(e), _) => Err(e),
                (Ok(()), Ok(Ok(()))) => Ok(()),
                (Ok(()), other) => Err(format!("connection.close failed: {other:?}")),
            }
        });
        let mut b = Bystander {
            done,
            stop: Some(stop_tx),
            task,
        };
        b.assert_progress(1).await;
        b
    }

    /// Waits until `n` more round trips have completed from now.
    pub async fn assert_progress(&mut self, n: u64) {
        let target = *self.done.borrow() + n;
        let waited = tokio::time::timeout(STEP, self.done.wait_for(|&d| d >= target)).await;
        match waited {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
                let res = task.await;
                panic!("the well-behaved client stopped: {res:?}");
            }
            Err(_) => {
                panic!("the well-behaved client made no progress ({n} round trips) within {STEP:?}")
            }
        }
    }

    /// Stops the round trips and checks the client never saw an error and closes cleanly.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match within("the well-behaved client to stop", &mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the well-behaved client failed: {e}"),
            Err(e) => panic!("the well-behaved client panicked: {e}"),
        }
    }
}

/// One basic.get result, simplified.
#[derive(Debug, Clone)]
pub struct Got {
    pub tag: u64,
    pub redelivered: bool,
    /// Messages left in the queue, as get-ok reports it.
    pub message_count: u32,
    pub body: Vec<u8>,
}

/// basic.get; `None` for get-empty.
pub async fn get(ch: &Channel, queue: &str, no_ack: bool) -> Option<Got> {
    let args = amqprs::channel::BasicGetArguments::new(queue)
        .no_ack(no_ack)
        .finish();
    within(&format!("basic.get {queue}"), ch.basic_get(args))
        .await
        .unwrap_or_else(|e| panic!("basic.get {queue} failed: {e}"))
        .map(|(ok, _props, body)| Got {
            tag: ok.delivery_tag(),
            redelivered: ok.redelivered(),
            message_count: ok.message_count(),
            body,
        })
}

// ---------------------------------------------------------------------------------------------
// A RabbitMQ node that speaks only amqps (tests/tls.rs)

impl PrivateCluster {
    /// `scripts/rabbit.sh up-single-tls NAME auto CERT_DIR [verify-peer]` in a fresh state dir of
    /// its own: a one-node cluster whose only listener is amqps, with `CERT_DIR/ca.pem`,
    /// `server.pem` and `server.key`. With `verify_peer`, clients must present a certificate
    /// signed by `ca.pem`. Torn down when the guard is dropped.
    pub fn start_tls(name: &str, cert_dir: &Path, verify_peer: bool) -> PrivateCluster {
        let mut guard = PrivateCluster::fresh(name);
        let cert_dir = cert_dir.to_str().expect("UTF-8 certificate dir");
        let mut args = vec!["up-single-tls", name, "auto", cert_dir];
        if verify_peer {
            args.push("verify-peer");
        }
        let stdout = guard.rabbit(&args);
        let line = stdout.lines().last().unwrap_or_default().to_owned();
        let nodes: Vec<String> = line.split_whitespace().skip(1).map(str::to_owned).collect();
        assert_eq!(
            nodes.len(),
            1,
            "unexpected output of rabbit.sh up-single-tls: {stdout:?}"
        );
        guard.cluster.nodes = nodes;
        guard
    }
}

// ---------------------------------------------------------------------------------------------
// Waits with a deadline of their own (tests/sharding.rs)

impl Events {
    /// The next event, failing the test with `what` after `limit` (for bulk work that outlasts
    /// [`STEP`]).
    pub async fn next_for(&mut self, limit: Duration, what: &str) -> Event {
        within_for(limit, what, self.rx.recv())
            .await
            .expect("channel event stream ended")
    }

    /// Fails the test if the broker closed the channel; the other events received so far are
    /// dropped.
    pub fn assert_no_close(&mut self, who: &str) {
        while let Some(e) = self.try_next() {
            assert!(
                !matches!(e, Event::Close { .. }),
                "{who}: unexpected channel close: {e:?}"
            );
        }
    }
}

/// Polls `check` until it returns `Ok`, or fails the test after `limit` with `what` and the last
/// `Err` it returned (what it saw: a depth, a count). [`eventually`] with a deadline of one's own
/// and the last state in the failure.
pub async fn eventually_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut seen = String::from("nothing yet");
    let polled = tokio::time::timeout(limit, async {
        loop {
            match check().await {
                Ok(v) => return v,
                Err(s) => seen = s,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("not reached within {limit:?}: {what}; last seen: {seen}"))
}

/// Runs `scripts/rabbit.sh ctl NODE ARGS...`, i.e. `rabbitmqctl -n <node> ARGS...` against a node
/// of the test clusters (`shard-a-1`, `shard-a-2`, ...), and returns its stdout; fails the test on
/// a non-zero exit. The state dir is the one [`clusters`] got its clusters from: the caller's
/// `WARREN_RABBIT_DIR` (scripts/test.sh's) when `WARREN_TEST_CLUSTERS` is set, else
/// `target/test-rabbit`. Blocking: in an async test call it inside `tokio::task::block_in_place`.
pub fn rabbit_ctl(node: &str, args: &[&str]) -> String {
    let external = std::env::var("WARREN_TEST_CLUSTERS").is_ok_and(|s| !s.trim().is_empty());
    // Starts the local cluster when there is none yet.
    let _ = clusters();
    let mut cmd = ProcessCommand::new(rabbit_script());
    cmd.arg("ctl").arg(node).args(args);
    if !external {
        cmd.env("WARREN_RABBIT_DIR", repo_dir().join("target/test-rabbit"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbit.sh ctl {node}: {e}"));
    assert!(
        out.status.success(),
        "rabbit.sh ctl {node} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Appends basic.publish with its content to `out`, body frames split to `frame_max`: for a
/// test that sends it in one write with other frames.
pub fn encode_publish(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    frame_max: usize,
) {
    codec::write_method(
        out,
        channel,
        &Method::BasicPublish(codec::BasicPublish {
            ticket: 0,
            exchange: ss(exchange),
            routing_key: ss(routing_key),
            mandatory: false,
            immediate: false,
        }),
    );
    codec::write_header(
        out,
        channel,
        &ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: WireProperties::default(),
        },
    );
    codec::write_body(out, channel, body, frame_max);
}
