//! The riskiest parts of a session, end to end, without RabbitMQ: warren in front of fake
//! brokers (`tests/support/fake_broker.rs`) that confirm, deliver and fail exactly as each test
//! scripts, driven by a raw AMQP client, and checked on both sides: what the client saw and
//! what each broker received.
//!
//! | Test | Shows |
//! |---|---|
//! | `a_*` | publisher confirms from two shard links, out of order and with `multiple`, reach the client once each, never before their broker confirmed them |
//! | `b_*` | a client's ack / nack / reject (with `multiple`, with requeue) reach each broker as exactly the settlements of its own deliveries |
//! | `c_*` | a nacked publish goes to the other shard (or is nacked once both refused); a publish lost with its link goes to the other shard, or waits for the cluster's other node |
//! | `d_*` | a transaction whose link dies before tx.commit is committed on a live link (commit-ok, every message committed exactly once); one whose link dies during tx.commit is refused with 541, its outcome unknown, and committed nowhere else |
//! | `e_*` | basic.qos is split over the shard clusters as docs/routing.md says (room kept for what each holds), the control cluster gets all of it, and each broker holds the client to its share |
//! | `f_*` | a link that fails over to the other node gets the channels, modes, prefetch, passive topology checks and consumers (same tags) replayed; old tags are swallowed; a queue gone meanwhile closes the client with 320 |
//! | `g_*` | tx.select after publishing reopens each upstream channel without confirm mode only once its publishes are confirmed; a publish nacked meanwhile never joins the transaction |
//! | `h_*` | publishes pipelined behind one the broker refuses are routed nowhere (the publish barrier) |
//! | `i_*` | a channel one cluster closes is closed for the client and on every cluster; the number can be reused at once |
//! | `j_*` | a consumer cancelled by one cluster is cancelled on every cluster and once for the client, after what the others delivered before their cancel-ok |
//! | `k_*` | deliveries that come before the last consume-ok wait for it and keep their tag order |
//! | `l_*`, `m_*`, `n_*`, `o_*` | bugs this file found, fixed since: each test's comment says what went wrong |
//! | `p_*` | control publishes wait for the control link's replacement and keep their order |
//! | `q_*` | connection.update-secret reaches every link, and links opened later log in with the new secret |
//! | `r_*` | with `lazy_links`, a connection that only talks to the control cluster has one link; its first request involving the shard clusters opens theirs, replays its state there, then goes on |
//! | `s_*` | a channel reopened at once waits for the old one's close on every cluster before anything sent behind the open goes out; a conditional queue.delete checks the whole queue on warren's own channels (so a cluster without the queue closes nothing of the client's), behind a fence on the client's channel (so it sees what the client sent before) |
//! | `u_*` | deliveries and confirms that reach warren split every few bytes, or many in one read, pass intact and in order: bodies whole, tags in arrival order, each publish confirmed once, acks reaching each broker as its own tags |
//! | `t_*` | a connection that only publishes, whose links warren reads late, loses, doubles and misses nothing: its publishes reach one broker once, held memory is freed, a dying link's held publishes go to the other shard, a close a broker sends unasked reaches the client |
//!
//! Every wait polls with a deadline; nothing depends on the environment. A bug found here that
//! is not fixed yet gets a test marked `#[ignore]` with the reason, run with
//! `cargo test --test session_core -- --ignored`.

mod support;

#[path = "support/fake_broker.rs"]
mod fake_broker;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use warren::codec::{self, FrameKind, Method, ReplyCode, ShortStr};

use fake_broker::{CommitVerdict, ConnId, FakeCluster, Kill, Verdict, wait_for};
use support::sharded::ShardedProxy;
use support::{Cluster, Ending, Login, RawClient, encode_publish, within_for};

const A: &str = "shard-a";
const B: &str = "shard-b";
const CONTROL: &str = "control";
/// A sharded queue name (not a control name of the Celery preset).
const Q: &str = "orders";
/// Every step of a test is over in well under a second; this only bounds a failing one.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The rig: fake clusters and a proxy in front of them

struct Rig {
    proxy: ShardedProxy,
    clusters: Vec<FakeCluster>,
}

impl Rig {
    /// Fake clusters `(name, nodes)` and warren in front of them ("control" is the control
    /// cluster, the others shards), with short connect and failover timeouts.
    async fn start(spec: &[(&str, usize)]) -> Rig {
        Rig::start_with(spec, false).await
    }

    /// [`Rig::start`], with `[limits] lazy_links` as given.
    async fn start_with(spec: &[(&str, usize)], lazy: bool) -> Rig {
        Rig::start_with_limits(spec, &format!("lazy_links = {lazy}\n")).await
    }

    /// shard-a, shard-b and control with lazy links, shard links closed after 1 s of idleness.
    async fn with_idle_links() -> Rig {
        Rig::start_with_limits(
            &[(A, 1), (B, 1), (CONTROL, 1)],
            "lazy_links = true\nidle_link_secs = 1\n",
        )
        .await
    }

    /// Until the shard links of the connections are closed for idleness.
    async fn shard_links_closed(&self) {
        let (a, b) = (self.get(A), self.get(B));
        wait_for("the idle shard links to close", || {
            (a.links().is_empty() && b.links().is_empty()).then_some(())
        })
        .await;
    }

    /// [`Rig::start`], with these lines in `[limits]`.
    async fn start_with_limits(spec: &[(&str, usize)], limits: &str) -> Rig {
        Rig::start_with_settings(spec, "", limits).await
    }

    /// [`Rig::start`], with these lines in `[timeouts]` and in `[limits]`.
    async fn start_with_settings(spec: &[(&str, usize)], timeouts: &str, limits: &str) -> Rig {
        let all: Vec<&str> = spec.iter().map(|&(name, _)| name).collect();
        Rig::start_configured(spec, &all, timeouts, limits).await
    }

    /// shard-a, shard-b and control, with warren started on shard-a and control only: a
    /// reload adds shard-b.
    async fn without_b() -> Rig {
        Rig::start_configured(
            &[(A, 1), (B, 1), (CONTROL, 1)],
            &[A, CONTROL],
            "",
            "lazy_links = false\n",
        )
        .await
    }

    /// The clusters of `spec`, with warren started on those named in `configured`.
    async fn start_configured(
        spec: &[(&str, usize)],
        configured: &[&str],
        timeouts: &str,
        limits: &str,
    ) -> Rig {
        let mut clusters = Vec::new();
        for &(name, nodes) in spec {
            clusters.push(FakeCluster::start(name, nodes).await);
        }
        let config: Vec<Cluster> = clusters
            .iter()
            .filter(|c| configured.contains(&c.name()))
            .map(|c| Cluster {
                name: c.name().to_owned(),
                nodes: c.nodes(),
            })
            .collect();
        // Every link at connection.open (the scenarios below count on it); `r_*` tests the
        // default, links opened when first needed.
        let proxy = ShardedProxy::start_on(
            &config,
            &format!(
                "connect_ms = 1000\n{}{timeouts}\n\n[limits]\n{limits}",
                // A scenario may set its own.
                if timeouts.contains("failover_wait_secs") {
                    ""
                } else {
                    "failover_wait_secs = 5\n"
                }
            ),
        )
        .await;
        Rig { proxy, clusters }
    }

    /// shard-a, shard-b and control, one node each.
    async fn three() -> Rig {
        Rig::start(&[(A, 1), (B, 1), (CONTROL, 1)]).await
    }

    fn get(&self, name: &str) -> &FakeCluster {
        self.clusters
            .iter()
            .find(|c| c.name() == name)
            .expect("a cluster of the rig")
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.amqp_addr()
    }

    fn republished(&self) -> u64 {
        self.proxy.metrics().republished.get()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client that sorts what it reads: confirms, deliveries, other methods

/// A basic.deliver or basic.get-ok.
#[derive(Debug)]
struct Delivered {
    tag: u64,
    redelivered: bool,
    body: Bytes,
    get: bool,
}

struct Client {
    raw: RawClient,
    /// Per confirm-mode channel: publishes sent, and the outcome of each settled sequence number.
    published: BTreeMap<u16, u64>,
    settled: BTreeMap<u16, BTreeMap<u64, bool>>,
    /// Every confirm frame as it came: (channel, tag, multiple, ack).
    confirm_frames: Vec<(u16, u64, bool, bool)>,
    deliveries: VecDeque<Delivered>,
    methods: VecDeque<(u16, Method)>,
    /// Every method read, in order: (channel, name).
    log: Vec<(u16, &'static str)>,
}

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).expect("short string")
}

/// A connection.close or channel.close warren sent.
trait Close: std::fmt::Debug {
    fn code(&self) -> u16;
    fn text(&self) -> String;
}

impl Close for codec::ConnectionClose {
    fn code(&self) -> u16 {
        self.reply_code
    }
    fn text(&self) -> String {
        self.reply_text.as_str().into_owned()
    }
}

impl Close for codec::ChannelClose {
    fn code(&self) -> u16 {
        self.reply_code
    }
    fn text(&self) -> String {
        self.reply_text.as_str().into_owned()
    }
}

/// Asserts that `close` has reply code `code` and that its text names every one of `words`:
/// a refusal must say why.
#[track_caller]
fn assert_says(close: &impl Close, code: u16, words: &[&str]) {
    assert_eq!(close.code(), code, "{close:?}");
    let text = close.text();
    let unsaid: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !text.contains(w))
        .collect();
    assert!(unsaid.is_empty(), "{close:?} does not say {unsaid:?}");
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            raw: RawClient::open(addr, Login::default()).await,
            published: BTreeMap::new(),
            settled: BTreeMap::new(),
            confirm_frames: Vec::new(),
            deliveries: VecDeque::new(),
            methods: VecDeque::new(),
            log: Vec::new(),
        }
    }

    async fn send(&mut self, ch: u16, m: Method) {
        self.raw.send_method(ch, &m).await;
    }

    /// Reads one command and files it.
    async fn pump(&mut self) {
        let (ch, method) = loop {
            let f = self.raw.read_frame().await.expect("a frame from warren");
            let f = f.expect("warren closed the client's socket");
            match f.kind {
                FrameKind::Heartbeat => continue,
                FrameKind::Method => {
                    break (f.channel, Method::decode(f.payload).expect("a method"));
                }
                other => panic!("unexpected {other:?} frame"),
            }
        };
        let body = if method.has_content() {
            let h = self.raw.read_frame().await.expect("frame").expect("header");
            let (_, size) = codec::peek_content_header(&h.payload).expect("content header");
            let mut body = Vec::new();
            while (body.len() as u64) < size {
                let f = self.raw.read_frame().await.expect("frame").expect("body");
                body.extend_from_slice(&f.payload);
            }
            Some(Bytes::from(body))
        } else {
            None
        };
        self.log.push((ch, method.name()));
        match method {
            Method::BasicAck(a) => self.confirmed(ch, a.delivery_tag, a.multiple, true),
            Method::BasicNack(n) => self.confirmed(ch, n.delivery_tag, n.multiple, false),
            Method::BasicDeliver(d) => self.deliveries.push_back(Delivered {
                tag: d.delivery_tag,
                redelivered: d.redelivered,
                body: body.expect("content"),
                get: false,
            }),
            Method::BasicGetOk(g) => self.deliveries.push_back(Delivered {
                tag: g.delivery_tag,
                redelivered: g.redelivered,
                body: body.expect("content"),
                get: true,
            }),
            other => self.methods.push_back((ch, other)),
        }
    }

    /// A confirm as a client reads it: `multiple` settles every unsettled number up to `tag`.
    fn confirmed(&mut self, ch: u16, tag: u64, multiple: bool, ack: bool) {
        self.confirm_frames.push((ch, tag, multiple, ack));
        let n = self.published.get(&ch).copied().unwrap_or(0);
        assert!(
            (1..=n).contains(&tag),
            "confirm of {tag} on channel {ch}: only 1..={n} were published"
        );
        let settled = self.settled.entry(ch).or_default();
        let tags: Vec<u64> = if multiple {
            (1..=tag).filter(|t| !settled.contains_key(t)).collect()
        } else {
            vec![tag]
        };
        assert!(
            !tags.is_empty(),
            "a multiple confirm of {tag} that settles nothing"
        );
        for t in tags {
            assert!(
                settled.insert(t, ack).is_none(),
                "sequence number {t} on channel {ch} confirmed twice"
            );
        }
    }

    /// Reads until channel `ch`'s settled confirms cover `expected`; then they must be exactly
    /// `expected` (nothing confirmed before its broker did).
    async fn expect_settled(&mut self, ch: u16, expected: &BTreeMap<u64, bool>) {
        within_for(STEP, "the client's confirms", async {
            while !expected
                .keys()
                .all(|k| self.settled.get(&ch).is_some_and(|s| s.contains_key(k)))
            {
                self.pump().await;
            }
        })
        .await;
        assert_eq!(
            self.settled.get(&ch).cloned().unwrap_or_default(),
            *expected,
            "the client's confirms on channel {ch} (frames: {:?})",
            self.confirm_frames
        );
    }

    /// The next method on `ch` that is not a confirm or a delivery.
    async fn reply(&mut self, ch: u16) -> Method {
        within_for(STEP, "a reply from warren", async {
            loop {
                if let Some(i) = self.methods.iter().position(|(c, _)| *c == ch) {
                    return self.methods.remove(i).expect("present").1;
                }
                self.pump().await;
            }
        })
        .await
    }

    /// The channel.close warren sends next on `ch`; any other reply fails the test.
    async fn channel_close(&mut self, ch: u16) -> codec::ChannelClose {
        match self.reply(ch).await {
            Method::ChannelClose(close) => close,
            other => panic!("expected channel.close on channel {ch}, got {other:?}"),
        }
    }

    async fn call(&mut self, ch: u16, m: Method) -> Method {
        self.send(ch, m).await;
        self.reply(ch).await
    }

    async fn delivery(&mut self) -> Delivered {
        within_for(STEP, "a delivery", async {
            loop {
                if let Some(d) = self.deliveries.pop_front() {
                    return d;
                }
                self.pump().await;
            }
        })
        .await
    }

    async fn open(&mut self, ch: u16) {
        let ok = self.call(ch, Method::ChannelOpen(Default::default())).await;
        assert!(matches!(ok, Method::ChannelOpenOk(_)), "{ok:?}");
    }

    /// exchange.declare of a durable direct exchange, answered with declare-ok.
    async fn declare_exchange(&mut self, ch: u16, exchange: &str) {
        let declare = Method::ExchangeDeclare(codec::ExchangeDeclare {
            exchange: ss(exchange),
            kind: ss("direct"),
            durable: true,
            ..Default::default()
        });
        let ok = self.call(ch, declare).await;
        assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    }

    /// queue.bind, answered with bind-ok.
    async fn bind(&mut self, ch: u16, queue: &str, exchange: &str, key: &str) {
        let bind = Method::QueueBind(codec::QueueBind {
            queue: ss(queue),
            exchange: ss(exchange),
            routing_key: ss(key),
            ..Default::default()
        });
        let ok = self.call(ch, bind).await;
        assert!(matches!(ok, Method::QueueBindOk(_)), "{ok:?}");
    }

    async fn declare(&mut self, ch: u16, queue: &str) {
        let declare = Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(queue),
            durable: true,
            ..Default::default()
        });
        let ok = self.call(ch, declare).await;
        assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    }

    /// queue.declare of an exclusive queue (this connection's own), answered with declare-ok.
    async fn declare_exclusive(&mut self, ch: u16, queue: &str) {
        let declare = Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(queue),
            exclusive: true,
            ..Default::default()
        });
        let ok = self.call(ch, declare).await;
        assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    }

    /// queue.declare of a transient auto-delete queue, answered with declare-ok.
    async fn declare_auto_delete(&mut self, ch: u16, queue: &str) {
        let declare = Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(queue),
            auto_delete: true,
            ..Default::default()
        });
        let ok = self.call(ch, declare).await;
        assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    }

    /// The connection.close warren sends next; other methods read meanwhile are dropped.
    async fn connection_close(&mut self) -> codec::ConnectionClose {
        loop {
            self.pump().await;
            if let Some((0, Method::ConnectionClose(close))) = self.methods.pop_front() {
                return close;
            }
        }
    }

    async fn confirm_select(&mut self, ch: u16) {
        let ok = self
            .call(ch, Method::ConfirmSelect(Default::default()))
            .await;
        assert!(matches!(ok, Method::ConfirmSelectOk(_)), "{ok:?}");
        self.published.insert(ch, 0);
    }

    async fn tx_select(&mut self, ch: u16) {
        let ok = self.call(ch, Method::TxSelect(Default::default())).await;
        assert!(matches!(ok, Method::TxSelectOk(_)), "{ok:?}");
    }

    async fn qos(&mut self, ch: u16, prefetch_count: u16, global: bool) {
        let qos = Method::BasicQos(codec::BasicQos {
            prefetch_size: 0,
            prefetch_count,
            global,
        });
        let ok = self.call(ch, qos).await;
        assert!(matches!(ok, Method::BasicQosOk(_)), "{ok:?}");
    }

    async fn consume(&mut self, ch: u16, queue: &str, tag: &str) {
        let consume = Method::BasicConsume(codec::BasicConsume {
            queue: ss(queue),
            consumer_tag: ss(tag),
            ..Default::default()
        });
        let ok = self.call(ch, consume).await;
        assert!(
            matches!(&ok, Method::BasicConsumeOk(c) if c.consumer_tag == tag),
            "{ok:?}"
        );
    }

    /// A publish to the default exchange; counted for confirms on a confirm-mode channel.
    async fn publish(&mut self, ch: u16, queue: &str, body: &str) {
        let frame_max = self.raw.frame_max;
        self.raw
            .publish(ch, "", queue, body.as_bytes(), frame_max)
            .await;
        if let Some(n) = self.published.get_mut(&ch) {
            *n += 1;
        }
    }

    /// This connection's first publish to the default exchange, on a channel of its own
    /// (`ch`, opened here), to a queue that does not exist (dropped), and a round trip: warren
    /// checks the first publish of a connection to each exchange, so the scenario that follows,
    /// which stalls links, publishes to the default exchange unchecked.
    async fn prove_default_exchange(&mut self, ch: u16) {
        self.open(ch).await;
        self.publish(ch, "no-such-queue", "warm-up").await;
        self.sync(ch).await;
    }

    /// A round trip through every link of `ch` (channel.flow, which goes to all of them):
    /// whatever the brokers sent before their answers has been handled by warren when it
    /// returns.
    async fn sync(&mut self, ch: u16) {
        let flow = Method::ChannelFlow(codec::ChannelFlow { active: true });
        let ok = self.call(ch, flow).await;
        assert!(matches!(ok, Method::ChannelFlowOk(_)), "{ok:?}");
    }
}

/// Appends a mandatory basic.publish to the default exchange, with `body`, to `out`.
fn encode_mandatory_publish(out: &mut BytesMut, ch: u16, routing_key: &str, body: &str) {
    codec::write_method(
        out,
        ch,
        &Method::BasicPublish(codec::BasicPublish {
            routing_key: ss(routing_key),
            mandatory: true,
            ..Default::default()
        }),
    );
    codec::write_header(
        out,
        ch,
        &codec::ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: Default::default(),
        },
    );
    codec::write_body(out, ch, body.as_bytes(), 0);
}

fn ack(tag: u64, multiple: bool) -> Method {
    Method::BasicAck(codec::BasicAck {
        delivery_tag: tag,
        multiple,
    })
}

fn nack(tag: u64, multiple: bool, requeue: bool) -> Method {
    Method::BasicNack(codec::BasicNack {
        delivery_tag: tag,
        multiple,
        requeue,
    })
}

fn reject(tag: u64, requeue: bool) -> Method {
    Method::BasicReject(codec::BasicReject {
        delivery_tag: tag,
        requeue,
    })
}

