//! Sharding behaviour of the proxy, against three real RabbitMQ clusters.
//!
//! The proxy runs in-process in front of `shard-a` and `shard-b` (role "shard") and `control`
//! (role "control"), with the default routing rules (the Celery preset). Clients talk to it with
//! amqprs; what landed where is checked with direct amqprs connections to the first node of each
//! cluster.
//!
//! The clusters come from `WARREN_TEST_CLUSTERS`
//! (`shard-a=127.0.0.1:P1,127.0.0.1:P2;shard-b=...;control=...`, exported by `scripts/test.sh`).
//! All three are required: a missing one fails every test with a message naming it.
//!
//! Tests run in parallel against the same clusters, so every queue (and non-preset exchange) has
//! a unique name, and a guard deletes them on every cluster when the test ends, pass or fail.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicNackArguments, BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments, ExchangeDeleteArguments,
    QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use tokio::sync::mpsc;
use warren::ProxyHandle;
use warren::config::Config;

/// Deadline for one step (a round trip, a delivery, a close). Generous: the machine is small and
/// every queue is mirrored to a second node.
const STEP: Duration = Duration::from_secs(20);
/// Deadline for bulk work (thousands of messages reaching the queues).
const BULK: Duration = Duration::from_secs(120);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(1500);
/// Upper bound of the end-of-test cleanup.
const CLEANUP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Clusters

struct Clusters {
    shard_a: Vec<String>,
    shard_b: Vec<String>,
    control: Vec<String>,
}

/// The three clusters, from `WARREN_TEST_CLUSTERS`; fails naming any that is missing.
fn clusters() -> &'static Clusters {
    static CLUSTERS: OnceLock<Clusters> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let spec = std::env::var("WARREN_TEST_CLUSTERS").unwrap_or_default();
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        for entry in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, nodes)) = entry.split_once('=') else {
                panic!("bad WARREN_TEST_CLUSTERS entry {entry:?}: expected name=host:port,...")
            };
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
            found.push((name.trim().to_owned(), nodes));
        }
        let missing: Vec<&str> = ["shard-a", "shard-b", "control"]
            .into_iter()
            .filter(|n| !found.iter().any(|(f, _)| f == n))
            .collect();
        assert!(
            missing.is_empty(),
            "the sharding tests need three RabbitMQ clusters (shard-a, shard-b, control); \
             WARREN_TEST_CLUSTERS={spec:?} lacks {missing:?}. Run them through scripts/test.sh, \
             or start each with `scripts/rabbit.sh up NAME auto auto` and export \
             WARREN_TEST_CLUSTERS=\"shard-a=H:P,H:P;shard-b=H:P,H:P;control=H:P,H:P\""
        );
        let take = |name: &str| {
            found
                .iter()
                .find(|(f, _)| f == name)
                .map(|(_, n)| n.clone())
                .unwrap_or_default()
        };
        Clusters {
            shard_a: take("shard-a"),
            shard_b: take("shard-b"),
            control: take("control"),
        }
    })
}

fn resolve(addr: &str) -> SocketAddr {
    addr.to_socket_addrs()
        .unwrap_or_else(|e| panic!("cannot resolve {addr}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{addr} resolves to nothing"))
}

/// The three clusters by name, for direct checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cl {
    A,
    B,
    Control,
}

impl Cl {
    const ALL: [Cl; 3] = [Cl::A, Cl::B, Cl::Control];

    fn name(self) -> &'static str {
        match self {
            Cl::A => "shard-a",
            Cl::B => "shard-b",
            Cl::Control => "control",
        }
    }

    fn addr(self) -> SocketAddr {
        let c = clusters();
        let nodes = match self {
            Cl::A => &c.shard_a,
            Cl::B => &c.shard_b,
            Cl::Control => &c.control,
        };
        resolve(&nodes[0])
    }
}

// ---------------------------------------------------------------------------------------------
// Small utilities

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
    }
}

fn init_tracing() {
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

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// A name no other test (nor an earlier run) uses.
fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "warren-test.sharding.{prefix}.{}.{}.{n}",
        std::process::id(),
        nanos() % 1_000_000_000_000
    )
}

/// A fresh UUID-shaped name (8-4-4-4-12 lowercase hex).
fn uuid() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u128;
    let t = nanos();
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

// ---------------------------------------------------------------------------------------------
// The proxy

fn toml_nodes(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A proxy running on a runtime of its own (two threads), as it would in its own process: a proxy
/// task that never yields cannot stall the test's clients and timeouts, so such a bug fails the
/// test with a timeout instead of hanging the whole binary.
struct Proxy {
    handle: Option<ProxyHandle>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    fn amqp_addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("proxy running").amqp_addr()
    }

    async fn shutdown(mut self) {
        let handle = self.handle.take().expect("proxy running");
        let done = self
            .runtime
            .as_ref()
            .expect("proxy runtime")
            .spawn(handle.shutdown());
        done.await.expect("proxy shutdown task");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.handle = None;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A proxy on 127.0.0.1:0 in front of shard-a, shard-b (shards) and control, Celery preset.
async fn start_proxy() -> Proxy {
    init_tracing();
    let c = clusters();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\n[timeouts]\nshutdown_grace_ms = 100\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        toml_nodes(&c.shard_a),
        toml_nodes(&c.shard_b),
        toml_nodes(&c.control)
    );
    let config = Config::parse(&text, "sharding-test.toml")
        .unwrap_or_else(|e| panic!("test proxy config rejected: {e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("test-proxy")
        .enable_all()
        .build()
        .expect("proxy runtime");
    let started = runtime.spawn(warren::start(Arc::new(config)));
    let mut proxy = Proxy {
        handle: None,
        runtime: Some(runtime),
    };
    let handle = within("the proxy to start", started)
        .await
        .expect("proxy start task")
        .expect("start the proxy");
    proxy.handle = Some(handle);
    proxy
}

// ---------------------------------------------------------------------------------------------
// amqprs helpers

async fn connect(addr: SocketAddr) -> Connection {
    let args = OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest");
    within(
        &format!("amqprs connection to {addr}"),
        Connection::open(&args),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

async fn close_connection(conn: Connection) {
    within("connection.close", conn.close())
        .await
        .expect("connection.close failed");
}

/// Something the broker sent on a channel on its own initiative.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Close { code: u16, text: String },
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, multiple: bool },
    Return { code: u16, body: Vec<u8> },
    Cancel { consumer_tag: String },
}

struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    async fn next(&mut self) -> Event {
        within(
            "a channel event (close, confirm, return, cancel)",
            self.rx.recv(),
        )
        .await
        .expect("channel event stream ended")
    }

    fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    async fn expect_close(&mut self) -> (u16, String) {
        loop {
            if let Event::Close { code, text } = self.next().await {
                return (code, text);
            }
        }
    }

    /// Fails if the channel was closed by the server (events other than close are dropped).
    fn assert_no_close(&mut self, who: &str) {
        while let Some(e) = self.try_next() {
            assert!(
                !matches!(e, Event::Close { .. }),
                "{who}: unexpected channel close: {e:?}"
            );
        }
    }
}

struct EventCallback {
    tx: mpsc::UnboundedSender<Event>,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// amqprs's callback traits are `#[async_trait]`; this is the expanded form.
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
            body: content,
        });
        Box::pin(async {})
    }
}

async fn open_channel(conn: &Connection) -> (Channel, Events) {
    let ch = within("channel.open", conn.open_channel(None))
        .await
        .expect("channel.open failed");
    let (tx, rx) = mpsc::unbounded_channel();
    ch.register_callback(EventCallback { tx })
        .await
        .expect("register channel callback");
    (ch, Events { rx })
}

