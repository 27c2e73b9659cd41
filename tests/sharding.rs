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
//!
//! The amqprs plumbing (connections, channels with their [`Events`], publish and consume, waits
//! with deadlines) and the raw AMQP client come from `tests/support`.

mod support;

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicNackArguments, BasicPublishArguments,
    BasicQosArguments, BasicRejectArguments, Channel, ConsumerMessage, ExchangeDeclareArguments,
    ExchangeDeleteArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
    QueuePurgeArguments,
};
use amqprs::connection::Connection;
use amqprs::{BasicProperties, FieldTable, FieldValue};
use bytes::BytesMut;
use tokio::sync::mpsc;
use warren::codec::{self, Method, ShortStr};

use support::sharded::{Cleanup, ShardedProxy as Proxy};
use support::{
    Cluster, Delivery, Event, Events, Login, RawClient, STEP, answer_rpc_requests, confirm_select,
    connect, consume, declare_queue, eventually_for, get, open_channel, parse_clusters, publish,
    publish_with, queue_counts, receive_rpc_replies, send_rpc_requests, unique, within,
};

/// Deadline for bulk work (thousands of messages reaching the queues).
const BULK: Duration = Duration::from_secs(120);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// Clusters

/// The three clusters, from `WARREN_TEST_CLUSTERS`; fails naming any that is missing. (Unlike
/// `support::clusters`, never falls back to starting a local shard-a alone.)
fn clusters() -> &'static [Cluster] {
    static CLUSTERS: OnceLock<Vec<Cluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let spec = std::env::var("WARREN_TEST_CLUSTERS").unwrap_or_default();
        let found = parse_clusters(&spec);
        let missing: Vec<&str> = Cl::ALL
            .into_iter()
            .map(Cl::name)
            .filter(|n| !found.iter().any(|f| f.name == *n))
            .collect();
        assert!(
            missing.is_empty(),
            "the sharding tests need three RabbitMQ clusters (shard-a, shard-b, control); \
             WARREN_TEST_CLUSTERS={spec:?} lacks {missing:?}. Run them through scripts/test.sh, \
             or start each with `scripts/rabbit.sh up NAME auto auto` and export \
             WARREN_TEST_CLUSTERS=\"shard-a=H:P,H:P;shard-b=H:P,H:P;control=H:P,H:P\""
        );
        found
    })
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

    fn cluster(self) -> &'static Cluster {
        clusters()
            .iter()
            .find(|c| c.name == self.name())
            .expect("clusters() checked that all three are there")
    }

    fn addr(self) -> SocketAddr {
        self.cluster().first_node()
    }
}

// ---------------------------------------------------------------------------------------------
// Names

// ---------------------------------------------------------------------------------------------
// The proxy

/// A proxy on 127.0.0.1:0 in front of shard-a, shard-b (shards) and control, Celery preset, on a
/// runtime of its own: a proxy task that never yields cannot stall the test's clients and
/// timeouts, so such a bug fails the test with a timeout instead of hanging the whole binary.
async fn start_proxy() -> Proxy {
    Proxy::start().await
}

/// What most tests start with: a proxy, direct connections to every cluster, and a client
/// connection to the proxy with one channel (and its events).
async fn start() -> (Proxy, Direct, Connection, Channel, Events) {
    let proxy = start_proxy().await;
    let direct = Direct::open().await;
    let (conn, ch, events) = client(&proxy).await;
    (proxy, direct, conn, ch, events)
}

/// [`start`], then declares `queue` (transient) through the proxy.
async fn start_with_queue(queue: &str) -> (Proxy, Direct, Connection, Channel, Events) {
    let started = start().await;
    declare_queue(&started.3, queue).await;
    started
}

/// A client connection to the proxy, with one channel.
async fn client(proxy: &Proxy) -> (Connection, Channel, Events) {
    let conn = connect(proxy.amqp_addr()).await;
    let (ch, events) = open_channel(&conn).await;
    (conn, ch, events)
}

/// Shuts the proxy down, then closes the direct connections.
async fn shutdown(proxy: Proxy, direct: Direct) {
    within("proxy shutdown", proxy.shutdown()).await;
    direct.close().await;
}

/// The usual end of a test: the client's connection closed, then [`shutdown`].
async fn finish(conn: Connection, proxy: Proxy, direct: Direct) {
    close_connection(conn).await;
    shutdown(proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// amqprs helpers (each step has a deadline; any error fails the test)

/// Closes an amqprs connection; unlike `support::close_connection`, every error fails the test.
async fn close_connection(conn: Connection) {
    within("connection.close", conn.close())
        .await
        .expect("connection.close failed");
}

/// queue.declare; returns the (ready messages, consumers) of the declare-ok.
async fn declare(ch: &Channel, args: QueueDeclareArguments) -> (u32, u32) {
    let what = format!("queue.declare {args:?}");
    let r = within(&what, ch.queue_declare(args))
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"));
    let (_, messages, consumers) = r.expect("declare-ok");
    (messages, consumers)
}

/// queue.delete; returns the message count of the delete-ok.
async fn queue_delete(ch: &Channel, queue: &str) -> Option<u32> {
    within(
        &format!("queue.delete {queue}"),
        ch.queue_delete(QueueDeleteArguments::new(queue)),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.delete {queue} failed: {e}"))
}

async fn exchange_declare(ch: &Channel, exchange: &str, kind: &str, durable: bool) {
    let args = ExchangeDeclareArguments::new(exchange, kind)
        .durable(durable)
        .finish();
    within(
        &format!("exchange.declare {exchange}"),
        ch.exchange_declare(args),
    )
    .await
    .unwrap_or_else(|e| panic!("exchange.declare {exchange} failed: {e}"));
}

async fn exchange_delete(ch: &Channel, exchange: &str) {
    within(
        &format!("exchange.delete {exchange}"),
        ch.exchange_delete(ExchangeDeleteArguments::new(exchange)),
    )
    .await
    .unwrap_or_else(|e| panic!("exchange.delete {exchange} failed: {e}"));
}

async fn qos(ch: &Channel, prefetch_count: u16, global: bool) {
    within(
        "basic.qos",
        ch.basic_qos(BasicQosArguments::new(0, prefetch_count, global)),
    )
    .await
    .expect("basic.qos");
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, multiple)),
    )
    .await
    .expect("basic.ack");
}