/// The client sequence number a test publish carries in its body ("m7" -> 7).
fn seq_of(body: &[u8]) -> u64 {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.strip_prefix('m'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a numbered test body: {body:?}"))
}

fn bodies(v: &[Bytes]) -> Vec<String> {
    v.iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The (upstream seq, client seq) of the publishes `cluster`'s link holds on channel 1.
fn held_map(cluster: &FakeCluster, link: ConnId) -> Vec<(u64, u64)> {
    cluster
        .held_bodies(link, 1)
        .into_iter()
        .map(|(up, body)| (up, seq_of(&body)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// (a) Confirms across links

/// Six publishes alternate over the two shards (equal weights). shard-b confirms its three at
/// once (`multiple`), shard-a its second alone, then its first and third with `multiple`. The
/// client hears each number once, when its own broker confirmed it: three single acks, one
/// single ack, then one `multiple` ack covering exactly the two oldest outstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_out_of_order_multiple_confirms_from_two_shards_settle_each_publish_once() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    a.on_publish(|_| Verdict::Hold);
    b.on_publish(|_| Verdict::Hold);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    for i in 1..=6 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    let (la, lb) = (a.only_link().await, b.only_link().await);
    wait_for("six publishes held by the shards", || {
        (a.held(la, 1).len() + b.held(lb, 1).len() == 6).then_some(())
    })
    .await;
    // Which shard took publish 1 depends on the round-robin's start; the other took 2.
    let (first, lf, second, ls) = if held_map(a, la)[0].1 == 1 {
        (a, la, b, lb)
    } else {
        (b, lb, a, la)
    };
    assert_eq!(
        held_map(first, lf),
        vec![(1, 1), (2, 3), (3, 5)],
        "equal weights alternate"
    );
    assert_eq!(held_map(second, ls), vec![(1, 2), (2, 4), (3, 6)]);
    c.expect_settled(1, &BTreeMap::new()).await;

    let mut expected = BTreeMap::new();
    second.confirm(ls, 1, 3, true, true);
    expected.extend([(2, true), (4, true), (6, true)]);
    c.expect_settled(1, &expected).await;

    first.confirm(lf, 1, 2, false, true);
    expected.insert(3, true);
    c.expect_settled(1, &expected).await;

    first.confirm(lf, 1, 3, true, true);
    expected.extend([(1, true), (5, true)]);
    c.expect_settled(1, &expected).await;

    c.sync(1).await;
    assert_eq!(
        c.confirm_frames,
        vec![
            (1, 2, false, true),
            (1, 4, false, true),
            (1, 6, false, true),
            (1, 3, false, true),
            (1, 5, true, true),
        ],
        "single acks while older numbers are outstanding, one multiple ack for the oldest ones"
    );
    assert_eq!(sorted(bodies(&first.ready(Q))), ["m1", "m3", "m5"]);
    assert_eq!(sorted(bodies(&second.ready(Q))), ["m2", "m4", "m6"]);
}

/// A small deterministic generator for the randomised schedules.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Randomised schedules (fixed seeds): 20 publishes held by both shards, then settled in a
/// random order, one or several at a time (`multiple`), a quarter of them nacked. A nacked
/// publish is nacked to the client and sent nowhere else. After each broker step the client's
/// settled numbers are exactly the model's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_confirm_schedules_with_nacks_match_the_model() {
    for seed in [1u64, 7, 42] {
        let rig = Rig::three().await;
        let shards = [rig.get(A), rig.get(B)];
        for s in shards {
            s.on_publish(|_| Verdict::Hold);
        }
        let mut c = Client::connect(rig.addr()).await;
        c.open(1).await;
        c.declare(1, Q).await;
        c.confirm_select(1).await;
        const N: u64 = 20;
        for i in 1..=N {
            c.publish(1, Q, &format!("m{i}")).await;
        }
        let links = [shards[0].only_link().await, shards[1].only_link().await];
        let held = |k: usize| held_map(shards[k], links[k]);
        wait_for("every publish held by a shard", || {
            (held(0).len() + held(1).len() == N as usize).then_some(())
        })
        .await;
        let mut rng = Lcg(seed);
        let mut expected: BTreeMap<u64, bool> = BTreeMap::new();
        let mut steps = Vec::new();
        while (expected.len() as u64) < N {
            let with: Vec<usize> = (0..2).filter(|&k| !held(k).is_empty()).collect();
            let k = with[rng.below(with.len())];
            let list = held(k);
            let (up, _) = list[rng.below(list.len())];
            let multiple = rng.below(2) == 0;
            let ack = rng.below(4) != 0;
            steps.push((k, up, multiple, ack));
            for (u, s) in list {
                if if multiple { u <= up } else { u == up } {
                    expected.insert(s, ack);
                }
            }
            shards[k].confirm(links[k], 1, up, multiple, ack);
            c.expect_settled(1, &expected).await;
        }
        c.sync(1).await;
        assert_eq!(c.settled[&1], expected, "seed {seed}, steps {steps:?}");
        // Acked publishes are on exactly one shard; refused ones on none.
        let mut stored: Vec<u64> = shards
            .iter()
            .flat_map(|s| s.ready(Q))
            .map(|b| seq_of(&b))
            .collect();
        stored.sort_unstable();
        let acked: Vec<u64> = expected
            .iter()
            .filter(|(_, ok)| **ok)
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(stored, acked, "seed {seed}, steps {steps:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Delivery tags

/// Deliveries of shard-a (a1..a4) and shard-b (b1..b4) interleave on one consumer: client tags
/// 1..8, upstream tags 1..4 on each. The client acks 2 (b1); nacks up to 5 with `multiple`,
/// no requeue (a1, a2, b2, a3); rejects 6 (b3) with requeue, which shard-b delivers again (its
/// tag 5, the client's 9, redelivered); acks 7 (a4); acks up to 9 with `multiple` (b4, b3).
/// Each broker receives exactly one settlement per client action that covers its deliveries,
/// naming its own tags; the control cluster none. Then an ack of an already settled tag is the
/// client's 406 and reaches no broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_mixed_acks_over_interleaved_deliveries_reach_each_broker_with_its_own_tags() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-b").await;
    let mut tags = BTreeMap::new();
    for i in 1..=4 {
        for (cluster, name) in [(a, "a"), (b, "b")] {
            let body = format!("{name}{i}");
            cluster.enqueue(Q, body.as_bytes());
            let d = c.delivery().await;
            assert_eq!(d.body, body.as_bytes());
            assert!(!d.redelivered);
            tags.insert(body, d.tag);
        }
    }
    let expected_tags: BTreeMap<String, u64> = [
        ("a1", 1),
        ("b1", 2),
        ("a2", 3),
        ("b2", 4),
        ("a3", 5),
        ("b3", 6),
        ("a4", 7),
        ("b4", 8),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(tags, expected_tags, "client tags in arrival order");
    let (la, lb, lc) = (
        a.only_link().await,
        b.only_link().await,
        control.only_link().await,
    );

    c.send(1, ack(2, false)).await;
    c.send(1, nack(5, true, false)).await;
    c.send(1, reject(6, true)).await;
    let again = c.delivery().await;
    assert_eq!((again.tag, again.redelivered), (9, true));
    assert_eq!(again.body, "b3".as_bytes());
    c.send(1, ack(7, false)).await;
    c.send(1, ack(9, true)).await;
    c.sync(1).await;

    let expect_a = vec![nack(3, true, false), ack(4, false)];
    let expect_b = vec![
        ack(1, false),
        nack(2, false, false),
        reject(3, true),
        ack(5, true),
    ];
    wait_for("both brokers settled", || {
        (a.ledger(la).settlements(1).len() >= expect_a.len()
            && b.ledger(lb).settlements(1).len() >= expect_b.len())
        .then_some(())
    })
    .await;
    assert_eq!(
        a.ledger(la).settlements(1),
        expect_a,
        "shard-a's settlements"
    );
    assert_eq!(
        b.ledger(lb).settlements(1),
        expect_b,
        "shard-b's settlements"
    );
    assert!(control.ledger(lc).settlements(1).is_empty());
    for cluster in [a, b] {
        assert!(
            cluster.ready(Q).is_empty(),
            "{}: nothing left",
            cluster.name()
        );
    }
    assert!(a.unacked(la).is_empty() && b.unacked(lb).is_empty());

    // Tag 3 was settled (nacked): 406, and no broker hears of it.
    c.send(1, ack(3, false)).await;
    let close = c.channel_close(1).await;
    assert_says(&close, 406, &["unknown delivery tag 3"]);
    assert_eq!(a.ledger(la).settlements(1), expect_a);
    assert_eq!(b.ledger(lb).settlements(1), expect_b);
}

// ---------------------------------------------------------------------------------------------
// (c) Republishing

/// shard-a refuses every publish, shard-b takes them. Of two publishes one lands on each; the
/// one shard-a refused is nacked to the client and never sent to shard-b (a nack may come after
/// other queues took the message, or dead-lettered it: a second try would duplicate it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_publish_a_shard_nacks_is_nacked_to_the_client_and_sent_nowhere_else() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    a.on_publish(|_| Verdict::Nack);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    c.publish(1, Q, "m1").await;
    c.publish(1, Q, "m2").await;
    c.sync(1).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    let refused = bodies(&a.ledger(la).published(1));
    assert_eq!(refused.len(), 1, "one publish went to shard-a");
    let refused_seq = if refused[0] == "m1" { 1 } else { 2 };
    c.expect_settled(
        1,
        &BTreeMap::from([(refused_seq, false), (3 - refused_seq, true)]),
    )
    .await;
    c.sync(1).await;
    assert_eq!(a.ledger(la).sent_named("basic.nack").len(), 1);
    assert_eq!(b.ledger(lb).published(1).len(), 1, "nothing sent again");
    assert_eq!(b.ready(Q).len(), 1);
    assert!(a.ready(Q).is_empty());
    assert_eq!(rig.republished(), 0);
}

/// shard-a holds its publish unconfirmed and its link dies (RST): the publish goes to shard-b,
/// which acks it; the client gets one ack per publish, and both messages are on shard-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_publish_lost_with_its_link_is_acked_once_from_the_other_shard() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    a.on_publish(|_| Verdict::Hold);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let la = a.only_link().await;
    c.publish(1, Q, "m1").await;
    c.publish(1, Q, "m2").await;
    // One of them is acked by shard-b, the other held by shard-a.
    let held = wait_for("shard-a holds a publish", || {
        let h = held_map(a, la);
        (h.len() == 1).then(|| h[0].1)
    })
    .await;
    let acked = 3 - held;
    c.expect_settled(1, &BTreeMap::from([(acked, true)])).await;
    a.kill(la, Kill::Rst);
    c.expect_settled(1, &BTreeMap::from([(1, true), (2, true)]))
        .await;
    c.sync(1).await;
    assert_eq!(sorted(bodies(&b.ready(Q))), ["m1", "m2"]);
    assert!(a.ready(Q).is_empty(), "the held publish died with its link");
    assert_eq!(rig.republished(), 1);
}

/// The only shard cluster has two nodes. Its link ends holding a publish (`end`), and the
/// first node now refuses: the publish waits until the link to the second node is open and
/// replayed, goes there, and the client gets one ack on a connection that stays open.
async fn a_publish_held_on_the_first_node_goes_to_the_second(
    end: impl FnOnce(&FakeCluster, ConnId),
) {
    let rig = Rig::start(&[(A, 2), (CONTROL, 1)]).await;
    let a = rig.get(A);
    a.on_publish(|p| {
        if p.node == 0 {
            Verdict::Hold
        } else {
            Verdict::Ack
        }
    });
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let first = a.only_link().await;
    c.publish(1, Q, "m1").await;
    wait_for("node 1 holds the publish", || {
        (a.held(first, 1).len() == 1).then_some(())
    })
    .await;
    a.refuse(0, true);
    end(a, first);
    c.expect_settled(1, &BTreeMap::from([(1, true)])).await;
    let second = a.only_link().await;
    let l = a.ledger(second);
    assert_eq!(l.node, 1, "the new link is on the second node");
    assert_eq!(bodies(&l.published(1)), ["m1"]);
    assert_eq!(bodies(&a.ready(Q)), ["m1"]);
    c.declare(1, "still-open").await;
}

/// A link given up for its silence (no heartbeat for two intervals: a stalled node, a
/// half-open connection) is let go at once: its socket is closed before the link that replaces
/// it opens, so the node learns the connection is gone as soon as the network lets it and
/// releases what it held. It was kept open until the new link took its slot, and RabbitMQ,
/// still holding the old connection's exclusive queue, refused the replay's declare of it with
/// 405, which closed a Celery worker's connection with 320 on each such stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_given_up_for_silence_is_closed_before_its_replacement_opens() {
    let rig = Rig::start_with_settings(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "upstream_heartbeat_secs = 1",
        "lazy_links = false\n",
    )
    .await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let old = a.only_link().await;
    // The node refuses new connections for a while, so the replacement waits.
    a.refuse(0, true);
    a.stall(old, true);
    wait_for("warren trying to reconnect shard-a", || {
        (a.refused(0) > 0).then_some(())
    })
    .await;
    // The broker notices the close as its reader gets to it; the replacement cannot open
    // before the refusal ends, so an old link still open then would be kept for good.
    wait_for(
        "the silent link's socket closed while its replacement is being opened",
        || (!a.ledger(old).alive).then_some(()),
    )
    .await;
    assert!(a.links().is_empty(), "no replacement opened yet");
    a.refuse(0, false);
    wait_for("a new link to shard-a", || {
        a.links()
            .into_iter()
            .find(|&l| l != old && a.ledger(l).opened)
    })
    .await;
    c.declare(1, "still-served").await;
}

/// A consumer that stops reading its socket with a large backlog: warren's buffer for it fills,
/// so it stops reading the links (back-pressure), and RabbitMQ would close those links when its
/// own writes to warren time out, which warren would notice only once the client read again,
/// with deliveries of dead links in hand (each then delivered twice). As RabbitMQ disconnects
/// a client whose writes time out, warren disconnects the client after
/// `client_write_timeout_secs` and closes its links, so the brokers requeue everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_client_that_stops_reading_is_disconnected_and_its_links_closed() {
    let rig = Rig::start_with_settings(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "client_write_timeout_secs = 2",
        "lazy_links = false\nframe_max = 4096\nclient_buffer_bytes = 65536\n",
    )
    .await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    // More than the kernel's socket buffers hold on both sides of the client's socket.
    let body = vec![b'x'; 32 * 1024];
    for _ in 0..400 {
        a.enqueue(Q, &body);
        b.enqueue(Q, &body);
    }
    let (la, lb) = (a.only_link().await, b.only_link().await);
    c.consume(1, Q, "slow").await;
    // The client reads nothing more.
    wait_for("warren closing both shard links", || {
        (!a.ledger(la).alive && !b.ledger(lb).alive).then_some(())
    })
    .await;
    for (s, l) in [(a, la), (b, lb)] {
        assert!(
            !s.ledger(l).received_named("connection.close").is_empty(),
            "{}: the link was closed by warren, politely",
            s.name()
        );
    }
    assert_eq!(
        a.ready(Q).len() + b.ready(Q).len(),
        800,
        "every message back in the queue, none acknowledged"
    );
    // The client's socket ends: nothing more from warren than what was already on its way.
    within_for(STEP, "the end of the client's socket", async {
        while let Ok(Some(_)) = c.raw.read_frame().await {}
    })
    .await;
}

/// The same stall with `client_write_timeout_secs = 0` (or set above the brokers' send
/// timeout): a broker closes the link warren stopped reading while the client read nothing.
/// What it had written for a `no_ack` consumer went with the link, so the client must hear of
/// it as it would from one broker closing it: connection.close 320 once it reads again. A
/// probe's consumer stalled 60 s kept its connection through the failover, and 2,145 and
/// 2,421 of 20,000 messages never reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_its_broker_closed_while_the_client_read_nothing_closes_a_no_ack_consumer() {
    let rig = Rig::start_with_settings(
        &[(A, 2), (B, 1), (CONTROL, 1)],
        "client_write_timeout_secs = 0",
        "lazy_links = false\nframe_max = 4096\nclient_buffer_bytes = 65536\n",
    )
    .await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    // More than the kernel's socket buffers hold on both sides of the client's socket.
    let body = vec![b'x'; 32 * 1024];
    for _ in 0..400 {
        a.enqueue(Q, &body);
    }
    let link = a.only_link().await;
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss(Q),
        consumer_tag: ss("stalled"),
        no_ack: true,
        ..Default::default()
    });
    let ok = c.call(1, consume).await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
    // The client reads nothing; its broker gives up on the link meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill(link, Kill::Rst);
    let close = within_for(
        Duration::from_secs(20),
        "connection.close",
        c.connection_close(),
    )
    .await;
    assert_says(&close, 320, &["shard-a", "not reading it"]);
}

/// A connection error from one cluster (RabbitMQ's 540 for a publish with `immediate`) closes
/// the client. It hears of it only once its other links are closed: a client reconnecting at
/// once must find the exclusive queues of its old connection gone on every cluster, as RabbitMQ
/// deletes them as it closes the connection. py-amqp's own suite, reconnecting at once, was
/// refused its exclusive queue (405) by a link still closing. Here shard-a answers its close
/// a second late, and the client is told no sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_close_warren_starts_reaches_the_client_once_its_links_are_closed() {
    let rig = Rig::start(&[(A, 1), (B, 1), (CONTROL, 1)]).await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    // The client reads on a task of its own, and notes when its close came.
    let told = tokio::spawn(async move {
        let close = c.connection_close().await;
        (close, std::time::Instant::now())
    });
    b.close_connection(lb, ReplyCode::NotImplemented, "immediate=true");
    wait_for("warren closing shard-a's link", || {
        (!a.ledger(la).received_named("connection.close").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resumed = std::time::Instant::now();
    a.stall(la, false);
    let (close, at) = within_for(STEP, "connection.close", told)
        .await
        .expect("the client task");
    assert_eq!(close.reply_code, 540, "{close:?}");
    assert!(
        at >= resumed,
        "told {:?} before shard-a's link answered its close",
        resumed - at
    );
}

/// The link dies (FIN): the node went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_publish_lost_with_the_only_shard_link_goes_to_the_other_node() {
    a_publish_held_on_the_first_node_goes_to_the_second(|a, link| a.kill(link, Kill::Fin)).await;
}

/// The node holding the link stops gracefully (`rabbitmqctl stop`, a rolling restart): RabbitMQ
/// closes its connections with 320 "broker forced connection closure with reason 'shutdown'"
/// instead of dropping them. That is a failover, as when a node dies, not a close for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_node_shutting_down_fails_its_links_over_instead_of_closing_the_client() {
    a_publish_held_on_the_first_node_goes_to_the_second(|a, link| {
        a.close_connection(
            link,
            ReplyCode::ConnectionForced,
            "broker forced connection closure with reason 'shutdown'",
        )
    })
    .await;
}

/// An operator closes warren's link for one client in RabbitMQ's management UI (any other
/// close by the broker): one broker's client would see its connection closed with that code
/// and text, and so does this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_closed_by_an_operator_closes_the_client_with_the_brokers_words() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let link = a.only_link().await;
    a.close_connection(
        link,
        ReplyCode::ConnectionForced,
        "Closed via management plugin",
    );
    let close = c.connection_close().await;
    assert_eq!(close.reply_code, 320);
    assert_eq!(
        close.reply_text.as_str(),
        "CONNECTION_FORCED - Closed via management plugin"
    );
}

/// What vanishes during a failover in the scenarios below: the queue `orders`, or the
/// auto-delete exchange `jobs` (emptied of its bindings, RabbitMQ deletes it).
#[derive(Clone, Copy, PartialEq)]
enum Vanishing {
    Queue,
    Exchange,
}

const X: &str = "jobs";

/// The client declared `orders`, `invoices` and the auto-delete exchange `jobs`; `what` is
/// deleted on the clusters named in `gone_on` while shard-a's link is down (refused until then),
/// and the link comes back. Returns the client and the rig once shard-a's new link was asked
/// about it.
async fn vanished_during_a_failover(what: Vanishing, gone_on: &[&str]) -> (Client, Rig) {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    c.declare(1, Q).await;
    c.declare(1, "invoices").await;
    let declare = Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ss(X),
        kind: ss("direct"),
        auto_delete: true,
        ..Default::default()
    });
    let ok = c.call(1, declare).await;
    assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    let la = a.only_link().await;
    take_away(a).await;
    for cluster in gone_on {
        match what {
            Vanishing::Queue => rig.get(cluster).delete_queue(Q),
            Vanishing::Exchange => rig.get(cluster).delete_exchange(X),
        }
    }
    a.refuse(0, false);
    wait_for("shard-a's new link checked what vanished", || {
        // Any link since: one whose check closes the client is gone at once.
        let l = a.opened().into_iter().find(|&l| l != la)?;
        let led = a.ledger(l);
        let checked = match what {
            Vanishing::Queue => led
                .received_named("queue.declare")
                .iter()
                .any(|(_, m)| matches!(m, Method::QueueDeclare(q) if q.passive && q.queue == Q)),
            Vanishing::Exchange => led.received_named("exchange.declare").iter().any(
                |(_, m)| matches!(m, Method::ExchangeDeclare(x) if x.passive && x.exchange == X),
            ),
        };
        checked.then_some(())
    })
    .await;
    (c, rig)
}

/// A queue the client declared is deleted while one of its links fails over (by another
/// client; or it expired, or an auto-delete queue lost its consumer), or an auto-delete
/// exchange it declared lost its last binding: one broker's client carries on and learns of it
/// when it next uses the name. Through warren the new link's replay finds it missing, asks the
/// other clusters, and as none has it any more forgets it: the connection stays up, a publish
/// to another queue is confirmed, the name is declared again nowhere, and a passive declare of
/// it gets the clusters' 404. (The replay closed the connection with 320.)
async fn gone_everywhere_during_a_failover_is_forgotten(what: Vanishing) {
    let (mut c, rig) = vanished_during_a_failover(what, &[A, B, CONTROL]).await;
    c.publish(1, "invoices", "after").await;
    c.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
    for cluster in [A, B, CONTROL] {
        let back = match what {
            Vanishing::Queue => rig.get(cluster).has_queue(Q),
            Vanishing::Exchange => rig.get(cluster).has_exchange(X),
        };
        assert!(!back, "declared again on {cluster}");
    }
    c.open(2).await;
    let passive = match what {
        Vanishing::Queue => Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(Q),
            passive: true,
            ..Default::default()
        }),
        Vanishing::Exchange => Method::ExchangeDeclare(codec::ExchangeDeclare {
            exchange: ss(X),
            passive: true,
            ..Default::default()
        }),
    };
    c.send(2, passive).await;
    let close = c.channel_close(2).await;
    assert_eq!(close.reply_code, 404, "{close:?}");
    c.sync(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_queue_gone_everywhere_during_a_failover_is_forgotten() {
    gone_everywhere_during_a_failover_is_forgotten(Vanishing::Queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_an_auto_delete_exchange_gone_during_a_failover_is_forgotten() {
    gone_everywhere_during_a_failover_is_forgotten(Vanishing::Exchange).await;
}

/// queue.declare of durable queue `queue` with an `x-expires` lease of a minute.
fn declare_leased(queue: &str) -> Method {
    declare_durable_with(queue, "x-expires", codec::FieldValue::I32(60_000))
}

/// queue.declare of durable queue `queue` with one argument.
fn declare_durable_with(queue: &str, key: &str, value: codec::FieldValue) -> Method {
    let mut arguments = codec::FieldTable::default();
    arguments.insert(ss(key), value);
    Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(queue),
        durable: true,
        arguments,
        ..Default::default()
    })
}

/// A client since gone declared a queue with an `x-expires` lease and a plain one; the leased
/// queue expired on every cluster (or an operator deleted it), then shard-b is added by a
/// reload. One broker no longer has the queue: a publish to it is unroutable, returned to a
/// mandatory publisher. shard-b's link replays the vhost's shared topology, and used to declare
/// the queue there again, alone: it took shard-b's share of such publishes and held them until
/// its lease ran out there. Now the serving clusters are asked first: the queue none has any
/// more is forgotten (a passive declare gets their 404, as on one broker), the plain one is
/// declared on shard-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_cluster_added_by_a_reload_does_not_get_a_queue_gone_from_every_cluster() {
    let rig = Rig::without_b().await;
    let b = rig.get(B);
    let mut first = Client::connect(rig.addr()).await;
    first.open(1).await;
    let ok = first.call(1, declare_leased("leased")).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    first.declare(1, "kept").await;
    drop(first);
    for cluster in [A, CONTROL] {
        rig.get(cluster).delete_queue("leased");
    }
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    rig.proxy.reload_on(
        &clusters_of(&rig, &[A, B, CONTROL]),
        "connect_ms = 1000\nfailover_wait_secs = 5\n",
    );
    wait_for("shard-b got the queue the others still have", || {
        b.has_queue("kept").then_some(())
    })
    .await;
    // The replay declares in the order of the records: "leased" would have come first.
    assert!(!b.has_queue("leased"), "declared again on shard-b alone");
    c.sync(1).await;
    c.open(2).await;
    c.send(
        2,
        Method::QueueDeclare(codec::QueueDeclare {
            queue: ss("leased"),
            passive: true,
            ..Default::default()
        }),
    )
    .await;
    let close = c.channel_close(2).await;
    assert_eq!(close.reply_code, 404, "{close:?}");
    c.sync(1).await;
    // A client connecting now does not declare it on shard-b either: the vhost forgot it.
    let mut later = Client::connect(rig.addr()).await;
    later.open(1).await;
    later.sync(1).await;
    assert!(!b.has_queue("leased"));
}

/// shard-b is away while the client declares a leased queue; the queue then expires on the
/// clusters that have it, before shard-b is back. Applying what shard-b missed used to declare
/// it there, alone. Now the serving clusters are asked first, and the queue none has is
/// forgotten; a queue declared while shard-b was away that the others still have is declared
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_queue_declared_while_a_cluster_was_away_and_gone_since_is_not_declared_there() {
    let rig = Rig::three().await;
    let b = rig.get(B);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    take_away(b).await;
    let ok = c.call(1, declare_leased("leased")).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    c.declare(1, "kept").await;
    for cluster in [A, CONTROL] {
        rig.get(cluster).delete_queue("leased");
    }
    b.refuse(0, false);
    wait_for("shard-b got the queue the others still have", || {
        b.has_queue("kept").then_some(())
    })
    .await;
    assert!(!b.has_queue("leased"), "declared again on shard-b alone");
    c.sync(1).await;
}

/// The same, by a client gone before shard-b is back: the next connection's link to shard-b
/// applies what the vhost's clients changed meanwhile, and used to declare the leased queue
/// there, alone, at its first channel.open. Now that link joins once the serving clusters were
/// asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_queue_gone_since_a_gone_client_declared_it_is_not_declared_on_a_returning_cluster() {
    let rig = Rig::three().await;
    let b = rig.get(B);
    let mut first = Client::connect(rig.addr()).await;
    first.open(1).await;
    take_away(b).await;
    let ok = first.call(1, declare_leased("leased")).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    first.declare(1, "kept").await;
    drop(first);
    for cluster in [A, CONTROL] {
        rig.get(cluster).delete_queue("leased");
    }
    b.refuse(0, false);
    // The old link's retries may still be backing off: the next connection opens a new one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut next = Client::connect(rig.addr()).await;
    next.open(1).await;
    wait_for("shard-b got the queue the others still have", || {
        b.has_queue("kept").then_some(())
    })
    .await;
    assert!(!b.has_queue("leased"), "declared again on shard-b alone");
    next.sync(1).await;
}

/// The same queue missing on the failed-over cluster only (that cluster lost it: a queue on the
/// node that died) while the others still have it: carrying on would route that cluster's share
/// of its messages nowhere, so the client is closed with 320 naming the cluster and the queue,
/// as one broker's client loses its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_queue_lost_on_the_failed_over_cluster_only_closes_the_client_with_320() {
    let (mut c, rig) = vanished_during_a_failover(Vanishing::Queue, &[A]).await;
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "queue 'orders'", "only"]);
    assert!(rig.get(B).has_queue(Q), "kept where it was");
    assert!(!rig.get(A).has_queue(Q), "not re-created on shard-a alone");
}

/// The per-consumer prefetch in force on channel 1 of `link` at each basic.consume it received:
/// `(consumer tag, prefetch count)`.
fn prefetch_at_each_consume(cluster: &FakeCluster, link: ConnId) -> Vec<(String, u16)> {
    let mut in_force = 0;
    let mut out = Vec::new();
    for f in cluster
        .ledger(link)
        .received
        .iter()
        .filter(|f| f.channel == 1)
    {
        match &f.method {
            Method::BasicQos(q) if !q.global => in_force = q.prefetch_count,
            Method::BasicConsume(k) => out.push((k.consumer_tag.as_str().into_owned(), in_force)),
            _ => {}
        }
    }
    out
}

/// basic.qos (per consumer) applies to the consumers started after it: one started under
/// prefetch 4 keeps that limit when the channel's setting is raised to 10 for a later one. A
/// link that replaces a dead one subscribes both again, each under the limit it started with,
/// as on the first link, and a consumer started afterwards gets the setting in force. (Every
/// consumer got the latest setting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_each_consumer_keeps_its_prefetch_on_a_new_link() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, "invoices").await;
    c.qos(1, 4, false).await;
    c.consume(1, Q, "early").await;
    c.qos(1, 10, false).await;
    c.consume(1, "invoices", "late").await;
    let first = a.only_link().await;
    let before = prefetch_at_each_consume(a, first);
    // Shares of the window with two shard clusters.
    assert_eq!(
        before,
        [("early".to_owned(), 2), ("late".to_owned(), 5)],
        "on the first link"
    );
    a.kill(first, Kill::Rst);
    let second = wait_for("a new link subscribed both consumers again", || {
        let l = a.links().into_iter().find(|&l| l != first)?;
        (a.ledger(l).received_named("basic.consume").len() == 2).then_some(l)
    })
    .await;
    assert_eq!(
        prefetch_at_each_consume(a, second),
        before,
        "on the new link"
    );
    c.consume(1, Q, "later").await;
    assert_eq!(
        prefetch_at_each_consume(a, second).last(),
        Some(&("later".to_owned(), 5)),
        "a consumer started after the failover gets the setting in force"
    );
}

// ---------------------------------------------------------------------------------------------
// (d) Transactions across a failover

/// tx.select, two publishes (both to the transaction's shard), tx.commit: the transaction's
/// shard receives the commit and dies (RST) without answering. Whether it committed is
/// unknown, as to one broker's client whose connection fails during a commit: the client is
/// told so (channel.close 541), and nothing is committed again elsewhere (docs/routing.md,
/// "Transactions"). warren used to commit the transaction again on the other shard, which
/// committed it twice whenever the dead node had committed (next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_commit_whose_link_dies_unanswered_is_refused_with_541_not_redone() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    let link = tx_cluster.only_link().await;
    tx_cluster.on_commit(|_, _| CommitVerdict::Hang);
    c.send(1, Method::TxCommit(Default::default())).await;
    got_commit(tx_cluster, link).await;
    tx_cluster.kill(link, Kill::Rst);
    let close = c.channel_close(1).await;
    assert_says(&close, 541, &["may or may not have been committed"]);
    assert!(
        tx_cluster.ready(Q).is_empty(),
        "the dead link committed nothing"
    );
    assert!(other.ready(Q).is_empty(), "nothing committed elsewhere");
    assert_eq!(rig.republished(), 0);
}

/// The same, but the dying shard did commit before it died (its commit-ok never came): the
/// transaction is in the queue once, and the client is told the outcome is unknown. It used to
/// be committed on the other shard too: a probe found a whole transaction of 50 twice in 3 of
/// 5 runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_commit_applied_by_a_dying_shard_is_not_committed_again() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    let link = tx_cluster.only_link().await;
    tx_cluster.on_commit(|_, _| CommitVerdict::CommitSilently);
    c.send(1, Method::TxCommit(Default::default())).await;
    wait_for("the transaction's shard committed", || {
        (tx_cluster.ready(Q).len() == 2).then_some(())
    })
    .await;
    tx_cluster.kill(link, Kill::Rst);
    let close = c.channel_close(1).await;
    assert_eq!(close.reply_code, 541, "{close:?}");
    assert_eq!(sorted(bodies(&tx_cluster.ready(Q))), ["t1", "t2"]);
    assert!(other.ready(Q).is_empty(), "not committed a second time");
    assert_eq!(rig.republished(), 0);
}

/// The transaction's link dies before tx.commit is sent: the commit publishes the transaction
/// again on a live link first; commit-ok, each message committed exactly once somewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_transaction_whose_link_died_before_the_commit_is_committed_once() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    let link = tx_cluster.only_link().await;
    tx_cluster.kill(link, Kill::Rst);
    // warren noticed: it has a new link there (replayed in tx mode).
    let new = wait_for("a new link to the transaction's shard", || {
        tx_cluster.links().into_iter().find(|&l| l != link)
    })
    .await;
    wait_for("the new link selected tx", || {
        (!tx_cluster
            .ledger(new)
            .received_named("tx.select")
            .is_empty())
        .then_some(())
    })
    .await;
    let ok = c.call(1, Method::TxCommit(Default::default())).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    c.sync(1).await;
    let all: Vec<String> = [tx_cluster, other]
        .iter()
        .flat_map(|s| bodies(&s.ready(Q)))
        .collect();
    assert_eq!(sorted(all), ["t1", "t2"], "each message committed once");
}

/// The transaction's shard dies with the commit unanswered, and the other shard is down: the
/// commit cannot be redone anywhere. The client is told so with channel.close 541, at once: the
/// close used to wait behind the commit itself, which nothing could answer any more, and the
/// client's tx.commit never returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_commit_lost_with_no_other_shard_up_is_refused_not_left_waiting() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    other.refuse(0, true);
    other.kill(other.only_link().await, Kill::Rst);
    let link = tx_cluster.only_link().await;
    tx_cluster.on_commit(|_, _| CommitVerdict::Hang);
    c.send(1, Method::TxCommit(Default::default())).await;
    got_commit(tx_cluster, link).await;
    tx_cluster.refuse(0, true);
    tx_cluster.kill(link, Kill::Rst);
    let close = c.channel_close(1).await;
    assert_says(&close, 541, &["may or may not have been committed"]);
}

/// Every shard link is down when tx.commit arrives (both failed over, their clusters not yet
/// back): the commit waits for a shard link, as publishes do, instead of being refused with
/// 541 at once; once one is back the transaction is published there again and committed, each
/// message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_commit_while_every_shard_link_is_reconnecting_waits_for_one() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    for cluster in [tx_cluster, other] {
        cluster.refuse(0, true);
        cluster.kill(cluster.only_link().await, Kill::Rst);
    }
    wait_for("warren tried to reconnect both shards", || {
        (tx_cluster.refused(0) > 0 && other.refused(0) > 0).then_some(())
    })
    .await;
    c.send(1, Method::TxCommit(Default::default())).await;
    let early = tokio::time::timeout(Duration::from_millis(400), c.reply(1)).await;
    assert!(
        early.is_err(),
        "the commit waits for a shard link: {early:?}"
    );
    other.refuse(0, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    c.sync(1).await;
    let all: Vec<String> = [tx_cluster, other]
        .iter()
        .flat_map(|s| bodies(&s.ready(Q)))
        .collect();
    assert_eq!(sorted(all), ["t1", "t2"], "each message committed once");
}