async fn declare(ch: &Channel, args: QueueDeclareArguments) -> (u32, u32) {
    let what = format!("queue.declare {args:?}");
    let r = within(&what, ch.queue_declare(args))
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"));
    let (_, messages, consumers) = r.expect("declare-ok");
    (messages, consumers)
}

/// Declares a transient, non-exclusive queue.
async fn declare_queue(ch: &Channel, name: &str) {
    declare(ch, QueueDeclareArguments::new(name)).await;
}

/// Ready messages of a queue on a cluster (passive declare on a fresh channel), or `None` when
/// the cluster does not have the queue (404). Any other failure fails the test.
async fn depth_on(conn: &Connection, name: &str) -> Option<u32> {
    let (ch, mut events) = open_channel(conn).await;
    let args = QueueDeclareArguments::new(name).passive(true).finish();
    match within(
        &format!("passive queue.declare {name}"),
        ch.queue_declare(args),
    )
    .await
    {
        Ok(r) => {
            let _ = within("channel.close", ch.close()).await;
            Some(r.expect("declare-ok").1)
        }
        Err(e) => {
            let (code, text) = events.expect_close().await;
            assert_eq!(
                code, 404,
                "passive queue.declare {name}: expected 404 or success, got {code} {text} ({e})"
            );
            None
        }
    }
}

/// Whether an exchange exists on a cluster (passive declare on a fresh channel).
async fn exchange_exists(conn: &Connection, name: &str, kind: &str) -> bool {
    let (ch, mut events) = open_channel(conn).await;
    let args = ExchangeDeclareArguments::new(name, kind)
        .passive(true)
        .finish();
    match within(
        &format!("passive exchange.declare {name}"),
        ch.exchange_declare(args),
    )
    .await
    {
        Ok(()) => {
            let _ = within("channel.close", ch.close()).await;
            true
        }
        Err(e) => {
            let (code, text) = events.expect_close().await;
            assert_eq!(
                code, 404,
                "passive exchange.declare {name}: expected 404 or success, got {code} {text} ({e})"
            );
            false
        }
    }
}

/// Direct connections to the first node of each cluster.
struct Direct {
    a: Connection,
    b: Connection,
    control: Connection,
}

impl Direct {
    async fn open() -> Direct {
        Direct {
            a: connect(Cl::A.addr()).await,
            b: connect(Cl::B.addr()).await,
            control: connect(Cl::Control.addr()).await,
        }
    }

    fn conn(&self, c: Cl) -> &Connection {
        match c {
            Cl::A => &self.a,
            Cl::B => &self.b,
            Cl::Control => &self.control,
        }
    }

    async fn depth(&self, c: Cl, queue: &str) -> Option<u32> {
        depth_on(self.conn(c), queue).await
    }

    /// Ready messages of a queue that must exist on both shard clusters.
    async fn shard_depths(&self, queue: &str) -> (u32, u32) {
        let a = self
            .depth(Cl::A, queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} does not exist on shard-a"));
        let b = self
            .depth(Cl::B, queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} does not exist on shard-b"));
        (a, b)
    }

    /// Polls the shard depths until `done` holds, failing after `limit` with the last depths.
    async fn wait_shard_depths(
        &self,
        queue: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(u32, u32) -> bool,
    ) -> (u32, u32) {
        let deadline = Instant::now() + limit;
        loop {
            let (a, b) = self.shard_depths(queue).await;
            if done(a, b) {
                return (a, b);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {limit:?}; shard-a has {a}, shard-b has {b} in {queue}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls one cluster's depth of a queue until it is `expected`.
    async fn wait_depth(&self, c: Cl, queue: &str, expected: u32) {
        let deadline = Instant::now() + STEP;
        loop {
            let d = self.depth(c, queue).await;
            if d == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} should have {expected} messages in {queue}, has {d:?}",
                c.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes `bodies` directly to one cluster, to the default exchange, waiting for the
    /// broker's confirms.
    async fn publish(&self, c: Cl, queue: &str, bodies: &[&str]) {
        let (ch, mut events) = open_channel(self.conn(c)).await;
        within(
            "confirm.select",
            ch.confirm_select(ConfirmSelectArguments::default()),
        )
        .await
        .expect("confirm.select");
        for body in bodies {
            publish(&ch, "", queue, body.as_bytes()).await;
        }
        let mut pending: BTreeSet<u64> = (1..=bodies.len() as u64).collect();
        while !pending.is_empty() {
            match events.next().await {
                Event::Ack {
                    tag,
                    multiple: true,
                } => pending.retain(|&t| t > tag),
                Event::Ack {
                    tag,
                    multiple: false,
                } => {
                    pending.remove(&tag);
                }
                other => panic!(
                    "direct publish to {} {queue}: unexpected {other:?}",
                    c.name()
                ),
            }
        }
        let _ = within("channel.close", ch.close()).await;
    }

    /// Deletes a queue directly on one cluster.
    async fn delete_queue(&self, c: Cl, queue: &str) {
        let (ch, _events) = open_channel(self.conn(c)).await;
        within(
            &format!("queue.delete {queue} on {}", c.name()),
            ch.queue_delete(QueueDeleteArguments::new(queue)),
        )
        .await
        .unwrap_or_else(|e| panic!("queue.delete {queue} on {} failed: {e}", c.name()));
        let _ = within("channel.close", ch.close()).await;
    }

    async fn close(self) {
        for conn in [self.a, self.b, self.control] {
            let _ = tokio::time::timeout(STEP, conn.close()).await;
        }
    }
}

async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    publish_with(ch, BasicPublishArguments::new(exchange, routing_key), body).await;
}

async fn publish_with(ch: &Channel, args: BasicPublishArguments, body: &[u8]) {
    within(
        "basic.publish",
        ch.basic_publish(BasicProperties::default(), body.to_vec(), args),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.publish failed: {e}"));
}

/// Publishes `msg-{i}` for i in `range` (message id = i) to the default exchange.
async fn publish_numbered(ch: &Channel, queue: &str, range: std::ops::Range<usize>) {
    for i in range {
        let props = BasicProperties::default()
            .with_message_id(&i.to_string())
            .finish();
        let body = format!("msg-{i}").into_bytes();
        within(
            "basic.publish",
            ch.basic_publish(props, body, BasicPublishArguments::new("", queue)),
        )
        .await
        .unwrap_or_else(|e| panic!("basic.publish {i} failed: {e}"));
    }
}

fn index_of(body: &[u8]) -> usize {
    let s = std::str::from_utf8(body).unwrap_or_else(|_| panic!("non-UTF-8 body {body:?}"));
    s.strip_prefix("msg-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {s:?}"))
}

async fn consume(
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

struct Delivery {
    tag: u64,
    redelivered: bool,
    body: Vec<u8>,
}

fn delivery(m: ConsumerMessage) -> Delivery {
    let d = m.deliver.expect("deliver");
    Delivery {
        tag: d.delivery_tag(),
        redelivered: d.redelivered(),
        body: m.content.unwrap_or_default(),
    }
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, multiple)),
    )
    .await
    .expect("basic.ack");
}

// ---------------------------------------------------------------------------------------------
// Cleanup

/// Deletes the test's queues and exchanges on every cluster when dropped, pass or fail (on a
/// thread of its own: drop cannot await).
#[derive(Default)]
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    fn queue(&mut self, name: &str) -> String {
        self.queues.push(name.to_owned());
        name.to_owned()
    }