/// basic.nack with requeue.
async fn nack(ch: &Channel, tag: u64, multiple: bool) {
    within(
        "basic.nack",
        ch.basic_nack(BasicNackArguments::new(tag, multiple, true)),
    )
    .await
    .expect("basic.nack");
}

/// basic.reject with requeue.
async fn reject(ch: &Channel, tag: u64) {
    within(
        "basic.reject",
        ch.basic_reject(BasicRejectArguments::new(tag, true)),
    )
    .await
    .expect("basic.reject");
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

/// Publishes `msg-0`..`msg-{n-1}` to `queue` through the proxy, then waits (up to `limit`) until
/// the shard clusters hold all `n`; returns their depths (shard-a, shard-b).
async fn publish_all(
    ch: &Channel,
    direct: &Direct,
    queue: &str,
    n: usize,
    limit: Duration,
) -> (u32, u32) {
    publish_numbered(ch, queue, 0..n).await;
    let what = format!("all {n} messages in {queue}");
    direct.wait_shard_total(queue, limit, &what, n).await
}

fn index_of(body: &[u8]) -> usize {
    let s = std::str::from_utf8(body).unwrap_or_else(|_| panic!("non-UTF-8 body {body:?}"));
    s.strip_prefix("msg-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {s:?}"))
}

fn delivery(m: ConsumerMessage) -> Delivery {
    let d = m.deliver.expect("deliver");
    Delivery {
        tag: d.delivery_tag(),
        redelivered: d.redelivered(),
        routing_key: d.routing_key().clone(),
        body: m.content.unwrap_or_default(),
    }
}

/// Waits for the broker's basic.cancel of consumer `ctag`; `after` says what should cause it.
async fn expect_cancel(events: &mut Events, ctag: &str, after: &str) {
    match events.next().await {
        Event::Cancel { consumer_tag } => {
            assert_eq!(consumer_tag, ctag, "basic.cancel {after}")
        }
        other => panic!("expected basic.cancel for {ctag} {after}, got {other:?}"),
    }
}