/// The next transaction's publishes pipelined right behind a tx.commit whose shard dies
/// without answering: the commit's outcome is unknown (channel.close 541), and what the client
/// sent after the commit is discarded with the channel, committed nowhere. RabbitMQ handles
/// nothing else on a channel while it commits; warren reads the client's input only once the
/// commit is answered. (When the commit was redone on the other shard, those publishes used to
/// be committed with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_publishes_behind_a_commit_in_doubt_are_committed_nowhere() {
    let rig = Rig::three().await;
    let (mut c, tx_cluster, other) = open_transaction(&rig).await;
    let link = tx_cluster.only_link().await;
    tx_cluster.on_commit(|_, _| CommitVerdict::Hang);
    c.send(1, Method::TxCommit(Default::default())).await;
    for body in ["n1", "n2", "n3", "n4"] {
        c.publish(1, Q, body).await;
    }
    got_commit(tx_cluster, link).await;
    tx_cluster.kill(link, Kill::Rst);
    let close = c.channel_close(1).await;
    assert_eq!(close.reply_code, 541, "{close:?}");
    c.open(2).await;
    c.sync(2).await;
    assert!(
        tx_cluster.ready(Q).is_empty(),
        "the dead link committed nothing"
    );
    assert!(other.ready(Q).is_empty(), "nothing committed elsewhere");
}

/// In a transaction, a nack with `requeue` of deliveries from both shards, then tx.commit:
/// a broker answers commit-ok before it delivers again what the commit requeued. The shard
/// that commits first must not have its redeliveries reach the client before the client's
/// commit-ok, which waits for the slower shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_redeliveries_of_what_a_commit_requeued_come_after_commit_ok() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    a.enqueue(Q, b"from-a");
    b.enqueue(Q, b"from-b");
    c.tx_select(1).await;
    c.consume(1, Q, "worker").await;
    let first = c.delivery().await;
    let second = c.delivery().await;
    let (link_a, link_b) = (a.only_link().await, b.only_link().await);
    b.stall(link_b, true);
    c.send(1, nack(first.tag.max(second.tag), true, true)).await;
    c.send(1, Method::TxCommit(Default::default())).await;
    wait_for("shard-a committed and delivered again", || {
        (a.ledger(link_a).sent_named("basic.deliver").len() == 2).then_some(())
    })
    .await;
    // Give warren the time to read shard-a's commit-ok and redelivery.
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.stall(link_b, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    let at = c
        .log
        .iter()
        .position(|(_, name)| *name == "tx.commit-ok")
        .expect("commit-ok read");
    let before = c.log[..at]
        .iter()
        .filter(|(_, name)| *name == "basic.deliver")
        .count();
    assert_eq!(
        before, 2,
        "only the first deliveries came before commit-ok: {:?}",
        c.log
    );
    let again = [c.delivery().await, c.delivery().await];
    let mut got: Vec<String> = again
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    got.sort();
    assert_eq!(got, ["from-a", "from-b"]);
    assert!(again.iter().all(|d| d.redelivered), "marked redelivered");
}

/// Connects to `rig`, declares `Q` on channel 1 and opens a transaction there with two
/// publishes ("t1", "t2"); returns the client, the shard that received them (the
/// transaction's), and the other shard.
async fn open_transaction(rig: &Rig) -> (Client, &FakeCluster, &FakeCluster) {
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.tx_select(1).await;
    c.publish(1, Q, "t1").await;
    c.publish(1, Q, "t2").await;
    let (tx_cluster, other) = wait_for("the transaction's two publishes on one shard", || {
        let on = |s: &FakeCluster| {
            s.links()
                .iter()
                .map(|&l| s.ledger(l).published(1).len())
                .sum::<usize>()
        };
        match (on(a), on(b)) {
            (2, 0) => Some((a, b)),
            (0, 2) => Some((b, a)),
            _ => None,
        }
    })
    .await;
    (c, tx_cluster, other)
}

/// Waits until `cluster`'s connection `link` has received tx.commit.
async fn got_commit(cluster: &FakeCluster, link: ConnId) {
    wait_for("the transaction's shard got tx.commit", || {
        (!cluster.ledger(link).received_named("tx.commit").is_empty()).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (e) Prefetch split

/// basic.qos over shard-a, shard-b and control (docs/routing.md, "Prefetch"): the shard
/// clusters share the window W (W / 2 each, the remainder to the first, at least 1, 0 stays 0),
/// the control cluster gets all of it (a sharded queue's messages are on the shards); `global`
/// is passed on. With 20 messages on each shard and prefetch 10, the client holds exactly 5 + 5
/// deliveries. Then the client holds 8 deliveries of shard-a on purpose (as Celery holds ETA
/// tasks) and raises its prefetch from 10 to 10 + 8: shard-a's share keeps room for its 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_prefetch_is_split_over_the_shard_clusters_and_each_broker_holds_to_its_share() {
    let rig = Rig::three().await;
    let clusters = [rig.get(A), rig.get(B), rig.get(CONTROL)];
    let mut c = Client::connect(rig.addr()).await;
    for ch in 1..=4 {
        c.open(ch).await;
    }
    c.declare(1, Q).await;
    c.qos(1, 10, false).await;
    c.qos(2, 2, false).await;
    c.qos(3, 0, false).await;
    c.qos(4, 7, true).await;
    let expected: [(u16, [u16; 3], bool); 4] = [
        (1, [5, 5, 10], false),
        (2, [1, 1, 2], false),
        (3, [0, 0, 0], false),
        (4, [4, 3, 7], true),
    ];
    let links: Vec<ConnId> = {
        let mut v = Vec::new();
        for cl in clusters {
            v.push(cl.only_link().await);
        }
        v
    };
    let qos_of = |i: usize| -> Vec<(u16, u16, bool)> {
        clusters[i]
            .ledger(links[i])
            .received_named("basic.qos")
            .into_iter()
            .map(|(ch, m)| match m {
                Method::BasicQos(q) => (ch, q.prefetch_count, q.global),
                _ => unreachable!(),
            })
            .collect()
    };
    for (i, cl) in clusters.iter().enumerate() {
        let want: Vec<(u16, u16, bool)> =
            expected.iter().map(|(ch, s, g)| (*ch, s[i], *g)).collect();
        assert_eq!(qos_of(i), want, "{}'s basic.qos", cl.name());
    }
    for cl in &clusters[..2] {
        for i in 0..20 {
            cl.enqueue(Q, format!("{}-{i}", cl.name()).as_bytes());
        }
    }
    c.consume(1, Q, "ctag-e").await;
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(c.delivery().await);
    }
    for (i, cl) in clusters.iter().enumerate() {
        let want = [5, 5, 0][i];
        wait_for(&format!("{} holds {want} unacked", cl.name()), || {
            (cl.unacked(links[i]).len() == want).then_some(())
        })
        .await;
    }
    c.sync(1).await;
    assert!(
        c.deliveries.is_empty(),
        "no more than the window: {:?}",
        c.deliveries
    );
    // Ack shard-b's five: the client holds shard-a's five, then takes shard-b's next five.
    let b_tags: Vec<u64> = got
        .iter()
        .filter(|d| d.body.starts_with(b"shard-b"))
        .map(|d| d.tag)
        .collect();
    for t in &b_tags {
        c.send(1, ack(*t, false)).await;
    }
    for _ in 0..5 {
        got.push(c.delivery().await);
    }
    // Holding shard-a's 5 on purpose, the client raises its prefetch by 5 (Celery's ETA
    // tasks): shard-a gets 5 + (15 - 10) / 2 = 7 or 8, room for more beside what it holds.
    c.qos(1, 15, false).await;
    let last = qos_of(0).last().copied().expect("shard-a's new qos");
    assert!(
        last.1 > 5,
        "shard-a's share keeps room beyond the 5 it holds: {last:?}"
    );
    let total: u16 = [qos_of(0), qos_of(1)]
        .iter()
        .map(|v| v.last().expect("a qos").1)
        .sum();
    assert_eq!(total, 15, "the shard shares add up to the window");
}

/// The documented limit of the split (docs/routing.md, "Prefetch"): prefetch 2 over two shard
/// clusters is a share of 1 each. A consumer holding one delivery of shard-a has room for one
/// more, but shard-a's next message waits there until that delivery is acked, while shard-b,
/// with nothing ready, keeps the other share. One broker would deliver it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_full_share_holds_back_its_clusters_messages_while_the_client_has_room() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.qos(1, 2, false).await;
    a.enqueue(Q, b"long");
    c.consume(1, Q, "ctag-share").await;
    let long = c.delivery().await;
    assert_eq!(long.body.as_ref(), b"long");
    a.enqueue(Q, b"short");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.sync(1).await;
    assert!(
        c.deliveries.is_empty(),
        "shard-a's share of 1 is held: nothing more comes from it"
    );
    assert_eq!(a.ready(Q).len(), 1, "the message waits on shard-a");
    c.send(1, ack(long.tag, false)).await;
    let short = c.delivery().await;
    assert_eq!(short.body.as_ref(), b"short");
}

// ---------------------------------------------------------------------------------------------
// (f) Failover replay

/// The client's setup on shard-a's link: an exchange, a queue bound to it, channel 1 in confirm
/// mode with prefetch 10 and a consumer, channel 2 in tx mode, and one delivery of shard-a,
/// acknowledged. The link dies (RST) and the first node refuses: the link to the second node
/// opens channels 1 and 2, selects confirm and tx again, sends channel 1's share of the prefetch,
/// checks the exchange and the queue with passive declares (declaring and binding nothing), and
/// subscribes the consumer with the same tag. The next delivery comes through it, and its ack
/// reaches the new link; publishes are confirmed through it. (A client holding deliveries of
/// the dead link is closed instead: `c_a_link_lost_while_the_client_holds_its_deliveries_closes_the_client`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_failed_over_link_replays_channels_modes_qos_topology_and_consumers() {
    let rig = Rig::start(&[(A, 2), (B, 1), (CONTROL, 1)]).await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.open(2).await;
    c.declare_exchange(1, "jobs").await;
    c.declare(1, Q).await;
    c.bind(1, Q, "jobs", "new").await;
    c.confirm_select(1).await;
    c.qos(1, 10, false).await;
    c.consume(1, Q, "ctag-f").await;
    c.tx_select(2).await;
    a.enqueue(Q, b"before");
    let old = c.delivery().await;
    assert_eq!(old.body, "before".as_bytes());
    let first = a.only_link().await;
    c.send(1, ack(old.tag, false)).await;
    wait_for("the ack on the first link", || {
        a.unacked(first).is_empty().then_some(())
    })
    .await;

    a.refuse(0, true);
    a.kill(first, Kill::Rst);
    let second = wait_for("the link to the second node replayed the consumer", || {
        let l = a.links().into_iter().find(|&l| l != first)?;
        (!a.ledger(l).received_named("basic.consume").is_empty()).then_some(l)
    })
    .await;
    a.enqueue(Q, b"after");
    let again = c.delivery().await;
    assert_eq!(again.body, "after".as_bytes());
    assert!(!again.redelivered);
    assert_ne!(again.tag, old.tag);

    let l = a.ledger(second);
    assert_eq!(l.node, 1);
    let on = |name: &str| -> Vec<(u16, Method)> { l.received_named(name) };
    // The topology is checked on channels of warren's own (numbers the client does not use),
    // which carry those passive declares only.
    let checks: BTreeSet<u16> = l
        .received
        .iter()
        .filter(|f| {
            matches!(&f.method, Method::ExchangeDeclare(x) if x.passive)
                || matches!(&f.method, Method::QueueDeclare(q) if q.passive)
        })
        .map(|f| f.channel)
        .collect();
    let channels: BTreeSet<u16> = on("channel.open").into_iter().map(|(ch, _)| ch).collect();
    assert_eq!(
        channels
            .difference(&checks)
            .copied()
            .collect::<BTreeSet<u16>>(),
        BTreeSet::from([1, 2])
    );
    assert!(checks.is_disjoint(&BTreeSet::from([1, 2])), "{checks:?}");
    assert!(
        matches!(&on("confirm.select")[..], [(1, Method::ConfirmSelect(s))] if !s.nowait),
        "{:?}",
        on("confirm.select")
    );
    assert!(
        matches!(&on("tx.select")[..], [(2, _)]),
        "{:?}",
        on("tx.select")
    );
    assert!(
        on("basic.qos").iter().any(|(ch, m)| *ch == 1
            && matches!(m, Method::BasicQos(q) if q.prefetch_count == 5 && !q.global)),
        "channel 1's share of prefetch 10: {:?}",
        on("basic.qos")
    );
    let declares: Vec<(String, bool)> = l
        .received
        .iter()
        .filter_map(|f| match &f.method {
            Method::ExchangeDeclare(x) => {
                Some((format!("exchange {}", x.exchange.as_str()), x.passive))
            }
            Method::QueueDeclare(q) => Some((format!("queue {}", q.queue.as_str()), q.passive)),
            _ => None,
        })
        .collect();
    assert_eq!(
        declares,
        [
            ("exchange jobs".to_owned(), true),
            (format!("queue {Q}"), true)
        ],
        "a failover checks the topology, never re-creates it"
    );
    assert!(on("queue.bind").is_empty());
    assert!(
        matches!(&on("basic.consume")[..], [(1, Method::BasicConsume(k))]
            if k.consumer_tag == "ctag-f" && k.queue == Q && !k.no_ack),
        "{:?}",
        on("basic.consume")
    );

    assert_eq!(bodies(&a.unacked(second)), ["after"]);
    c.send(1, ack(again.tag, false)).await;
    wait_for("the new tag's ack on the new link", || {
        (a.ledger(second).settlements(1) == vec![ack(1, false)]).then_some(())
    })
    .await;
    assert!(a.unacked(second).is_empty());

    // Publishing through the replayed confirm-mode channel works on both shards.
    for i in 1..=4 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    c.expect_settled(1, &(1..=4).map(|s| (s, true)).collect())
        .await;
}

/// A consumer holds a delivery of shard-a, unacknowledged, when its link there dies. The broker
/// requeues the message and would deliver it again through the next link while the client
/// still has it: a Celery worker would run the task twice. One broker's client loses its
/// connection with the node and drops what it held, so warren closes the client with 320,
/// saying why, rather than fail over. A consumer holding nothing of the dead link fails over
/// without a word (`f_a_failed_over_link_replays_channels_modes_qos_topology_and_consumers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_lost_while_the_client_holds_its_deliveries_closes_the_client() {
    let rig = Rig::start(&[(A, 2), (B, 1), (CONTROL, 1)]).await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.qos(1, 10, false).await;
    c.consume(1, Q, "ctag-held").await;
    a.enqueue(Q, b"held");
    assert_eq!(c.delivery().await.body, b"held".as_slice());
    let first = a.only_link().await;
    a.refuse(0, true);
    a.kill(first, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "1 unacknowledged deliveries"]);
}

/// warren closes a client with 320 (shard-a's link died while the client held one of its
/// deliveries) while publishes the client sent without confirms are still unconfirmed on
/// shard-b: shard-b's link stays open until they are confirmed, and they are in the queue. It
/// used to get connection.close with the client's, and the publishes were lost with it. The
/// client's exclusive queue is deleted at once all the same, as RabbitMQ deletes it with the
/// connection, not kept with the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_close_warren_starts_keeps_the_links_until_the_publishes_are_confirmed() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, "other").await;
    c.declare_exclusive(1, "mine").await;
    c.consume(1, Q, "worker").await;
    a.enqueue(Q, b"held");
    assert_eq!(c.delivery().await.body, b"held".as_slice());
    b.on_publish(|_| Verdict::Hold);
    let (link_a, link_b) = (a.only_link().await, b.only_link().await);
    for i in 0..4 {
        c.publish(1, "other", &format!("p{i}")).await;
    }
    wait_for("shard-b holds two publishes", || {
        (b.ledger(link_b).published(1).len() == 2).then_some(())
    })
    .await;
    a.kill(link_a, Kill::Rst);
    let close = c.connection_close().await;
    assert_eq!(close.reply_code, 320, "{close:?}");
    c.send(0, Method::ConnectionCloseOk(Default::default()))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.links().contains(&link_b),
        "shard-b's link stays while its publishes are unconfirmed"
    );
    assert!(
        !b.has_queue("mine"),
        "the exclusive queue is deleted as the client is closed"
    );
    b.confirm(link_b, 1, 2, true, true);
    wait_for("shard-b routed the two publishes", || {
        (b.ready("other").len() == 2).then_some(())
    })
    .await;
    wait_for("shard-b's link closed once they were confirmed", || {
        (!b.links().contains(&link_b)).then_some(())
    })
    .await;
}

/// warren closes a client with 320 (shard-a's link died while the client held one of its
/// deliveries) while publishes the client asked to have confirmed are on their way to shard-b:
/// the client gets their confirms first, then the close. Told of the close at once, it counted
/// them lost and published them again, though shard-b routed them: each twice. Until the
/// close goes out the client does not know of it, so an ack it sends meanwhile (of shard-b's
/// delivery) reaches shard-b; dropped, the message would be delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_close_warren_starts_passes_the_confirms_the_client_is_owed_first() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    let (link_a, link_b, from_b) = two_deliveries_and_two_held_publishes(&mut c, a, b).await;
    a.kill(link_a, Kill::Rst);
    closing_with_publishes_held(b, link_b).await;
    c.send(1, ack(from_b, false)).await;
    wait_for("the client's ack reached shard-b", || {
        (!b.ledger(link_b).received_named("basic.ack").is_empty()).then_some(())
    })
    .await;
    b.confirm(link_b, 2, 2, true, true);
    c.expect_settled(2, &(1..=4).map(|t| (t, true)).collect())
        .await;
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "1 unacknowledged deliveries"]);
    let last_confirm = c.log.iter().rposition(|(_, m)| *m == "basic.ack");
    let close_at = c.log.iter().position(|(_, m)| *m == "connection.close");
    assert!(last_confirm < close_at, "{:?}", c.log);
}

/// While the close waits, the client's stream is cut at the first thing it sends other than
/// an ack: a publish then is discarded, and so is an ack behind it, as one broker handles a
/// prefix of what a client sent before its connection ends. (An ack passed on behind a
/// discarded publish would settle a message whose result was lost with the publish.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_held_close_cuts_the_clients_stream_at_its_first_discarded_method() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    let (link_a, link_b, from_b) = two_deliveries_and_two_held_publishes(&mut c, a, b).await;
    b.enqueue(Q, b"from-b-2");
    let second = c.delivery().await.tag;
    a.kill(link_a, Kill::Rst);
    closing_with_publishes_held(b, link_b).await;
    c.send(1, ack(from_b, false)).await;
    c.publish(1, "other", "after-the-cut").await;
    c.send(1, ack(second, false)).await;
    wait_for("the first ack reached shard-b", || {
        (!b.ledger(link_b).received_named("basic.ack").is_empty()).then_some(())
    })
    .await;
    b.confirm(link_b, 2, 2, true, true);
    c.expect_settled(2, &(1..=4).map(|t| (t, true)).collect())
        .await;
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a"]);
    assert_eq!(
        b.ledger(link_b).received_named("basic.ack").len(),
        1,
        "the ack behind the discarded publish was discarded too"
    );
    for cluster in [a, b] {
        assert!(
            !bodies(&cluster.ready("other")).contains(&"after-the-cut".to_owned()),
            "the publish sent while the close waited was discarded"
        );
    }
}

/// The same, but shard-b never confirms: the client gets the close all the same, within the
/// close timeout (3 s), with those publishes unconfirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_close_warren_starts_waits_for_owed_confirms_no_longer_than_the_close_timeout() {
    // The links stay up to failover_wait_secs for the publishes: 20 s, far from the 3 s.
    let rig = Rig::start_with_settings(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "failover_wait_secs = 20",
        "",
    )
    .await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    let (link_a, _, _) = two_deliveries_and_two_held_publishes(&mut c, a, b).await;
    let start = std::time::Instant::now();
    a.kill(link_a, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "1 unacknowledged deliveries"]);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(12),
        "the close came after {waited:?}"
    );
    assert_eq!(
        c.settled.get(&2).map_or(0, BTreeMap::len),
        2,
        "only shard-a's"
    );
}

/// The same, with a mandatory publish shard-b cannot route: its basic.return, which shard-b
/// sends before the confirm, reaches the client before the close too. Dropped, the client
/// would have the confirm alone, and take the publish for routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_close_warren_starts_passes_a_return_owed_before_its_confirm() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    let (link_a, link_b, _) = two_deliveries_and_two_held_publishes(&mut c, a, b).await;
    // shard-b's answers wait; two mandatory publishes nobody can route, one to each shard.
    b.stall(link_b, true);
    let mut out = BytesMut::new();
    for i in 0..2 {
        encode_mandatory_publish(&mut out, 2, "nowhere", &format!("unroutable{i}"));
    }
    c.raw.send(&out).await;
    *c.published.entry(2).or_default() += 2;
    within_for(STEP, "shard-a's return and confirm", async {
        while c.settled.get(&2).map_or(0, BTreeMap::len) < 3 {
            c.pump().await;
        }
    })
    .await;
    let returns = |c: &Client| c.log.iter().filter(|(_, m)| *m == "basic.return").count();
    assert_eq!(returns(&c), 1, "shard-a's: {:?}", c.log);
    wait_for("shard-b holds three publishes", || {
        (b.ledger(link_b).published(2).len() == 3).then_some(())
    })
    .await;
    a.kill(link_a, Kill::Rst);
    closing_with_publishes_held(b, link_b).await;
    b.stall(link_b, false);
    b.confirm(link_b, 2, 3, true, true);
    c.expect_settled(2, &(1..=6).map(|t| (t, true)).collect())
        .await;
    // The returns, filed with the replies, go before the close is looked for.
    c.methods
        .retain(|(_, m)| !matches!(m, Method::BasicReturn(_)));
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "1 unacknowledged deliveries"]);
    assert_eq!(
        returns(&c),
        2,
        "shard-b's return reached the client: {:?}",
        c.log
    );
    let last_return = c.log.iter().rposition(|(_, m)| *m == "basic.return");
    let last_confirm = c.log.iter().rposition(|(_, m)| *m == "basic.ack");
    assert!(last_return < last_confirm, "{:?}", c.log);
}

/// A prefetch count below the number of shard clusters cannot hold (each cluster's share is at
/// least one): warren counts each such basic.qos in `warren_prefetch_below_shards_total`, so an
/// operator sees which clients may hold more than they asked for. Two shard clusters here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_a_prefetch_below_the_shard_clusters_is_counted() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let below = || rig.proxy.metrics().prefetch_below_shards.get();
    c.qos(1, 2, false).await;
    c.qos(1, 0, false).await;
    assert_eq!(below(), 0, "2 holds over two shard clusters; 0 is no limit");
    c.qos(1, 1, false).await;
    assert_eq!(below(), 1);
    c.qos(1, 1, true).await;
    assert_eq!(below(), 2, "per channel too");
}

/// Waits until warren has begun closing the client with its publishes held: it cancels the
/// consumers on the links it keeps (shard-b's here), so nothing more is delivered.
async fn closing_with_publishes_held(b: &FakeCluster, link_b: ConnId) {
    wait_for("warren cancelled the consumer on shard-b", || {
        (!b.ledger(link_b).received_named("basic.cancel").is_empty()).then_some(())
    })
    .await;
}

/// A consumer holding a delivery from each shard, and a confirm channel with four publishes:
/// shard-a confirmed its two (the client has them), shard-b holds its two. Returns the links
/// and the tag of shard-b's delivery.
async fn two_deliveries_and_two_held_publishes(
    c: &mut Client,
    a: &FakeCluster,
    b: &FakeCluster,
) -> (ConnId, ConnId, u64) {
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, "other").await;
    c.consume(1, Q, "worker").await;
    a.enqueue(Q, b"from-a");
    b.enqueue(Q, b"from-b");
    let (d1, d2) = (c.delivery().await, c.delivery().await);
    let from_b = if d1.body == b"from-b".as_slice() {
        d1.tag
    } else {
        d2.tag
    };
    c.open(2).await;
    c.confirm_select(2).await;
    b.on_publish(|_| Verdict::Hold);
    let (link_a, link_b) = (a.only_link().await, b.only_link().await);
    for i in 0..4 {
        c.publish(2, "other", &format!("p{i}")).await;
    }
    wait_for("shard-b holds two publishes", || {
        (b.ledger(link_b).published(2).len() == 2).then_some(())
    })
    .await;
    within_for(STEP, "shard-a's confirms", async {
        while c.settled.get(&2).map_or(0, BTreeMap::len) < 2 {
            c.pump().await;
        }
    })
    .await;
    (link_a, link_b, from_b)
}

/// Two connections subscribe to a single-active-consumer queue at the same moment. Each
/// cluster makes the first consumer registered the active one: had the two consumes crossed
/// (the first connection's first on shard-a, the second's first on shard-b), both would be
/// active, each for its cluster's messages. The second connection's consume waits until every
/// cluster has answered the first's, so every cluster registers them in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_subscribes_to_a_single_active_consumer_queue_reach_every_cluster_in_one_order() {
    const SAC: &str = "jobs-sac";
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let declare = || declare_single_active(SAC);
    let consume = |tag: &str| {
        Method::BasicConsume(codec::BasicConsume {
            queue: ss(SAC),
            consumer_tag: ss(tag),
            ..Default::default()
        })
    };
    let mut first = Client::connect(rig.addr()).await;
    first.open(1).await;
    let ok = first.call(1, declare()).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    let (first_a, first_b) = (a.only_link().await, b.only_link().await);
    let mut second = Client::connect(rig.addr()).await;
    second.open(1).await;
    let ok = second.call(1, declare()).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    let seconds = |c: &FakeCluster, first: ConnId| -> Vec<ConnId> {
        c.links().into_iter().filter(|&l| l != first).collect()
    };
    let consumes =
        |c: &FakeCluster, link: ConnId| c.ledger(link).received_named("basic.consume").len();
    // shard-b answers the first connection's consume late.
    b.stall(first_b, true);
    first.send(1, consume("first")).await;
    wait_for("the first consume reached both clusters", || {
        (consumes(a, first_a) == 1 && consumes(b, first_b) == 1).then_some(())
    })
    .await;
    second.send(1, consume("second")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (c, first_link) in [(a, first_a), (b, first_b)] {
        for l in seconds(c, first_link) {
            assert_eq!(
                consumes(c, l),
                0,
                "the second consume went out before the first was answered"
            );
        }
    }
    b.stall(first_b, false);
    let ok = first.reply(1).await;
    assert!(
        matches!(&ok, Method::BasicConsumeOk(c) if c.consumer_tag == "first"),
        "{ok:?}"
    );
    let ok = second.reply(1).await;
    assert!(
        matches!(&ok, Method::BasicConsumeOk(c) if c.consumer_tag == "second"),
        "{ok:?}"
    );
    for (c, first_link) in [(a, first_a), (b, first_b)] {
        let l = seconds(c, first_link);
        assert_eq!(l.len(), 1);
        assert_eq!(consumes(c, l[0]), 1);
    }
    // Another queue's subscribes do not wait.
    first.declare(1, Q).await;
    second.declare(1, Q).await;
    b.stall(first_b, true);
    first.send(1, consume_of(Q, "first-q")).await;
    second.consume(1, Q, "second-q").await;
    b.stall(first_b, false);
    let ok = first.reply(1).await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
}