    fn exchange(&mut self, name: &str) -> String {
        self.exchanges.push(name.to_owned());
        name.to_owned()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // Bounded: a cleanup must never hang the test binary.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let op = Duration::from_secs(5);
            let work = async move {
                for c in Cl::ALL {
                    let addr = c.addr();
                    let args = OpenConnectionArguments::new(
                        &addr.ip().to_string(),
                        addr.port(),
                        "guest",
                        "guest",
                    );
                    let Ok(Ok(conn)) = tokio::time::timeout(op, Connection::open(&args)).await
                    else {
                        continue;
                    };
                    // A fresh channel per deletion: a failure closes the channel.
                    for q in &queues {
                        if let Ok(Ok(ch)) = tokio::time::timeout(op, conn.open_channel(None)).await
                        {
                            let delete = ch.queue_delete(QueueDeleteArguments::new(q));
                            let _ = tokio::time::timeout(op, delete).await;
                            let _ = tokio::time::timeout(op, ch.close()).await;
                        }
                    }
                    for x in &exchanges {
                        if let Ok(Ok(ch)) = tokio::time::timeout(op, conn.open_channel(None)).await
                        {
                            let delete = ch.exchange_delete(ExchangeDeleteArguments::new(x));
                            let _ = tokio::time::timeout(op, delete).await;
                            let _ = tokio::time::timeout(op, ch.close()).await;
                        }
                    }
                    let _ = tokio::time::timeout(op, conn.close()).await;
                }
            };
            // The timeout is made inside the runtime (it needs its timer).
            let _ = rt.block_on(async move { tokio::time::timeout(CLEANUP, work).await });
            rt.shutdown_background();
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(CLEANUP + Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Round-robin publishes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_spread_evenly_over_the_shard_clusters() {
    const N: usize = 10_000;
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("spread"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare(&ch, QueueDeclareArguments::durable_client_named(&queue)).await;
    publish_numbered(&ch, &queue, 0..N).await;

    let (a, b) = direct
        .wait_shard_depths(&queue, BULK, "all 10,000 messages in the queues", |a, b| {
            a as usize + b as usize >= N
        })
        .await;
    println!("10,000 publishes on one channel: shard-a {a}, shard-b {b}");
    assert_eq!(
        a as usize + b as usize,
        N,
        "shard-a {a} + shard-b {b} must be exactly {N}"
    );
    for (name, d) in [("shard-a", a), ("shard-b", b)] {
        assert!(
            (4_900..=5_100).contains(&d),
            "{name} got {d} of {N} messages: not within 2% of 5,000 (shard-a {a}, shard-b {b})"
        );
    }
    assert_eq!(
        direct.depth(Cl::Control, &queue).await,
        None,
        "the control cluster must not have the sharded queue {queue}"
    );
    events.assert_no_close("publisher");

    within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete through the proxy");
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 2. One consumer gets every message once, with every kind of acknowledgement

#[derive(Default, Debug)]
struct AckStats {
    single_acks: u32,
    multiple_acks: u32,
    nacks: u32,
    multiple_nacks: u32,
    rejects: u32,
    redeliveries: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_gets_every_message_exactly_once_with_mixed_acks() {
    const N: usize = 10_000;
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("consume-all"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (pub_ch, mut pub_events) = open_channel(&conn).await;
    declare(&pub_ch, QueueDeclareArguments::durable_client_named(&queue)).await;
    publish_numbered(&pub_ch, &queue, 0..N).await;
    let (a, b) = direct
        .wait_shard_depths(&queue, BULK, "all 10,000 messages in the queues", |a, b| {
            a as usize + b as usize >= N
        })
        .await;
    assert_eq!(a as usize + b as usize, N);
    assert!(
        a > 0 && b > 0,
        "both shard clusters should hold messages (shard-a {a}, shard-b {b})"
    );

    let (ch, mut events) = open_channel(&conn).await;
    within(
        "basic.qos",
        ch.basic_qos(BasicQosArguments::new(0, 300, false)),
    )
    .await
    .expect("basic.qos");
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;

    let mut deliveries = vec![0u32; N];
    let mut requeues = vec![0u32; N];
    let mut acked = vec![false; N];
    let mut acked_count = 0usize;
    let mut batch: Vec<(u64, usize)> = Vec::new();
    let mut batches = 0u32;
    let mut stats = AckStats::default();
    let mut last_progress = Instant::now();

    while acked_count < N {
        let m = match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!(
                "consumer stream ended after {acked_count} acks ({stats:?}); channel events: {:?}",
                events.try_next()
            ),
            Err(_) => {
                // Nothing more for now: settle the deferred batch, or give up after a while.
                if let Some(&(tag, _)) = batch.last() {
                    ack(&ch, tag, true).await;
                    stats.multiple_acks += 1;
                    for (_, i) in batch.drain(..) {
                        acked[i] = true;
                        acked_count += 1;
                    }
                    last_progress = Instant::now();
                } else {
                    assert!(
                        last_progress.elapsed() < STEP,
                        "no delivery for {STEP:?} with {acked_count} of {N} acked ({stats:?}); \
                         never delivered: {:?}",
                        (0..N)
                            .filter(|&i| deliveries[i] == 0)
                            .take(20)
                            .collect::<Vec<_>>()
                    );
                }
                continue;
            }
        };
        last_progress = Instant::now();
        let d = delivery(m);
        let i = index_of(&d.body);
        assert!(
            !acked[i],
            "message {i} delivered again (tag {}, redelivered {}) after it was acked",
            d.tag, d.redelivered
        );
        deliveries[i] += 1;
        assert_eq!(
            deliveries[i],
            requeues[i] + 1,
            "message {i} delivered {} times but requeued only {} times (redelivered flag {})",
            deliveries[i],
            requeues[i],
            d.redelivered
        );
        assert_eq!(
            d.redelivered,
            requeues[i] > 0,
            "message {i}: redelivered flag {} after {} requeues",
            d.redelivered,
            requeues[i]
        );
        if d.redelivered {
            stats.redeliveries += 1;
            if i % 2 == 1 {
                ack(&ch, d.tag, false).await;
                stats.single_acks += 1;
                acked[i] = true;
                acked_count += 1;
            } else {
                batch.push((d.tag, i));
            }
        } else if i.is_multiple_of(13) {
            within(
                "basic.nack",
                ch.basic_nack(BasicNackArguments::new(d.tag, false, true)),
            )
            .await
            .expect("basic.nack");
            stats.nacks += 1;
            requeues[i] += 1;
        } else if i.is_multiple_of(17) {
            within(
                "basic.reject",
                ch.basic_reject(BasicRejectArguments::new(d.tag, true)),
            )
            .await
            .expect("basic.reject");
            stats.rejects += 1;
            requeues[i] += 1;
        } else if i.is_multiple_of(5) {
            ack(&ch, d.tag, false).await;
            stats.single_acks += 1;
            acked[i] = true;
            acked_count += 1;
        } else {
            batch.push((d.tag, i));
        }
        // Everything older than the batch is settled, so a `multiple` covers exactly the batch.
        if batch.len() as u32 > batches % 40 {
            batches += 1;
            let tag = batch.last().map(|b| b.0).unwrap_or_default();
            if batches.is_multiple_of(7) {
                within(
                    "basic.nack",
                    ch.basic_nack(BasicNackArguments::new(tag, true, true)),
                )
                .await
                .expect("basic.nack");
                stats.multiple_nacks += 1;
                for (_, i) in batch.drain(..) {
                    requeues[i] += 1;
                }
            } else {
                ack(&ch, tag, true).await;
                stats.multiple_acks += 1;
                for (_, i) in batch.drain(..) {
                    acked[i] = true;
                    acked_count += 1;
                }
            }
        }
    }
    println!("consumed {N} messages: {stats:?}");

    // Nothing more comes, nothing failed.
    tokio::time::sleep(QUIET).await;
    if let Ok(m) = rx.try_recv() {
        let d = delivery(m);
        panic!(
            "unexpected delivery after every message was acked: {:?} redelivered {}",
            String::from_utf8_lossy(&d.body),
            d.redelivered
        );
    }
    events.assert_no_close("consumer");
    pub_events.assert_no_close("publisher");
    assert!(ch.is_open(), "the consumer's channel was closed");
    let never: Vec<usize> = (0..N).filter(|&i| !acked[i]).collect();
    assert!(never.is_empty(), "messages never acked: {never:?}");
    assert!(
        stats.single_acks > 0
            && stats.multiple_acks > 0
            && stats.nacks > 0
            && stats.multiple_nacks > 0
            && stats.rejects > 0,
        "every kind of acknowledgement should have been used: {stats:?}"
    );
    let expected_redeliveries: u32 = requeues.iter().sum();
    assert_eq!(
        stats.redeliveries, expected_redeliveries,
        "every requeued message comes back exactly once per requeue"
    );

    // Through the proxy and on each cluster: nothing left.
    let (ready, consumers) = declare(
        &ch,
        QueueDeclareArguments::new(&queue).passive(true).finish(),
    )
    .await;
    assert_eq!(
        (ready, consumers),
        (0, 1),
        "passive declare through the proxy after all acks"
    );
    close_connection(conn).await;
    // Closing requeues anything unacknowledged: so an empty queue now means everything was acked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = direct.shard_depths(&queue).await;
    assert_eq!(
        (a, b),
        (0, 0),
        "queues must be empty on both shard clusters after all acks (shard-a {a}, shard-b {b})"
    );
    assert_eq!(
        direct.depth(Cl::Control, &queue).await,
        None,
        "the control cluster must not have the sharded queue"
    );

    within("proxy shutdown", proxy.shutdown()).await;
    for c in [Cl::A, Cl::B] {
        direct.delete_queue(c, &queue).await;
    }
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Publisher confirms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_is_confirmed_exactly_once() {
    const N: u64 = 2_000;
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("confirms"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    // Every tenth publish goes to an rpc reply queue (a UUID: control traffic), so the client's
    // sequence numbers are spread over three upstream channels.
    let rpc_queue = cleanup.queue(&uuid());
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    declare_queue(&ch, &rpc_queue).await;
    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectArguments::default()),
    )
    .await
    .expect("confirm.select");
    for i in 0..N as usize {
        let target = if i % 10 == 9 { &rpc_queue } else { &queue };
        publish_numbered(&ch, target, i..i + 1).await;
    }

    let mut outstanding: BTreeSet<u64> = (1..=N).collect();
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let (mut singles, mut multiples) = (0u32, 0u32);
    while !outstanding.is_empty() {
        let e = within_for(BULK, "publisher confirms", events.rx.recv())
            .await
            .expect("event stream ended");
        match e {
            Event::Ack { tag, multiple } => {
                assert!(
                    (1..=N).contains(&tag),
                    "ack for sequence number {tag} (multiple {multiple}): only 1..={N} were published"
                );
                assert!(
                    !confirmed.contains(&tag),
                    "sequence number {tag} acked twice (multiple {multiple})"
                );
                if multiple {
                    multiples += 1;
                    let covered: Vec<u64> = outstanding.range(..=tag).copied().collect();
                    for t in covered {
                        outstanding.remove(&t);
                        confirmed.insert(t);
                    }
                } else {
                    singles += 1;
                    assert!(
                        outstanding.remove(&tag),
                        "sequence number {tag} acked but not outstanding"
                    );
                    confirmed.insert(tag);
                }
            }
            other => panic!(
                "unexpected event in confirm mode: {other:?} ({} still unconfirmed)",
                outstanding.len()
            ),
        }
    }
    println!("{N} confirms: {singles} single acks, {multiples} multiple acks");
    assert_eq!(confirmed, (1..=N).collect::<BTreeSet<_>>());
    // Nothing more: no duplicate ack after the last one.
    tokio::time::sleep(QUIET).await;
    if let Some(e) = events.try_next() {
        panic!("unexpected event after every publish was confirmed: {e:?}");
    }
    let sharded = N - N / 10;
    let (a, b) = direct
        .wait_shard_depths(
            &queue,
            STEP,
            "all confirmed messages in the queues",
            |a, b| u64::from(a + b) >= sharded,
        )
        .await;
    assert_eq!(u64::from(a + b), sharded, "shard-a {a} + shard-b {b}");
    assert!(
        a > 0 && b > 0,
        "confirmed publishes should be spread over both shard clusters (shard-a {a}, shard-b {b})"
    );
    direct
        .wait_depth(Cl::Control, &rpc_queue, (N / 10) as u32)
        .await;

    for q in [&queue, &rpc_queue] {
        within(
            "queue.delete",
            ch.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await
        .expect("queue.delete");
    }
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A conflicting declaration on one cluster is the client's 406

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_arguments_on_one_cluster_give_406() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("conflict"));
    let other = cleanup.queue(&unique("conflict-after"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    // Only shard-b has the queue, with x-max-length = 10.
    {
        let (ch, _events) = open_channel(&direct.b).await;
        let mut args = FieldTable::new();
        args.insert("x-max-length".try_into().unwrap(), FieldValue::l(10));
        declare(
            &ch,
            QueueDeclareArguments::new(&queue).arguments(args).finish(),
        )
        .await;
        let _ = within("channel.close", ch.close()).await;
    }
    assert_eq!(
        direct.depth(Cl::A, &queue).await,
        None,
        "precondition: shard-a has no {queue}"
    );

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    let r = within(
        "queue.declare with conflicting arguments",
        ch.queue_declare(QueueDeclareArguments::new(&queue)),
    )
    .await;
    assert!(
        r.is_err(),
        "queue.declare without arguments of a queue that has x-max-length on shard-b should fail, got {r:?}"
    );
    let (code, text) = events.expect_close().await;
    assert_eq!(
        code, 406,
        "expected 406 PRECONDITION_FAILED, got {code} {text}"
    );
    assert!(
        text.starts_with("PRECONDITION_FAILED"),
        "reply text {text:?}"
    );
    assert!(
        text.contains("x-max-length"),
        "reply text should name the argument: {text:?}"
    );

    // The connection survives: a new channel works.
    assert!(
        conn.is_open(),
        "the connection must survive a channel error"
    );
    let (ch2, mut events2) = open_channel(&conn).await;
    declare_queue(&ch2, &other).await;
    publish(&ch2, "", &other, b"after the 406").await;
    let (a, b) = direct
        .wait_shard_depths(&other, STEP, "the message after the 406", |a, b| a + b >= 1)
        .await;
    assert_eq!(a + b, 1);
    events2.assert_no_close("second channel");
    within(
        "queue.delete",
        ch2.queue_delete(QueueDeleteArguments::new(&other)),
    )
    .await
    .expect("queue.delete");

    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Passive declare and purge sum the clusters' counts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare_and_purge_sum_the_clusters() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("counts"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    assert_eq!(
        direct.shard_depths(&queue).await,
        (0, 0),
        "declared through the proxy: empty on both shard clusters"
    );

    direct.publish(Cl::A, &queue, &["a1", "a2", "a3"]).await;
    direct
        .publish(Cl::B, &queue, &["b1", "b2", "b3", "b4", "b5"])
        .await;
    direct.wait_depth(Cl::A, &queue, 3).await;
    direct.wait_depth(Cl::B, &queue, 5).await;

    let (ready, consumers) = declare(
        &ch,
        QueueDeclareArguments::new(&queue).passive(true).finish(),
    )
    .await;
    assert_eq!(
        ready, 8,
        "passive queue.declare through the proxy: 3 on shard-a + 5 on shard-b"
    );
    assert_eq!(consumers, 0);
    // A plain (non-passive) redeclaration reports the sum too.
    let (ready, _) = declare(&ch, QueueDeclareArguments::new(&queue)).await;
    assert_eq!(
        ready, 8,
        "queue.declare through the proxy: 3 on shard-a + 5 on shard-b"
    );

    let purged = within(
        "queue.purge",
        ch.queue_purge(QueuePurgeArguments::new(&queue)),
    )
    .await
    .expect("queue.purge");
    assert_eq!(
        purged,
        Some(8),
        "queue.purge through the proxy returns the sum of the clusters' counts"
    );
    assert_eq!(
        direct.shard_depths(&queue).await,
        (0, 0),
        "after the purge both shard clusters are empty"
    );
    let (ready, _) = declare(
        &ch,
        QueueDeclareArguments::new(&queue).passive(true).finish(),
    )
    .await;
    assert_eq!(ready, 0);
    events.assert_no_close("client");

    // queue.delete reports the sum too.
    direct.publish(Cl::A, &queue, &["a4", "a5"]).await;
    direct
        .publish(Cl::B, &queue, &["b6", "b7", "b8", "b9"])
        .await;
    direct.wait_depth(Cl::A, &queue, 2).await;
    direct.wait_depth(Cl::B, &queue, 4).await;
    let deleted = within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete");
    assert_eq!(
        deleted,
        Some(6),
        "queue.delete through the proxy: 2 on shard-a + 4 on shard-b"
    );
    assert_eq!(
        direct.depth(Cl::A, &queue).await,
        None,
        "queue.delete through the proxy removes the queue from shard-a"
    );
    assert_eq!(
        direct.depth(Cl::B, &queue).await,
        None,
        "queue.delete through the proxy removes the queue from shard-b"
    );
    events.assert_no_close("client");
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Prefetch

/// Consumes without acking for a while, then acks one at a time; returns the largest number of
/// unacknowledged deliveries the client ever held.
async fn hold_and_ack(
    ch: &Channel,
    rx: &mut mpsc::UnboundedReceiver<(String, ConsumerMessage)>,
    total: usize,
    prefetch: usize,
) -> usize {
    let mut outstanding: VecDeque<u64> = VecDeque::new();
    let mut max = 0usize;
    let mut received = 0usize;

    // Without acking, the deliveries stop at the window.
    let until = Instant::now() + QUIET;
    while let Ok(Some((_, m))) =
        tokio::time::timeout(until.saturating_duration_since(Instant::now()), rx.recv()).await
    {
        outstanding.push_back(delivery(m).tag);
        received += 1;
        max = max.max(outstanding.len());
    }
    assert!(
        !outstanding.is_empty(),
        "no delivery at all with a prefetch of {prefetch}"
    );
    assert!(
        outstanding.len() <= prefetch,
        "with a prefetch of {prefetch} and no acks, the client holds {} unacknowledged deliveries",
        outstanding.len()
    );
    println!(
        "prefetch {prefetch}: {} deliveries held before the first ack",
        outstanding.len()
    );

    // Ack one at a time; after each ack, take whatever arrives and count again.
    let mut acked = 0usize;
    while acked < total {
        let wait = if outstanding.is_empty() {
            STEP
        } else {
            Duration::from_millis(20)
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some((_, m))) => {
                outstanding.push_back(delivery(m).tag);
                received += 1;
                max = max.max(outstanding.len());
                assert!(
                    outstanding.len() <= prefetch,
                    "prefetch {prefetch}: the client holds {} unacknowledged deliveries ({acked} acked, {received} received)",
                    outstanding.len()
                );
                continue;
            }
            Ok(None) => panic!("consumer stream ended after {received} deliveries"),
            Err(_) if outstanding.is_empty() => {
                panic!("no delivery within {STEP:?} with {acked} of {total} acked")
            }
            Err(_) => {}
        }
        let tag = outstanding.pop_front().expect("non-empty");
        ack(ch, tag, false).await;
        acked += 1;
    }
    assert_eq!(received, total, "every message delivered once");
    max
}

/// Deletes a queue that has a consumer through the proxy; as with RabbitMQ, the consumer is then
/// cancelled (basic.cancel). Waiting for that before closing the connection also sidesteps an
/// amqprs race (its connection.close fails with "channel closed" when a basic.cancel is in
/// flight; seen against RabbitMQ directly too).
async fn delete_consumed_queue(ch: &Channel, events: &mut Events, queue: &str, ctag: &str) {
    within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(queue)),
    )
    .await
    .expect("queue.delete");
    match events.next().await {
        Event::Cancel { consumer_tag } => {
            assert_eq!(consumer_tag, ctag, "basic.cancel after queue.delete")
        }
        other => panic!("expected basic.cancel for {ctag} after deleting {queue}, got {other:?}"),
    }
}

/// Forwards several consumers' deliveries into one stream (with their consumer tags).
fn merge(
    rxs: Vec<mpsc::UnboundedReceiver<ConsumerMessage>>,
) -> mpsc::UnboundedReceiver<(String, ConsumerMessage)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for mut r in rxs {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(m) = r.recv().await {
                let tag = m
                    .deliver
                    .as_ref()
                    .map(|d| d.consumer_tag().clone())
                    .unwrap_or_default();
                if tx.send((tag, m)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unacked_deliveries_across_shards() {
    const N: usize = 200;
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("prefetch"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    publish_numbered(&ch, &queue, 0..N).await;
    let (a, b) = direct
        .wait_shard_depths(&queue, STEP, "200 messages", |a, b| {
            a as usize + b as usize >= N
        })
        .await;
    assert!(
        a > 0 && b > 0,
        "messages on both shard clusters (shard-a {a}, shard-b {b})"
    );

    within(
        "basic.qos",
        ch.basic_qos(BasicQosArguments::new(0, 10, false)),
    )
    .await
    .expect("basic.qos");
    let (ctag, rx) = consume(&ch, &queue, true).await;
    let mut rx = merge(vec![rx]);
    let max = hold_and_ack(&ch, &mut rx, N, 10).await;
    println!("prefetch 10 (per consumer): at most {max} unacknowledged");
    assert!((1..=10).contains(&max), "max outstanding {max}");
    events.assert_no_close("consumer");
    assert_eq!(direct.shard_depths(&queue).await, (0, 0));

    delete_consumed_queue(&ch, &mut events, &queue, &ctag).await;
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_bounds_unacked_deliveries_of_the_channel() {
    const PER_QUEUE: usize = 100;
    let mut cleanup = Cleanup::default();
    let q1 = cleanup.queue(&unique("prefetch-global-1"));
    let q2 = cleanup.queue(&unique("prefetch-global-2"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    for q in [&q1, &q2] {
        declare_queue(&ch, q).await;
        publish_numbered(&ch, q, 0..PER_QUEUE).await;
    }
    for q in [&q1, &q2] {
        direct
            .wait_shard_depths(q, STEP, "100 messages", |a, b| {
                a as usize + b as usize >= PER_QUEUE
            })
            .await;
    }

    // global = true: one window shared by both consumers of the channel.
    within(
        "basic.qos",
        ch.basic_qos(BasicQosArguments::new(0, 10, true)),
    )
    .await
    .expect("basic.qos global");
    let (t1, rx1) = consume(&ch, &q1, true).await;
    let (t2, rx2) = consume(&ch, &q2, true).await;
    let mut rx = merge(vec![rx1, rx2]);
    let max = hold_and_ack(&ch, &mut rx, 2 * PER_QUEUE, 10).await;
    println!("prefetch 10 (global, two consumers): at most {max} unacknowledged");
    assert!((1..=10).contains(&max), "max outstanding {max}");
    events.assert_no_close("consumer");
    for (q, tag) in [(&q1, &t1), (&q2, &t2)] {
        assert_eq!(direct.shard_depths(q).await, (0, 0));
        delete_consumed_queue(&ch, &mut events, q, tag).await;
    }
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Control routing (the Celery preset)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_names_live_on_the_control_cluster_only() {
    let mut cleanup = Cleanup::default();
    let host = unique("host").replace('.', "-");
    let pidbox_q = cleanup.queue(&format!("w1@{host}.celery.pidbox"));
    let reply_q = cleanup.queue(&format!("{}.reply.celery.pidbox", uuid()));
    let events_q = cleanup.queue(&format!("celeryev.{}", uuid()));
    let rpc_q = cleanup.queue(&uuid());
    let task_q = cleanup.queue(&format!("celery-{}", unique("task")));
    // The preset's exchanges have fixed names; flags as Celery (kombu) declares them.
    let exchanges = [
        ("celery.pidbox", "fanout", false),
        ("reply.celery.pidbox", "direct", false),
        ("celeryev", "topic", true),
    ];
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    // A clean baseline: the control exchanges must not be on the shards before we start (a run
    // of another suite against a single shard may have left them there).
    for (x, kind, _) in exchanges {
        for c in [Cl::A, Cl::B] {
            if exchange_exists(direct.conn(c), x, kind).await {
                let (ch, _e) = open_channel(direct.conn(c)).await;
                within(
                    "exchange.delete",
                    ch.exchange_delete(ExchangeDeleteArguments::new(x)),
                )
                .await
                .expect("exchange.delete");
                let _ = within("channel.close", ch.close()).await;
            }
        }
    }

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    for (x, kind, durable) in exchanges {
        within(
            &format!("exchange.declare {x}"),
            ch.exchange_declare(
                ExchangeDeclareArguments::new(x, kind)
                    .durable(durable)
                    .finish(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("exchange.declare {x} through the proxy failed: {e}"));
    }
    for q in [&pidbox_q, &reply_q, &events_q, &rpc_q, &task_q] {
        declare_queue(&ch, q).await;
    }
    // A server-named queue (amq.gen-*) is created on the control cluster.
    let (server_named, _, _) = within(
        "queue.declare \"\"",
        ch.queue_declare(QueueDeclareArguments::new("")),
    )
    .await
    .expect("queue.declare with an empty name")
    .expect("declare-ok");
    let server_named = cleanup.queue(&server_named);
    assert!(
        server_named.starts_with("amq.gen-"),
        "server-named queue {server_named:?}"
    );
    let bind = |q: &str, x: &str, rk: &str| QueueBindArguments::new(q, x, rk);
    within(
        "queue.bind",
        ch.queue_bind(bind(&pidbox_q, "celery.pidbox", "")),
    )
    .await
    .expect("bind pidbox queue");
    within(
        "queue.bind",
        ch.queue_bind(bind(&events_q, "celeryev", "worker.#")),
    )
    .await
    .expect("bind celeryev queue");
    within(
        "queue.bind",
        ch.queue_bind(bind(&reply_q, "reply.celery.pidbox", &reply_q)),
    )
    .await
    .expect("bind reply queue");

    // Where everything is, asked of each cluster directly.
    for (x, kind, _) in exchanges {
        assert!(
            exchange_exists(&direct.control, x, kind).await,
            "exchange {x} must exist on the control cluster"
        );
        for c in [Cl::A, Cl::B] {
            assert!(
                !exchange_exists(direct.conn(c), x, kind).await,
                "control exchange {x} must not exist on {}",
                c.name()
            );
        }
    }
    for q in [&pidbox_q, &reply_q, &events_q, &rpc_q, &server_named] {
        assert_eq!(
            direct.depth(Cl::Control, q).await,
            Some(0),
            "control queue {q} must exist on the control cluster"
        );
        for c in [Cl::A, Cl::B] {
            assert_eq!(
                direct.depth(c, q).await,
                None,
                "control queue {q} must not exist on {}",
                c.name()
            );
        }
    }
    assert_eq!(
        direct.shard_depths(&task_q).await,
        (0, 0),
        "the task queue exists on both shard clusters"
    );
    assert_eq!(
        direct.depth(Cl::Control, &task_q).await,
        None,
        "the task queue must not exist on the control cluster"
    );

    // Publishes follow the same rules.
    publish(&ch, "", &rpc_q, b"rpc reply").await;
    publish(&ch, "", &task_q, b"a task").await;
    publish(&ch, "celery.pidbox", "", b"broadcast").await;
    publish(&ch, "celeryev", "worker.heartbeat", b"heartbeat").await;
    publish(&ch, "reply.celery.pidbox", &reply_q, b"pong").await;
    publish(&ch, "", &server_named, b"to the server-named queue").await;
    direct.wait_depth(Cl::Control, &server_named, 1).await;
    direct.wait_depth(Cl::Control, &rpc_q, 1).await;
    direct.wait_depth(Cl::Control, &pidbox_q, 1).await;
    direct.wait_depth(Cl::Control, &events_q, 1).await;
    direct.wait_depth(Cl::Control, &reply_q, 1).await;
    let (a, b) = direct
        .wait_shard_depths(&task_q, STEP, "the task message", |a, b| a + b >= 1)
        .await;
    assert_eq!(
        a + b,
        1,
        "the task message lands on exactly one shard cluster (shard-a {a}, shard-b {b})"
    );
    assert_eq!(direct.depth(Cl::Control, &task_q).await, None);
    events.assert_no_close("client");

    for q in [
        &pidbox_q,
        &reply_q,
        &events_q,
        &rpc_q,
        &task_q,
        &server_named,
    ] {
        within(
            "queue.delete",
            ch.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await
        .expect("queue.delete through the proxy");
    }
    for q in [&pidbox_q, &reply_q, &events_q, &rpc_q, &server_named] {
        assert_eq!(
            direct.depth(Cl::Control, q).await,
            None,
            "queue.delete through the proxy removes {q} from control"
        );
    }
    for (x, _, _) in exchanges {
        within(
            "exchange.delete",
            ch.exchange_delete(ExchangeDeleteArguments::new(x)),
        )
        .await
        .expect("exchange.delete");
    }
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 8. basic.get looks on every shard cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_finds_messages_on_either_shard() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("get"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    let get = || ch.basic_get(BasicGetArguments::new(&queue));

    for (c, body) in [
        (Cl::B, "only on shard-b"),
        (Cl::A, "only on shard-a"),
        (Cl::B, "shard-b again"),
    ] {
        direct.publish(c, &queue, &[body]).await;
        direct.wait_depth(c, &queue, 1).await;
        let got = within("basic.get", get())
            .await
            .expect("basic.get through the proxy");
        let (ok, _props, content) = got.unwrap_or_else(|| {
            panic!(
                "basic.get returned get-empty with one message on {}",
                c.name()
            )
        });
        assert_eq!(content, body.as_bytes(), "basic.get body");
        assert!(!ok.redelivered());
        ack(&ch, ok.delivery_tag(), false).await;
        // Empty everywhere now, whichever cluster the proxy asks first.
        for _ in 0..3 {
            let got = within("basic.get", get())
                .await
                .expect("basic.get through the proxy");
            assert!(
                got.is_none(),
                "basic.get on an empty queue should be get-empty, got {:?}",
                got.map(|g| g.2)
            );
        }
    }
    events.assert_no_close("client");
    assert_eq!(direct.shard_depths(&queue).await, (0, 0));
    close_connection(conn).await;
    // The acks took: nothing comes back when the connection closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        direct.shard_depths(&queue).await,
        (0, 0),
        "the gotten messages were acked, not requeued"
    );

    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 9. A consumer is cancelled only when every cluster cancelled it

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_cancel_reaches_the_client_once_every_cluster_cancelled() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("cancel"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    let (ctag, mut rx) = consume(&ch, &queue, true).await;

    // shard-a cancels the consumer: the client must not hear of it, and keeps getting shard-b's.
    direct.delete_queue(Cl::A, &queue).await;
    tokio::time::sleep(QUIET).await;
    if let Some(e) = events.try_next() {
        panic!(
            "event after the queue was deleted on shard-a only (the consumer still reads shard-b): {e:?}"
        );
    }
    direct.publish(Cl::B, &queue, &["msg-1"]).await;
    let m = within("a delivery from shard-b after shard-a cancelled", rx.recv())
        .await
        .expect("consumer still running");
    let d = delivery(m);
    assert_eq!(d.body, b"msg-1");
    ack(&ch, d.tag, false).await;

    // shard-b cancels too: now the client hears basic.cancel.
    direct.delete_queue(Cl::B, &queue).await;
    match events.next().await {
        Event::Cancel { consumer_tag } => {
            assert_eq!(consumer_tag, ctag, "basic.cancel for our consumer")
        }
        other => {
            panic!("expected basic.cancel once the queue is gone from every cluster, got {other:?}")
        }
    }
    let end = within("the consumer stream to end after basic.cancel", rx.recv()).await;
    assert!(
        end.is_none(),
        "consumer stream should end after basic.cancel"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(e) = events.try_next() {
        panic!("unexpected event after the cancel: {e:?}");
    }
    assert!(
        ch.is_open(),
        "the channel survives the consumer's cancellation"
    );
    // The channel is still usable.
    let other = cleanup.queue(&unique("cancel-after"));
    declare_queue(&ch, &other).await;
    within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(&other)),
    )
    .await
    .expect("queue.delete");

    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Mandatory + confirms: the return comes before the ack

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_publish_is_returned_before_its_ack() {
    const N: u64 = 6;
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&unique("unroutable-x"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    within(
        "exchange.declare",
        ch.exchange_declare(ExchangeDeclareArguments::new(&exchange, "direct")),
    )
    .await
    .expect("exchange.declare");
    for c in [Cl::A, Cl::B] {
        assert!(
            exchange_exists(direct.conn(c), &exchange, "direct").await,
            "sharded exchange {exchange} must exist on {}",
            c.name()
        );
    }
    assert!(
        !exchange_exists(&direct.control, &exchange, "direct").await,
        "sharded exchange {exchange} must not exist on control"
    );

    within(
        "confirm.select",
        ch.confirm_select(ConfirmSelectArguments::default()),
    )
    .await
    .expect("confirm.select");
    for i in 0..N {
        let args = BasicPublishArguments::new(&exchange, "nowhere")
            .mandatory(true)
            .finish();
        publish_with(&ch, args, format!("msg-{i}").as_bytes()).await;
    }
    // Message i has sequence number i + 1.
    let mut returned: BTreeSet<u64> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut log = Vec::new();
    while acked.len() < N as usize {
        let e = events.next().await;
        log.push(e.clone());
        match e {
            Event::Return { code, body } => {
                assert_eq!(code, 312, "NO_ROUTE");
                let seq = index_of(&body) as u64 + 1;
                assert!(
                    !acked.contains(&seq),
                    "message {seq} returned after its ack: {log:?}"
                );
                assert!(
                    returned.insert(seq),
                    "message {seq} returned twice: {log:?}"
                );
            }
            Event::Ack { tag, multiple } => {
                let covered: Vec<u64> = if multiple {
                    (1..=tag).filter(|s| !acked.contains(s)).collect()
                } else {
                    vec![tag]
                };
                for s in covered {
                    assert!(
                        returned.contains(&s),
                        "ack for {s} before its basic.return: {log:?}"
                    );
                    assert!(acked.insert(s), "{s} acked twice: {log:?}");
                }
            }
            other => panic!("unexpected {other:?}: {log:?}"),
        }
    }
    assert_eq!(returned.len(), N as usize);
    within(
        "exchange.delete",
        ch.exchange_delete(ExchangeDeleteArguments::new(&exchange)),
    )
    .await
    .expect("exchange.delete");
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Transactions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_commits_on_one_cluster_and_rollback_discards() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("tx"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");

    // Commit: all ten on one cluster.
    publish_numbered(&ch, &queue, 0..10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        direct.shard_depths(&queue).await,
        (0, 0),
        "nothing is visible before tx.commit"
    );
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    let (a1, b1) = direct.shard_depths(&queue).await;
    println!("first transaction: shard-a {a1}, shard-b {b1}");
    assert!(
        (a1, b1) == (10, 0) || (a1, b1) == (0, 10),
        "a committed transaction lands on one cluster: shard-a {a1}, shard-b {b1}"
    );

    // Rollback: nothing lands.
    publish_numbered(&ch, &queue, 10..17).await;
    within("tx.rollback", ch.tx_rollback())
        .await
        .expect("tx.rollback");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        direct.shard_depths(&queue).await,
        (a1, b1),
        "tx.rollback discards the publishes"
    );

    // Another commit: again all on one cluster.
    publish_numbered(&ch, &queue, 17..22).await;
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    let (a2, b2) = direct.shard_depths(&queue).await;
    let delta = (a2 - a1, b2 - b1);
    println!(
        "second committed transaction: shard-a +{}, shard-b +{}",
        delta.0, delta.1
    );
    assert!(
        delta == (5, 0) || delta == (0, 5),
        "the second transaction lands on one cluster: +{delta:?}"
    );

    // The committed messages are the right ones.
    let mut got = BTreeSet::new();
    while let Some((_, _, body)) = within(
        "basic.get",
        ch.basic_get(BasicGetArguments::new(&queue).no_ack(true).finish()),
    )
    .await
    .expect("basic.get")
    {
        assert!(
            got.insert(index_of(&body)),
            "message {} twice",
            index_of(&body)
        );
    }
    assert_eq!(
        got,
        (0..10).chain(17..22).collect::<BTreeSet<_>>(),
        "the committed messages, and only them"
    );
    events.assert_no_close("client");

    within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete");
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// An explicit basic.cancel stops the consumer on every shard cluster.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_cancel_stops_deliveries_from_every_shard() {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("explicit-cancel"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    let conn = connect(proxy.amqp_addr()).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_queue(&ch, &queue).await;
    let (ctag, mut rx) = consume(&ch, &queue, false).await;
    assert_eq!(
        declare(
            &ch,
            QueueDeclareArguments::new(&queue).passive(true).finish()
        )
        .await
        .1,
        1,
        "one consumer"
    );
    let cancelled = within(
        "basic.cancel",
        ch.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await
    .expect("basic.cancel");
    assert_eq!(cancelled, ctag);
    assert_eq!(
        declare(
            &ch,
            QueueDeclareArguments::new(&queue).passive(true).finish()
        )
        .await
        .1,
        0,
        "no consumer left"
    );
    direct.publish(Cl::A, &queue, &["msg-1"]).await;
    direct.publish(Cl::B, &queue, &["msg-2"]).await;
    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err(), "no delivery after basic.cancel");
    assert_eq!(
        direct.shard_depths(&queue).await,
        (1, 1),
        "the messages stay in the queues"
    );
    events.assert_no_close("client");
    within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete");
    close_connection(conn).await;
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

// ---------------------------------------------------------------------------------------------
// 4b. After a 406 from one cluster, the same channel number opens again at once
//
// Clients such as py-amqp reuse a channel number as soon as its close handshake is done. amqprs
// does not release the number of a channel the server closed, so this one speaks raw frames
// through `warren::codec`.

// What must happen: when shard-b refuses the declaration, the proxy closes the channel's parts on
// shard-a and control behind it. Until their close-ok, anything those clusters still send on the
// channel (shard-a's declare-ok for the refused request, say) belongs to the closed channel and
// must be discarded (AMQP 0-9-1: after sending channel.close, a peer discards every method but
// close / close-ok), and the reopened channel must really be reopened on every cluster before
// the client gets its open-ok.

/// A minimal raw AMQP client: handshake as guest, methods in and out.
struct Raw {
    stream: tokio::net::TcpStream,
    rbuf: bytes::BytesMut,
}

fn ss(s: &str) -> warren::codec::ShortStr {
    warren::codec::ShortStr::try_from(s).expect("short string")
}

impl Raw {
    async fn open(addr: SocketAddr) -> Raw {
        use warren::codec::{self, FieldTable as Table, FieldValue as Value, LongStr, Method};
        let stream = within("TCP connect", tokio::net::TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        let mut raw = Raw {
            stream,
            rbuf: bytes::BytesMut::with_capacity(64 * 1024),
        };
        raw.write(codec::PROTOCOL_HEADER).await;
        match raw.read().await {
            (0, Method::ConnectionStart(_)) => {}
            (ch, m) => panic!("expected connection.start, got {} on {ch}", m.name()),
        }
        let mut caps = Table::default();
        caps.insert(ss("consumer_cancel_notify"), Value::Bool(true));
        let mut props = Table::default();
        props.insert(ss("capabilities"), Value::Table(caps));
        let start_ok = codec::ConnectionStartOk {
            client_properties: props,
            mechanism: ss("PLAIN"),
            response: LongStr::from("\0guest\0guest"),
            locale: ss("en_US"),
        };
        raw.send(&[(0, Method::ConnectionStartOk(start_ok))]).await;
        let tune = match raw.read().await {
            (0, Method::ConnectionTune(t)) => t,
            (ch, m) => panic!("expected connection.tune, got {} on {ch}", m.name()),
        };
        let tune_ok = codec::ConnectionTuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        };
        let open = codec::ConnectionOpen {
            virtual_host: ss("/"),
            capabilities: ss(""),
            insist: false,
        };
        raw.send(&[
            (0, Method::ConnectionTuneOk(tune_ok)),
            (0, Method::ConnectionOpen(open)),
        ])
        .await;
        match raw.read().await {
            (0, Method::ConnectionOpenOk(_)) => {}
            (ch, m) => panic!("expected connection.open-ok, got {} on {ch}", m.name()),
        }
        raw
    }

    async fn write(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        within("socket write", self.stream.write_all(bytes))
            .await
            .expect("socket write");
    }

    /// Sends several methods in one write (pipelined).
    async fn send(&mut self, methods: &[(u16, warren::codec::Method)]) {
        let mut out = bytes::BytesMut::new();
        for (ch, m) in methods {
            warren::codec::write_method(&mut out, *ch, m);
        }
        self.write(&out).await;
    }

    /// The next method frame (heartbeats and content frames skipped).
    async fn read(&mut self) -> (u16, warren::codec::Method) {
        use tokio::io::AsyncReadExt;
        use warren::codec::{self, FrameKind, Method};
        loop {
            match codec::decode_frame(&mut self.rbuf, 1 << 20) {
                Ok(Some(f)) if f.kind == FrameKind::Method => {
                    let m = Method::decode(f.payload).expect("decodable method");
                    return (f.channel, m);
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("undecodable frame from the proxy: {e}"),
            }
            let n = within("data from the proxy", self.stream.read_buf(&mut self.rbuf))
                .await
                .expect("socket read");
            assert!(n > 0, "the proxy closed the connection");
        }
    }

    /// Sends a method and returns the next method on that channel.
    async fn call(&mut self, ch: u16, m: warren::codec::Method) -> warren::codec::Method {
        use warren::codec::Method;
        self.send(&[(ch, m)]).await;
        loop {
            let (c, reply) = self.read().await;
            if c == ch {
                return reply;
            }
            if let Method::ConnectionClose(close) = &reply {
                panic!(
                    "the proxy closed the connection: {} {} (class {} method {})",
                    close.reply_code, close.reply_text, close.class_id, close.method_id
                );
            }
            assert_ne!(c, 0, "unexpected {} on channel 0", reply.name());
        }
    }
}

fn raw_declare(queue: &str, passive: bool) -> warren::codec::Method {
    warren::codec::Method::QueueDeclare(warren::codec::QueueDeclare {
        ticket: 0,
        queue: ss(queue),
        passive,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: warren::codec::FieldTable::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_406_the_same_channel_number_reopens_on_every_cluster() {
    use warren::codec::{self, Method};
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("reopen-conflict"));
    let other = cleanup.queue(&unique("reopen-after"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;
    {
        let (ch, _events) = open_channel(&direct.b).await;
        let mut args = FieldTable::new();
        args.insert("x-max-length".try_into().unwrap(), FieldValue::l(10));
        declare(
            &ch,
            QueueDeclareArguments::new(&queue).arguments(args).finish(),
        )
        .await;
        let _ = within("channel.close", ch.close()).await;
    }

    let mut raw = Raw::open(proxy.amqp_addr()).await;
    for round in 0..3 {
        match raw.call(1, Method::ChannelOpen(Default::default())).await {
            Method::ChannelOpenOk(_) => {}
            m => panic!("round {round}: expected channel.open-ok, got {}", m.name()),
        }
        match raw.call(1, raw_declare(&queue, false)).await {
            Method::ChannelClose(c) => {
                assert_eq!(c.reply_code, 406, "round {round}: {}", c.reply_text);
                assert_eq!(
                    (c.class_id, c.method_id),
                    (50, 10),
                    "round {round}: the close names queue.declare"
                );
            }
            m => panic!(
                "round {round}: expected channel.close 406, got {}",
                m.name()
            ),
        }
        // close-ok and the reopening in one write: the proxy is most likely still closing the
        // channel's part on shard-a and control.
        raw.send(&[
            (1, Method::ChannelCloseOk(Default::default())),
            (1, Method::ChannelOpen(Default::default())),
        ])
        .await;
        match raw.read().await {
            (1, Method::ChannelOpenOk(_)) => {}
            (ch, m) => panic!(
                "round {round}: expected channel.open-ok on 1 right after the 406, got {} on {ch}",
                m.name()
            ),
        }
        // The reopened channel works on every cluster: a declare fans out to both shards...
        match raw.call(1, raw_declare(&other, false)).await {
            Method::QueueDeclareOk(ok) => assert_eq!(ok.queue.as_str(), other.as_str()),
            m => panic!("round {round}: expected queue.declare-ok, got {}", m.name()),
        }
        // ...and publishes alternate between them.
        let mut out = bytes::BytesMut::new();
        for i in 0..4 {
            codec::write_method(
                &mut out,
                1,
                &Method::BasicPublish(codec::BasicPublish {
                    ticket: 0,
                    exchange: ss(""),
                    routing_key: ss(&other),
                    mandatory: false,
                    immediate: false,
                }),
            );
            let body = format!("msg-{i}");
            codec::write_header(
                &mut out,
                1,
                &codec::ContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: codec::BasicProperties::default(),
                },
            );
            codec::write_body(&mut out, 1, body.as_bytes(), 4096);
        }
        raw.write(&out).await;
        let expected = 4 * (round + 1);
        let (a, b) = direct
            .wait_shard_depths(&other, STEP, "the publishes after the reopen", |a, b| {
                a + b >= expected
            })
            .await;
        assert_eq!(a + b, expected, "round {round}: shard-a {a} + shard-b {b}");
        assert_eq!(
            (a, b),
            (expected / 2, expected / 2),
            "round {round}: publishes alternate over both shards after the reopen"
        );
        match raw
            .call(
                1,
                Method::ChannelClose(codec::ChannelClose {
                    reply_code: 200,
                    reply_text: ss("bye"),
                    class_id: 0,
                    method_id: 0,
                }),
            )
            .await
        {
            Method::ChannelCloseOk(_) => {}
            m => panic!("round {round}: expected channel.close-ok, got {}", m.name()),
        }
    }
    let close = Method::ConnectionClose(codec::ConnectionClose {
        reply_code: 200,
        reply_text: ss("bye"),
        class_id: 0,
        method_id: 0,
    });
    match raw.call(0, close).await {
        Method::ConnectionCloseOk(_) => {}
        m => panic!("expected connection.close-ok, got {}", m.name()),
    }
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}