/// The outcome of a passive declaration `what` on a channel of its own: `Some` (and the channel
/// closed) when the cluster has the entity, `None` when it answers 404. Any other failure fails
/// the test.
async fn passive_outcome<T>(
    ch: Channel,
    events: &mut Events,
    what: &str,
    r: Result<T, amqprs::error::Error>,
) -> Option<T> {
    match r {
        Ok(v) => {
            let _ = within("channel.close", ch.close()).await;
            Some(v)
        }
        Err(e) => {
            let (code, text) = events.expect_close().await;
            assert_eq!(
                code, 404,
                "{what}: expected 404 or success, got {code} {text} ({e})"
            );
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Direct connections

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

    /// Ready messages of a queue on a cluster (passive declare on a fresh channel), or `None`
    /// when the cluster does not have the queue (404).
    async fn depth(&self, c: Cl, queue: &str) -> Option<u32> {
        let (ch, mut events) = open_channel(self.conn(c)).await;
        let what = format!("passive queue.declare {queue}");
        let args = QueueDeclareArguments::new(queue).passive(true).finish();
        let r = within(&what, ch.queue_declare(args)).await;
        passive_outcome(ch, &mut events, &what, r)
            .await
            .map(|ok| ok.expect("declare-ok").1)
    }

    /// Fails with `why` if cluster `c` has `queue`.
    async fn assert_no_queue(&self, c: Cl, queue: &str, why: &str) {
        assert_eq!(self.depth(c, queue).await, None, "{why}");
    }

    /// Whether an exchange exists on a cluster (passive declare on a fresh channel).
    async fn exchange_exists(&self, c: Cl, exchange: &str, kind: &str) -> bool {
        let (ch, mut events) = open_channel(self.conn(c)).await;
        let what = format!("passive exchange.declare {exchange}");
        let args = ExchangeDeclareArguments::new(exchange, kind)
            .passive(true)
            .finish();
        let r = within(&what, ch.exchange_declare(args)).await;
        passive_outcome(ch, &mut events, &what, r).await.is_some()
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

    /// Polls the shard depths until they add up to at least `total`, failing after `limit` with
    /// the last depths.
    async fn wait_shard_total(
        &self,
        queue: &str,
        limit: Duration,
        what: &str,
        total: usize,
    ) -> (u32, u32) {
        eventually_for(limit, what, || async move {
            let (a, b) = self.shard_depths(queue).await;
            if a as usize + b as usize >= total {
                Ok((a, b))
            } else {
                Err(format!("shard-a has {a}, shard-b has {b} in {queue}"))
            }
        })
        .await
    }

    /// Polls one cluster's depth of a queue until it is `expected`.
    async fn wait_depth(&self, c: Cl, queue: &str, expected: u32) {
        let what = format!("{} should have {expected} messages in {queue}", c.name());
        eventually_for(STEP, &what, || async move {
            match self.depth(c, queue).await {
                Some(d) if d == expected => Ok(()),
                d => Err(format!("has {d:?}")),
            }
        })
        .await
    }

    /// Publishes `bodies` directly to one cluster, to the default exchange, waiting for the
    /// broker's confirms.
    async fn publish(&self, c: Cl, queue: &str, bodies: &[&str]) {
        let (ch, mut events) = open_channel(self.conn(c)).await;
        confirm_select(&ch).await;
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

    /// [`Direct::publish`] to a queue that is empty on that cluster, then waits until the cluster
    /// holds all of `bodies`.
    async fn fill(&self, c: Cl, queue: &str, bodies: &[&str]) {
        self.publish(c, queue, bodies).await;
        self.wait_depth(c, queue, bodies.len() as u32).await;
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

    /// Declares `queue` on shard-b only, with x-max-length = 10: a declaration without arguments
    /// through the proxy then conflicts on that one cluster.
    async fn declare_limited_on_shard_b(&self, queue: &str) {
        let (ch, _events) = open_channel(&self.b).await;
        let mut args = FieldTable::new();
        args.insert("x-max-length".try_into().unwrap(), FieldValue::l(10));
        declare(
            &ch,
            QueueDeclareArguments::new(queue).arguments(args).finish(),
        )
        .await;
        let _ = within("channel.close", ch.close()).await;
    }

    async fn close(self) {
        for conn in [self.a, self.b, self.control] {
            let _ = tokio::time::timeout(STEP, conn.close()).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Round-robin publishes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_spread_evenly_over_the_shard_clusters() {
    if support::skip_live() {
        return;
    }
    const N: usize = 10_000;
    let (_cleanup, queue) = Cleanup::with_queue("spread");
    let (proxy, direct, conn, ch, mut events) = start().await;
    declare(&ch, QueueDeclareArguments::durable_client_named(&queue)).await;
    let (a, b) = publish_all(&ch, &direct, &queue, N, BULK).await;
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
        Some(0),
        "the control cluster has the queue (topology lives everywhere) but no task message"
    );
    events.assert_no_close("publisher");

    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

/// A producer that alternates between two queues (a web request that sends task A, then task
/// B) on one channel: each queue's messages spread over both shard clusters. With one rotation
/// for all of a connection's publishes, every A went to one cluster and every B to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_queues_each_spread_over_the_shard_clusters() {
    if support::skip_live() {
        return;
    }
    const N: usize = 200;
    let (mut cleanup, qa) = Cleanup::with_queue("interleave-a");
    // Two keys that share a rotation share it as every key did before (1 chance in 64).
    let qb = loop {
        let qb = support::unique("interleave-b");
        if warren::route::key_bucket(qb.as_bytes()) != warren::route::key_bucket(qa.as_bytes()) {
            break cleanup.queue(&qb);
        }
    };
    let (proxy, direct, conn, ch, mut events) = start().await;
    declare(&ch, QueueDeclareArguments::durable_client_named(&qa)).await;
    declare(&ch, QueueDeclareArguments::durable_client_named(&qb)).await;
    for i in 0..N {
        publish_numbered(&ch, &qa, i..i + 1).await;
        publish_numbered(&ch, &qb, i..i + 1).await;
    }
    for queue in [&qa, &qb] {
        let what = format!("all {N} messages in {queue}");
        let (a, b) = direct.wait_shard_total(queue, BULK, &what, N).await;
        println!("{queue}: shard-a {a}, shard-b {b}");
        assert_eq!((a, b), (100, 100), "{queue} half on each shard cluster");
    }
    events.assert_no_close("publisher");
    queue_delete(&ch, &qa).await;
    queue_delete(&ch, &qb).await;
    finish(conn, proxy, direct).await;
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

/// What the consumer of the mixed-acks test knows of each message (indexed by message number).
struct Consumed {
    deliveries: Vec<u32>,
    requeues: Vec<u32>,
    acked: Vec<bool>,
    acked_count: usize,
    /// Deliveries whose settlement is deferred to one `multiple` ack or nack: (tag, message).
    batch: Vec<(u64, usize)>,
    stats: AckStats,
}

impl Consumed {
    fn new(n: usize) -> Consumed {
        Consumed {
            deliveries: vec![0; n],
            requeues: vec![0; n],
            acked: vec![false; n],
            acked_count: 0,
            batch: Vec::new(),
            stats: AckStats::default(),
        }
    }

    /// Acks message `i` (delivery `tag`) alone.
    async fn ack_one(&mut self, ch: &Channel, tag: u64, i: usize) {
        ack(ch, tag, false).await;
        self.stats.single_acks += 1;
        self.acked[i] = true;
        self.acked_count += 1;
    }

    fn batch_tag(&self) -> u64 {
        self.batch.last().map(|b| b.0).unwrap_or_default()
    }

    /// Acks the whole batch with one `multiple` ack of its last tag.
    async fn ack_batch(&mut self, ch: &Channel) {
        ack(ch, self.batch_tag(), true).await;
        self.stats.multiple_acks += 1;
        for (_, i) in self.batch.drain(..) {
            self.acked[i] = true;
            self.acked_count += 1;
        }
    }

    /// Requeues the whole batch with one `multiple` nack of its last tag.
    async fn nack_batch(&mut self, ch: &Channel) {
        nack(ch, self.batch_tag(), true).await;
        self.stats.multiple_nacks += 1;
        for (_, i) in self.batch.drain(..) {
            self.requeues[i] += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_gets_every_message_exactly_once_with_mixed_acks() {
    if support::skip_live() {
        return;
    }
    const N: usize = 10_000;
    let (_cleanup, queue) = Cleanup::with_queue("consume-all");
    let (proxy, direct, conn, pub_ch, mut pub_events) = start().await;
    declare(&pub_ch, QueueDeclareArguments::durable_client_named(&queue)).await;
    let (a, b) = publish_all(&pub_ch, &direct, &queue, N, BULK).await;
    assert_eq!(a as usize + b as usize, N);
    assert!(
        a > 0 && b > 0,
        "both shard clusters should hold messages (shard-a {a}, shard-b {b})"
    );

    let (ch, mut events) = open_channel(&conn).await;
    qos(&ch, 300, false).await;
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;

    let mut c = Consumed::new(N);
    let mut batches = 0u32;
    let mut last_progress = Instant::now();

    while c.acked_count < N {
        let m = match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!(
                "consumer stream ended after {} acks ({:?}); channel events: {:?}",
                c.acked_count,
                c.stats,
                events.try_next()
            ),
            Err(_) => {
                // Nothing more for now: settle the deferred batch, or give up after a while.
                if c.batch.is_empty() {
                    assert!(
                        last_progress.elapsed() < STEP,
                        "no delivery for {STEP:?} with {} of {N} acked ({:?}); \
                         never delivered: {:?}",
                        c.acked_count,
                        c.stats,
                        (0..N)
                            .filter(|&i| c.deliveries[i] == 0)
                            .take(20)
                            .collect::<Vec<_>>()
                    );
                } else {
                    c.ack_batch(&ch).await;
                    last_progress = Instant::now();
                }
                continue;
            }
        };
        last_progress = Instant::now();
        let d = delivery(m);
        let i = index_of(&d.body);
        assert!(
            !c.acked[i],
            "message {i} delivered again (tag {}, redelivered {}) after it was acked",
            d.tag, d.redelivered
        );
        c.deliveries[i] += 1;
        assert_eq!(
            c.deliveries[i],
            c.requeues[i] + 1,
            "message {i} delivered {} times but requeued only {} times (redelivered flag {})",
            c.deliveries[i],
            c.requeues[i],
            d.redelivered
        );
        assert_eq!(
            d.redelivered,
            c.requeues[i] > 0,
            "message {i}: redelivered flag {} after {} requeues",
            d.redelivered,
            c.requeues[i]
        );
        if d.redelivered {
            c.stats.redeliveries += 1;
            if i % 2 == 1 {
                c.ack_one(&ch, d.tag, i).await;
            } else {
                c.batch.push((d.tag, i));
            }
        } else if i.is_multiple_of(13) {
            nack(&ch, d.tag, false).await;
            c.stats.nacks += 1;
            c.requeues[i] += 1;
        } else if i.is_multiple_of(17) {
            reject(&ch, d.tag).await;
            c.stats.rejects += 1;
            c.requeues[i] += 1;
        } else if i.is_multiple_of(5) {
            c.ack_one(&ch, d.tag, i).await;
        } else {
            c.batch.push((d.tag, i));
        }
        // Everything older than the batch is settled, so a `multiple` covers exactly the batch.
        if c.batch.len() as u32 > batches % 40 {
            batches += 1;
            if batches.is_multiple_of(7) {
                c.nack_batch(&ch).await;
            } else {
                c.ack_batch(&ch).await;
            }
        }
    }
    let Consumed {
        acked,
        requeues,
        stats,
        ..
    } = c;
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
    assert_eq!(
        queue_counts(&ch, &queue).await,
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
        Some(0),
        "the control cluster has the queue (topology lives everywhere), empty"
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
    if support::skip_live() {
        return;
    }
    const N: u64 = 2_000;
    let (mut cleanup, queue) = Cleanup::with_queue("confirms");
    // Every tenth publish goes to an rpc reply queue (a UUID: control traffic), so the client's
    // sequence numbers are spread over three upstream channels.
    let rpc_queue = cleanup.queue(&support::uuid());
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    declare_queue(&ch, &rpc_queue).await;
    confirm_select(&ch).await;
    for i in 0..N as usize {
        let target = if i % 10 == 9 { &rpc_queue } else { &queue };
        publish_numbered(&ch, target, i..i + 1).await;
    }

    let mut outstanding: BTreeSet<u64> = (1..=N).collect();
    let mut confirmed: BTreeSet<u64> = BTreeSet::new();
    let (mut singles, mut multiples) = (0u32, 0u32);
    while !outstanding.is_empty() {
        match events.next_for(BULK, "publisher confirms").await {
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
        .wait_shard_total(
            &queue,
            STEP,
            "all confirmed messages in the queues",
            sharded as usize,
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
        queue_delete(&ch, q).await;
    }
    finish(conn, proxy, direct).await;
}

/// RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`), the RPC pattern of the pika, Java and
/// amqplib tutorials: the caller consumes from the pseudo-queue and publishes requests with it
/// as `reply_to`; the cluster that takes a request rewrites `reply_to` into a name only it can
/// route, and the server publishes its reply to that name. Through warren the requests spread
/// over both shard clusters, and every reply must still reach the caller, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_replies_reach_the_caller_from_every_shard() {
    if support::skip_live() {
        return;
    }
    const N: usize = 20;
    let (_cleanup, queue) = Cleanup::with_queue("rpc");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    let (server_conn, server_ch, _server_events) = client(&proxy).await;
    let (_server_tag, mut requests) = consume(&server_ch, &queue, false).await;
    let (_caller_tag, mut replies) = consume(&ch, "amq.rabbitmq.reply-to", false).await;
    send_rpc_requests(&ch, &queue, N).await;
    answer_rpc_requests(&server_ch, &mut requests, N).await;
    receive_rpc_replies(&mut replies, N).await;
    tokio::time::sleep(QUIET).await;
    assert!(replies.try_recv().is_err(), "a reply more than once");
    let published = proxy.metrics();
    let spread: Vec<u64> = [Cl::A, Cl::B]
        .iter()
        .map(|c| {
            published
                .publishes
                .get_or_create(&warren::metrics::ClusterLabel {
                    cluster: c.name().to_owned(),
                })
                .get()
        })
        .collect();
    assert!(
        spread.iter().all(|&n| n > 0),
        "requests and replies on both shard clusters: {spread:?}"
    );
    events.assert_no_close("caller");
    close_connection(server_conn).await;
    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

/// A sharded queue full on every shard cluster (`x-overflow = reject-publish`): a publish its
/// cluster refuses is nacked to the client, as one broker nacks it, and never sent to another
/// cluster (RabbitMQ nacks once any queue refuses, after the others took the message, and
/// `reject-publish-dlx` dead-letters it: a second try elsewhere would duplicate it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_its_shard_refuses_is_nacked_and_not_sent_elsewhere() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("full");
    let (proxy, direct, conn, ch, mut events) = start().await;
    support::declare_reject_publish_queue(&ch, &queue, 1).await;
    confirm_select(&ch).await;
    // Round-robin puts the first two on different clusters (one message each fills both); the
    // other three are refused where they go.
    let republished = proxy.metrics().republished.get();
    publish_numbered(&ch, &queue, 0..5).await;
    assert_eq!(events.confirms(5).await, [true, true, false, false, false]);
    tokio::time::sleep(QUIET).await;
    assert_eq!(events.try_next(), None, "nothing after the five confirms");
    assert_eq!(direct.shard_depths(&queue).await, (1, 1));
    assert_eq!(
        proxy.metrics().republished.get(),
        republished,
        "a refused publish is not sent again"
    );

    // A client without confirms: the refused publish is dropped (as RabbitMQ drops it) and
    // counted.
    let dropped = proxy.metrics().dropped.get();
    let (plain, _plain_events) = open_channel(&conn).await;
    publish_numbered(&plain, &queue, 5..7).await;
    eventually_for(STEP, "two refused publishes counted as dropped", || async {
        match proxy.metrics().dropped.get() - dropped {
            2 => Ok(()),
            n => Err(format!("{n} dropped")),
        }
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(proxy.metrics().republished.get(), republished);
    assert_eq!(proxy.metrics().dropped.get(), dropped + 2);
    assert_eq!(direct.shard_depths(&queue).await, (1, 1));

    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 4. A conflicting declaration on one cluster is the client's 406

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_arguments_on_one_cluster_give_406() {
    if support::skip_live() {
        return;
    }
    let (mut cleanup, queue) = Cleanup::with_queue("conflict");
    let other = cleanup.queue(&unique("conflict-after"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;

    // Only shard-b has the queue, with x-max-length = 10.
    direct.declare_limited_on_shard_b(&queue).await;
    direct
        .assert_no_queue(
            Cl::A,
            &queue,
            &format!("precondition: shard-a has no {queue}"),
        )
        .await;

    let (conn, ch, mut events) = client(&proxy).await;
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
        .wait_shard_total(&other, STEP, "the message after the 406", 1)
        .await;
    assert_eq!(a + b, 1);
    events2.assert_no_close("second channel");
    queue_delete(&ch2, &other).await;

    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Passive declare and purge sum the clusters' counts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare_and_purge_sum_the_clusters() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("counts");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    assert_eq!(
        direct.shard_depths(&queue).await,
        (0, 0),
        "declared through the proxy: empty on both shard clusters"
    );

    direct.fill(Cl::A, &queue, &["a1", "a2", "a3"]).await;
    direct
        .fill(Cl::B, &queue, &["b1", "b2", "b3", "b4", "b5"])
        .await;

    let (ready, consumers) = queue_counts(&ch, &queue).await;
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
    assert_eq!(queue_counts(&ch, &queue).await.0, 0);
    events.assert_no_close("client");

    // queue.delete reports the sum too.
    direct.fill(Cl::A, &queue, &["a4", "a5"]).await;
    direct.fill(Cl::B, &queue, &["b6", "b7", "b8", "b9"]).await;
    assert_eq!(
        queue_delete(&ch, &queue).await,
        Some(6),
        "queue.delete through the proxy: 2 on shard-a + 4 on shard-b"
    );
    for c in [Cl::A, Cl::B] {
        direct
            .assert_no_queue(
                c,
                &queue,
                &format!(
                    "queue.delete through the proxy removes the queue from {}",
                    c.name()
                ),
            )
            .await;
    }
    events.assert_no_close("client");
    finish(conn, proxy, direct).await;
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
    queue_delete(ch, queue).await;
    expect_cancel(events, ctag, &format!("after deleting {queue}")).await;
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
    if support::skip_live() {
        return;
    }
    const N: usize = 200;
    let (_cleanup, queue) = Cleanup::with_queue("prefetch");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    let (a, b) = publish_all(&ch, &direct, &queue, N, STEP).await;
    assert!(
        a > 0 && b > 0,
        "messages on both shard clusters (shard-a {a}, shard-b {b})"
    );

    qos(&ch, 10, false).await;
    let (ctag, rx) = consume(&ch, &queue, true).await;
    let mut rx = merge(vec![rx]);
    let max = hold_and_ack(&ch, &mut rx, N, 10).await;
    println!("prefetch 10 (per consumer): at most {max} unacknowledged");
    assert!((1..=10).contains(&max), "max outstanding {max}");
    events.assert_no_close("consumer");
    assert_eq!(direct.shard_depths(&queue).await, (0, 0));

    delete_consumed_queue(&ch, &mut events, &queue, &ctag).await;
    finish(conn, proxy, direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_prefetch_bounds_unacked_deliveries_of_the_channel() {
    if support::skip_live() {
        return;
    }
    const PER_QUEUE: usize = 100;
    let mut cleanup = Cleanup::default();
    let q1 = cleanup.queue(&unique("prefetch-global-1"));
    let q2 = cleanup.queue(&unique("prefetch-global-2"));
    let (proxy, direct, conn, ch, mut events) = start().await;
    for q in [&q1, &q2] {
        declare_queue(&ch, q).await;
        publish_all(&ch, &direct, q, PER_QUEUE, STEP).await;
    }

    // global = true: one window shared by both consumers of the channel.
    qos(&ch, 10, true).await;
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
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Control routing (the Celery preset)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn celery_control_traffic_is_published_to_the_control_cluster_only() {
    if support::skip_live() {
        return;
    }
    let mut cleanup = Cleanup::default();
    let host = unique("host").replace('.', "-");
    let pidbox_q = cleanup.queue(&format!("w1@{host}.celery.pidbox"));
    let reply_q = cleanup.queue(&format!("{}.reply.celery.pidbox", support::uuid()));
    let events_q = cleanup.queue(&format!("celeryev.{}", support::uuid()));
    let rpc_q = cleanup.queue(&support::uuid());
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
            if direct.exchange_exists(c, x, kind).await {
                let (ch, _e) = open_channel(direct.conn(c)).await;
                exchange_delete(&ch, x).await;
                let _ = within("channel.close", ch.close()).await;
            }
        }
    }

    let (conn, ch, mut events) = client(&proxy).await;
    for (x, kind, durable) in exchanges {
        exchange_declare(&ch, x, kind, durable).await;
    }
    for q in [&pidbox_q, &reply_q, &events_q, &rpc_q, &task_q] {
        declare_queue(&ch, q).await;
    }
    // A server-named queue gets warren's name, the same on every cluster.
    let (server_named, _, _) = within(
        "queue.declare \"\"",
        ch.queue_declare(QueueDeclareArguments::new("")),
    )
    .await
    .expect("queue.declare with an empty name")
    .expect("declare-ok");
    let server_named = cleanup.queue(&server_named);
    assert!(
        server_named.starts_with("warren.gen-"),
        "server-named queue {server_named:?}"
    );
    for (q, x, rk) in [
        (&pidbox_q, "celery.pidbox", ""),
        (&events_q, "celeryev", "worker.#"),
        (&reply_q, "reply.celery.pidbox", reply_q.as_str()),
    ] {
        within(
            &format!("queue.bind {q} to {x}"),
            ch.queue_bind(QueueBindArguments::new(q, x, rk)),
        )
        .await
        .unwrap_or_else(|e| panic!("bind {q} to {x} failed: {e}"));
    }

    // Topology lives on every cluster, asked of each cluster directly.
    for (x, kind, _) in exchanges {
        for c in Cl::ALL {
            assert!(
                direct.exchange_exists(c, x, kind).await,
                "exchange {x} must exist on {}",
                c.name()
            );
        }
    }
    for q in [
        &pidbox_q,
        &reply_q,
        &events_q,
        &rpc_q,
        &server_named,
        &task_q,
    ] {
        for c in Cl::ALL {
            assert_eq!(
                direct.depth(c, q).await,
                Some(0),
                "queue {q} must exist on {}",
                c.name()
            );
        }
    }

    // Publishes follow the same rules.
    publish(&ch, "", &rpc_q, b"rpc reply").await;
    publish(&ch, "", &task_q, b"a task").await;
    publish(&ch, "celery.pidbox", "", b"broadcast").await;
    publish(&ch, "celeryev", "worker.heartbeat", b"heartbeat").await;
    publish(&ch, "reply.celery.pidbox", &reply_q, b"pong").await;
    publish(&ch, "", &server_named, b"to the server-named queue").await;
    for q in [&server_named, &rpc_q, &pidbox_q, &events_q, &reply_q] {
        direct.wait_depth(Cl::Control, q, 1).await;
        for c in [Cl::A, Cl::B] {
            assert_eq!(
                direct.depth(c, q).await,
                Some(0),
                "control traffic for {q} is published to the control cluster only"
            );
        }
    }
    let (a, b) = direct
        .wait_shard_total(&task_q, STEP, "the task message", 1)
        .await;
    assert_eq!(
        a + b,
        1,
        "the task message lands on exactly one shard cluster (shard-a {a}, shard-b {b})"
    );
    assert_eq!(direct.depth(Cl::Control, &task_q).await, Some(0));
    events.assert_no_close("client");

    for q in [
        &pidbox_q,
        &reply_q,
        &events_q,
        &rpc_q,
        &task_q,
        &server_named,
    ] {
        queue_delete(&ch, q).await;
    }
    for q in [&pidbox_q, &reply_q, &events_q, &rpc_q, &server_named] {
        for c in Cl::ALL {
            direct
                .assert_no_queue(
                    c,
                    q,
                    &format!(
                        "queue.delete through the proxy removes {q} from {}",
                        c.name()
                    ),
                )
                .await;
        }
    }
    for (x, _, _) in exchanges {
        exchange_delete(&ch, x).await;
    }
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 8. basic.get looks on every shard cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_finds_messages_on_either_shard() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("get");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;

    for (c, body) in [
        (Cl::B, "only on shard-b"),
        (Cl::A, "only on shard-a"),
        (Cl::B, "shard-b again"),
    ] {
        direct.fill(c, &queue, &[body]).await;
        let got = get(&ch, &queue, false).await.unwrap_or_else(|| {
            panic!(
                "basic.get returned get-empty with one message on {}",
                c.name()
            )
        });
        assert_eq!(got.body, body.as_bytes(), "basic.get body");
        assert!(!got.redelivered);
        ack(&ch, got.tag, false).await;
        // Empty everywhere now, whichever cluster the proxy asks first.
        for _ in 0..3 {
            let got = get(&ch, &queue, false).await;
            assert!(
                got.is_none(),
                "basic.get on an empty queue should be get-empty, got {:?}",
                got.map(|g| g.body)
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

    shutdown(proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 9. A consumer cancelled by one cluster is cancelled for the client

/// The queue deleted on shard-a only (an operator there, or a mirrored queue failing over
/// under `x-cancel-on-ha-failover`): one broker ends the consumer and says so, and warren
/// does too, at once, instead of keeping a consumer that no longer reads shard-a's part. A
/// client that declares and consumes again (as kombu and Celery do) gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_cancelled_by_one_cluster_is_cancelled_for_the_client() {
    if support::skip_live() {
        return;
    }
    let (mut cleanup, queue) = Cleanup::with_queue("cancel");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    let (ctag, mut rx) = consume(&ch, &queue, true).await;

    direct.delete_queue(Cl::A, &queue).await;
    expect_cancel(&mut events, &ctag, "once shard-a deleted the queue").await;
    let end = within("the consumer stream to end after basic.cancel", rx.recv()).await;
    assert!(
        end.is_none(),
        "consumer stream should end after basic.cancel"
    );
    // Nothing more is delivered for the old tag: a message on shard-b stays there.
    direct.publish(Cl::B, &queue, &["msg-1"]).await;
    direct.wait_depth(Cl::B, &queue, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(e) = events.try_next() {
        panic!("unexpected event after the cancel: {e:?}");
    }
    assert!(
        ch.is_open(),
        "the channel survives the consumer's cancellation"
    );
    // Declare and consume again: the queue is back on shard-a and shard-b's message arrives.
    declare_queue(&ch, &queue).await;
    assert_eq!(direct.depth(Cl::A, &queue).await, Some(0));
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;
    let m = within("shard-b's message after consuming again", rx.recv())
        .await
        .expect("consumer running");
    let d = delivery(m);
    assert_eq!(d.body, b"msg-1");
    ack(&ch, d.tag, false).await;
    let other = cleanup.queue(&unique("cancel-after"));
    declare_queue(&ch, &other).await;
    queue_delete(&ch, &other).await;

    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 10. Mandatory + confirms: the return comes before the ack

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_publish_is_returned_before_its_ack() {
    if support::skip_live() {
        return;
    }
    const N: u64 = 6;
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&unique("unroutable-x"));
    let (proxy, direct, conn, ch, mut events) = start().await;
    exchange_declare(&ch, &exchange, "direct", false).await;
    for c in [Cl::A, Cl::B] {
        assert!(
            direct.exchange_exists(c, &exchange, "direct").await,
            "sharded exchange {exchange} must exist on {}",
            c.name()
        );
    }
    assert!(
        direct
            .exchange_exists(Cl::Control, &exchange, "direct")
            .await,
        "exchange {exchange} exists on control too (topology lives everywhere)"
    );

    confirm_select(&ch).await;
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
            Event::Return { code, body, .. } => {
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
    exchange_delete(&ch, &exchange).await;
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 11. Transactions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_commits_on_one_cluster_and_rollback_discards() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("tx");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
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
    while let Some(m) = get(&ch, &queue, true).await {
        let i = index_of(&m.body);
        assert!(got.insert(i), "message {i} twice");
    }
    assert_eq!(
        got,
        (0..10).chain(17..22).collect::<BTreeSet<_>>(),
        "the committed messages, and only them"
    );
    events.assert_no_close("client");

    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

/// tx.select on a channel that has published without a transaction: both shard clusters had
/// that channel's publishes (and warren had put it in confirm mode on both); the transaction
/// then commits on one of them, and nothing published before it is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_select_after_plain_publishes_spread_over_both_shards() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("tx-after-publish");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    publish_numbered(&ch, &queue, 0..200).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select after plain publishes");
    let (a0, b0) = direct.shard_depths(&queue).await;
    assert_eq!(
        a0 + b0,
        200,
        "every plain publish is in, before the transaction"
    );
    assert!(
        a0 > 0 && b0 > 0,
        "plain publishes on both shards: {a0} + {b0}"
    );
    publish_numbered(&ch, &queue, 200..210).await;
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    let (a1, b1) = direct.shard_depths(&queue).await;
    assert!(
        (a1 - a0, b1 - b0) == (10, 0) || (a1 - a0, b1 - b0) == (0, 10),
        "the transaction lands on one cluster: +{} +{}",
        a1 - a0,
        b1 - b0
    );
    let mut got = BTreeSet::new();
    while let Some(m) = get(&ch, &queue, true).await {
        let i = index_of(&m.body);
        assert!(got.insert(i), "message {i} twice");
    }
    assert_eq!(got, (0..210).collect::<BTreeSet<_>>());
    events.assert_no_close("client");
    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

/// tx.select while publishes from before it are being refused: a queue full on both shard
/// clusters (`x-overflow = reject-publish`) nacks them while warren waits to switch the channel
/// to tx mode. They are never published into the client's transaction: each is dropped and
/// counted (the client asked for no confirms: RabbitMQ alone drops them too), the switch
/// completes, and the transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_select_while_earlier_publishes_are_nacked() {
    if support::skip_live() {
        return;
    }
    let (mut cleanup, full) = Cleanup::with_queue("tx-full");
    let queue = cleanup.queue(&unique("tx-after-nacks"));
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    support::declare_reject_publish_queue(&ch, &full, 1).await;
    publish_numbered(&ch, &full, 0..6).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select after refused publishes");
    eventually_for(
        STEP,
        "four refused publishes counted as dropped",
        || async {
            match proxy.metrics().dropped.get() {
                4 => Ok(()),
                n => Err(format!("{n} dropped")),
            }
        },
    )
    .await;
    assert_eq!(direct.shard_depths(&full).await, (1, 1));
    publish_numbered(&ch, &queue, 100..103).await;
    within("tx.commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    let (a, b) = direct.shard_depths(&queue).await;
    assert_eq!(a + b, 3, "the committed publishes: {a} + {b}");
    assert!(
        proxy.metrics().republished.get() <= 4,
        "each refused publish offered elsewhere at most once"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(proxy.metrics().dropped.get(), 4);
    assert_eq!(direct.shard_depths(&full).await, (1, 1));
    events.assert_no_close("client");
    for q in [&full, &queue] {
        queue_delete(&ch, q).await;
    }
    finish(conn, proxy, direct).await;
}

/// The one case warren cannot switch to tx mode: a channel that has published and has
/// deliveries unacknowledged. Reopening its upstream channels would requeue those deliveries
/// (the client would see them twice), so it is refused with a 406 that says why, and the
/// connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_select_after_publishing_with_unacked_deliveries_is_refused_with_406() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("tx-refused");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    publish_numbered(&ch, &queue, 0..4).await;
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;
    let _unacked = within("a delivery", rx.recv()).await.expect("a delivery");
    let err = within("tx.select", ch.tx_select())
        .await
        .expect_err("tx.select must be refused");
    println!("tx.select refused: {err}");
    let (code, text) = events.expect_close().await;
    assert_eq!(code, 406, "{text}");
    assert!(
        text.contains("tx.select before the first publish"),
        "{text}"
    );
    // The connection carries on, and the unacknowledged deliveries went back to the queue.
    let (ch2, _events2) = open_channel(&conn).await;
    support::eventually("all four messages back in the queue", || async {
        (queue_counts(&ch2, &queue).await.0 == 4).then_some(())
    })
    .await;
    queue_delete(&ch2, &queue).await;
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// An explicit basic.cancel stops the consumer on every shard cluster.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_cancel_stops_deliveries_from_every_shard() {
    if support::skip_live() {
        return;
    }
    let (_cleanup, queue) = Cleanup::with_queue("explicit-cancel");
    let (proxy, direct, conn, ch, mut events) = start_with_queue(&queue).await;
    let (ctag, mut rx) = consume(&ch, &queue, false).await;
    assert_eq!(queue_counts(&ch, &queue).await.1, 1, "one consumer");
    let cancelled = within(
        "basic.cancel",
        ch.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await
    .expect("basic.cancel");
    assert_eq!(cancelled, ctag);
    assert_eq!(queue_counts(&ch, &queue).await.1, 0, "no consumer left");
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
    queue_delete(&ch, &queue).await;
    finish(conn, proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 4b. After a 406 from one cluster, the same channel number opens again at once
//
// Clients such as py-amqp reuse a channel number as soon as its close handshake is done. amqprs
// does not release the number of a channel the server closed, so this one speaks raw frames
// through `warren::codec` (`support::RawClient`).

// What must happen: when shard-b refuses the declaration, the proxy closes the channel's parts on
// shard-a and control behind it. Until their close-ok, anything those clusters still send on the
// channel (shard-a's declare-ok for the refused request, say) belongs to the closed channel and
// must be discarded (AMQP 0-9-1: after sending channel.close, a peer discards every method but
// close / close-ok), and the reopened channel must really be reopened on every cluster before
// the client gets its open-ok.

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).expect("short string")
}

fn raw_declare(queue: &str) -> Method {
    Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(queue),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_406_the_same_channel_number_reopens_on_every_cluster() {
    if support::skip_live() {
        return;
    }
    let (mut cleanup, queue) = Cleanup::with_queue("reopen-conflict");
    let other = cleanup.queue(&unique("reopen-after"));
    let proxy = start_proxy().await;
    let direct = Direct::open().await;
    direct.declare_limited_on_shard_b(&queue).await;

    let mut raw = RawClient::open(proxy.amqp_addr(), Login::default()).await;
    for round in 0..3 {
        match raw.call(1, &Method::ChannelOpen(Default::default())).await {
            Method::ChannelOpenOk(_) => {}
            m => panic!("round {round}: expected channel.open-ok, got {}", m.name()),
        }
        match raw.call(1, &raw_declare(&queue)).await {
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
        let mut out = BytesMut::new();
        codec::write_method(&mut out, 1, &Method::ChannelCloseOk(Default::default()));
        codec::write_method(&mut out, 1, &Method::ChannelOpen(Default::default()));
        raw.send(&out).await;
        match raw.read_method().await {
            (1, Method::ChannelOpenOk(_)) => {}
            (ch, m) => panic!(
                "round {round}: expected channel.open-ok on 1 right after the 406, got {} on {ch}",
                m.name()
            ),
        }
        // The reopened channel works on every cluster: a declare fans out to both shards...
        match raw.call(1, &raw_declare(&other)).await {
            Method::QueueDeclareOk(ok) => assert_eq!(ok.queue.as_str(), other.as_str()),
            m => panic!("round {round}: expected queue.declare-ok, got {}", m.name()),
        }
        // ...and publishes alternate between them.
        let frame_max = raw.frame_max;
        for i in 0..4 {
            raw.publish(1, "", &other, format!("msg-{i}").as_bytes(), frame_max)
                .await;
        }
        let expected = 4 * (round + 1);
        let (a, b) = direct
            .wait_shard_total(&other, STEP, "the publishes after the reopen", expected)
            .await;
        assert_eq!(
            a as usize + b as usize,
            expected,
            "round {round}: shard-a {a} + shard-b {b}"
        );
        assert_eq!(
            (a as usize, b as usize),
            (expected / 2, expected / 2),
            "round {round}: publishes alternate over both shards after the reopen"
        );
        let close = Method::ChannelClose(codec::ChannelClose {
            reply_code: 200,
            reply_text: ss("bye"),
            class_id: 0,
            method_id: 0,
        });
        match raw.call(1, &close).await {
            Method::ChannelCloseOk(_) => {}
            m => panic!("round {round}: expected channel.close-ok, got {}", m.name()),
        }
    }
    // connection.close, waiting for close-ok.
    raw.close().await;
    shutdown(proxy, direct).await;
}

// ---------------------------------------------------------------------------------------------
// 11. Several warren instances side by side

/// Routing depends on names only, never on what one process saw: a server-named queue declared
/// and bound to a fanout exchange through one warren gets what a client publishes to that
/// exchange through another, each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_route_alike_declare_through_one_publish_through_the_other() {
    if support::skip_live() {
        return;
    }
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&unique("two-instances"));
    let first = start_proxy().await;
    let second = start_proxy().await;
    let direct = Direct::open().await;
    let (c1, ch1, mut e1) = client(&first).await;
    let (c2, ch2, mut e2) = client(&second).await;
    exchange_declare(&ch1, &exchange, "fanout", false).await;
    let (queue, _, _) = within(
        "queue.declare \"\" through the first instance",
        ch1.queue_declare(QueueDeclareArguments::exclusive_server_named()),
    )
    .await
    .expect("queue.declare")
    .expect("declare-ok");
    cleanup.queue(&queue);
    within(
        "queue.bind through the first instance",
        ch1.queue_bind(QueueBindArguments::new(&queue, &exchange, "")),
    )
    .await
    .expect("queue.bind");
    let (_tag, mut rx) = consume(&ch1, &queue, true).await;
    const N: usize = 20;
    confirm_select(&ch2).await;
    for i in 0..N {
        publish(&ch2, &exchange, "", format!("m-{i}").as_bytes()).await;
    }
    assert!(
        e2.confirms(N as u64).await.iter().all(|&a| a),
        "every publish acked"
    );
    let mut got = BTreeSet::new();
    for _ in 0..N {
        let d = delivery(
            within("a delivery through the first instance", rx.recv())
                .await
                .expect("consumer open"),
        );
        assert!(got.insert(d.body.clone()), "delivered twice: {:?}", d.body);
        ack(&ch1, d.tag, false).await;
    }
    tokio::time::sleep(QUIET).await;
    assert!(rx.try_recv().is_err(), "a message arrived twice");
    e1.assert_no_close("first instance's client");
    e2.assert_no_close("second instance's client");
    close_connection(c2).await;
    close_connection(c1).await;
    within("second proxy shutdown", second.shutdown()).await;
    shutdown(first, direct).await;
}