/// A connection consumes a single-active-consumer queue while shard-b is away: its consumer
/// is registered on shard-a only. When shard-b's link opens, subscribing there would put it
/// after the consumers other connections registered there meanwhile, though it comes before
/// them on shard-a: two consumers could be active at once. The client is closed with 320
/// saying so; subscribing again, it takes its turn on every cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_a_cluster_joining_a_single_active_consumers_connection_closes_it_with_320() {
    const SAC: &str = "jobs-sac-joined";
    let rig = Rig::three().await;
    let b = rig.get(B);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    take_away(b).await;
    let ok = c.call(1, declare_single_active(SAC)).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    c.consume(1, SAC, "only").await;
    b.refuse(0, false);
    let close = c.connection_close().await;
    assert_says(
        &close,
        320,
        &[
            "cluster shard-b",
            "single-active-consumer queue 'jobs-sac-joined'",
            "reconnect",
            // In one piece, as docs/semantics.md quotes it.
            "cluster shard-b joined this connection's clusters while it consumes \
             single-active-consumer queue 'jobs-sac-joined', whose consumers every cluster \
             must register in one order: reconnect to subscribe again",
        ],
    );
    // A connection without such a consumer keeps shard-b's new link.
    let mut other = Client::connect(rig.addr()).await;
    other.open(1).await;
    other.declare(1, Q).await;
    other.consume(1, Q, "plain").await;
    take_away(b).await;
    b.refuse(0, false);
    wait_for("a new link to shard-b", || {
        b.links().into_iter().find(|&l| b.ledger(l).opened)
    })
    .await;
    other.sync(1).await;
    assert!(
        other.methods.iter().all(|(ch, _)| *ch != 0),
        "{:?}",
        other.methods
    );
}

/// queue.declare of a durable single-active-consumer queue.
fn declare_single_active(queue: &str) -> Method {
    declare_durable_with(
        queue,
        "x-single-active-consumer",
        codec::FieldValue::Bool(true),
    )
}

fn consume_of(queue: &str, tag: &str) -> Method {
    Method::BasicConsume(codec::BasicConsume {
        queue: ss(queue),
        consumer_tag: ss(tag),
        ..Default::default()
    })
}

/// A node taken out of a cluster's `nodes` keeps the links open on it: `GET /clusters` lists
/// it, marked removed, with its links, while it has any (it listed only the file's nodes, and
/// an operator could not see where those links were). Each node of the file shows its links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_a_node_taken_out_of_the_file_is_listed_while_links_stay_on_it() {
    let rig = Rig::start_with_settings(
        &[(A, 2), (B, 1), (CONTROL, 1)],
        "\n[admin]\nlisten = \"127.0.0.1:0\"",
        "",
    )
    .await;
    let admin = rig.proxy.admin_addr().expect("an admin listener");
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let a = rig.get(A);
    assert_eq!(
        a.ledger(a.only_link().await).node,
        0,
        "on shard-a's first node"
    );
    let nodes = a.nodes();
    let node_of = |v: &serde_json::Value, address: &str| -> Option<serde_json::Value> {
        v["clusters"].as_array()?.iter().find(|c| c["name"] == A)?["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["address"] == address)
            .cloned()
    };
    // The usage each connection reports is refreshed every second.
    let listed = eventually_json(admin, "/clusters", |v| {
        node_of(v, &nodes[0]).filter(|n| n["links"] == 1)
    })
    .await;
    assert_eq!(listed["in_file"], true, "{listed}");
    let clusters: Vec<Cluster> = rig
        .clusters
        .iter()
        .map(|c| Cluster {
            name: c.name().to_owned(),
            nodes: if c.name() == A {
                nodes[1..].to_vec()
            } else {
                c.nodes()
            },
        })
        .collect();
    rig.proxy
        .reload_on(&clusters, "connect_ms = 1000\nfailover_wait_secs = 5\n");
    let removed = eventually_json(admin, "/clusters", |v| node_of(v, &nodes[0])).await;
    assert_eq!(removed["state"], "removed", "{removed}");
    assert_eq!(removed["in_file"], false, "{removed}");
    assert_eq!(removed["links"], 1, "{removed}");
    c.declare(1, "still-served").await;
    drop(c);
    eventually_json(admin, "/clusters", |v| {
        node_of(v, &nodes[0]).is_none().then_some(())
    })
    .await;
}

/// GETs `path` from the admin endpoint until `check` finds what it looks for in the JSON.
async fn eventually_json<T>(
    admin: SocketAddr,
    path: &str,
    mut check: impl FnMut(&serde_json::Value) -> Option<T>,
) -> T {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within_for(STEP, path, async {
        loop {
            let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: warren\r\nConnection: close\r\n\r\n");
            s.write_all(request.as_bytes()).await.expect("request");
            let mut response = Vec::new();
            s.read_to_end(&mut response).await.expect("response");
            let text = String::from_utf8_lossy(&response);
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
                && let Some(found) = check(&v)
            {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// shard-b is removed from the configuration while the client holds one of its deliveries,
/// and still holds it at the drain deadline: closing the link would have its broker requeue the
/// message while the client keeps its copy, so the client is closed with 320 instead, saying
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_removed_cluster_whose_deliveries_are_held_past_the_drain_deadline_closes_the_client() {
    let rig = Rig::start_with_settings(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "drain_deadline_secs = 1\n",
        "",
    )
    .await;
    let b = rig.get(B);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.qos(1, 10, false).await;
    c.consume(1, Q, "ctag-removed").await;
    b.enqueue(Q, b"held");
    assert_eq!(c.delivery().await.body, b"held".as_slice());
    let remaining = clusters_of(&rig, &[A, CONTROL]);
    rig.proxy.reload_on(
        &remaining,
        "connect_ms = 1000\nfailover_wait_secs = 5\ndrain_deadline_secs = 1\n",
    );
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-b", "1 unacknowledged deliveries"]);
}

/// shard-a's link is down (both its nodes refuse) while the client unbinds a queue and deletes
/// an exchange: the other clusters answer, and shard-a's next link must make the same removals
/// there. Declaring the client's record again never could (it no longer holds what was
/// removed): the binding and the exchange stayed on shard-a for good, and half of what was
/// published to the exchange afterwards still reached the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_removals_made_while_a_cluster_is_away_reach_it_when_it_is_back() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    for x in ["jobs", "old"] {
        c.declare_exchange(1, x).await;
    }
    c.declare(1, Q).await;
    c.bind(1, Q, "jobs", "k").await;
    assert!(a.has_binding("jobs", Q, "k"));
    take_away(a).await;
    let unbind = Method::QueueUnbind(codec::QueueUnbind {
        queue: ss(Q),
        exchange: ss("jobs"),
        routing_key: ss("k"),
        ..Default::default()
    });
    assert!(matches!(c.call(1, unbind).await, Method::QueueUnbindOk(_)));
    let delete_x = Method::ExchangeDelete(codec::ExchangeDelete {
        exchange: ss("old"),
        ..Default::default()
    });
    assert!(matches!(
        c.call(1, delete_x).await,
        Method::ExchangeDeleteOk(_)
    ));
    a.refuse(0, false);
    wait_for("shard-a's new link applied the removals", || {
        (!a.has_binding("jobs", Q, "k") && !a.has_exchange("old")).then_some(())
    })
    .await;
    assert!(a.has_exchange("jobs") && a.has_queue(Q), "the rest stays");
    c.sync(1).await;
}

/// shard-a's link is down while the client declares a new queue, and meanwhile an older queue
/// of the client goes from every cluster (another client deletes it, or it expires). shard-a's
/// next link declares the new queue there, and checks the rest instead of declaring the
/// client's whole record again, which re-created the gone queue on shard-a alone: mandatory
/// publishes to it were then confirmed there instead of returned, and lost when it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_declare_while_a_cluster_is_away_does_not_bring_back_what_went_meanwhile() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, "gone-meanwhile").await;
    take_away(a).await;
    for cluster in [a, b, control] {
        cluster.delete_queue("gone-meanwhile");
    }
    c.declare(1, "made-meanwhile").await;
    a.refuse(0, false);
    wait_for("shard-a's new link declared the new queue", || {
        a.has_queue("made-meanwhile").then_some(())
    })
    .await;
    c.sync(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !a.has_queue("gone-meanwhile"),
        "a queue gone from every cluster must not come back on shard-a"
    );
    c.sync(1).await;
}

/// A confirm-mode client closes its channel while shard-a's link, which had its publishes
/// unconfirmed, is down and reconnecting: the client must get its close-ok once the link is
/// back (a probe saw clients wait for it for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_channel_closed_while_its_link_reconnects_gets_its_close_ok() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let la = a.only_link().await;
    a.stall(la, true);
    // The connection's first publish to the default exchange: warren checks it behind the
    // publish, on shard-a, and reads nothing more from the client until the check is answered.
    c.publish(1, Q, "m0").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    take_away(a).await;
    c.send(1, Method::ChannelClose(Default::default())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.refuse(0, false);
    loop {
        match c.reply(1).await {
            Method::ChannelCloseOk(_) => break,
            Method::BasicAck(_) | Method::BasicNack(_) => {}
            other => panic!("expected channel.close-ok, got {other:?}"),
        }
    }
    let new = wait_for("shard-a's next link", || {
        a.links().first().copied().filter(|&l| l != la)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        a.ledger(new).violations.is_empty(),
        "{:?}",
        a.ledger(new).violations
    );
    c.open(2).await;
    c.sync(2).await;
}

/// A client closes its channel while shard-a's node answers nothing (its close-ok is owed by
/// shard-a's link; the other clusters answer theirs at once), then that link dies: the close
/// is answered as the link goes, since the channel's part there died with it. Only a close-ok
/// used to finish a client's close, and a dead link sends none: a probe's pika client waited
/// for ever when shard-a-1 was paused (SIGSTOP) and its link reset under the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_channel_close_owed_by_a_link_that_dies_gets_its_close_ok() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let la = a.only_link().await;
    a.stall(la, true);
    c.send(1, Method::ChannelClose(Default::default())).await;
    wait_for("the close on shard-a's link", || {
        (!a.ledger(la).received_named("channel.close").is_empty()).then_some(())
    })
    .await;
    a.refuse(0, true);
    a.kill(la, Kill::Rst);
    match c.reply(1).await {
        Method::ChannelCloseOk(_) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    a.refuse(0, false);
    c.open(1).await;
    c.sync(1).await;
}

/// As above, with a request ahead of the close that shard-a's link had not answered either:
/// it waits for shard-a's next link (the channel is not opened there again, the client closed
/// it), and the client gets its reply, then the close-ok, in the order it asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_request_and_close_owed_by_a_link_that_dies_are_answered_in_order() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let la = a.only_link().await;
    a.stall(la, true);
    let check = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(Q),
        passive: true,
        ..Default::default()
    });
    c.send(1, check).await;
    c.send(1, Method::ChannelClose(Default::default())).await;
    wait_for("the close on shard-a's link", || {
        (!a.ledger(la).received_named("channel.close").is_empty()).then_some(())
    })
    .await;
    a.kill(la, Kill::Rst);
    match c.reply(1).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
    match c.reply(1).await {
        Method::ChannelCloseOk(_) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    c.open(1).await;
    c.sync(1).await;
}

/// shard-b refuses channel 1 while shard-a's node answers nothing, so warren's close of the
/// channel's part there is in flight when the client takes its close and opens the number
/// again: that open waits on shard-a's link for the close-ok. The link dies instead: the open
/// is answered once shard-a's next link has the channel open. It waited for ever: it is in no
/// reply queue, and nothing settled it with the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_channel_reopened_behind_a_close_owed_by_a_link_that_dies_gets_its_open_ok() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    b.close_channel(lb, 1, ReplyCode::PreconditionFailed, "fake refusal");
    assert_eq!(c.channel_close(1).await.reply_code, 406);
    wait_for("warren's close on shard-a's link", || {
        (!a.ledger(la).received_named("channel.close").is_empty()).then_some(())
    })
    .await;
    c.send(1, Method::ChannelCloseOk(Default::default())).await;
    c.send(1, Method::ChannelOpen(Default::default())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.kill(la, Kill::Rst);
    match c.reply(1).await {
        Method::ChannelOpenOk(_) => {}
        other => panic!("expected channel.open-ok, got {other:?}"),
    }
    c.sync(1).await;
}

/// The control cluster is removed from the configuration while a client consumes a control
/// queue: like a change of which cluster is the control cluster, that applies to new
/// connections, so the client keeps its control link (it used to be drained and closed as a
/// removed shard's, and the connection's control traffic went nowhere: a connection without
/// shard links waited for ever on channel.open). When that link is lost later, the cluster is
/// not reconnected: the client is closed with 320, to reconnect to the current configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_removed_control_cluster_keeps_a_connected_clients_control_link() {
    let rig = Rig::three().await;
    let control = rig.get(CONTROL);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let q = "celeryev.watcher";
    c.declare(1, q).await;
    c.consume(1, q, "events").await;
    let link = control.only_link().await;
    let remaining = clusters_of(&rig, &[A, B]);
    rig.proxy
        .reload_on(&remaining, "connect_ms = 1000\nfailover_wait_secs = 5\n");
    // Past the quiet time after which a removed cluster's idle link closes (3 s), and a tick.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(control.links(), [link], "the control link is kept");
    control.enqueue(q, b"event");
    assert_eq!(c.delivery().await.body, b"event".as_slice());
    c.open(2).await;
    control.kill(link, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(
        &close,
        320,
        &[
            "control",
            "no longer in the proxy configuration",
            "reconnect",
        ],
    );
}

/// shard-b is removed from the configuration while the client has acked one of its
/// deliveries in a transaction it has not committed: the broker applies that ack only at the
/// commit, so the link must stay until then (closing it when its consumer went quiet had the
/// broker requeue a message the client had processed, and the commit's ack went nowhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_removed_clusters_link_stays_until_its_acks_in_a_transaction_are_committed() {
    let rig = Rig::three().await;
    let b = rig.get(B);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.tx_select(1).await;
    c.consume(1, Q, "ctag-tx").await;
    b.enqueue(Q, b"acked in tx");
    let d = c.delivery().await;
    assert_eq!(d.body, b"acked in tx".as_slice());
    c.send(1, ack(d.tag, false)).await;
    c.sync(1).await;
    let link_b = b.only_link().await;
    let remaining = clusters_of(&rig, &[A, CONTROL]);
    rig.proxy
        .reload_on(&remaining, "connect_ms = 1000\nfailover_wait_secs = 5\n");
    // Past the quiet time after which a removed cluster's idle link closes (3 s), and a tick.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let ok = c.call(1, Method::TxCommit(Default::default())).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    wait_for("shard-b applied the committed ack", || {
        (b.ledger(link_b).settlements(1).len() == 1).then_some(())
    })
    .await;
    assert!(b.ready(Q).is_empty(), "not requeued: {:?}", b.ready(Q));
}

/// A queue declared while shard-b was unreachable is declared there by the next link any
/// client opens to it (the shared topology). When that client's user may not declare it (403),
/// the client is closed saying so, and shard-b stays marked: the next client's link declares
/// it. (The mark used to be gone with the refused replay: shard-b stayed without the queue, and
/// publishes routed there were confirmed and dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_shared_topology_replay_refused_by_one_user_is_left_for_the_next_link() {
    let rig = Rig::three().await;
    let b = rig.get(B);
    let mut first = Client::connect(rig.addr()).await;
    first.open(1).await;
    take_away(b).await;
    first.declare(1, "jobs").await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.refuse(0, false);
    b.deny_declare("jobs", true);
    // The replay goes on the client's first channel.
    let mut narrow = Client::connect(rig.addr()).await;
    narrow
        .send(1, Method::ChannelOpen(Default::default()))
        .await;
    let close = narrow.connection_close().await;
    assert_says(&close, 320, &["while the cluster was unreachable"]);
    assert!(!b.has_queue("jobs"));
    b.deny_declare("jobs", false);
    let mut allowed = Client::connect(rig.addr()).await;
    allowed.open(1).await;
    wait_for(
        "the next client's link declared the queue on shard-b",
        || b.has_queue("jobs").then_some(()),
    )
    .await;
}

/// A queue deleted on shard-a while the client's link there was down is not re-created by the
/// replay: its passive declare is refused, and the client is closed with 320 naming shard-a
/// (docs/semantics.md, failover table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_queue_gone_at_failover_closes_the_client_with_320() {
    let rig = Rig::start(&[(A, 2), (B, 1), (CONTROL, 1)]).await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let first = a.only_link().await;
    a.refuse(0, true);
    a.delete_queue(Q);
    a.kill(first, Kill::Rst);
    let ending = within_for(STEP, "connection.close", c.raw.read_until_close()).await;
    let Ending::Close(close) = ending else {
        panic!("expected connection.close 320, the socket just closed")
    };
    assert_eq!(close.code, 320, "{close:?}");
    assert!(close.text.contains("shard-a"), "{close:?}");
    assert!(!a.has_queue(Q), "the replay did not re-create the queue");
}

/// An exclusive queue with a control name and only control bindings never gets a message on
/// a shard cluster by a binding, so when its copy there goes with a link the replay declares
/// it again and the client stays connected. But RabbitMQ also routes by what no binding shows:
/// a sharded queue that dead-letters into it by name, a `CC` header. Such a copy may hold
/// messages, and losing it must close the client (320) as losing its broker would, not
/// declare it again empty: a probe lost 5 of 10 dead-lettered messages silently that way.
/// Shown for a dead-letter route another connection declared, and for a `CC` publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_an_exclusive_queue_a_server_side_route_leads_to_closes_the_client_when_its_copy_goes() {
    const REPLIES: &str = "celeryev.replies";
    let rig = Rig::start(&[(A, 3), (B, 1), (CONTROL, 1)]).await;
    let a = rig.get(A);
    // Without a route there, the copy is declared again and the client stays.
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare_exclusive(1, REPLIES).await;
    let first = a.only_link().await;
    a.kill(first, Kill::Rst);
    wait_for("shard-a's copy declared again", || {
        a.links()
            .into_iter()
            .any(|l| {
                l != first
                    && a.ledger(l).received_named("queue.declare").iter().any(|(_, m)| {
                        matches!(m, Method::QueueDeclare(q) if q.queue.as_str() == REPLIES && !q.passive)
                    })
            })
            .then_some(())
    })
    .await;
    c.sync(1).await;
    assert!(c.methods.iter().all(|(ch, _)| *ch != 0), "{:?}", c.methods);
    drop(c);

    // Another connection's sharded queue dead-letters into it by name.
    let mut other = Client::connect(rig.addr()).await;
    other.open(1).await;
    let mut args = codec::FieldTable::default();
    for (k, v) in [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", REPLIES),
    ] {
        args.insert(ss(k), codec::FieldValue::LongStr(v.into()));
    }
    let dead_letters = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss("orders-retry"),
        arguments: args,
        ..Default::default()
    });
    let ok = other.call(1, dead_letters).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    let before: BTreeSet<ConnId> = a.links().into_iter().collect();
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare_exclusive(1, REPLIES).await;
    let link = wait_for("the client's shard-a link", || {
        a.links().into_iter().find(|l| !before.contains(l))
    })
    .await;
    a.kill(link, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", REPLIES]);
}

// ---------------------------------------------------------------------------------------------
// (g) tx.select on a channel that already published

/// A client without confirms publishes twice (warren holds both, its upstream channels in
/// confirm mode), then selects tx. RabbitMQ refuses tx.select on a confirm channel, so warren
/// reopens each upstream channel in confirm mode once everything on it is confirmed
/// (docs/routing.md, "tx.select after publishing"): nothing is closed while its publish is
/// held; each reopened channel selects tx and gets its prefetch share again; the client's
/// select-ok comes once both shards are done, and the transaction then commits normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_tx_select_after_publishing_reopens_each_upstream_channel_once_its_publishes_are_confirmed()
 {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.prove_default_exchange(9).await;
    a.on_publish(|_| Verdict::Hold);
    b.on_publish(|_| Verdict::Hold);
    c.open(1).await;
    c.declare(1, Q).await;
    c.qos(1, 10, false).await;
    c.publish(1, Q, "p1").await;
    c.publish(1, Q, "p2").await;
    let (la, lb, lc) = (
        a.only_link().await,
        b.only_link().await,
        control.only_link().await,
    );
    wait_for("one publish held on each shard", || {
        (a.held(la, 1).len() == 1 && b.held(lb, 1).len() == 1).then_some(())
    })
    .await;
    c.send(1, Method::TxSelect(Default::default())).await;
    wait_for("the control cluster selected tx", || {
        (!control.ledger(lc).received_named("tx.select").is_empty()).then_some(())
    })
    .await;
    for (s, l) in [(a, la), (b, lb)] {
        assert!(
            s.ledger(l).received_named("channel.close").is_empty(),
            "{} closed with a publish held",
            s.name()
        );
    }
    let after_publish = |s: &FakeCluster, l| -> Vec<&'static str> {
        let led = s.ledger(l);
        let at = led
            .received
            .iter()
            .position(|f| f.channel == 1 && matches!(f.method, Method::BasicPublish(_)))
            .expect("a publish");
        led.received[at + 1..]
            .iter()
            .filter(|f| f.channel == 1)
            .map(|f| f.method.name())
            .collect()
    };
    a.confirm(la, 1, 1, false, true);
    wait_for("shard-a reopened in tx mode", || {
        (after_publish(a, la).len() == 4).then_some(())
    })
    .await;
    assert_eq!(
        after_publish(a, la),
        ["channel.close", "channel.open", "tx.select", "basic.qos"]
    );
    assert!(matches!(
        &a.ledger(la).received_named("basic.qos")[..],
        [_, (1, Method::BasicQos(q))] if q.prefetch_count == 5
    ));
    assert!(
        after_publish(b, lb).is_empty(),
        "shard-b waits for its confirm"
    );
    b.confirm(lb, 1, 1, false, true);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::TxSelectOk(_)), "{ok:?}");
    assert_eq!(
        after_publish(b, lb),
        ["channel.close", "channel.open", "tx.select", "basic.qos"]
    );
    c.publish(1, Q, "t1").await;
    c.publish(1, Q, "t2").await;
    let ok = c.call(1, Method::TxCommit(Default::default())).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    let all: Vec<String> = [a, b].iter().flat_map(|s| bodies(&s.ready(Q))).collect();
    assert_eq!(sorted(all), ["p1", "p2", "t1", "t2"]);
}

/// The same switch, and a publish from before the tx.select is nacked while it is under way:
/// it may go again only to an upstream channel still in confirm mode, never into the client's
/// transaction; with none left it is dropped and counted (docs/routing.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_publish_nacked_during_the_tx_switch_never_joins_the_transaction() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    a.on_publish(|_| Verdict::Hold);
    b.on_publish(|_| Verdict::Hold);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.publish(1, Q, "m1").await;
    c.publish(1, Q, "m2").await;
    let (la, lb, lc) = (
        a.only_link().await,
        b.only_link().await,
        control.only_link().await,
    );
    wait_for("one publish held on each shard", || {
        (a.held(la, 1).len() == 1 && b.held(lb, 1).len() == 1).then_some(())
    })
    .await;
    let (x, lx, y, ly) = if held_map(a, la)[0].1 == 1 {
        (a, la, b, lb)
    } else {
        (b, lb, a, la)
    };
    c.send(1, Method::TxSelect(Default::default())).await;
    wait_for("the control cluster selected tx", || {
        (!control.ledger(lc).received_named("tx.select").is_empty()).then_some(())
    })
    .await;
    // m1's shard confirms and switches to tx; then m2's shard refuses m2.
    x.confirm(lx, 1, 1, false, true);
    wait_for("m1's shard selected tx", || {
        (!x.ledger(lx).received_named("tx.select").is_empty()).then_some(())
    })
    .await;
    y.confirm(ly, 1, 1, false, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::TxSelectOk(_)), "{ok:?}");
    c.sync(1).await;
    assert_eq!(
        bodies(&x.ledger(lx).published(1)),
        ["m1"],
        "m2 did not join a tx channel"
    );
    assert_eq!(rig.proxy.metrics().dropped.get(), 1);
    let ok = c.call(1, Method::TxCommit(Default::default())).await;
    assert!(matches!(ok, Method::TxCommitOk(_)), "{ok:?}");
    let all: Vec<String> = [a, b].iter().flat_map(|s| bodies(&s.ready(Q))).collect();
    assert_eq!(all, ["m1"]);
}

// ---------------------------------------------------------------------------------------------
// (h) The publish barrier

/// Writes a publish (method, header, body) to `out`.
fn publish_frames(out: &mut bytes::BytesMut, ch: u16, exchange: &str, key: &str, body: &str) {
    codec::write_method(
        out,
        ch,
        &Method::BasicPublish(codec::BasicPublish {
            exchange: ss(exchange),
            routing_key: ss(key),
            ..Default::default()
        }),
    );
    codec::write_header(
        out,
        ch,
        &codec::ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: Default::default(),
        },
    );
    codec::write_body(out, ch, body.as_bytes(), 0);
}

/// One write on channel 1: a publish to the exchange "missing", which no cluster has, and three
/// publishes behind it ("behind1" to "behind3") to `key` through the default exchange.
fn refused_then_behind(key: &str) -> BytesMut {
    let mut out = BytesMut::new();
    publish_frames(&mut out, 1, "missing", "k", "refused");
    for i in 1..=3 {
        publish_frames(&mut out, 1, "", key, &format!("behind{i}"));
    }
    out
}

/// The refused publish of [`refused_then_behind`] closes channel 1 with the broker's 404; the
/// client answers, and the channel number works again.
async fn expect_refused_and_reopen(c: &mut Client) {
    let close = c.channel_close(1).await;
    assert_says(&close, 404, &["missing"]);
    c.send(1, Method::ChannelCloseOk(Default::default())).await;
    c.open(1).await;
    c.sync(1).await;
}

/// No link of `clusters` received a publish from behind the refused one.
fn assert_nothing_behind_reached(clusters: &[&FakeCluster]) {
    for s in clusters {
        for l in s.opened() {
            let behind: Vec<String> = bodies(&s.ledger(l).published(1))
                .into_iter()
                .filter(|b| b.starts_with("behind"))
                .collect();
            assert!(behind.is_empty(), "{} received {behind:?}", s.name());
        }
    }
}

/// One write: a publish to an exchange that does not exist, and three publishes behind it. The
/// broker refuses the first (channel.close 404) and, as on one broker, none of the others is
/// routed anywhere: warren checks the first on its cluster before reading on (docs/semantics.md,
/// "Publishes pipelined behind one the broker refuses"). The channel number works again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_publishes_pipelined_behind_a_refused_one_are_routed_nowhere() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.raw.send(&refused_then_behind(Q)).await;
    expect_refused_and_reopen(&mut c).await;
    for name in [A, B, CONTROL] {
        assert!(
            rig.get(name).ready(Q).is_empty(),
            "{name} routed a publish behind the refused one"
        );
    }
    assert_nothing_behind_reached(&[rig.get(A), rig.get(B), rig.get(CONTROL)]);
    c.confirm_select(1).await;
    c.publish(1, Q, "m1").await;
    c.expect_settled(1, &BTreeMap::from([(1, true)])).await;
}

/// The first publish of a connection to the default exchange is checked like the first to any
/// exchange (a passive declare behind it before warren reads on): RabbitMQ refuses it (403) to
/// a user without write permission on `amq.default`, and publishes pipelined behind it must
/// not be routed by the other cluster meanwhile. Later publishes there go unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_the_first_publish_to_the_default_exchange_is_checked_once() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    for body in ["m1", "m2", "m3", "m4"] {
        c.publish(1, Q, body).await;
    }
    c.sync(1).await;
    let mut checks = 0;
    for shard in [a, b] {
        let link = shard.only_link().await;
        checks += shard
            .ledger(link)
            .received_named("exchange.declare")
            .iter()
            .filter(|(_, m)| matches!(m, Method::ExchangeDeclare(d) if d.passive))
            .count();
    }
    assert_eq!(checks, 1, "one check, behind the first publish");
    assert_eq!(a.ready(Q).len() + b.ready(Q).len(), 4);
}

/// One write: a queue.declare and four publishes to that queue through the default exchange,
/// as pika's SelectConnection sends them (it holds synchronous methods until their reply, but
/// not publishes). warren declares on the clusters one after the other; every cluster must get
/// the declare before the publishes behind it, or the publishes reaching a cluster that has no
/// queue yet are dropped there as unroutable (RabbitMQ handles a channel's methods in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_publishes_pipelined_behind_a_declare_reach_every_cluster_after_it() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let mut out = bytes::BytesMut::new();
    codec::write_method(
        &mut out,
        1,
        &Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(Q),
            durable: true,
            ..Default::default()
        }),
    );
    for i in 1..=4 {
        publish_frames(&mut out, 1, "", Q, &format!("behind{i}"));
    }
    c.raw.send(&out).await;
    assert!(matches!(c.reply(1).await, Method::QueueDeclareOk(_)));
    c.sync(1).await;
    let mut published = 0;
    for name in [A, B] {
        let s = rig.get(name);
        for l in s.opened() {
            let on_1: Vec<&str> = s
                .ledger(l)
                .received
                .iter()
                .filter(|f| f.channel == 1)
                .map(|f| f.method.name())
                .filter(|n| *n == "queue.declare" || *n == "basic.publish")
                .collect();
            published += on_1.iter().filter(|n| **n == "basic.publish").count();
            if let Some(first) = on_1.first() {
                assert_eq!(*first, "queue.declare", "{name}'s channel 1: {on_1:?}");
            }
        }
    }
    assert_eq!(published, 4, "every publish reached a shard cluster");
}

/// The same when the link under the refused publish dies before its check is answered: the
/// publish is sent again to the other shard cluster, whose refusal must come before anything
/// the client wrote behind it is read. (The check died with the link, and the publishes behind
/// went to the control cluster, which routed them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_publish_whose_check_dies_with_its_link_is_checked_where_it_goes_again() {
    const EVENTS: &str = "celeryev.test";
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, EVENTS).await;
    c.confirm_select(1).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    b.stall(lb, true);
    c.raw.send(&refused_then_behind(EVENTS)).await;
    let took = |s: &FakeCluster, l| {
        s.ledger(l).received_named("basic.publish").iter().any(
            |(_, m)| matches!(m, Method::BasicPublish(p) if p.exchange.as_bytes() == b"missing"),
        )
    };
    let (first, first_link, other, other_link) = wait_for("the refused publish on a shard", || {
        if took(a, la) {
            Some((a, la, b, lb))
        } else if took(b, lb) {
            Some((b, lb, a, la))
        } else {
            None
        }
    })
    .await;
    other.stall(other_link, false);
    first.refuse(0, true);
    first.kill(first_link, Kill::Rst);
    expect_refused_and_reopen(&mut c).await;
    assert!(
        control.ready(EVENTS).is_empty(),
        "the control cluster routed a publish behind the refused one: {:?}",
        control.ready(EVENTS)
    );
    assert_nothing_behind_reached(&[a, b, control]);
    first.refuse(0, false);
}

/// The same when no shard cluster is reachable as the client writes: the publish waits for
/// one, nothing the client wrote behind it is read meanwhile (the publishes to a control queue
/// would have gone to the control cluster at once and been routed there), and it is checked
/// where it finally goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_refused_publish_that_waited_for_a_shard_cluster_is_checked_before_what_follows() {
    const EVENTS: &str = "celeryev.test";
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, EVENTS).await;
    c.confirm_select(1).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    for (s, l) in [(a, la), (b, lb)] {
        s.refuse(0, true);
        s.kill(l, Kill::Rst);
    }
    wait_for("warren to see both shard links lost", || {
        (a.links().is_empty() && b.links().is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.raw.send(&refused_then_behind(EVENTS)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        control.ready(EVENTS).is_empty(),
        "read and routed behind a publish that waits: {:?}",
        control.ready(EVENTS)
    );
    a.refuse(0, false);
    b.refuse(0, false);
    expect_refused_and_reopen(&mut c).await;
    assert!(
        control.ready(EVENTS).is_empty(),
        "{:?}",
        control.ready(EVENTS)
    );
    assert_nothing_behind_reached(&[a, b, control]);
}

/// basic.get of an empty queue with a publish to it pipelined behind, several times: on one
/// broker the get is handled first and finds the queue empty. warren tries the clusters one
/// after the other; the publish must not reach a cluster before the get does, or the get
/// would return the message published after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_publish_pipelined_behind_a_get_is_not_what_the_get_returns() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    for i in 1..=6 {
        let queue = format!("{Q}-{i}");
        c.declare(1, &queue).await;
        let mut out = bytes::BytesMut::new();
        codec::write_method(&mut out, 1, &basic_get(&queue));
        publish_frames(&mut out, 1, "", &queue, "after");
        c.raw.send(&out).await;
        let reply = c.reply(1).await;
        assert!(
            matches!(reply, Method::BasicGetEmpty(_)),
            "get {i} returned what was published behind it: {reply:?}"
        );
        c.sync(1).await;
        let ready: usize = [A, B].iter().map(|n| rig.get(n).ready(&queue).len()).sum();
        assert_eq!(ready, 1, "the publish is in the queue");
    }
}

/// A channel in confirm mode, then one that is not: warren holds the second's publishes until
/// their clusters confirm them too, and those confirms must reach nobody (Bunny's reader thread
/// dies on an ack for a channel without confirms; CloudAMQP's Node client logs an unknown tag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_a_channel_without_confirm_mode_gets_no_confirms() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    c.publish(1, Q, "m1").await;
    c.expect_settled(1, &BTreeMap::from([(1, true)])).await;
    c.open(2).await;
    for i in 0..4 {
        c.publish(2, Q, &format!("plain{i}")).await;
    }
    c.sync(2).await;
    c.sync(1).await;
    assert!(
        c.confirm_frames.iter().all(|&(ch, ..)| ch == 1),
        "a confirm on the channel without confirm mode: {:?}",
        c.confirm_frames
    );
    assert_eq!(c.confirm_frames.len(), 1, "{:?}", c.confirm_frames);
}

/// One write: a queue.declare, then publishes on the confirm-mode channel, two of them
/// mandatory and unroutable. One broker handles a channel's commands in order: the declare-ok
/// comes first, then the returns and confirms of the publishes behind it. warren answers the
/// declare when every cluster has; a cluster that answered early returns and confirms its
/// publishes while another still works on the declare (here: stalled), and those must wait for
/// the merged declare-ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_returns_and_confirms_of_publishes_behind_a_request_follow_its_reply() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.prove_default_exchange(2).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    b.stall(lb, true);
    let mut out = bytes::BytesMut::new();
    codec::write_method(
        &mut out,
        1,
        &Method::QueueDeclare(codec::QueueDeclare {
            queue: ss("orders-2"),
            durable: true,
            ..Default::default()
        }),
    );
    for (i, key) in [Q, Q, "nowhere", "nowhere"].iter().enumerate() {
        encode_mandatory_publish(&mut out, 1, key, &format!("behind{i}"));
    }
    c.raw.send(&out).await;
    c.published.insert(1, 4);
    // The publishes alternate between the shards: each takes one routable and one not.
    // shard-a answers the declare and returns and confirms its share of the publishes.
    wait_for("shard-a's return and confirms", || {
        let sent = a.ledger(la).sent;
        let named = |n: &str| sent.iter().filter(|f| f.method.name() == n).count();
        (named("basic.return") == 1 && named("basic.ack") >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.stall(lb, false);
    assert!(matches!(c.reply(1).await, Method::QueueDeclareOk(_)));
    let expected: BTreeMap<u64, bool> = (1..=4).map(|n| (n, true)).collect();
    c.expect_settled(1, &expected).await;
    while c
        .log
        .iter()
        .filter(|(ch, n)| *ch == 1 && *n == "basic.return")
        .count()
        < 2
    {
        c.pump().await;
    }
    let on_1: Vec<&str> = c
        .log
        .iter()
        .filter(|(ch, _)| *ch == 1)
        .map(|(_, n)| *n)
        .skip_while(|n| *n != "confirm.select-ok")
        .skip(1)
        .collect();
    assert_eq!(
        on_1.first(),
        Some(&"queue.declare-ok"),
        "nothing of the publishes behind the declare before its reply: {on_1:?}"
    );
}

/// A manual-ack consumer cancelled with `nowait` and its tag taken at once by a no-ack
/// consumer, in one write, while the brokers still have deliveries of the first on their way
/// (stalled links). Those deliveries are the first consumer's: the client acks them, and the
/// brokers must get the acks (on one broker the queue ends empty). Deciding the ack mode by the
/// tag's current owner made them untracked no-ack deliveries, and their messages came back
/// when the channel closed. The other way round (no-ack first) an ack-all must not settle the
/// no-ack deliveries upstream, which brokers refuse (406 unknown delivery tag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_deliveries_of_a_cancelled_consumer_keep_its_ack_mode_when_its_tag_is_reused() {
    for first_no_ack in [false, true] {
        let rig = Rig::three().await;
        let (a, b) = (rig.get(A), rig.get(B));
        let mut c = Client::connect(rig.addr()).await;
        c.open(1).await;
        c.declare(1, Q).await;
        let (la, lb) = (a.only_link().await, b.only_link().await);
        let consume = |no_ack: bool, nowait: bool| {
            Method::BasicConsume(codec::BasicConsume {
                queue: ss(Q),
                consumer_tag: ss("t"),
                no_ack,
                nowait,
                ..Default::default()
            })
        };
        let ok = c.call(1, consume(first_no_ack, false)).await;
        assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
        a.stall(la, true);
        b.stall(lb, true);
        for i in 0..10 {
            a.enqueue(Q, format!("a{i}").as_bytes());
            b.enqueue(Q, format!("b{i}").as_bytes());
        }
        wait_for("every message delivered (unread by warren)", || {
            (a.ready(Q).is_empty() && b.ready(Q).is_empty()).then_some(())
        })
        .await;
        let mut out = bytes::BytesMut::new();
        codec::write_method(
            &mut out,
            1,
            &Method::BasicCancel(codec::BasicCancel {
                consumer_tag: ss("t"),
                nowait: true,
            }),
        );
        codec::write_method(&mut out, 1, &consume(!first_no_ack, true));
        c.raw.send(&out).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.stall(la, false);
        b.stall(lb, false);
        let mut last = 0;
        for _ in 0..20 {
            last = last.max(c.delivery().await.tag);
        }
        if first_no_ack {
            // Nothing to settle: an ack-all must not reach a broker as acks of no-ack tags.
            c.send(1, ack(0, true)).await;
        } else {
            c.send(1, ack(last, true)).await;
        }
        c.sync(1).await;
        assert!(
            !c.methods
                .iter()
                .any(|(_, m)| matches!(m, Method::ChannelClose(_))),
            "no channel error: {:?}",
            c.methods
        );
        assert!(
            a.unacked(la).is_empty() && b.unacked(lb).is_empty(),
            "first consumer no_ack={first_no_ack}: every delivery settled upstream, left {:?} {:?}",
            a.unacked(la),
            b.unacked(lb)
        );
    }
}

/// One write: a queue.declare, then an ack of a tag never delivered (refused by warren
/// itself, 406), or the client's own channel.close. One broker answers the declare first, then
/// closes the channel (or answers the close): the declare's reply, which other clusters still
/// owe when the refusal or the close is read, must not be lost with the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_replies_owed_before_a_refusal_or_a_close_come_first() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(Q),
        durable: true,
        ..Default::default()
    });
    for (ch, behind) in [
        (1, ack(99, false)),
        (2, Method::ChannelClose(Default::default())),
    ] {
        c.open(ch).await;
        let mut out = bytes::BytesMut::new();
        codec::write_method(&mut out, ch, &declare);
        codec::write_method(&mut out, ch, &behind);
        c.raw.send(&out).await;
        let first = c.reply(ch).await;
        assert!(
            matches!(first, Method::QueueDeclareOk(_)),
            "channel {ch}: the declare's reply first, got {first:?}"
        );
        match c.reply(ch).await {
            Method::ChannelClose(close) if ch == 1 => {
                assert_eq!(close.reply_code, 406, "{close:?}");
                c.send(ch, Method::ChannelCloseOk(Default::default())).await;
            }
            Method::ChannelCloseOk(_) if ch == 2 => {}
            other => panic!("channel {ch}: unexpected {other:?}"),
        }
    }
    c.open(3).await;
    c.sync(3).await;
}

/// One write: basic.consume with no_ack on a queue holding messages, then channel.close. Each
/// cluster delivers its messages (and lets them go: no_ack) before it reads the close, as one
/// broker does; the client must get every one of them before its close-ok, not lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_deliveries_sent_before_a_client_close_reach_the_client() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    for i in 1..=4 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    c.expect_settled(
        1,
        &BTreeMap::from([(1, true), (2, true), (3, true), (4, true)]),
    )
    .await;
    c.open(2).await;
    let mut out = bytes::BytesMut::new();
    codec::write_method(
        &mut out,
        2,
        &Method::BasicConsume(codec::BasicConsume {
            queue: ss(Q),
            consumer_tag: ss("c1"),
            no_ack: true,
            ..Default::default()
        }),
    );
    codec::write_method(&mut out, 2, &Method::ChannelClose(Default::default()));
    c.raw.send(&out).await;
    assert!(matches!(c.reply(2).await, Method::BasicConsumeOk(_)));
    assert!(matches!(c.reply(2).await, Method::ChannelCloseOk(_)));
    let got: Vec<String> = c
        .deliveries
        .drain(..)
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    assert_eq!(
        sorted(got),
        ["m1", "m2", "m3", "m4"],
        "every no-ack delivery reached the client"
    );
}

// ---------------------------------------------------------------------------------------------
// (i) A cluster closes a channel

/// shard-b closes channel 1 with 406 of its own. The client's channel is closed with shard-b's
/// code and text and its parts on the other clusters are closed too. The client reuses the
/// number at once (while those closes may still be in flight) and consumes again: the delivery
/// it had not acknowledged comes again, redelivered, and its ack reaches shard-b's new channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_a_channel_closed_by_one_cluster_closes_the_client_channel_everywhere() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-i").await;
    b.enqueue(Q, b"b1");
    let first = c.delivery().await;
    assert_eq!(first.body, "b1".as_bytes());
    let lb = b.only_link().await;
    b.close_channel(
        lb,
        1,
        warren::codec::ReplyCode::PreconditionFailed,
        "fake refusal",
    );
    let close = c.channel_close(1).await;
    assert_eq!(close.reply_code, 406);
    assert_eq!(close.reply_text, "PRECONDITION_FAILED - fake refusal");
    for s in [a, control] {
        let l = s.only_link().await;
        wait_for(&format!("{} closed channel 1", s.name()), || {
            (!s.ledger(l).received_named("channel.close").is_empty()).then_some(())
        })
        .await;
    }
    c.send(1, Method::ChannelCloseOk(Default::default())).await;
    c.open(1).await;
    c.consume(1, Q, "ctag-i2").await;
    let again = c.delivery().await;
    assert_eq!(again.body, "b1".as_bytes());
    assert!(again.redelivered);
    assert_eq!(again.tag, 1, "a new channel numbers from 1");
    c.send(1, ack(again.tag, false)).await;
    wait_for("shard-b got the ack on its new channel", || {
        (b.ledger(lb).settlements(1) == vec![ack(1, false)]).then_some(())
    })
    .await;
    assert!(b.unacked(lb).is_empty() && b.ready(Q).is_empty());
}

// ---------------------------------------------------------------------------------------------
// (j) Consumer cancel notifications

/// The consumer's queue is deleted on one cluster (by a client or an operator there, or a
/// mirrored queue failing over under `x-cancel-on-ha-failover`): one broker would end the
/// consumer and tell the client, so warren does, once, and cancels it on the other clusters.
/// A delivery another cluster had already sent for it reaches the client before the
/// basic.cancel (one broker's deliveries come before its basic.cancel, never after), and the
/// client can ack it; the client is told once every cluster has answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_a_consumer_cancelled_by_one_cluster_is_cancelled_everywhere_and_the_client_told_once() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-j").await;
    // shard-b delivers one message that waits in its socket until after the cancel.
    let b_link = b.only_link().await;
    b.stall(b_link, true);
    b.enqueue(Q, b"straggler");
    wait_for("shard-b to deliver", || {
        (!b.unacked(b_link).is_empty()).then_some(())
    })
    .await;
    a.delete_queue(Q);
    for cluster in [B, CONTROL] {
        let cluster = rig.get(cluster);
        let link = cluster.only_link().await;
        wait_for(
            "warren to cancel the consumer on the other clusters",
            || {
                let sent = cluster.ledger(link).received_named("basic.cancel");
                sent.iter()
                    .any(|(ch, m)| {
                        *ch == 1
                            && matches!(m, Method::BasicCancel(k) if k.consumer_tag == "ctag-j")
                    })
                    .then_some(())
            },
        )
        .await;
    }
    b.stall(b_link, false);
    let d = c.delivery().await;
    assert_eq!(&d.body[..], b"straggler");
    match c.reply(1).await {
        Method::BasicCancel(k) => assert_eq!(k.consumer_tag, "ctag-j"),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
    let at = |name: &str| c.log.iter().position(|(_, m)| *m == name);
    assert!(
        at("basic.deliver") < at("basic.cancel"),
        "the delivery must come before basic.cancel: {:?}",
        c.log
    );
    c.send(1, ack(d.tag, false)).await;
    c.sync(1).await;
    assert_eq!(b.ledger(b_link).settlements(1), vec![ack(1, false)]);
    assert!(b.ready(Q).is_empty() && b.unacked(b_link).is_empty());
    let cancels = c.log.iter().filter(|(_, m)| *m == "basic.cancel").count();
    assert_eq!(cancels, 1);
    // As a client does after a cancel: declare the queue again and consume; the tag is free
    // again and the new consumer gets what is published next.
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-j").await;
    b.enqueue(Q, b"next");
    let d = c.delivery().await;
    assert_eq!(&d.body[..], b"next");
    assert!(c.deliveries.is_empty(), "{:?}", c.deliveries);
}

/// As above, but the link of the cluster warren waits for dies before it answers the cancel:
/// the client is told at once (what that link had delivered goes back to its queue with the
/// link, as RabbitMQ requeues it), and the link that replaces it does not subscribe the
/// consumer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_a_cancel_waiting_for_a_link_that_dies_reaches_the_client() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-j2").await;
    let b_link = b.only_link().await;
    b.stall(b_link, true);
    a.delete_queue(Q);
    wait_for("warren to cancel the consumer on shard-b", || {
        (!b.ledger(b_link).received_named("basic.cancel").is_empty()).then_some(())
    })
    .await;
    b.kill(b_link, Kill::Rst);
    match c.reply(1).await {
        Method::BasicCancel(k) => assert_eq!(k.consumer_tag, "ctag-j2"),
        other => panic!("expected basic.cancel, got {other:?}"),
    }
    wait_for("shard-b's new link", || {
        b.links()
            .into_iter()
            .find(|&l| l != b_link && b.ledger(l).opened)
    })
    .await;
    c.sync(1).await;
    for link in b.links().into_iter().filter(|&l| l != b_link) {
        assert!(
            b.ledger(link).received_named("basic.consume").is_empty(),
            "the cancelled consumer was subscribed again on shard-b's new link"
        );
    }
    let cancels = c.log.iter().filter(|(_, m)| *m == "basic.cancel").count();
    assert_eq!(cancels, 1);
}

// ---------------------------------------------------------------------------------------------
// (k) Deliveries before the last consume-ok

/// shard-a answers basic.consume and delivers two messages at once; shard-b is slow (its
/// consume-ok, then a delivery, wait in its socket). The client gets consume-ok before any
/// delivery, then shard-a's two and shard-b's one, tagged in that order; one `multiple` ack of
/// the last tag reaches each shard as an ack of its own tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_deliveries_wait_for_the_last_consume_ok_and_keep_their_tag_order() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    a.enqueue(Q, b"a1");
    a.enqueue(Q, b"a2");
    let (la, lb) = (a.only_link().await, b.only_link().await);
    b.stall(lb, true);
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss(Q),
        consumer_tag: ss("ctag-k"),
        ..Default::default()
    });
    c.send(1, consume).await;
    wait_for("shard-a delivered both", || {
        (a.unacked(la).len() == 2).then_some(())
    })
    .await;
    wait_for("shard-b registered the consumer", || {
        (!b.ledger(lb).received_named("basic.consume").is_empty()).then_some(())
    })
    .await;
    b.enqueue(Q, b"b1");
    b.stall(lb, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = c.delivery().await;
        got.push((d.tag, String::from_utf8_lossy(&d.body).into_owned()));
    }
    assert_eq!(
        got,
        [
            (1, "a1".to_owned()),
            (2, "a2".to_owned()),
            (3, "b1".to_owned())
        ]
    );
    let first_deliver = c.log.iter().position(|(_, m)| *m == "basic.deliver");
    let consume_ok = c.log.iter().position(|(_, m)| *m == "basic.consume-ok");
    assert!(consume_ok < first_deliver, "{:?}", c.log);
    c.send(1, ack(3, true)).await;
    c.sync(1).await;
    wait_for("both shards acked", || {
        (a.ledger(la).settlements(1) == vec![ack(2, true)]
            && b.ledger(lb).settlements(1) == vec![ack(1, false)])
        .then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (l, m, n) Tags and consumers around basic.get and failovers

/// basic.get on an empty queue (get-empty from every cluster). Each basic.get of a session
/// starts at the next cluster in turn: the k-th at live link k mod 3 (shard-a is link 0).
async fn get_empty(c: &mut Client, ch: u16, queue: &str) {
    let get = Method::BasicGet(codec::BasicGet {
        queue: ss(queue),
        ..Default::default()
    });
    let reply = c.call(ch, get).await;
    assert!(matches!(reply, Method::BasicGetEmpty(_)), "{reply:?}");
}

fn basic_get(queue: &str) -> Method {
    Method::BasicGet(codec::BasicGet {
        queue: ss(queue),
        ..Default::default()
    })
}

fn delete_if_empty(queue: &str) -> Method {
    Method::QueueDelete(codec::QueueDelete {
        queue: ss(queue),
        if_empty: true,
        ..Default::default()
    })
}

/// A client pipelines basic.consume and basic.get on one channel (prefetch 3: one per
/// cluster). shard-a answers both at once: a delivery for the consumer (its tag 1), then a
/// get-ok (its tag 2); shard-b's consume-ok comes late, so the delivery waits for it. The
/// client's tags must grow with shard-a's (docs/architecture.md: "each link's upstream tags
/// grow with ours"), so that one `multiple` ack of the higher tag settles both on shard-a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_a_get_ok_and_held_deliveries_of_one_link_keep_its_tag_order() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.open(2).await;
    c.declare(1, Q).await;
    c.qos(1, 2, false).await; // one per shard cluster
    // The next basic.get starts at shard-a.
    get_empty(&mut c, 2, Q).await;
    get_empty(&mut c, 2, Q).await;
    a.enqueue(Q, b"m1");
    a.enqueue(Q, b"m2");
    let (la, lb) = (a.only_link().await, b.only_link().await);
    b.stall(lb, true);
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss(Q),
        consumer_tag: ss("ctag-l"),
        ..Default::default()
    });
    c.send(1, consume).await;
    c.send(1, basic_get(Q)).await;
    wait_for("shard-a delivered m1 and answered the get with m2", || {
        (a.unacked(la).len() == 2).then_some(())
    })
    .await;
    wait_for("shard-b registered the consumer", || {
        (!b.ledger(lb).received_named("basic.consume").is_empty()).then_some(())
    })
    .await;
    b.stall(lb, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
    let (x, y) = (c.delivery().await, c.delivery().await);
    let tag_of = |body: &str| {
        [&x, &y]
            .into_iter()
            .find(|d| d.body == body.as_bytes())
            .map(|d| d.tag)
    };
    let (t1, t2) = (tag_of("m1").expect("m1"), tag_of("m2").expect("m2"));
    c.send(1, ack(t1.max(t2), true)).await;
    c.sync(1).await;
    assert!(
        a.unacked(la).is_empty(),
        "the client acked m1 (tag {t1}) and m2 (tag {t2}) with one multiple ack; shard-a got \
         {:?} and still holds {:?} unacknowledged",
        a.ledger(la).settlements(1),
        bodies(&a.unacked(la))
    );
}

/// A basic.get that shard-a answers renews the queue's `x-expires` lease on the clusters it
/// did not ask, with a passive declare, even though this connection declared the queue
/// without a lease: a policy, or another client's redeclare since, can give it one, and a
/// lease left to run out there deletes the queue's messages on those clusters. A client
/// polling with gets renews each queue's lease once a second at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_a_get_answered_by_one_cluster_renews_the_lease_on_the_others_whatever_was_declared() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await; // no x-expires
    // The third basic.get of a session starts at shard-a.
    get_empty(&mut c, 1, Q).await;
    get_empty(&mut c, 1, Q).await;
    rig.get(A).enqueue(Q, b"m1");
    let passive_declares = |fake: &FakeCluster| -> usize {
        fake.links()
            .into_iter()
            .map(|l| {
                fake.ledger(l)
                    .received_named("queue.declare")
                    .iter()
                    .filter(
                        |(_, m)| matches!(m, Method::QueueDeclare(q) if q.passive && q.queue == Q),
                    )
                    .count()
            })
            .sum()
    };
    let before: Vec<usize> = [B, CONTROL].map(|n| passive_declares(rig.get(n))).to_vec();
    c.send(1, basic_get(Q)).await;
    let got = c.delivery().await;
    assert_eq!(got.body, b"m1".as_slice());
    for (cluster, before) in [B, CONTROL].into_iter().zip(before) {
        let fake = rig.get(cluster);
        wait_for(&format!("{cluster} got a passive declare of {Q}"), || {
            (passive_declares(fake) > before).then_some(())
        })
        .await;
    }
    // At most one round of renewals per queue a second: the next get, which shard-b answers
    // at once, sends none.
    let renewed: Vec<usize> = [A, CONTROL].map(|n| passive_declares(rig.get(n))).to_vec();
    rig.get(B).enqueue(Q, b"m2");
    c.send(1, basic_get(Q)).await;
    assert_eq!(c.delivery().await.body, b"m2".as_slice());
    c.sync(1).await;
    let after: Vec<usize> = [A, CONTROL].map(|n| passive_declares(rig.get(n))).to_vec();
    assert_eq!(after, renewed, "passive declares on shard-a and control");
}

/// The clusters named `names` of `rig`, for a configuration without the others.
fn clusters_of(rig: &Rig, names: &[&str]) -> Vec<Cluster> {
    names
        .iter()
        .map(|&name| Cluster {
            name: name.to_owned(),
            nodes: rig.get(name).nodes(),
        })
        .collect()
}

/// Kills `cluster`'s only link and has its first node refuse new connections until told
/// otherwise; returns once warren has tried to reconnect, the cluster away for the connection.
async fn take_away(cluster: &FakeCluster) {
    let link = cluster.only_link().await;
    cluster.refuse(0, true);
    cluster.kill(link, Kill::Rst);
    wait_for(
        &format!("warren tried to reconnect {}", cluster.name()),
        || (cluster.refused(0) > 0).then_some(()),
    )
    .await;
}

/// queue.purge of `queue`.
fn purge(queue: &str) -> Method {
    Method::QueuePurge(codec::QueuePurge {
        queue: ss(queue),
        ..Default::default()
    })
}

/// basic.get while shard-a's link fails over (its node refuses the new connection for a
/// while): shard-a holds the only message. The other clusters' get-empty is not the answer,
/// since shard-a's part of the queue could not be read: the get waits for shard-a's next
/// link and gets the message there. It used to answer get-empty at once, and a client
/// draining with "get until get-empty" stopped early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_get_while_a_cluster_fails_over_waits_for_it_instead_of_answering_empty() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    a.enqueue(Q, b"on-a");
    take_away(a).await;
    c.send(1, basic_get(Q)).await;
    let early = tokio::time::timeout(Duration::from_millis(400), c.reply(1)).await;
    assert!(early.is_err(), "no answer while shard-a is away: {early:?}");
    a.refuse(0, false);
    let g = c.delivery().await;
    assert!(g.get && g.body == "on-a".as_bytes(), "{g:?}");
}

/// The same, but shard-a does not come back within `timeouts.failover_wait_secs` (5 s here):
/// the get is refused with 541 naming the cluster, not answered get-empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_get_while_a_cluster_stays_down_is_refused_with_541() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    take_away(a).await;
    c.send(1, basic_get(Q)).await;
    let close = within_for(
        Duration::from_secs(10),
        "the get's refusal",
        c.channel_close(1),
    )
    .await;
    assert_says(&close, 541, &["cluster shard-a is unreachable"]);
}

/// A passive declare of a direct reply-to address warren handed out, whose caller has gone:
/// warren asks the cluster named in it under RabbitMQ's own name, and the cluster's 404 names
/// that. The client gets it naming the address it asked about, as one broker's 404 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_a_404_for_a_gone_callers_address_names_the_address_the_client_asked_about() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let asked = "amq.rabbitmq.reply-to.shard-a~g1h2AA.gone==";
    let passive = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(asked),
        passive: true,
        ..Default::default()
    });
    let close = match c.call(1, passive).await {
        Method::ChannelClose(close) => close,
        other => panic!("expected 404, got {other:?}"),
    };
    assert_says(&close, 404, &[&format!("no queue '{asked}'")]);
}

/// An RPC server's reply to a direct reply-to address whose caller's node is not running:
/// RabbitMQ 3.10 crashes the channel and closes the connection with a bare "541
/// INTERNAL_ERROR" (a RabbitMQ cluster used directly does the same). The client's
/// connection.close says what that 541 most likely means.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_a_541_right_after_a_direct_reply_says_why() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let la = a.only_link().await;
    c.publish(1, "amq.rabbitmq.reply-to.shard-a~g1h2AA.gone==", "reply")
        .await;
    wait_for("the reply on shard-a's link", || {
        (!a.ledger(la).received_named("basic.publish").is_empty()).then_some(())
    })
    .await;
    a.close_connection(la, ReplyCode::InternalError, "INTERNAL_ERROR");
    let close = c.connection_close().await;
    assert_says(&close, 541, &["INTERNAL_ERROR", "direct reply-to"]);
}

/// A client deletes the queue it consumes and cancels the consumer in one write (or the queue
/// goes while its cancel is on the way): each cluster cancels its part of the consumer
/// (`consumer_cancel_notify`) while the client's cancel is in flight. One broker sends its
/// basic.cancel, if at all, before the cancel-ok; after it, the tag names nothing the client
/// has (py-amqp raises ConsumerCancelled). (warren kept the clusters' cancel behind the
/// channel's replies and sent it after the cancel-ok.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_the_clusters_cancel_never_follows_the_clients_own_cancel_ok() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "race").await;
    let mut out = BytesMut::new();
    let delete = Method::QueueDelete(codec::QueueDelete {
        queue: ss(Q),
        ..Default::default()
    });
    let cancel = Method::BasicCancel(codec::BasicCancel {
        consumer_tag: ss("race"),
        nowait: false,
    });
    codec::write_method(&mut out, 1, &delete);
    codec::write_method(&mut out, 1, &cancel);
    c.raw.send(&out).await;
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::QueueDeleteOk(_)), "{ok:?}");
    loop {
        match c.reply(1).await {
            Method::BasicCancelOk(ok) if ok.consumer_tag == "race" => break,
            // Before the cancel-ok, as one broker may send it.
            Method::BasicCancel(x) if x.consumer_tag == "race" => {}
            other => panic!("expected the cancel-ok, got {other:?}"),
        }
    }
    // A round trip: anything warren had for the channel is read before its reply.
    c.qos(1, 10, false).await;
    let after: Vec<_> = c
        .log
        .iter()
        .skip_while(|(_, m)| *m != "basic.cancel-ok")
        .collect();
    assert!(
        !after.iter().any(|(ch, m)| *ch == 1 && *m == "basic.cancel"),
        "a basic.cancel after the cancel-ok: {:?}",
        c.log
    );
}

/// A client cancels its consumer with `nowait` and at once subscribes a new one under the
/// same tag to another queue, while another client deletes the first queue. A cluster that
/// deletes the queue before it reads the cancel sends basic.cancel for the old consumer, then
/// the cancel-ok RabbitMQ gives a tag it no longer knows, then the new consumer's consume-ok.
/// That basic.cancel is about the consumer the client has already ended: the new one must go
/// on, on every cluster, and the client is not told it was cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_stale_cancel_does_not_end_a_new_consumer_of_the_same_tag() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, "second").await;
    c.consume(1, Q, "reuse").await;
    let link = a.only_link().await;
    // A writes nothing until told: its basic.cancel of the old consumer waits ahead of its
    // answers to the cancel and the consume that follow.
    a.stall(link, true);
    a.delete_queue(Q);
    let mut out = BytesMut::new();
    let cancel = Method::BasicCancel(codec::BasicCancel {
        consumer_tag: ss("reuse"),
        nowait: true,
    });
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss("second"),
        consumer_tag: ss("reuse"),
        ..Default::default()
    });
    codec::write_method(&mut out, 1, &cancel);
    codec::write_method(&mut out, 1, &consume);
    c.raw.send(&out).await;
    wait_for("A to read the new consume", || {
        (a.ledger(link).received_named("basic.consume").len() == 2).then_some(())
    })
    .await;
    a.stall(link, false);
    let ok = c.reply(1).await;
    assert!(
        matches!(&ok, Method::BasicConsumeOk(k) if k.consumer_tag == "reuse"),
        "{ok:?}"
    );
    c.sync(1).await;
    assert!(
        !c.log.iter().any(|(_, m)| *m == "basic.cancel"),
        "the new consumer was reported cancelled: {:?}",
        c.log
    );
    let b_link = b.only_link().await;
    assert_eq!(
        b.ledger(b_link).received_named("basic.cancel").len(),
        1,
        "B got a cancel besides the client's"
    );
    // The new consumer receives from both clusters.
    a.enqueue("second", b"from a");
    b.enqueue("second", b"from b");
    let mut bodies = vec![c.delivery().await.body, c.delivery().await.body];
    bodies.sort();
    assert_eq!(bodies, [&b"from a"[..], &b"from b"[..]]);
}

/// A client deletes the queue it consumes, on the consumer's channel (a service shutting
/// down). The delete goes to one cluster after the other; the first cancels the consumer.
/// warren must not cancel it on the others itself: its cancel would cross the delete there,
/// and RabbitMQ 3.10 fails the whole link for a quorum queue's consumer cancelled just after
/// the queue went (541 to the client). Each cluster ends the consumer as the delete reaches
/// it, and the client is told once, after its delete-ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_queue_the_connection_deletes_ends_its_consumer_without_warrens_cancels() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "service").await;
    let delete = Method::QueueDelete(codec::QueueDelete {
        queue: ss(Q),
        ..Default::default()
    });
    let ok = c.call(1, delete).await;
    assert!(matches!(ok, Method::QueueDeleteOk(_)), "{ok:?}");
    match c.reply(1).await {
        Method::BasicCancel(x) => assert_eq!(x.consumer_tag, "service"),
        other => panic!("expected the consumer's cancel, got {other:?}"),
    }
    c.qos(1, 10, false).await;
    for shard in [a, b] {
        let link = shard.only_link().await;
        let cancels = shard.ledger(link).received_named("basic.cancel");
        assert!(
            cancels.is_empty(),
            "{} got warren's cancel: {cancels:?}",
            shard.name()
        );
        assert!(!shard.has_queue(Q));
    }
    assert_eq!(
        c.log.iter().filter(|(_, m)| *m == "basic.cancel").count(),
        1,
        "told once: {:?}",
        c.log
    );
}

/// A confirm-mode channel's publishes and its channel.close in one write (aio-pika closing a
/// channel with publishes in flight): the clusters confirm what they took before they read
/// the close, and one broker passes those confirms on before its close-ok. (warren dropped
/// them once the client's close was seen: the client counted routed messages as unconfirmed,
/// and a publisher resending those would send them twice.) Returns of mandatory publishes
/// come the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_confirms_and_returns_before_a_channel_close_reach_the_client_before_its_close_ok() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.confirm_select(1).await;
    let mut out = BytesMut::new();
    let frame_max = c.raw.frame_max;
    for i in 0..10 {
        encode_publish(&mut out, 1, "", Q, format!("m{i}").as_bytes(), frame_max);
    }
    codec::write_method(
        &mut out,
        1,
        &Method::BasicPublish(codec::BasicPublish {
            routing_key: ss("nowhere"),
            mandatory: true,
            ..Default::default()
        }),
    );
    codec::write_header(
        &mut out,
        1,
        &codec::ContentHeader {
            class_id: 60,
            body_size: 4,
            properties: codec::BasicProperties::default(),
        },
    );
    codec::write_body(&mut out, 1, b"lost", frame_max);
    codec::write_method(
        &mut out,
        1,
        &Method::ChannelClose(codec::ChannelClose {
            reply_code: 200,
            ..Default::default()
        }),
    );
    c.published.insert(1, 11);
    c.raw.send(&out).await;
    loop {
        match c.reply(1).await {
            Method::ChannelCloseOk(_) => break,
            Method::BasicReturn(r) => assert_eq!(r.reply_code, 312),
            other => panic!("expected the close-ok, got {other:?}"),
        }
    }
    wait_for("the 10 publishes at the brokers", || {
        (a.ready(Q).len() + b.ready(Q).len() == 10).then_some(())
    })
    .await;
    let settled = c.settled.get(&1).cloned().unwrap_or_default();
    assert_eq!(
        settled.len(),
        11,
        "every publish confirmed before the close-ok: {:?}",
        c.log
    );
    assert!(settled.values().all(|ack| *ack), "{settled:?}");
    let close_ok = c.log.iter().position(|(_, m)| *m == "channel.close-ok");
    let returned = c.log.iter().position(|(_, m)| *m == "basic.return");
    assert!(
        returned.is_some() && returned < close_ok,
        "the return before the close-ok: {:?}",
        c.log
    );
}

/// RabbitMQ checks a user's configure permission on a queue before anything else about a
/// declare or delete, and warren answers some of these itself: a conditional delete after its
/// check over the clusters (406 for a queue not empty), a stream declare (540). A user without
/// the permission gets the clusters' 403 first, as from one broker; a user with it gets
/// warren's answer; and asking creates nothing. (warren's own answer came first: 406 or 540
/// where one broker says 403.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_user_without_configure_permission_gets_403_before_warrens_own_refusals() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, "jobs").await;
    a.enqueue("jobs", b"waiting");
    let delete = |queue: &str| {
        Method::QueueDelete(codec::QueueDelete {
            queue: ss(queue),
            if_empty: true,
            if_unused: true,
            ..Default::default()
        })
    };
    let mut stream_args = codec::FieldTable::default();
    stream_args.insert(
        ss("x-queue-type"),
        codec::FieldValue::LongStr(codec::LongStr::from_static("stream")),
    );
    let stream = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss("events"),
        durable: true,
        arguments: stream_args,
        ..Default::default()
    });
    async fn refused(c: &mut Client, request: Method) -> codec::ChannelClose {
        let close = match c.call(1, request).await {
            Method::ChannelClose(close) => close,
            other => panic!("expected a refusal, got {other:?}"),
        };
        c.send(1, Method::ChannelCloseOk(Default::default())).await;
        c.open(1).await;
        close
    }
    for deny in [true, false] {
        for s in [a, b, control] {
            s.deny_declare("jobs", deny);
            s.deny_declare("events", deny);
        }
        let close = refused(&mut c, delete("jobs")).await;
        let close_stream = refused(&mut c, stream.clone()).await;
        if deny {
            assert_says(&close, 403, &["access to queue 'jobs'"]);
            assert_says(&close_stream, 403, &["access to queue 'events'"]);
        } else {
            assert_says(&close, 406, &["not empty"]);
            assert_says(&close_stream, 540, &["streams"]);
        }
        assert_eq!(
            (close.class_id, close.method_id),
            (50, 40),
            "queue.delete's"
        );
        assert_eq!(
            (close_stream.class_id, close_stream.method_id),
            (50, 10),
            "queue.declare's"
        );
    }
    assert_eq!(a.ready("jobs"), vec![Bytes::from_static(b"waiting")]);
    // Asking about a queue no cluster has makes none: its conditional delete is delete-ok.
    let ok = c.call(1, delete("ghost")).await;
    assert!(matches!(ok, Method::QueueDeleteOk(_)), "{ok:?}");
    for s in [a, b, control] {
        assert!(
            !s.has_queue("ghost") && !s.has_queue("events"),
            "{}",
            s.name()
        );
    }
    // A quorum queue's condition: 403 on the channel without the permission; with it, the
    // connection error RabbitMQ gives (540).
    let mut quorum_args = codec::FieldTable::default();
    quorum_args.insert(
        ss("x-queue-type"),
        codec::FieldValue::LongStr(codec::LongStr::from_static("quorum")),
    );
    let quorum = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss("votes"),
        durable: true,
        arguments: quorum_args,
        ..Default::default()
    });
    let ok = c.call(1, quorum).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    for s in [a, b, control] {
        s.deny_declare("votes", true);
    }
    let close = refused(&mut c, delete("votes")).await;
    assert_says(&close, 403, &["access to queue 'votes'"]);
    for s in [a, b, control] {
        s.deny_declare("votes", false);
    }
    c.send(1, delete("votes")).await;
    let close = c.connection_close().await;
    assert_says(&close, 540, &["quorum queues"]);
    assert_eq!((close.class_id, close.method_id), (50, 40));
    for s in [a, b, control] {
        assert!(s.has_queue("votes"), "kept on {}", s.name());
    }
}

/// A declare the first clusters by name accept and a later one refuses (here shard-b, as a
/// cluster without a majority refuses a quorum queue, or one at its vhost's `max-queues`): the
/// client gets the refusal, as from one broker, and the queue stays made on control and
/// shard-a, as docs/routing.md says ("A declare one cluster refuses after another made it").
/// Declaring again once the cause is gone makes it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_a_declare_a_later_cluster_refuses_stays_made_where_it_was_accepted() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    b.deny_declare("jobs", true);
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss("jobs"),
        durable: true,
        ..Default::default()
    });
    let close = match c.call(1, declare).await {
        Method::ChannelClose(close) => close,
        other => panic!("expected the refusal, got {other:?}"),
    };
    assert_eq!(close.reply_code, 403, "{close:?}");
    assert!(
        control.has_queue("jobs") && a.has_queue("jobs") && !b.has_queue("jobs"),
        "made where accepted"
    );
    c.send(1, Method::ChannelCloseOk(Default::default())).await;
    b.deny_declare("jobs", false);
    c.open(1).await;
    c.declare(1, "jobs").await;
    assert!(b.has_queue("jobs"), "whole once declared again");
}

/// queue.purge while shard-a's link fails over: shard-a holds part of the queue. One broker
/// purges the whole queue; answered by the clusters that are up, the purge would leave
/// shard-a's part to be delivered after the purge-ok. It waits for shard-a's next link, is
/// made there too, and purge-ok counts both parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_purge_while_a_cluster_fails_over_waits_for_it_and_purges_it_too() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    a.enqueue(Q, b"a1");
    a.enqueue(Q, b"a2");
    b.enqueue(Q, b"b1");
    take_away(a).await;
    c.send(1, purge(Q)).await;
    let early = tokio::time::timeout(Duration::from_millis(400), c.reply(1)).await;
    assert!(early.is_err(), "no answer while shard-a is away: {early:?}");
    assert!(b.ready(Q).is_empty(), "shard-b purged at once");
    a.refuse(0, false);
    match c.reply(1).await {
        Method::QueuePurgeOk(ok) => assert_eq!(ok.message_count, 3, "both parts counted"),
        other => panic!("expected purge-ok, got {other:?}"),
    }
    assert!(
        a.ready(Q).is_empty(),
        "shard-a's part purged: {:?}",
        a.ready(Q)
    );
}

/// queue.purge, queue.delete and a passive queue.declare while shard-a stays down past
/// `timeouts.failover_wait_secs` (5 s here): each is refused with 541 naming the cluster and
/// what was and was not done, not answered from the clusters that are up as if they were the
/// whole queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_whole_queue_requests_while_a_cluster_stays_down_are_refused_with_541() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    for ch in 1..=3 {
        c.open(ch).await;
    }
    c.declare(1, Q).await;
    a.enqueue(Q, b"on-a");
    take_away(a).await;
    c.send(1, purge(Q)).await;
    let passive = codec::QueueDeclare {
        queue: ss(Q),
        passive: true,
        ..Default::default()
    };
    c.send(2, Method::QueueDeclare(passive)).await;
    c.send(
        3,
        Method::QueueDelete(codec::QueueDelete {
            queue: ss(Q),
            ..Default::default()
        }),
    )
    .await;
    for (ch, says) in [
        (1, "purged on the other clusters, not there"),
        (2, "its message count cannot be known"),
        (
            3,
            "deleted on the other clusters, and its copy there remains",
        ),
    ] {
        let close = within_for(Duration::from_secs(10), "the refusal", c.channel_close(ch)).await;
        assert_says(&close, 541, &["cluster shard-a is unreachable", says]);
    }
    assert_eq!(a.ready(Q).len(), 1, "shard-a's part untouched");
}

/// A client goes away while its purge waits for shard-a, whose link is failing over. Nothing it
/// published is unconfirmed, and the purge cannot finish on the links that are up: they close
/// at once, not at `timeouts.failover_wait_secs` (5 s here) for a request only a cluster that
/// is away could answer. Held open, they count against a vhost's `max-connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_client_gone_with_a_request_waiting_for_a_cluster_away_closes_its_links_at_once() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let lb = b.only_link().await;
    take_away(a).await;
    c.send(1, purge(Q)).await;
    wait_for("shard-b purged", || {
        (!b.ledger(lb).received_named("queue.purge").is_empty()).then_some(())
    })
    .await;
    drop(c);
    let gone = std::time::Instant::now();
    wait_for("shard-b's link closed", || {
        (!b.links().contains(&lb)).then_some(())
    })
    .await;
    assert!(
        gone.elapsed() < Duration::from_secs(3),
        "closed {:?} after the client",
        gone.elapsed()
    );
}

/// A basic.get with `no_ack` is in flight on shard-a's link when it dies: RabbitMQ took the
/// message off the queue as it sent the get-ok, which never arrived. One broker's client
/// would lose its connection with it; warren closes the client with 320 saying why, instead
/// of asking again and answering with the next message (or get-empty) as if nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_lost_with_a_no_ack_get_in_flight_closes_the_client() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    a.enqueue(Q, b"taken");
    let la = a.only_link().await;
    a.stall(la, true);
    c.send(
        1,
        Method::BasicGet(codec::BasicGet {
            queue: ss(Q),
            no_ack: true,
            ..Default::default()
        }),
    )
    .await;
    wait_for("shard-a took the message for the get", || {
        a.ready(Q).is_empty().then_some(())
    })
    .await;
    a.kill(la, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(&close, 320, &["basic.get with no_ack in flight"]);
}

/// A consumer with `no_ack` whose link dies: RabbitMQ counted what it had sent on it as
/// delivered, so messages on their way are gone (here the stalled link holds one the client
/// never gets). One broker's client loses its connection with the node and knows; warren
/// closes the client with 320 saying why instead of re-subscribing as if nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_link_lost_under_a_no_ack_consumer_closes_the_client() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let ok = c
        .call(
            1,
            Method::BasicConsume(codec::BasicConsume {
                queue: ss(Q),
                consumer_tag: ss("auto"),
                no_ack: true,
                ..Default::default()
            }),
        )
        .await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
    a.enqueue(Q, b"first");
    assert_eq!(c.delivery().await.body, "first".as_bytes());
    let la = a.only_link().await;
    a.stall(la, true);
    a.enqueue(Q, b"on its way");
    wait_for("shard-a sent the second message", || {
        a.ready(Q).is_empty().then_some(())
    })
    .await;
    a.kill(la, Kill::Rst);
    let close = c.connection_close().await;
    assert_says(&close, 320, &["shard-a", "consumer 'auto'", "no_ack"]);
}

/// The same death under a no-ack consumer of a queue that gets messages only on the control
/// cluster (Celery's rpc:// result and reply queues): its copy on a shard cluster never holds
/// one, so nothing can be lost there and the client is not closed; the consumer goes on
/// receiving from the control cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_shard_link_lost_under_a_no_ack_consumer_of_a_control_queue_fails_over() {
    let rig = Rig::three().await;
    let (a, control) = (rig.get(A), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let q = "w1@host.celery.pidbox";
    c.declare(1, q).await;
    let ok = c
        .call(
            1,
            Method::BasicConsume(codec::BasicConsume {
                queue: ss(q),
                consumer_tag: ss("replies"),
                no_ack: true,
                ..Default::default()
            }),
        )
        .await;
    assert!(matches!(ok, Method::BasicConsumeOk(_)), "{ok:?}");
    let la = a.only_link().await;
    a.kill(la, Kill::Rst);
    wait_for("shard-a's next link", || {
        (a.opened().len() > 1 && a.links().len() == 1).then_some(())
    })
    .await;
    control.enqueue(q, b"reply");
    assert_eq!(c.delivery().await.body, "reply".as_bytes());
}

/// A get-ok from shard-a waits for its turn behind a queue.declare that shard-b answers late;
/// shard-a's link dies meanwhile (its broker requeues the message) and is replaced by a new
/// connection before the get-ok reaches the client. Passing that get-ok on would give the
/// client a message RabbitMQ also delivers again (it used to, with a dead tag whose ack was
/// swallowed: the message was processed twice). The get is asked again on shard-a's new
/// link instead: the client gets the message once, marked redelivered, and its ack settles
/// it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m_a_get_ok_whose_link_died_before_it_was_answered_is_asked_again() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.open(2).await;
    c.declare(1, Q).await;
    get_empty(&mut c, 2, Q).await;
    get_empty(&mut c, 2, Q).await;
    a.enqueue(Q, b"g1");
    let (la, lb) = (a.only_link().await, b.only_link().await);
    b.stall(lb, true);
    c.send(
        1,
        Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(Q),
            durable: true,
            ..Default::default()
        }),
    )
    .await;
    c.send(1, basic_get(Q)).await;
    wait_for("shard-a answered the get", || {
        (a.unacked(la).len() == 1).then_some(())
    })
    .await;
    a.kill(la, Kill::Rst);
    let new = wait_for("shard-a's new link answered the declare again", || {
        let l = a.links().into_iter().find(|&l| l != la)?;
        (!a.ledger(l).sent_named("queue.declare-ok").is_empty()).then_some(l)
    })
    .await;
    b.stall(lb, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    let g = c.delivery().await;
    assert!(g.get && g.body == "g1".as_bytes(), "{g:?}");
    assert!(
        g.redelivered,
        "the new link's get-ok of the requeued message"
    );
    c.send(1, ack(g.tag, false)).await;
    let flow = Method::ChannelFlow(codec::ChannelFlow { active: true });
    match c.call(1, flow).await {
        Method::ChannelFlowOk(_) => {}
        Method::ChannelClose(close) => panic!(
            "the ack of the get-ok closed the channel: {} {}",
            close.reply_code, close.reply_text
        ),
        other => panic!("expected channel.flow-ok, got {other:?}"),
    }
    assert_eq!(a.ledger(new).settlements(1), vec![ack(1, false)]);
    assert!(a.ready(Q).is_empty(), "taken once, and acked");
}

/// The client cancels its consumer while shard-a's link is down; shard-b answers the cancel
/// late, and shard-a's new link opens (the client's consumers replayed on it) in between. Once
/// the client has cancel-ok, no cluster may feed the consumer any more: a message on shard-a
/// must stay there, not be delivered for the cancelled tag (for a no-ack consumer it would be
/// lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_a_consumer_cancelled_during_a_failover_is_not_resubscribed_on_the_new_link() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-n").await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    take_away(a).await;
    b.stall(lb, true);
    let cancel = Method::BasicCancel(codec::BasicCancel {
        consumer_tag: ss("ctag-n"),
        nowait: false,
    });
    c.send(1, cancel).await;
    wait_for("shard-b got the cancel", || {
        (!b.ledger(lb).received_named("basic.cancel").is_empty()).then_some(())
    })
    .await;
    a.refuse(0, false);
    wait_for("shard-a's new link replayed the channel", || {
        let l = a.links().into_iter().find(|&l| l != la)?;
        let led = a.ledger(l);
        led.received_named("queue.declare")
            .iter()
            .any(|(_, m)| matches!(m, Method::QueueDeclare(q) if q.passive))
            .then_some(())
    })
    .await;
    b.stall(lb, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::BasicCancelOk(_)), "{ok:?}");
    a.enqueue(Q, b"late");
    c.sync(1).await;
    assert!(
        c.deliveries.is_empty(),
        "delivered for a cancelled consumer: {:?}",
        c.deliveries
    );
    assert_eq!(bodies(&a.ready(Q)), ["late"]);
}

// ---------------------------------------------------------------------------------------------
// (o) A control publish inside a transaction

/// A transaction publishes to a control queue (`celeryev.*`), which goes to the control
/// cluster, and the control link dies before tx.commit. docs/routing.md promises that
/// "commit-ok always means every publish of the transaction was committed" (and
/// docs/reliability.md: "a commit-ok covers every publish of the transaction"): so either
/// commit-ok with the message committed on the control cluster's new link, or an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_a_control_publish_of_a_transaction_whose_link_died_is_not_lost_behind_commit_ok() {
    const EVENTS: &str = "celeryev.test";
    let rig = Rig::three().await;
    let control = rig.get(CONTROL);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, EVENTS).await;
    c.tx_select(1).await;
    c.publish(1, EVENTS, "e1").await;
    // A transaction's publishes all go to its one (shard) cluster, control ones included, so
    // the control link's death cannot take this one with it.
    c.sync(1).await;
    let lc = control.only_link().await;
    assert!(control.ledger(lc).published(1).is_empty());
    control.kill(lc, Kill::Rst);
    wait_for("the control cluster's new link selected tx", || {
        let l = control.links().into_iter().find(|&l| l != lc)?;
        (!control.ledger(l).received_named("tx.select").is_empty()).then_some(())
    })
    .await;
    match c.call(1, Method::TxCommit(Default::default())).await {
        Method::TxCommitOk(_) => {
            let everywhere: Vec<String> = [A, B, CONTROL]
                .iter()
                .flat_map(|n| bodies(&rig.get(n).ready(EVENTS)))
                .collect();
            assert_eq!(
                everywhere,
                ["e1"],
                "commit-ok, but the transaction's publish was committed nowhere"
            );
        }
        Method::ChannelClose(_) => {} // A clear refusal is allowed.
        other => panic!("expected tx.commit-ok or channel.close, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// (p) Control publishes during the control link's failover

/// Confirm-mode publishes to a control queue: two are held by the control cluster when its link
/// dies, a third is published while no control link is up. All three go to the new link once it
/// is replayed, in order, and each is acked once (docs/semantics.md, failover table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p_control_publishes_wait_for_the_control_links_replacement_and_keep_their_order() {
    const EVENTS: &str = "celeryev.test";
    let rig = Rig::start(&[(A, 1), (B, 1), (CONTROL, 2)]).await;
    let control = rig.get(CONTROL);
    control.on_publish(|p| {
        if p.node == 0 {
            Verdict::Hold
        } else {
            Verdict::Ack
        }
    });
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, EVENTS).await;
    c.confirm_select(1).await;
    let first = control.only_link().await;
    c.publish(1, EVENTS, "e1").await;
    c.publish(1, EVENTS, "e2").await;
    wait_for("the control cluster holds both", || {
        (control.held(first, 1).len() == 2).then_some(())
    })
    .await;
    control.refuse(0, true);
    control.refuse(1, true);
    control.kill(first, Kill::Rst);
    wait_for("warren tries to reconnect the control cluster", || {
        (control.refused(0) > 0).then_some(())
    })
    .await;
    c.publish(1, EVENTS, "e3").await;
    c.sync(1).await;
    control.refuse(1, false);
    c.expect_settled(1, &(1..=3).map(|s| (s, true)).collect())
        .await;
    let second = control.only_link().await;
    assert_eq!(control.ledger(second).node, 1);
    assert_eq!(
        bodies(&control.ledger(second).published(1)),
        ["e1", "e2", "e3"]
    );
    assert_eq!(bodies(&control.ready(EVENTS)), ["e1", "e2", "e3"]);
}

// ---------------------------------------------------------------------------------------------
// (q) connection.update-secret

/// The client renews its secret (an OAuth token) with connection.update-secret: every link gets
/// it, the client gets update-secret-ok, and a link opened afterwards (shard-a's replacement)
/// logs in with the new secret, not the expired one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_links_opened_after_update_secret_log_in_with_the_new_secret() {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.send(
        0,
        Method::ConnectionUpdateSecret(codec::ConnectionUpdateSecret {
            new_secret: "new-token".into(),
            reason: ss("renewed"),
        }),
    )
    .await;
    match c.reply(0).await {
        Method::ConnectionUpdateSecretOk(_) => {}
        other => panic!("expected update-secret-ok, got {other:?}"),
    }
    let first = a.only_link().await;
    wait_for("shard-a's link to get the new secret", || {
        (!a.ledger(first)
            .received_named("connection.update-secret")
            .is_empty())
        .then_some(())
    })
    .await;
    a.kill(first, Kill::Rst);
    let second = wait_for("shard-a's replacement link", || {
        a.links().into_iter().find(|&l| l != first)
    })
    .await;
    let login = wait_for("the replacement's login", || {
        a.ledger(second)
            .received_named("connection.start-ok")
            .into_iter()
            .next()
    })
    .await;
    let Method::ConnectionStartOk(ok) = login.1 else {
        unreachable!()
    };
    let response = ok.response.as_bytes().to_vec();
    assert!(
        response.ends_with(b"\0new-token"),
        "the replacement logs in with {:?}",
        String::from_utf8_lossy(&response)
    );
}

/// RabbitMQ's internal users accept any update-secret and go on checking the password: a
/// client that sends one its clusters do not know (amqp-client.js's own test suite does) keeps
/// working on one broker. Through warren the shard links, opened after it (lazy links), log in
/// with the secret, are refused with 403, and open with the login password instead: the
/// declare is answered and the publish confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_a_secret_the_clusters_refuse_falls_back_to_the_login_password() {
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let (a, b) = (rig.get(A), rig.get(B));
    for cluster in [A, B, CONTROL] {
        rig.get(cluster).require_password("guest");
    }
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.send(
        0,
        Method::ConnectionUpdateSecret(codec::ConnectionUpdateSecret {
            new_secret: "not-the-password".into(),
            reason: ss("test"),
        }),
    )
    .await;
    match c.reply(0).await {
        Method::ConnectionUpdateSecretOk(_) => {}
        other => panic!("expected update-secret-ok, got {other:?}"),
    }
    assert!(a.links().is_empty() && b.links().is_empty());
    c.confirm_select(1).await;
    c.declare(1, "tasks").await;
    c.publish(1, "tasks", "t1").await;
    c.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
}

// ---------------------------------------------------------------------------------------------
// (r) Links opened when first needed

/// A control exchange declared by a connection that has only used the control cluster
/// (`lazy_links`) is on the control cluster alone. Another connection asking whether it exists
/// (a passive declare) is answered by the control cluster, as one broker would answer; binding
/// a sharded queue to it is refused (404, documented) by a shard cluster before the control
/// cluster makes the binding: a refused bind must leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_a_control_exchange_only_on_the_control_cluster_is_found_and_not_half_bound() {
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let control = rig.get(CONTROL);
    let mut events = Client::connect(rig.addr()).await;
    events.open(1).await;
    let declare = |passive: bool| {
        Method::ExchangeDeclare(codec::ExchangeDeclare {
            exchange: ss("celeryev"),
            kind: ss("topic"),
            passive,
            ..Default::default()
        })
    };
    let ok = events.call(1, declare(false)).await;
    assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    assert!(control.has_exchange("celeryev"));
    assert!(!rig.get(A).has_exchange("celeryev"));

    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let ok = c.call(1, declare(true)).await;
    assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    let bind = Method::QueueBind(codec::QueueBind {
        queue: ss(Q),
        exchange: ss("celeryev"),
        routing_key: ss("#"),
        ..Default::default()
    });
    c.send(1, bind).await;
    let close = c.channel_close(1).await;
    assert_eq!(close.reply_code, 404, "{close:?}");
    for l in control.opened() {
        assert!(
            control.ledger(l).received_named("queue.bind").is_empty(),
            "the control cluster was asked to make the refused binding"
        );
    }
}

/// With `[limits] lazy_links` (the default), a connection that only publishes to control names
/// (a Celery event connection) has one link, to the control cluster. Its first request that
/// involves the shard clusters (here a queue.declare of a sharded queue) opens their links,
/// waits until the client's channel and its confirm mode are replayed there, and is then
/// answered from every cluster; publishes go on to the shard clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_shard_links_open_at_the_first_request_that_needs_them() {
    const EVENTS: &str = "celeryev.test";
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    for i in 1..=3 {
        c.publish(1, EVENTS, &format!("e{i}")).await;
    }
    c.expect_settled(1, &(1..=3).map(|s| (s, true)).collect())
        .await;
    assert!(
        a.links().is_empty() && b.links().is_empty(),
        "no shard link for a connection that only talked to the control cluster"
    );
    let cl = control.only_link().await;
    assert_eq!(bodies(&control.ledger(cl).published(1)), ["e1", "e2", "e3"]);

    c.declare(1, Q).await;
    for shard in [a, b] {
        let link = shard.only_link().await;
        let ledger = shard.ledger(link);
        assert_eq!(ledger.received_named("channel.open").len(), 1);
        assert_eq!(ledger.received_named("confirm.select").len(), 1);
        assert!(shard.has_queue(Q), "{} has the queue", shard.name());
    }
    for i in 4..=7 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    c.expect_settled(1, &(1..=7).map(|s| (s, true)).collect())
        .await;
    assert_eq!(a.ready(Q).len() + b.ready(Q).len(), 4);
    assert_eq!(
        control.ledger(cl).published(1).len(),
        3,
        "nothing sharded on control"
    );
}

/// With `idle_link_secs`, shard links that have carried nothing and held none of the
/// connection's state for that long are closed; the connection keeps its control link. Its next
/// publish opens them again: the clusters kept what the old links declared, so the replay
/// declares nothing (nothing another client deleted meanwhile is re-created), and the publish
/// is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_idle_shard_links_close_and_open_again_when_needed() {
    let rig = Rig::with_idle_links().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    c.declare(1, Q).await;
    c.publish(1, Q, "m1").await;
    c.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
    let (first_a, first_b) = (a.only_link().await, b.only_link().await);
    rig.shard_links_closed().await;
    assert_eq!(control.links().len(), 1, "the control link stays");
    c.publish(1, Q, "m2").await;
    c.expect_settled(1, &[(1, true), (2, true)].into_iter().collect())
        .await;
    for (shard, first) in [(a, first_a), (b, first_b)] {
        let link = shard.only_link().await;
        assert_ne!(link, first, "{}: a new link", shard.name());
        let declares = shard.ledger(link).received_named("queue.declare");
        assert!(
            declares.is_empty(),
            "{}: the reopened link declares nothing: {declares:?}",
            shard.name()
        );
    }
    assert_eq!(a.ready(Q).len() + b.ready(Q).len(), 2);
}

/// While the shard links are closed for idleness, the connection declares a control exchange
/// (it goes to the control cluster alone) and another client deletes the connection's queue.
/// The publish that reopens the shard links must not re-create the queue there: the control
/// declare concerned no shard cluster. (It marked them as having missed the connection's
/// topology, the reopened links declared it all again, and the mandatory publish to the
/// deleted queue was routed to a queue no one could reach instead of returned.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_a_control_declare_while_shard_links_idle_does_not_replay_on_them() {
    let rig = Rig::with_idle_links().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    c.declare(1, Q).await;
    c.publish(1, Q, "m1").await;
    c.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
    rig.shard_links_closed().await;
    let declare = Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ss("celeryev"),
        kind: ss("topic"),
        ..Default::default()
    });
    let ok = c.call(1, declare).await;
    assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    for shard in [a, b] {
        shard.delete_queue(Q);
    }
    c.publish(1, "invoices", "m2").await;
    c.expect_settled(1, &[(1, true), (2, true)].into_iter().collect())
        .await;
    for shard in [a, b] {
        let link = shard.only_link().await;
        let declares = shard.ledger(link).received_named("queue.declare");
        assert!(
            declares.is_empty(),
            "{}: the reopened link declares nothing: {declares:?}",
            shard.name()
        );
        assert!(!shard.has_queue(Q), "{}: {Q} re-created", shard.name());
    }
}

/// A queue the connection declared vanishes while its shard links are closed for idleness (it
/// expired, or another client deleted it). One broker's client does not hear of it until it
/// uses the queue; through warren likewise: the publish to another queue that opens the links
/// again is routed and confirmed, the connection stays open, and the next use of the vanished
/// queue gets the cluster's own 404. (Checking it on the reopened links closed the connection
/// with 320 and lost that publish.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_a_queue_gone_while_the_links_were_idle_does_not_close_the_connection() {
    const OTHER: &str = "invoices";
    let rig = Rig::with_idle_links().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    c.declare(1, Q).await;
    c.declare(1, OTHER).await;
    c.publish(1, OTHER, "m1").await;
    c.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
    rig.shard_links_closed().await;
    for shard in [a, b] {
        shard.delete_queue(Q);
    }
    c.publish(1, OTHER, "m2").await;
    c.expect_settled(1, &[(1, true), (2, true)].into_iter().collect())
        .await;
    assert_eq!(a.ready(OTHER).len() + b.ready(OTHER).len(), 2);
    c.open(2).await;
    let passive = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(Q),
        passive: true,
        ..Default::default()
    });
    c.send(2, passive).await;
    let close = c.channel_close(2).await;
    assert_eq!(close.reply_code, 404, "{close:?}");
    c.sync(1).await;
}

/// An asynchronous client closes a channel and, before it reads close-ok, publishes on it (to a
/// sharded queue, which would open the shard links), in one write: RabbitMQ discards what
/// follows the close. So does warren, before the links exist too; it deferred the publish until
/// they opened and then ran it against the freed channel, closing the whole connection with
/// 504. (Sent in two writes, the publish may arrive after close-ok is sent, and then one broker
/// too closes the connection with 504: "expected 'channel.open'".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_a_publish_behind_a_channel_close_is_discarded_before_the_links_open() {
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.open(2).await;
    let close = Method::ChannelClose(codec::ChannelClose {
        reply_code: 200,
        reply_text: ss("bye"),
        class_id: 0,
        method_id: 0,
    });
    let mut out = BytesMut::new();
    codec::write_method(&mut out, 2, &close);
    let frame_max = c.raw.frame_max;
    encode_publish(&mut out, 2, "", Q, b"after the close", frame_max);
    c.raw.send(&out).await;
    c.qos(1, 5, false).await;
    assert!(matches!(c.reply(2).await, Method::ChannelCloseOk(_)));
    c.declare(1, Q).await;
    assert!(a.ready(Q).is_empty() && b.ready(Q).is_empty());
}

/// A channel has two prefetch settings, the per-consumer one (`global = false`) and the
/// channel's (`global = true`), each changed only by a basic.qos of its own kind. Set both before
/// the shard links exist (a lazy connection), then consume: each shard link gets both, split.
/// (Only the last one was sent, so the per-consumer limit was lifted there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_both_prefetch_settings_reach_links_opened_later() {
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.qos(1, 2, false).await;
    c.qos(1, 5, true).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "worker").await;
    let mut sums = (0, 0);
    for shard in [a, b] {
        let link = shard.only_link().await;
        let qos: Vec<(u16, bool)> = shard
            .ledger(link)
            .received_named("basic.qos")
            .into_iter()
            .map(|(_, m)| match m {
                Method::BasicQos(q) => (q.prefetch_count, q.global),
                _ => unreachable!(),
            })
            .collect();
        // The last of each kind is in force (a link opened first gets the whole window, then
        // its share once the other opens).
        let last = |global: bool| qos.iter().rev().find(|q| q.1 == global).map(|q| q.0);
        let (Some(per_consumer), Some(per_channel)) = (last(false), last(true)) else {
            panic!("{}'s basic.qos: {qos:?}", shard.name());
        };
        sums = (sums.0 + per_consumer, sums.1 + per_channel);
    }
    assert_eq!(
        sums,
        (2, 5),
        "each setting split over the two shard clusters"
    );
}

/// A per-consumer basic.qos lifts the channel's limit, as RabbitMQ's does (kombu sends one for
/// a `Consumer(prefetch_count=N)` on a channel that had a global qos). Set a channel limit,
/// then a per-consumer one, before the shard links exist, then consume: the links get the
/// per-consumer limit only. (Both were sent, so the channel limit of 2 held the consumer to
/// 2 where one broker gives it 5.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_a_per_consumer_prefetch_lifts_the_channel_prefetch_before_it() {
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 1)], true).await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.qos(1, 2, true).await;
    c.qos(1, 5, false).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "worker").await;
    let mut per_consumer = 0;
    for shard in [a, b] {
        let link = shard.only_link().await;
        let qos: Vec<(u16, bool)> = shard
            .ledger(link)
            .received_named("basic.qos")
            .into_iter()
            .map(|(_, m)| match m {
                Method::BasicQos(q) => (q.prefetch_count, q.global),
                _ => unreachable!(),
            })
            .collect();
        assert!(
            qos.iter().all(|q| !q.1),
            "{} got a channel limit: {qos:?}",
            shard.name()
        );
        per_consumer += qos.last().map_or(0, |q| q.0);
    }
    assert_eq!(
        per_consumer, 5,
        "the per-consumer limit split over the shards"
    );
}

/// Links that hold the connection's state are never idle: a consumer's links stay open however
/// long nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r_shard_links_of_a_consumer_stay_open_while_idle() {
    let rig = Rig::with_idle_links().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "worker").await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!((a.links(), b.links()), (vec![la], vec![lb]));
}

// ---------------------------------------------------------------------------------------------
// (s) Channels reopened behind a close, and warren's own channels for checks

/// The client reopens a channel at once after one cluster closed it, while another cluster
/// still has to confirm the close of its part (it answers late), and sends requests behind the
/// open without waiting (asynchronous clients do; py-amqp and kombu reuse the lowest free
/// number). Those requests must reach that cluster after the new channel.open: sent on the
/// closed channel, RabbitMQ closes the whole connection (504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_requests_behind_a_reopen_wait_for_the_slow_close_of_the_old_channel() {
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    b.close_channel(
        lb,
        1,
        warren::codec::ReplyCode::PreconditionFailed,
        "fake refusal",
    );
    assert!(matches!(c.reply(1).await, Method::ChannelClose(_)));
    c.send(1, Method::ChannelCloseOk(Default::default())).await;
    c.send(1, Method::ChannelOpen(Default::default())).await;
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(Q),
        durable: true,
        ..Default::default()
    });
    c.send(1, declare).await;
    wait_for("shard-a got the close of the old channel", || {
        (!a.ledger(la).received_named("channel.close").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.stall(la, false);
    assert!(matches!(c.reply(1).await, Method::ChannelOpenOk(_)));
    assert!(matches!(c.reply(1).await, Method::QueueDeclareOk(_)));
    let on_1: Vec<&str> = a
        .ledger(la)
        .received
        .iter()
        .filter(|f| f.channel == 1)
        .map(|f| f.method.name())
        .collect();
    assert_eq!(
        on_1[on_1.len() - 3..],
        ["channel.close", "channel.open", "queue.declare"],
        "shard-a's channel 1: {on_1:?}"
    );
    for (cluster, link) in [(a, la), (b, lb), (control, control.only_link().await)] {
        assert!(
            cluster.ledger(link).violations.is_empty(),
            "{}: {:?}",
            cluster.name(),
            cluster.ledger(link).violations
        );
    }
}

/// queue.delete with `if_empty` of a queue one cluster lacks: warren checks the whole queue
/// with passive declares on channels of its own, so the cluster's 404 closes only that
/// channel; the client's channel keeps its consumer and unacked message, and the delete goes
/// to every cluster. A queue missing everywhere is delete-ok (0), as from RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_a_conditional_delete_checks_on_warrens_own_channels() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare(1, "other").await;
    c.consume(1, "other", "ctag-s").await;
    b.enqueue("other", b"held");
    let held = c.delivery().await;
    a.delete_queue(Q);
    let delete = |queue: &str| {
        Method::QueueDelete(codec::QueueDelete {
            queue: ss(queue),
            if_empty: true,
            if_unused: true,
            ..Default::default()
        })
    };
    match c.call(1, delete(Q)).await {
        Method::QueueDeleteOk(ok) => assert_eq!(ok.message_count, 0),
        other => panic!("expected queue.delete-ok, got {other:?}"),
    }
    assert!(!a.has_queue(Q) && !b.has_queue(Q));
    match c.call(1, delete("never-declared")).await {
        Method::QueueDeleteOk(ok) => assert_eq!(ok.message_count, 0),
        other => panic!("expected queue.delete-ok, got {other:?}"),
    }
    c.send(1, ack(held.tag, false)).await;
    c.sync(1).await;
    let lb = b.only_link().await;
    assert_eq!(b.ledger(lb).settlements(1), vec![ack(1, false)]);
    for cluster in [a, b] {
        let link = cluster.only_link().await;
        let checks = cluster.ledger(link).received_named("queue.declare");
        assert!(
            checks
                .iter()
                .filter(|(_, m)| matches!(m, Method::QueueDeclare(d) if d.passive))
                .all(|(ch, _)| *ch != 1),
            "{}: passive checks on the client's channel: {checks:?}",
            cluster.name()
        );
        assert!(cluster.ledger(link).violations.is_empty());
    }
}

/// A publish pipelined right ahead of a conditional delete on the same channel: one broker
/// routes it before it handles the delete, which then sees a queue that is not empty. warren's
/// whole-queue check runs on channels of its own, beside the client's: it is sent to a
/// cluster only once a fence on the client's channel there is answered, so it sees the
/// publish. While a cluster holds its replies back, that cluster has the fence and no check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_a_conditional_delete_checks_behind_the_channels_earlier_publish() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.prove_default_exchange(9).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    b.stall(lb, true);
    c.publish(1, Q, "just ahead").await;
    c.send(1, delete_if_empty(Q)).await;
    let passive_check = |cluster: &FakeCluster, link| {
        cluster
            .ledger(link)
            .received
            .iter()
            .position(|f| matches!(&f.method, Method::QueueDeclare(d) if d.passive))
    };
    let fence = |cluster: &FakeCluster, link| {
        cluster.ledger(link).received.iter().position(|f| {
            f.channel == 1 && matches!(&f.method, Method::ExchangeDeclare(x) if x.passive)
        })
    };
    for (cluster, link) in [(a, la), (b, lb)] {
        wait_for("the fence reached the cluster", || fence(cluster, link)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (cluster, link) in [(a, la), (b, lb)] {
        assert_eq!(
            passive_check(cluster, link),
            None,
            "{}: the check went out before the fence was answered",
            cluster.name()
        );
    }
    a.stall(la, false);
    b.stall(lb, false);
    match c.reply(1).await {
        Method::ChannelClose(close) => assert_eq!(close.reply_code, 406, "{close:?}"),
        other => panic!("expected channel.close 406 (the queue holds the publish), got {other:?}"),
    }
    let held: usize = [a, b].iter().map(|cl| cl.ready(Q).len()).sum();
    assert_eq!(held, 1, "the queue keeps the publish");
    for (cluster, link) in [(a, la), (b, lb)] {
        let (f, check) = (fence(cluster, link), passive_check(cluster, link));
        assert!(
            f.is_some() && check.is_some() && f < check,
            "{}: fence {f:?} must come before the check {check:?}",
            cluster.name()
        );
        assert!(cluster.ledger(link).violations.is_empty());
    }
}

/// The link of one cluster dies while warren's whole-queue check of a conditional delete (here
/// the fence ahead of it) waits for its answer there: the check is asked again, on a channel of warren's own, on the
/// cluster's new link, and the delete goes on as if nothing happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s_a_conditional_delete_survives_a_failover_during_its_check() {
    let rig = Rig::start(&[(A, 2), (B, 1), (CONTROL, 1)]).await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let first = a.only_link().await;
    a.stall(first, true);
    c.send(1, delete_if_empty(Q)).await;
    // The client's channel is open there, so the fence ahead of the check is what waits.
    wait_for("shard-a got the fence ahead of the check", || {
        a.ledger(first)
            .received_named("exchange.declare")
            .iter()
            .any(|(ch, m)| *ch == 1 && matches!(m, Method::ExchangeDeclare(x) if x.passive))
            .then_some(())
    })
    .await;
    a.kill(first, Kill::Rst);
    match c.reply(1).await {
        Method::QueueDeleteOk(ok) => assert_eq!(ok.message_count, 0),
        other => panic!("expected queue.delete-ok, got {other:?}"),
    }
    assert!(!a.has_queue(Q) && !b.has_queue(Q));
    let second = a.only_link().await;
    assert_ne!(second, first, "shard-a's link failed over");
    for (cluster, link) in [(a, second), (b, b.only_link().await)] {
        assert!(cluster.ledger(link).violations.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// (t) Confirms nobody waits for, read late

/// A connection that only publishes, without confirms: warren reads the acks of its held
/// publishes late, in batches (`client/session/read_pace.rs`). Nothing is lost or doubled by
/// it: every publish reaches one broker once, the held memory is freed once the acks come,
/// publishes a dying link still held go to the other shard, and what a broker says unasked (a
/// channel it closes) still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_publish_only_connection_frees_held_publishes_and_hears_unasked_closes() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let (mut c, la, lb) = publish_only_burst(&rig).await;
    wait_for("the 40 publishes at the brokers", || {
        (a.ready(Q).len() + b.ready(Q).len() == 40).then_some(())
    })
    .await;
    // shard-a now keeps its publishes unconfirmed, and its link dies holding some: they go
    // to shard-b, once each.
    a.on_publish(|_| Verdict::Hold);
    for i in 40..60 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    wait_for("shard-a holds publishes", || {
        (held_map(a, la).len() >= 2).then_some(())
    })
    .await;
    wait_for("every publish at a broker", || {
        (held_map(a, la).len() + a.ready(Q).len() + b.ready(Q).len() == 60).then_some(())
    })
    .await;
    a.kill(la, Kill::Rst);
    wait_for("shard-a's held publishes at shard-b", || {
        (a.ready(Q).len() + b.ready(Q).len() == 60).then_some(())
    })
    .await;
    let mut all = bodies(&a.ready(Q));
    all.extend(bodies(&b.ready(Q)));
    let expected: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    assert_eq!(sorted(all), sorted(expected), "each publish once");
    wait_for("nothing held", || {
        (rig.proxy.metrics().held_bytes.get() == 0).then_some(())
    })
    .await;
    // A close shard-b sends unasked reaches the client.
    for i in 60..70 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    b.close_channel(
        lb,
        1,
        warren::codec::ReplyCode::PreconditionFailed,
        "fake refusal",
    );
    let close = c.channel_close(1).await;
    assert_eq!(close.reply_code, 406);
    assert_eq!(close.reply_text, "PRECONDITION_FAILED - fake refusal");
}

/// After a burst whose acks warren read late, in batches, the client goes quiet: what a
/// broker says unasked long after (a channel it closes) still reaches the client, from either
/// shard, and the channel can be opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_quiet_publisher_hears_unasked_closes_after_its_burst() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let (mut c, la, lb) = publish_only_burst(&rig).await;
    // Well past the read delay and its backstop: the client says nothing meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (round, (cluster, link)) in [(b, lb), (a, la)].into_iter().enumerate() {
        cluster.close_channel(
            link,
            1,
            warren::codec::ReplyCode::PreconditionFailed,
            "fake refusal",
        );
        let close = c.channel_close(1).await;
        assert_eq!(close.reply_code, 406);
        c.send(1, Method::ChannelCloseOk(Default::default())).await;
        c.open(1).await;
        // The first open, then one per close so far.
        let opens = round + 2;
        wait_for("the channel open again on both shards", || {
            (a.ledger(la).received_named("channel.open").len() >= opens
                && b.ledger(lb).received_named("channel.open").len() >= opens)
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client on channel 1 that only publishes, without confirms: 40 publishes spread over
/// shard-a and shard-b, acked at once by both and held until warren reads the acks, which
/// it does late, in batches (`client/session/read_pace.rs`). Returns once they are freed,
/// with the client and the two shards' links.
async fn publish_only_burst(rig: &Rig) -> (Client, ConnId, ConnId) {
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    for i in 0..40 {
        c.publish(1, Q, &format!("m{i}")).await;
    }
    wait_for("the held publishes freed", || {
        (rig.proxy.metrics().held_bytes.get() == 0).then_some(())
    })
    .await;
    (c, la, lb)
}

// ---------------------------------------------------------------------------------------------
// (u) Deliveries and confirms however the bytes are cut

/// Two shards stall their links while each delivers messages of several sizes (empty, small,
/// several body frames) and confirms the publishes it holds; then one releases its backlog in
/// 5-byte pieces (every frame split across warren's reads), the other in 700-byte pieces (many
/// commands, and a part of one, per read). warren passes deliveries on as bytes when a whole
/// one is in its buffer and assembles them frame by frame otherwise: the client must see the
/// same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_deliveries_and_confirms_split_across_reads_pass_intact_and_in_order() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.prove_default_exchange(9).await;
    a.on_publish(|_| Verdict::Hold);
    b.on_publish(|_| Verdict::Hold);
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "ctag-u").await;
    c.open(2).await;
    c.declare(2, "sink").await;
    c.confirm_select(2).await;
    let (la, lb) = (a.only_link().await, b.only_link().await);
    a.stall(la, true);
    b.stall(lb, true);
    // To a queue nobody consumes: the confirms are all the client hears of them.
    for i in 1..=6 {
        c.publish(2, "sink", &format!("p{i}")).await;
    }
    wait_for("six publishes held by the shards", || {
        (a.held(la, 2).len() + b.held(lb, 2).len() == 6).then_some(())
    })
    .await;
    let sizes = [0usize, 1, 100, 5000, 9000, 3];
    let mut sent = Vec::new();
    for (cluster, name) in [(a, "a"), (b, "b")] {
        for (i, size) in sizes.iter().enumerate() {
            let mut body = format!("{name}{i}:").into_bytes();
            body.resize(body.len().max(*size), b'0' + i as u8);
            if *size == 0 {
                body.clear();
            }
            cluster.enqueue(Q, &body);
            sent.push(body);
        }
    }
    wait_for("both shards to have delivered", || {
        (a.unacked(la).len() + b.unacked(lb).len() == 2 * sizes.len()).then_some(())
    })
    .await;
    // Each shard confirms its three publishes: two at once, then the last.
    for (cluster, link) in [(a, la), (b, lb)] {
        cluster.confirm(link, 2, 2, true, true);
        cluster.confirm(link, 2, 3, false, true);
    }
    a.release_in_pieces(la, 5);
    b.release_in_pieces(lb, 700);
    let mut got = Vec::new();
    for _ in 0..2 * sizes.len() {
        got.push(c.delivery().await);
    }
    let tags: Vec<u64> = got.iter().map(|d| d.tag).collect();
    assert_eq!(
        tags,
        (1..=12).collect::<Vec<u64>>(),
        "tags in arrival order"
    );
    // Compared by first bytes and length first: a failure then says which body is wrong.
    let summary = |b: &[u8]| (b.iter().take(3).copied().collect::<Vec<u8>>(), b.len());
    let mut bodies: Vec<_> = got.iter().map(|d| summary(&d.body)).collect();
    bodies.sort();
    let mut want: Vec<_> = sent.iter().map(|b| summary(b)).collect();
    want.sort();
    assert_eq!(bodies, want, "every body once (first bytes, length)");
    let mut bodies: Vec<Bytes> = got.iter().map(|d| d.body.clone()).collect();
    bodies.sort();
    let mut want: Vec<Bytes> = sent.into_iter().map(Bytes::from).collect();
    want.sort();
    assert!(bodies == want, "every body whole");
    let settled: BTreeMap<u64, bool> = (1..=6).map(|seq| (seq, true)).collect();
    c.expect_settled(2, &settled).await;
    // Each shard's deliveries came in its own order: acking the client's last tag with
    // `multiple` settles everything, as one ack per shard of its own last tag.
    c.send(1, ack(12, true)).await;
    c.sync(1).await;
    for (cluster, link) in [(a, la), (b, lb)] {
        wait_for("the shard to have its ack", || {
            cluster.unacked(link).is_empty().then_some(())
        })
        .await;
        assert_eq!(
            cluster.ledger(link).settlements(1),
            vec![ack(sizes.len() as u64, true)],
            "{}: one multiple ack of its own last tag",
            cluster.name()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (t) Message bodies still arriving count in the process-wide budget

/// The bytes of a publish `body` long on channel 1 to queue `queue` through the default
/// exchange, split after the first `head` bytes of its body.
fn publish_in_two(queue: &str, body: &[u8], head: usize) -> (BytesMut, BytesMut) {
    let mut first = BytesMut::new();
    codec::write_method(
        &mut first,
        1,
        &Method::BasicPublish(codec::BasicPublish {
            routing_key: ss(queue),
            ..Default::default()
        }),
    );
    codec::write_header(
        &mut first,
        1,
        &codec::ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: codec::BasicProperties::default(),
        },
    );
    codec::write_body(&mut first, 1, &body[..head], 4096);
    let mut rest = BytesMut::new();
    codec::write_body(&mut rest, 1, &body[head..], 4096);
    (first, rest)
}

/// A message is passed on only once whole, so warren buffers its body meanwhile. Those bytes
/// count in `max_held_bytes` with the held publishes: a client that sent 200 KiB of a 300 KiB
/// message and paused (as many slow large-message senders would together) fills a 64 KiB
/// budget, and another connection's publish waits, unread, until the message is finished; the
/// sender itself, over the bound by its own message only, may finish it. (Bodies still arriving
/// were bounded per connection only: `max_connections` times `max_message_size` in all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_bodies_still_arriving_count_in_the_process_budget() {
    let rig = Rig::start_with_limits(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "lazy_links = false\nmax_held_bytes = 65536\n",
    )
    .await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut big = Client::connect(rig.addr()).await;
    big.open(1).await;
    big.confirm_select(1).await;
    big.declare(1, Q).await;
    let mut small = Client::connect(rig.addr()).await;
    small.open(1).await;
    small.confirm_select(1).await;
    small.prove_default_exchange(2).await;
    big.prove_default_exchange(2).await;

    let body = vec![7u8; 300 * 1024];
    let (first, rest) = publish_in_two(Q, &body, 200 * 1024);
    big.raw.send(&first).await;
    *big.published.entry(1).or_default() += 1;
    wait_for("warren buffers the first 200 KiB", || {
        (rig.proxy.metrics().held_bytes.get() >= 200 * 1024).then_some(())
    })
    .await;
    // A connection already waiting on its socket reads what arrives next, then stops at the
    // bound on its next turn (as for held publishes): the first publish may pass.
    small.publish(1, Q, "s1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    small.publish(1, Q, "s2").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = || {
        let mut all = bodies(&a.ready(Q));
        all.extend(bodies(&b.ready(Q)));
        all
    };
    assert!(
        !stored().iter().any(|m| m == "s2"),
        "the other connection's publish waits while the budget is full: {:?}",
        stored()
    );

    big.raw.send(&rest).await;
    big.expect_settled(1, &[(1, true)].into_iter().collect())
        .await;
    small
        .expect_settled(1, &[(1, true), (2, true)].into_iter().collect())
        .await;
    assert_eq!(stored().len(), 3);
    wait_for("the budget empties", || {
        (rig.proxy.metrics().held_bytes.get() == 0).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// (u) The end of a connection warren closes

/// warren closes a connection (here for a method on channel 0 that belongs on a channel: 504)
/// and the client answers close-ok: RabbitMQ closes the socket then, and clients wait for that
/// end of the stream (the Java client's shutdown listeners and automatic recovery). So does
/// warren, at once. (It read on for 3 s, delaying the Java client's recovery by as much.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_the_socket_closes_right_after_the_clients_close_ok() {
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.send(0, Method::BasicQos(codec::BasicQos::default()))
        .await;
    let close = c.connection_close().await;
    assert_eq!(close.reply_code, 504, "{close:?}");
    c.send(0, Method::ConnectionCloseOk(Default::default()))
        .await;
    let t = std::time::Instant::now();
    within_for(STEP, "the end of the stream", async {
        while let Ok(Some(_)) = c.raw.read_frame().await {}
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the socket closed {:?} after close-ok",
        t.elapsed()
    );
}

/// A frame larger than frame_max ends the connection with 501, and the client must read why.
/// lapin sends a content header of any size as one frame: closing the socket while the rest of
/// that frame was still arriving reset it, and lapin reported "connection aborted" instead of
/// the reason (6 to 8 times in 10). warren now drops the rest of the frame as it comes, waits
/// for the client's close-ok behind it, and only then closes the socket, without a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_a_frame_too_large_is_refused_and_the_client_reads_why() {
    use tokio::io::AsyncReadExt;
    let rig = Rig::three().await;
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    let size = c.raw.frame_max + 1000;
    let mut frame = vec![codec::FRAME_HEADER, 0, 1];
    frame.extend_from_slice(&(size as u32).to_be_bytes());
    frame.resize(7 + size, 0x55);
    frame.push(codec::FRAME_END);
    let (first, rest) = frame.split_at(100);
    c.raw.send(first).await;
    let close = c.connection_close().await;
    assert_says(&close, 501, &["exceeds frame_max"]);
    // The rest of the frame, still on its way when the refusal was sent.
    c.raw.send(rest).await;
    let mut scratch = [0u8; 64];
    let early =
        tokio::time::timeout(Duration::from_millis(300), c.raw.stream.read(&mut scratch)).await;
    assert!(
        early.is_err(),
        "the socket ended before the client's close-ok: {early:?}"
    );
    c.send(0, Method::ConnectionCloseOk(Default::default()))
        .await;
    let t = std::time::Instant::now();
    let end = within_for(
        STEP,
        "the end of the stream",
        c.raw.stream.read(&mut scratch),
    )
    .await;
    assert!(
        matches!(end, Ok(0)),
        "the stream ended with {end:?}, not a clean end"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the socket closed {:?} after close-ok",
        t.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// (v) basic.recover

/// basic.recover with requeue: a broker sends recover-ok, then redelivers. warren answers the
/// client once every cluster has, so a cluster that answered first must not have its
/// redeliveries passed on before the client's recover-ok: lapin drops deliveries that reach
/// it before recover-ok, which left them unacked (or, acked with `multiple`, lost). With
/// shard-b's answer held back, shard-a's redeliveries wait; then recover-ok comes first, and
/// every message is redelivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v_redeliveries_follow_the_clients_recover_ok() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    for (cluster, body) in [(a, "a1"), (a, "a2"), (b, "b1"), (b, "b2")] {
        cluster.enqueue(Q, body.as_bytes());
    }
    c.consume(1, Q, "ctag-v").await;
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(c.delivery().await);
    }
    let lb = b.only_link().await;
    b.stall(lb, true);
    let sent_at = c.log.len();
    c.send(
        1,
        Method::BasicRecover(codec::BasicRecover { requeue: true }),
    )
    .await;
    let la = a.only_link().await;
    wait_for("shard-a answered the recover", || {
        (!a.ledger(la).sent_named("basic.recover-ok").is_empty()).then_some(())
    })
    .await;
    // Give warren time to pass on whatever it would.
    let _ = tokio::time::timeout(Duration::from_millis(300), c.pump()).await;
    assert!(
        c.deliveries.is_empty(),
        "redelivered before the client's recover-ok: {:?}",
        c.deliveries
    );
    b.stall(lb, false);
    let ok = c.reply(1).await;
    assert!(matches!(ok, Method::BasicRecoverOk(_)), "{ok:?}");
    let mut again = Vec::new();
    for _ in 0..4 {
        let d = c.delivery().await;
        assert!(d.redelivered, "{d:?}");
        again.push(String::from_utf8_lossy(&d.body).into_owned());
    }
    let after: Vec<&str> = c.log[sent_at..].iter().map(|(_, m)| *m).collect();
    assert_eq!(
        after.iter().position(|m| *m == "basic.recover-ok"),
        Some(0),
        "recover-ok first: {after:?}"
    );
    assert_eq!(sorted(again), ["a1", "a2", "b1", "b2"]);
}

// ---------------------------------------------------------------------------------------------
// (w) connection.close behind publishes still unconfirmed

/// A client publishes without confirms and closes its connection at once (a script that sends
/// a burst and exits). RabbitMQ has taken every publish before the close when it answers
/// close-ok. warren holds the publish until its cluster confirms it, and the close waits for
/// that: here the cluster keeps it unconfirmed and its link dies, so warren publishes it again
/// on the link to the other node, and only then closes and answers close-ok. (The links were
/// closed at once, or after 3 s, with the publish unconfirmed: lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_a_close_waits_for_the_publishes_before_it() {
    let rig = Rig::start(&[(A, 2), (CONTROL, 1)]).await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.prove_default_exchange(2).await;
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hold = first.clone();
    a.on_publish(move |_| {
        if hold.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Verdict::Hold
        } else {
            Verdict::Ack
        }
    });
    let la = a.only_link().await;
    c.publish(1, Q, "last words").await;
    wait_for("shard-a holds the publish", || {
        (a.held(la, 1).len() == 1).then_some(())
    })
    .await;
    c.send(0, Method::ConnectionClose(Default::default())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a.links().contains(&la),
        "the link closed with its publish unconfirmed"
    );
    a.kill(la, Kill::Rst);
    let ok = c.reply(0).await;
    assert!(matches!(ok, Method::ConnectionCloseOk(_)), "{ok:?}");
    assert_eq!(bodies(&a.ready(Q)), ["last words"]);
}

// ---------------------------------------------------------------------------------------------
// (x) A connection that only talks to the control cluster

/// A connection that has only talked to the control cluster (a Celery event publisher, with
/// `lazy_links`) has no shard link, by design. Its control link fails over to the other node:
/// that is no reason to close it once `failover_wait_secs` (5 s here) have passed, as if no
/// shard cluster were reachable; it carries on publishing events. (It was closed with 320
/// "no shard cluster is reachable", Celery's event and pool connections with it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_a_control_only_connection_survives_its_control_links_failover() {
    const EVENTS: &str = "celeryev";
    let rig = Rig::start_with(&[(A, 1), (B, 1), (CONTROL, 2)], true).await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    let declare = Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ss(EVENTS),
        kind: ss("topic"),
        durable: true,
        ..Default::default()
    });
    let ok = c.call(1, declare).await;
    assert!(matches!(ok, Method::ExchangeDeclareOk(_)), "{ok:?}");
    let first = control.only_link().await;
    assert!(
        a.links().is_empty() && b.links().is_empty(),
        "lazy: no shard link"
    );
    control.kill(first, Kill::Rst);
    wait_for("the control link failed over", || {
        control
            .links()
            .into_iter()
            .find(|&l| l != first)
            .map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    c.sync(1).await;
    assert!(
        c.methods.iter().all(|(ch, _)| *ch != 0),
        "closed: {:?}",
        c.methods
    );
}

// ---------------------------------------------------------------------------------------------
// (y) What a failover's replay declares again

/// A Celery worker consumes its task queue on channel 1 and its pidbox queue (auto-delete, a
/// control name bound to a control exchange: it never holds messages on a shard cluster) on
/// channel 2. The pidbox queue went with the dead shard link, so the replay declares it again;
/// the replay's topology goes on channel 1, and a cluster orders nothing between channels, so
/// the pidbox consume on channel 2 could reach RabbitMQ first and be refused (404), which
/// closed the worker's connection with 320. Channel 2 now carries the queue's declare ahead of
/// its consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_a_consumers_queue_is_declared_again_on_its_own_channel_first() {
    const PIDBOX_X: &str = "celery.pidbox";
    const PIDBOX: &str = "w1@host.celery.pidbox";
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.consume(1, Q, "tasks").await;
    c.open(2).await;
    let x = Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ss(PIDBOX_X),
        kind: ss("fanout"),
        ..Default::default()
    });
    assert!(matches!(c.call(2, x).await, Method::ExchangeDeclareOk(_)));
    c.declare_auto_delete(2, PIDBOX).await;
    c.bind(2, PIDBOX, PIDBOX_X, "").await;
    c.consume(2, PIDBOX, "pidbox").await;
    let first = a.only_link().await;
    a.kill(first, Kill::Rst);
    let second = wait_for("the new link subscribed both consumers again", || {
        let l = a.links().into_iter().find(|&l| l != first)?;
        (a.ledger(l).received_named("basic.consume").len() == 2).then_some(l)
    })
    .await;
    let on_2: Vec<String> = a
        .ledger(second)
        .received
        .iter()
        .filter(|f| f.channel == 2)
        .filter_map(|f| match &f.method {
            Method::QueueDeclare(d) => Some(format!("declare {}", d.queue.as_str())),
            Method::BasicConsume(k) => Some(format!("consume {}", k.queue.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        on_2,
        [format!("declare {PIDBOX}"), format!("consume {PIDBOX}")],
        "channel 2 of the new link"
    );
    c.sync(1).await;
}

/// An auto-delete queue the client consumed and then cancelled: RabbitMQ deleted it then, on
/// every cluster, not with a link. The control link fails over later; its replay checks the
/// queue instead of declaring it again (a sharded name never holds messages on the control
/// cluster, which made it look like one that went with the link): declaring it would bring it
/// back on the control cluster only, where a later declare with other properties meets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_an_auto_delete_queue_no_longer_consumed_is_not_brought_back() {
    const AD: &str = "jobs-ad";
    let rig = Rig::start(&[(A, 1), (B, 1), (CONTROL, 2)]).await;
    let control = rig.get(CONTROL);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare_auto_delete(1, AD).await;
    c.consume(1, AD, "ad").await;
    let cancel = Method::BasicCancel(codec::BasicCancel {
        consumer_tag: ss("ad"),
        nowait: false,
    });
    assert!(matches!(c.call(1, cancel).await, Method::BasicCancelOk(_)));
    for cluster in [A, B, CONTROL] {
        rig.get(cluster).delete_queue(AD);
    }
    let first = control.only_link().await;
    control.kill(first, Kill::Rst);
    wait_for("the new control link checked the queue", || {
        let l = control.links().into_iter().find(|&l| l != first)?;
        control
            .ledger(l)
            .received_named("queue.declare")
            .iter()
            .any(|(_, m)| matches!(m, Method::QueueDeclare(d) if d.queue == AD))
            .then_some(())
    })
    .await;
    c.sync(1).await;
    assert!(
        !control.has_queue(AD),
        "brought back on the control cluster"
    );
}

/// A client that declared many queues (40 here) has them all checked after a failover, at most
/// 32 at a time on channels of warren's own, one of them gone everywhere meanwhile: the replay
/// completes, the new link takes publishes again, and the client stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn y_a_failover_checks_a_large_topology_in_turns() {
    let rig = Rig::three().await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.confirm_select(1).await;
    let names: Vec<String> = (0..40).map(|i| format!("many-{i}")).collect();
    for n in &names {
        c.declare(1, n).await;
    }
    let first = a.only_link().await;
    take_away(a).await;
    for cluster in [A, B, CONTROL] {
        rig.get(cluster).delete_queue(&names[39]);
    }
    a.refuse(0, false);
    let second = wait_for("every queue checked on the new link", || {
        let l = a.links().into_iter().find(|&l| l != first)?;
        let checked = a
            .ledger(l)
            .received_named("queue.declare")
            .iter()
            .filter(|(_, m)| matches!(m, Method::QueueDeclare(q) if q.passive))
            .count();
        (checked == 40).then_some(l)
    })
    .await;
    // warren's own channels open at once, from what the new link received in order.
    let (mut open, mut most) = (0i32, 0i32);
    for f in a.ledger(second).received.iter().filter(|f| f.channel > 1) {
        match &f.method {
            Method::ChannelOpen(_) => open += 1,
            Method::ChannelClose(_) => open -= 1,
            _ => {}
        }
        most = most.max(open);
    }
    assert!(most <= 32, "{most} check channels open at once");
    // A round trip through every link: the checks' answers are in.
    c.sync(1).await;
    let mut settled = BTreeMap::new();
    for i in 1..=4u64 {
        c.publish(1, &names[0], "after").await;
        settled.insert(i, true);
    }
    c.expect_settled(1, &settled).await;
    assert!(
        !a.ready(&names[0]).is_empty() && !b.ready(&names[0]).is_empty(),
        "both shard links take publishes again"
    );
    c.sync(1).await;
}

/// A client consumes an auto-delete queue, and the node under its shard link dies. With the
/// queue mirrored, RabbitMQ promotes the copy on the other node and keeps the queue (the dead
/// node's consumer goes without deleting it): nothing was lost, and the client, whose
/// connection one broker would have kept, carries on with its consumer subscribed again.
/// (warren closed it with 320, assuming the queue went with the link, and the surviving copy
/// was left on that cluster for good.) Had RabbitMQ deleted it with the link, the replay's
/// check would find it missing there only and close the client with 320.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_an_auto_delete_queue_that_outlived_its_link_keeps_its_consumer() {
    const LIVE: &str = "jobs-live";
    let rig = Rig::start(&[(A, 2), (B, 1), (CONTROL, 1)]).await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare_auto_delete(1, LIVE).await;
    c.consume(1, LIVE, "live").await;
    a.enqueue(LIVE, b"before");
    let d = c.delivery().await;
    c.send(1, ack(d.tag, false)).await;
    c.sync(1).await;
    let first = a.only_link().await;
    a.kill(first, Kill::Rst);
    wait_for("the new link subscribed the consumer again", || {
        let l = a.links().into_iter().find(|&l| l != first)?;
        (!a.ledger(l).received_named("basic.consume").is_empty()).then_some(())
    })
    .await;
    a.enqueue(LIVE, b"after");
    let d = c.delivery().await;
    assert_eq!(d.body, "after".as_bytes());
    c.sync(1).await;
    assert!(
        c.methods.iter().all(|(ch, _)| *ch != 0),
        "closed: {:?}",
        c.methods
    );
}

/// `warren_confirm_latency_seconds` times a cluster's confirms, not warren's reading: while a
/// client reads nothing, warren stops reading its links (back-pressure), and a confirm that
/// waited in the kernel meanwhile is counted but not timed. (It was timed when it was read,
/// after the client's stall, and a slow consumer on a connection showed as a slow cluster in
/// the histogram and in the WarrenConfirmsSlow alert.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn z_a_confirm_that_waited_for_a_slow_client_is_not_timed_as_the_clusters() {
    const STALL: Duration = Duration::from_millis(800);
    let rig = Rig::start_with_settings(
        &[(A, 1), (B, 1), (CONTROL, 1)],
        "client_write_timeout_secs = 0",
        "lazy_links = false\nframe_max = 4096\nclient_buffer_bytes = 65536\n",
    )
    .await;
    let (a, b) = (rig.get(A), rig.get(B));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.open(2).await;
    c.confirm_select(2).await;
    // Confirmed as they come: timed.
    for _ in 0..4 {
        c.publish(2, "no-such-queue", "prompt").await;
    }
    c.expect_settled(2, &(1..=4).map(|t| (t, true)).collect())
        .await;
    let timed = |rig: &Rig| {
        let text = rig
            .proxy
            .metrics()
            .encode(warren::metrics::Format::Prometheus);
        let sample = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (
            sample("warren_confirm_latency_seconds_count{"),
            sample("warren_confirm_latency_seconds_sum{"),
        )
    };
    let (before, _) = timed(&rig);
    assert!(before >= 1.0, "prompt confirms are timed");
    // More than the kernel's socket buffers hold on both sides of the client's socket.
    let body = vec![b'x'; 32 * 1024];
    for _ in 0..400 {
        a.enqueue(Q, &body);
        b.enqueue(Q, &body);
    }
    c.consume(1, Q, "slow").await;
    // The client reads nothing while its publish is confirmed upstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.publish(2, "no-such-queue", "behind a stall").await;
    tokio::time::sleep(STALL).await;
    c.expect_settled(2, &(1..=5).map(|t| (t, true)).collect())
        .await;
    let (count, sum) = timed(&rig);
    assert!(
        sum < STALL.as_secs_f64() / 2.0,
        "the stall was timed as the cluster's: {count} confirms timed, {sum} s in all"
    );
}

/// A client holding a delivery publishes and exits at once, without connection.close, and the
/// cluster is slow to confirm the publish (RabbitMQ 3.10 before 3.10.10 could withhold a
/// confirm for good on a mirrored queue). One broker requeues the client's unacknowledged
/// deliveries as the connection ends, so another consumer gets them at once. warren keeps the
/// links open for the confirm (so a link that dies meanwhile does not lose the publish), and
/// used to keep the deliveries with them, up to `timeouts.failover_wait_secs`. Now they are
/// requeued as the client goes (a `multiple` nack with requeue), and the links still wait for
/// the confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_gone_clients_deliveries_are_requeued_while_its_publishes_wait_for_confirms() {
    leaving_clients_deliveries_are_requeued(false).await;
}

/// The same for a client that sends connection.close: RabbitMQ requeues what it held at the
/// close, and warren answers close-ok once the publishes before it are confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_closing_clients_deliveries_are_requeued_while_its_publishes_wait_for_confirms() {
    leaving_clients_deliveries_are_requeued(true).await;
}

/// A client with an exclusive queue leaves while a publish of its own waits for a confirm the
/// cluster is slow to send. One broker deletes a connection's exclusive queues as it ends, so
/// the client may reconnect at once and declare the queue again. warren keeps the links open
/// for the confirm, and used to keep the queue with them, up to `timeouts.failover_wait_secs`
/// (a reconnecting client was refused with 405 meanwhile). Now it is deleted on every cluster
/// as the client goes, and the links still wait for the confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_gone_clients_exclusive_queues_are_deleted_while_its_publishes_wait_for_confirms() {
    leaving_clients_exclusive_queues_are_deleted(false).await;
}

/// The same for a client that sends connection.close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t_a_closing_clients_exclusive_queues_are_deleted_while_its_publishes_wait_for_confirms() {
    leaving_clients_exclusive_queues_are_deleted(true).await;
}

async fn leaving_clients_exclusive_queues_are_deleted(close: bool) {
    const MINE: &str = "replies.mine";
    let rig = Rig::three().await;
    let (a, b, control) = (rig.get(A), rig.get(B), rig.get(CONTROL));
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.declare_exclusive(1, MINE).await;
    c.prove_default_exchange(2).await;
    for s in [a, b, control] {
        assert!(s.has_queue(MINE), "declared on {}", s.name());
    }
    a.on_publish(|_| Verdict::Hold);
    b.on_publish(|_| Verdict::Hold);
    c.publish(2, Q, "unconfirmed").await;
    c.sync(2).await;
    let links = [a.only_link().await, b.only_link().await];
    let _waiting = leave(c, close).await;
    wait_for(
        "the leaving client's exclusive queue deleted everywhere",
        || {
            [a, b, control]
                .iter()
                .all(|s| !s.has_queue(MINE))
                .then_some(())
        },
    )
    .await;
    assert!(
        a.has_queue(Q) && b.has_queue(Q),
        "only the exclusive queue goes"
    );
    assert!(
        a.links().contains(&links[0]) && b.links().contains(&links[1]),
        "the links wait for the confirm of the publish"
    );
}

/// The client leaves: with connection.close (`close`; it is returned, still connected and
/// waiting for close-ok), else by dropping its socket.
async fn leave(mut c: Client, close: bool) -> Option<Client> {
    if !close {
        return None;
    }
    c.send(0, Method::ConnectionClose(Default::default())).await;
    Some(c)
}

/// A client holding two deliveries of shard-a leaves (`close`: with connection.close, else
/// by dropping its socket) while a publish waits for its confirm.
async fn leaving_clients_deliveries_are_requeued(close: bool) {
    let rig = Rig::three().await;
    let a = rig.get(A);
    let mut c = Client::connect(rig.addr()).await;
    c.open(1).await;
    c.declare(1, Q).await;
    c.prove_default_exchange(2).await;
    c.consume(1, Q, "held").await;
    for body in ["one", "two"] {
        a.enqueue(Q, body.as_bytes());
        assert_eq!(c.delivery().await.body, body.as_bytes());
    }
    let la = a.only_link().await;
    rig.get(B).on_publish(|_| Verdict::Hold);
    a.on_publish(|_| Verdict::Hold);
    c.publish(2, Q, "unconfirmed").await;
    c.sync(2).await;
    // The closing client stays connected, waiting for close-ok.
    let _waiting = leave(c, close).await;
    wait_for(
        "the leaving client's deliveries requeued on shard-a",
        || a.unacked(la).is_empty().then_some(()),
    )
    .await;
    let requeued = a.ledger(la).settlements(1);
    assert!(
        matches!(requeued.as_slice(), [Method::BasicNack(n)] if n.multiple && n.requeue),
        "{requeued:?}"
    );
    assert!(
        a.links().contains(&la),
        "the link waits for the confirm of the publish"
    );
}
