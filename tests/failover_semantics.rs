//! What a client sees when one of its upstream links dies, row by row: a proxy in front of
//! shard-a, shard-b (shards) and control, each reached through the fault injector
//! (`tests/support/fault.rs`), which resets or stalls the links of **one** client connection.
//! A bystander connection of the same proxy does publish/consume round trips throughout and must
//! not notice, and the links of every other connection must stay open.
//!
//! | Row | Setup | Fault | Expected |
//! |---|---|---|---|
//! | a | durable queue, manual-ack consumer, confirm-mode publisher | reset the consumer's shard-a link mid-stream, while it holds deliveries of it | the consumer closed with 320 naming shard-a and the deliveries it held (as one broker's node loss closes it: a client that kept them would process them twice); reconnected, it gets every confirmed message, none lost, repeats flagged redelivered, every ack took effect; the publisher untouched |
//! | b | exclusive queue with a consumer | reset its shard-a link | `connection.close 320` naming shard-a within a few seconds (RabbitMQ deleted the queue there); then the queue is on no cluster |
//! | c | auto-delete queue with a consumer | reset its shard-a link | the same |
//! | d | server-named queue (empty name, exclusive: the usual reply queue) with a consumer | reset its control link | `320` naming control |
//! | e | x-single-active-consumer queue, consumers on two connections (each declares it) | reset the active consumer's shard-a link | `320` naming shard-a; afterwards one consumer receives at a time |
//! | f | queue.declare in flight (the link stalled): a new queue, and one holding 5 messages on shard-a | reset the link | declare-ok, no channel error; the count includes shard-a's 5 (answered by the new link); the new queue is where queues go |
//! | g | channel.open while the shard-a link is down (both nodes refuse for 2 s) | — | open-ok, not 541; once the link is back and replayed, the channel works on every cluster |
//! | g (extra) | queue.declare while shard-a is down, answered only after the new shard-a link replayed | — | the queue reaches shard-a too |
//! | h | a queue of A, A's shard-a link stalled, B deletes the queue | reset A's link | the queue is on no cluster or on all it was on, never on shard-a only |
//! | j | durable queue, consumer with `no_ack` | reset its shard-a link | `320` naming shard-a and the consumer's `no_ack` (what was on its way is lost, as with one broker's node loss) |
//!
//! Rows b-e: RabbitMQ deletes the state (the queue, the consumer's place) with the link's
//! connection, and a replay cannot bring it back, so the proxy must tell the client at once.
//!
//! Needs the three clusters of `WARREN_TEST_CLUSTERS` (as `tests/sharding.rs`); every queue
//! has a unique name and is deleted on every cluster when the test ends, pass or fail.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConsumerMessage, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, Close, FieldTable, FieldValue};
use tokio::sync::{mpsc, oneshot, watch};

use support::fault::{FaultInjector, LinkInfo};
use support::sharded::ShardedProxy;
use support::{
    Cluster, Event, Events, STEP, confirm_select, consume, eventually_for, next_delivery,
    open_channel, parse_clusters, unique, within,
};

const SHARD_A: &str = "shard-a";
const SHARD_B: &str = "shard-b";
const CONTROL: &str = "control";
const ALL: [&str; 3] = [SHARD_A, SHARD_B, CONTROL];

/// How soon the proxy must close a client whose state a cluster lost ("at once", with room for a
/// loaded machine).
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(1500);
/// Deadline of the row-a workload.
const BULK: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Clusters, proxy, injector

/// The three real clusters; fails naming any that is missing.
fn clusters() -> &'static [Cluster] {
    static CLUSTERS: OnceLock<Vec<Cluster>> = OnceLock::new();
    CLUSTERS.get_or_init(|| {
        let spec = std::env::var("WARREN_TEST_CLUSTERS").unwrap_or_default();
        let found = parse_clusters(&spec);
        let missing: Vec<&str> = ALL
            .into_iter()
            .filter(|n| !found.iter().any(|f| f.name == *n))
            .collect();
        assert!(
            missing.is_empty(),
            "the failover tests need three RabbitMQ clusters (shard-a, shard-b, control); \
             WARREN_TEST_CLUSTERS={spec:?} lacks {missing:?}. Run them through scripts/test.sh, or \
             export WARREN_TEST_CLUSTERS=\"shard-a=H:P,H:P;shard-b=H:P,H:P;control=H:P,H:P\""
        );
        ALL.iter()
            .map(|n| {
                found
                    .iter()
                    .find(|f| f.name == *n)
                    .cloned()
                    .expect("checked")
            })
            .collect()
    })
}

fn real(name: &str) -> &'static Cluster {
    clusters()
        .iter()
        .find(|c| c.name == name)
        .expect("one of the three")
}

/// What every test starts with: the injector, a proxy behind it, direct connections to the
/// clusters for checks, and a bystander client.
struct Rig {
    injector: FaultInjector,
    proxy: ShardedProxy,
    direct: Direct,
    bystander: Bystander,
}

impl Rig {
    async fn start(cleanup: &Cleanup) -> Rig {
        let injector = FaultInjector::start(clusters()).await;
        // shard-a and shard-b as shards, control as the control cluster, in front of the
        // injector's forwarders. Every link opens at connection.open (`lazy_links = false`):
        // the scenarios fail links a client has before it uses them.
        let proxy = ShardedProxy::start_on(
            injector.clusters(),
            "connect_ms = 3000\n\n[limits]\nlazy_links = false\n",
        )
        .await;
        let direct = Direct::open().await;
        let bystander = Bystander::start(&proxy, cleanup).await;
        Rig {
            injector,
            proxy,
            direct,
            bystander,
        }
    }

    /// The open links of every client connection but `target`'s (to check they survive).
    fn others(&self, target: &Client) -> Vec<LinkInfo> {
        self.injector
            .all_links()
            .into_iter()
            .filter(|l| l.connection_name != target.name)
            .collect()
    }

    /// After the fault: the bystander keeps going, and the links of `others` (taken before the
    /// fault) are all still open.
    async fn assert_unaffected(&mut self, others: &[LinkInfo]) {
        self.bystander.assert_progress(2).await;
        self.injector
            .assert_open(others, "the bystander and the other clients");
    }

    /// The bystander ends cleanly; then the proxy stops (before the injector, so its links
    /// close politely).
    async fn finish(self) {
        self.bystander.finish().await;
        self.proxy.shutdown().await;
        self.direct.close().await;
        drop(self.injector);
    }
}

/// A client doing publish/consume round trips on a queue of its own throughout a test (as
/// `support::Bystander` does; here its queue is auto-delete and known to the [`Cleanup`], so it
/// goes away also when a test fails midway).
struct Bystander {
    done: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Bystander {
    /// Connects, declares its queue and starts the round trips (returns after the first one).
    async fn start(proxy: &ShardedProxy, cleanup: &Cleanup) -> Bystander {
        let client = Client::connect(proxy, "fs-bystander").await;
        let (ch, events) = open_channel(&client.conn).await;
        let queue = cleanup.queue("fs-bystander");
        declare(&ch, QueueDeclareArguments::transient_autodelete(&queue)).await;
        let (_ctag, mut rx) = consume(&ch, &queue, true).await;
        let (done_tx, done) = watch::channel(0u64);
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _events = events;
            let mut n = 0u64;
            let result = loop {
                if stop_rx.try_recv().is_ok() {
                    break Ok(());
                }
                let body = format!("bystander {n}").into_bytes();
                let args = BasicPublishArguments::new("", &queue);
                let sent = ch.basic_publish(BasicProperties::default(), body.clone(), args);
                match tokio::time::timeout(STEP, sent).await {
                    Ok(Ok(())) => {}
                    other => break Err(format!("publish {n}: {other:?}")),
                }
                let m = match tokio::time::timeout(STEP, rx.recv()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(format!("consumer stream ended after {n} round trips")),
                    Err(_) => break Err(format!("no delivery within {STEP:?} after {n}")),
                };
                if m.content.as_deref() != Some(&body[..]) {
                    break Err(format!("round trip {n}: got {:?}", m.content));
                }
                let tag = m.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
                if let Err(e) = ch.basic_ack(BasicAckArguments::new(tag, false)).await {
                    break Err(format!("ack {n}: {e}"));
                }
                n += 1;
                let _ = done_tx.send(n);
            };
            let closed = client.closed.borrow().clone();
            let _ = tokio::time::timeout(STEP, ch.queue_delete(QueueDeleteArguments::new(&queue)))
                .await;
            client.close().await;
            match (result, closed) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(c)) => Err(format!("the proxy closed the bystander: {c:?}")),
                (Ok(()), None) => Ok(()),
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
    async fn assert_progress(&mut self, n: u64) {
        let target = *self.done.borrow() + n;
        match tokio::time::timeout(STEP, self.done.wait_for(|&d| d >= target)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
                panic!("the bystander stopped: {:?}", task.await);
            }
            Err(_) => panic!("the bystander made no progress ({n} round trips) within {STEP:?}"),
        }
    }

    /// Stops the round trips; fails the test if the bystander ever saw an error.
    async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match within("the bystander to stop", &mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the bystander failed: {e}"),
            Err(e) => panic!("the bystander panicked: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Records the server's connection.close (amqprs answers close-ok after the callback).
struct CloseWatch {
    tx: watch::Sender<Option<(u16, String)>>,
}

// amqprs's callback traits are `#[async_trait]`; this is the expanded form.
impl ConnectionCallback for CloseWatch {
    fn close<'s, 'c, 'a>(
        &'s mut self,
        _connection: &'c Connection,
        close: Close,
    ) -> BoxFut<'a, Result<(), amqprs::error::Error>>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        let _ = self
            .tx
            .send(Some((close.reply_code(), close.reply_text().clone())));
        Box::pin(async { Ok(()) })
    }

    fn blocked<'s, 'c, 'a>(
        &'s mut self,
        _connection: &'c Connection,
        _reason: String,
    ) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        Box::pin(async {})
    }

    fn unblocked<'s, 'c, 'a>(&'s mut self, _connection: &'c Connection) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        Box::pin(async {})
    }

    fn secret_updated<'s, 'c, 'a>(&'s mut self, _connection: &'c Connection) -> BoxFut<'a, ()>
    where
        's: 'a,
        'c: 'a,
        Self: 'a,
    {
        Box::pin(async {})
    }
}

/// An amqprs connection to the proxy with a unique `connection_name`, by which the injector
/// finds its links.
struct Client {
    name: String,
    conn: Connection,
    closed: watch::Receiver<Option<(u16, String)>>,
}

impl Client {
    async fn connect(proxy: &ShardedProxy, role: &str) -> Client {
        let name = unique(role);
        let addr = proxy.amqp_addr();
        let args =
            OpenConnectionArguments::new(&addr.ip().to_string(), addr.port(), "guest", "guest")
                .connection_name(&name)
                .finish();
        let conn = within(&format!("connection {name}"), Connection::open(&args))
            .await
            .unwrap_or_else(|e| panic!("cannot connect {name}: {e}"));
        let (tx, closed) = watch::channel(None);
        conn.register_callback(CloseWatch { tx })
            .await
            .expect("register connection callback");
        Client { name, conn, closed }
    }

    /// Fails the test if the proxy closed this connection.
    fn assert_open(&self, why: &str) {
        let closed = self.closed.borrow().clone();
        assert!(
            closed.is_none() && self.conn.is_open(),
            "{why}: client connection {} was closed: {closed:?}",
            self.name
        );
    }

    /// Waits for the proxy's connection.close after the fault at `since`: it must come within
    /// [`CLOSE_WITHIN`], with 320 CONNECTION_FORCED and a text naming `cluster`.
    async fn expect_forced_close(&mut self, cluster: &str, since: Instant) {
        let waited =
            tokio::time::timeout(CLOSE_WITHIN, self.closed.wait_for(|c| c.is_some())).await;
        let (code, text) = match waited {
            Ok(Ok(c)) => c.clone().expect("waited for Some"),
            Ok(Err(_)) => panic!("the close watch of {} ended", self.name),
            Err(_) => panic!(
                "no connection.close from the proxy within {CLOSE_WITHIN:?} of the reset of the {cluster} \
                 link (connection open: {}); expected 320 CONNECTION_FORCED naming {cluster}",
                self.conn.is_open()
            ),
        };
        println!(
            "{}: connection.close {code} {text:?} {:?} after the fault",
            self.name,
            since.elapsed()
        );
        assert_eq!(
            code, 320,
            "expected 320 CONNECTION_FORCED, got {code} {text:?}"
        );
        assert!(
            text.contains(cluster),
            "the close text should name the cluster {cluster}: {text:?}"
        );
    }

    async fn close(self) {
        let _ = tokio::time::timeout(STEP, self.conn.close()).await;
    }
}

/// queue.declare through `ch`; returns the queue's name (the server's for an empty one).
async fn declare(ch: &Channel, args: QueueDeclareArguments) -> String {
    let what = format!("queue.declare {args:?}");
    within(&what, ch.queue_declare(args))
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
        .expect("declare-ok")
        .0
}

async fn ack(ch: &Channel, tag: u64) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, false)),
    )
    .await
    .expect("basic.ack");
}

/// Publishes `body` to the default exchange (no confirm).
async fn publish(ch: &Channel, queue: &str, body: &str) {
    within(
        "basic.publish",
        ch.basic_publish(
            BasicProperties::default(),
            body.as_bytes().to_vec(),
            BasicPublishArguments::new("", queue),
        ),
    )
    .await
    .expect("basic.publish");
}

/// Publishes `n` bodies `{tag}-{i}` and receives them all on `rx` (acking each); the client's
/// channel works on every shard cluster.
async fn round_trip(
    pub_ch: &Channel,
    sub_ch: &Channel,
    rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>,
    queue: &str,
    tag: &str,
    n: usize,
) {
    let mut want: BTreeSet<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    for b in &want {
        publish(pub_ch, queue, b).await;
    }
    while !want.is_empty() {
        let d = next_delivery(rx).await;
        ack(sub_ch, d.tag).await;
        let body = String::from_utf8_lossy(&d.body).into_owned();
        want.remove(&body);
    }
}

// ---------------------------------------------------------------------------------------------
// Direct checks against the real clusters

/// What a passive declare on one cluster says of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// 404.
    No,
    /// 405 RESOURCE_LOCKED: there, exclusive to another connection.
    Exclusive,
    Yes {
        ready: u32,
        consumers: u32,
    },
}

/// A connection to the first node of each real cluster.
struct Direct {
    conns: Vec<(&'static str, Connection)>,
}

impl Direct {
    async fn open() -> Direct {
        let mut conns = Vec::new();
        for name in ALL {
            conns.push((name, support::connect(real(name).first_node()).await));
        }
        Direct { conns }
    }

    /// What a passive declare of `queue` on `cluster` says.
    async fn queue(&self, cluster: &str, queue: &str) -> Found {
        let (ch, mut events) = open_channel(self.conn(cluster)).await;
        let what = format!("passive queue.declare {queue} on {cluster}");
        let args = QueueDeclareArguments::new(queue).passive(true).finish();
        match within(&what, ch.queue_declare(args)).await {
            Ok(ok) => {
                let _ = within("channel.close", ch.close()).await;
                let (_, ready, consumers) = ok.expect("declare-ok");
                Found::Yes { ready, consumers }
            }
            Err(e) => match events.expect_close().await {
                (404, _) => Found::No,
                (405, _) => Found::Exclusive,
                (code, text) => {
                    panic!("{what}: expected 404, 405 or success, got {code} {text} ({e})")
                }
            },
        }
    }

    /// The clusters that have `queue`.
    async fn where_is(&self, queue: &str) -> Vec<&'static str> {
        let mut v = Vec::new();
        for name in ALL {
            if self.queue(name, queue).await != Found::No {
                v.push(name);
            }
        }
        v
    }

    /// Waits until exactly `expected` have `queue`.
    async fn wait_where(&self, queue: &str, expected: &[&str], why: &str) {
        let what = format!("{queue} should be on {expected:?}: {why}");
        eventually_for(STEP, &what, || async move {
            let at = self.where_is(queue).await;
            if at == expected {
                Ok(())
            } else {
                Err(format!("it is on {at:?}"))
            }
        })
        .await
    }

    /// Publishes `n` messages directly to `queue` on `cluster` (confirmed by the broker) and
    /// waits until the queue holds them.
    async fn fill(&self, cluster: &str, queue: &str, n: u32) {
        let (ch, mut events) = open_channel(self.conn(cluster)).await;
        confirm_select(&ch).await;
        for i in 0..n {
            publish(&ch, queue, &format!("direct-{i}")).await;
        }
        assert!(
            events.confirms(u64::from(n)).await.iter().all(|ok| *ok),
            "direct publishes to {queue} on {cluster} nacked"
        );
        let _ = within("channel.close", ch.close()).await;
        let what = format!("{n} messages in {queue} on {cluster}");
        eventually_for(STEP, &what, || async {
            match self.queue(cluster, queue).await {
                Found::Yes { ready, .. } if ready == n => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// Waits until `queue` on `cluster` has `n` consumers (a replayed consumer is back).
    async fn wait_consumers(&self, cluster: &str, queue: &str, n: u32) {
        let what = format!("{n} consumer(s) on {queue} at {cluster}");
        eventually_for(STEP, &what, || async {
            match self.queue(cluster, queue).await {
                Found::Yes { consumers, .. } if consumers == n => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    fn conn(&self, cluster: &str) -> &Connection {
        &self
            .conns
            .iter()
            .find(|(n, _)| *n == cluster)
            .expect("known cluster")
            .1
    }

    async fn close(self) {
        for (_, c) in self.conns {
            let _ = tokio::time::timeout(STEP, c.close()).await;
        }
    }
}

/// Deletes the test's queues on every real cluster when dropped, pass or fail (on a thread of
/// its own: drop cannot await; bounded, so it never hangs the binary).
#[derive(Default)]
struct Cleanup {
    queues: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Cleanup {
    fn queue(&self, prefix: &str) -> String {
        let q = unique(prefix);
        self.add(&q);
        q
    }

    fn add(&self, queue: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queue.to_owned());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|e| e.into_inner()));
        if queues.is_empty() {
            return;
        }
        let limit = Duration::from_secs(30);
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
                for name in ALL {
                    let addr = real(name).first_node();
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
                    for q in &queues {
                        if let Ok(Ok(ch)) = tokio::time::timeout(op, conn.open_channel(None)).await
                        {
                            let delete = ch.queue_delete(QueueDeleteArguments::new(q));
                            let _ = tokio::time::timeout(op, delete).await;
                            let _ = tokio::time::timeout(op, ch.close()).await;
                        }
                    }
                    let _ = tokio::time::timeout(op, conn.close()).await;
                }
            };
            let _ = rt.block_on(async move { tokio::time::timeout(limit, work).await });
            rt.shutdown_background();
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(limit + Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------------------------
// The injector itself

/// The harness's own check: a client connection has one link per cluster, and a stall or a
/// slowdown aimed at it leaves another connection of the same proxy alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_faults_hit_only_the_chosen_client_connection() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let x = Client::connect(&rig.proxy, "fi-x").await;
    let y = Client::connect(&rig.proxy, "fi-y").await;
    for c in [&x, &y] {
        let clusters: BTreeSet<String> = rig
            .injector
            .links_of(&c.name)
            .into_iter()
            .map(|l| l.cluster)
            .collect();
        assert_eq!(
            clusters,
            ALL.iter().map(|s| s.to_string()).collect(),
            "{}: one link per cluster",
            c.name
        );
    }
    let (xch, _xe) = open_channel(&x.conn).await;
    let (ych, _ye) = open_channel(&y.conn).await;
    let others = rig.others(&x);

    // Stalled: x's declare waits for shard-a, y's does not; resumed, x's completes.
    let q1 = cleanup.queue("fi-stall");
    rig.injector.stall(&x.name, SHARD_A);
    let xd = xch.queue_declare(QueueDeclareArguments::new(&q1));
    tokio::pin!(xd);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut xd)
            .await
            .is_err(),
        "x's queue.declare was answered while its shard-a link was stalled"
    );
    let q2 = cleanup.queue("fi-y");
    declare(&ych, QueueDeclareArguments::new(&q2)).await;
    rig.injector.resume(&x.name, SHARD_A);
    within("x's declare after resume", &mut xd)
        .await
        .expect("x's queue.declare");

    // Slowed by 300 ms a chunk: a round trip through shard-a takes at least 600 ms.
    rig.injector
        .slow(&x.name, SHARD_A, Duration::from_millis(300));
    let t = Instant::now();
    let q3 = cleanup.queue("fi-slow");
    declare(&xch, QueueDeclareArguments::new(&q3)).await;
    let slow = t.elapsed();
    assert!(
        slow >= Duration::from_millis(600),
        "slowed round trip took {slow:?}"
    );
    rig.injector.resume(&x.name, SHARD_A);

    // No failover happened: the same links throughout.
    rig.injector
        .assert_open(&rig.injector.links_of(&x.name), "x");
    x.assert_open("after stall and slow");
    y.assert_open("after x's faults");
    rig.assert_unaffected(&others).await;
    for q in [&q1, &q2, &q3] {
        let _ = within(
            "queue.delete",
            xch.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await;
    }
    x.close().await;
    y.close().await;
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// a. Durable queue, manual acks, confirm-mode publisher: nothing confirmed is lost

/// Publishes `m-0`..`m-{n-1}` (message id = i, persistent) in confirm mode, `batch` at a time,
/// each batch's confirms awaited; returns the ids acked and nacked.
async fn publish_confirmed(
    ch: Channel,
    mut events: Events,
    queue: String,
    n: usize,
    batch: usize,
) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let mut settled: BTreeMap<u64, bool> = BTreeMap::new();
    let mut sent = 0usize;
    while sent < n {
        let end = (sent + batch).min(n);
        for i in sent..end {
            let props = BasicProperties::default()
                .with_message_id(&i.to_string())
                .with_persistence(true)
                .finish();
            within(
                "basic.publish",
                ch.basic_publish(
                    props,
                    format!("m-{i}").into_bytes(),
                    BasicPublishArguments::new("", &queue),
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("publish {i}: {e}"));
        }
        sent = end;
        while settled.len() < sent {
            let (tag, multiple, ok) = match events.next().await {
                Event::Ack { tag, multiple } => (tag, multiple, true),
                Event::Nack { tag, multiple } => (tag, multiple, false),
                other => panic!("publisher: expected a confirm, got {other:?}"),
            };
            let tags: Vec<u64> = if multiple {
                (1..=tag).filter(|t| !settled.contains_key(t)).collect()
            } else {
                vec![tag]
            };
            for t in tags {
                assert!(
                    settled.insert(t, ok).is_none(),
                    "publisher: {t} confirmed twice"
                );
            }
        }
    }
    let mut acked = BTreeSet::new();
    let mut nacked = BTreeSet::new();
    for (seq, ok) in settled {
        let id = seq as usize - 1;
        if ok {
            acked.insert(id);
        } else {
            nacked.insert(id);
        }
    }
    (acked, nacked)
}

fn id_of(body: &[u8]) -> usize {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.strip_prefix("m-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_link_reset_mid_stream_loses_no_confirmed_message() {
    if support::skip_live() {
        return;
    }
    const N: usize = 3000;
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let queue = cleanup.queue("fs-a");

    // A consumer with prefetch 100 that acks each delivery as it reads it: at any moment it
    // holds some deliveries of each cluster, unacknowledged.
    async fn start_consumer(
        proxy: &ShardedProxy,
        queue: &str,
    ) -> (
        Client,
        Channel,
        String,
        mpsc::UnboundedReceiver<ConsumerMessage>,
    ) {
        let c = Client::connect(proxy, "fs-a-consumer").await;
        let (cch, _events) = open_channel(&c.conn).await;
        declare(&cch, QueueDeclareArguments::durable_client_named(queue)).await;
        within(
            "basic.qos",
            cch.basic_qos(BasicQosArguments::new(0, 100, false)),
        )
        .await
        .expect("basic.qos");
        let (ctag, rx) = consume(&cch, queue, true).await;
        (c, cch, ctag, rx)
    }
    let (mut c, mut cch, mut ctag, mut rx) = start_consumer(&rig.proxy, &queue).await;
    let mut closed_by_proxy: Option<(u16, String)> = None;

    let p = Client::connect(&rig.proxy, "fs-a-publisher").await;
    let (pch, pevents) = open_channel(&p.conn).await;
    confirm_select(&pch).await;
    let others = rig.others(&c);

    let mut publisher = tokio::spawn(publish_confirmed(
        pch.clone(),
        pevents,
        queue.clone(),
        N,
        50,
    ));
    let mut published: Option<(BTreeSet<usize>, BTreeSet<usize>)> = None;
    // id -> the redelivered flag of each delivery, in order.
    let mut seen: BTreeMap<usize, Vec<bool>> = BTreeMap::new();
    let mut deliveries = 0usize;
    let mut reset: Option<(Vec<LinkInfo>, usize)> = None;
    let deadline = tokio::time::Instant::now() + BULK;
    loop {
        if let Some((acked, _)) = &published
            && acked.iter().all(|i| seen.contains_key(i))
        {
            break;
        }
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else {
                    // The reset closed the consumer's connection: it connects again, once.
                    let why = c.closed.borrow().clone();
                    assert!(
                        reset.is_some() && closed_by_proxy.is_none(),
                        "the consumer's stream ended after {deliveries} deliveries: {why:?}"
                    );
                    let Some(why) = why else {
                        panic!("the consumer's stream ended without a connection.close");
                    };
                    closed_by_proxy = Some(why);
                    (c, cch, ctag, rx) = start_consumer(&rig.proxy, &queue).await;
                    continue;
                };
                let d = m.deliver.expect("deliver");
                let id = id_of(m.content.as_deref().unwrap_or_default());
                seen.entry(id).or_default().push(d.redelivered());
                deliveries += 1;
                // The proxy's 320 may close the channel between this delivery and its ack: the
                // ack then fails, and the message comes again, redelivered, once the consumer
                // has connected again (the ledger below counts it).
                let acked = within(
                    "basic.ack",
                    cch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false)),
                )
                .await;
                if let Err(e) = acked {
                    assert!(
                        reset.is_some(),
                        "basic.ack failed before the reset: {e}"
                    );
                }
                if reset.is_none() && deliveries >= N / 3 {
                    reset = Some((rig.injector.reset(&c.name, SHARD_A), deliveries));
                }
            }
            r = &mut publisher, if published.is_none() => {
                published = Some(r.expect("publisher task"));
            }
            () = tokio::time::sleep_until(deadline) => {
                let missing = published.as_ref().map(|(a, _)| a.iter().filter(|i| !seen.contains_key(i)).count());
                panic!("not every confirmed message arrived within {BULK:?}: {deliveries} deliveries, \
                        {} distinct ids, publisher done: {}, missing: {missing:?}",
                       seen.len(), published.is_some());
            }
        }
    }
    // Late duplicates.
    while let Ok(Some(m)) = tokio::time::timeout(QUIET, rx.recv()).await {
        let d = m.deliver.expect("deliver");
        let id = id_of(m.content.as_deref().unwrap_or_default());
        seen.entry(id).or_default().push(d.redelivered());
        deliveries += 1;
        ack(&cch, d.delivery_tag()).await;
    }

    // The ledger.
    let (reset_links, at) = reset.expect("the reset happened");
    let (acked, nacked) = published.expect("publisher done");
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|i| !seen.contains_key(i))
        .collect();
    let unexpected: Vec<usize> = seen.keys().copied().filter(|i| *i >= N).collect();
    let unflagged: Vec<usize> = seen
        .iter()
        .filter(|(_, flags)| flags.iter().skip(1).any(|r| !r))
        .map(|(i, _)| *i)
        .collect();
    let duplicates: usize = seen.values().map(|f| f.len() - 1).sum();
    let redelivered: usize = seen.values().flatten().filter(|r| **r).count();
    println!(
        "published {N}, confirmed {}, nacked {}, deliveries {deliveries}, distinct {}, lost {}, \
         duplicates {duplicates}, redelivered {redelivered}; reset {reset_links:?} after {at} deliveries",
        acked.len(),
        nacked.len(),
        seen.len(),
        lost.len()
    );
    assert!(at < N, "the reset came after the stream ended");
    assert!(
        nacked.is_empty(),
        "the publisher's links were not touched, yet {} publishes were nacked",
        nacked.len()
    );
    assert_eq!(acked.len(), N, "every publish confirmed");
    assert!(lost.is_empty(), "confirmed but never received: {lost:?}");
    assert!(
        unexpected.is_empty(),
        "received ids never published: {unexpected:?}"
    );
    assert!(
        unflagged.is_empty(),
        "received again without the redelivered flag: {unflagged:?}"
    );

    // The consumer acks each delivery as it reads it. If it held deliveries of shard-a when
    // the link died, it was told so and closed, as one broker's node loss closes it (the
    // deliveries come again to whoever consumes next, and it must not process its copies
    // too); if it held none, it failed over without a word, its consumer back on shard-a.
    match closed_by_proxy {
        Some((code, text)) => {
            assert_eq!(code, 320, "{text}");
            assert!(
                text.contains(SHARD_A) && text.contains("unacknowledged deliveries"),
                "{text}"
            );
            println!("the consumer was closed: {text}");
        }
        None => {
            rig.injector
                .wait_new_link(&c.name, SHARD_A, &reset_links)
                .await;
            println!("the consumer failed over, holding nothing of the dead link");
        }
    }
    c.assert_open("after the shard-a link reset");
    rig.assert_unaffected(&others).await;
    rig.direct.wait_consumers(SHARD_A, &queue, 1).await;
    within(
        "basic.cancel",
        cch.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await
    .expect("basic.cancel");
    c.close().await;
    for cluster in rig.direct.where_is(&queue).await {
        let what =
            format!("{queue} empty on {cluster} once the consumer is gone (every ack took effect)");
        eventually_for(STEP, &what, || async {
            match rig.direct.queue(cluster, &queue).await {
                Found::Yes {
                    ready: 0,
                    consumers: 0,
                } => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    let _ = within(
        "queue.delete",
        pch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await;
    p.close().await;
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// b-e. State RabbitMQ deletes with the link: the client is closed with 320 naming the cluster

/// Rows b-d: `queue` (declared by `args` through a fresh client, with a consumer and a few
/// messages through it) loses its link to `cluster`: the client must be closed with 320 naming
/// the cluster within [`CLOSE_WITHIN`], its links closed, and the queue gone from every cluster.
async fn lost_with_the_link(
    prefix: &str,
    args: impl FnOnce(&str) -> QueueDeclareArguments,
    cluster: &str,
) {
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let mut a = Client::connect(&rig.proxy, prefix).await;
    let (ch, _events) = open_channel(&a.conn).await;
    let asked = cleanup.queue(prefix);
    let queue = declare(&ch, args(&asked)).await;
    cleanup.add(&queue);
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;
    round_trip(&ch, &ch, &mut rx, &queue, "before", 6).await;
    let home = rig.direct.where_is(&queue).await;
    assert!(
        home.contains(&cluster),
        "{queue} should live on {cluster}, is on {home:?}"
    );
    let others = rig.others(&a);

    let t = Instant::now();
    rig.injector.reset(&a.name, cluster);
    a.expect_forced_close(cluster, t).await;
    rig.injector.wait_no_links(&a.name).await;
    rig.direct
        .wait_where(&queue, &[], "its connection is gone, so is the queue")
        .await;
    rig.assert_unaffected(&others).await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_exclusive_queue_lost_with_its_link_closes_the_client_with_320() {
    if support::skip_live() {
        return;
    }
    lost_with_the_link(
        "fs-b-exclusive",
        |q| QueueDeclareArguments::new(q).exclusive(true).finish(),
        SHARD_A,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_auto_delete_queue_lost_with_its_link_closes_the_client_with_320() {
    if support::skip_live() {
        return;
    }
    lost_with_the_link(
        "fs-c-autodelete",
        QueueDeclareArguments::transient_autodelete,
        SHARD_A,
    )
    .await;
}

/// A server-named queue as clients declare one (amqprs's `exclusive_server_named`, pika's and
/// kombu's reply queues): exclusive, on the control cluster. (A non-exclusive one would survive
/// the link; its name cannot be declared again, `amq.` being reserved.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_server_named_queue_lost_with_its_link_closes_the_client_with_320() {
    if support::skip_live() {
        return;
    }
    lost_with_the_link(
        "fs-d-server-named",
        |_| QueueDeclareArguments::exclusive_server_named(),
        CONTROL,
    )
    .await;
}

/// Row j: a consumer with `no_ack` on a durable queue. RabbitMQ counts what it has sent such a
/// consumer as delivered, so what was on its way when the link died is gone: the client must be
/// closed with 320 naming the cluster and the consumer's mode, as one broker's node loss closes
/// it, not re-subscribed as if nothing was lost. The queue stays (it is durable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn j_a_no_ack_consumers_link_lost_closes_the_client_with_320() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let mut a = Client::connect(&rig.proxy, "fs-i-noack").await;
    let (ch, _events) = open_channel(&a.conn).await;
    let queue = cleanup.queue("fs-i-noack");
    declare(&ch, QueueDeclareArguments::durable_client_named(&queue)).await;
    let (_ctag, mut rx) = consume(&ch, &queue, false).await;
    let mut want: BTreeSet<String> = (0..6).map(|i| format!("before-{i}")).collect();
    for b in &want.clone() {
        publish(&ch, &queue, b).await;
    }
    while !want.is_empty() {
        let d = next_delivery(&mut rx).await;
        want.remove(String::from_utf8_lossy(&d.body).as_ref());
    }
    let home = rig.direct.where_is(&queue).await;
    assert!(
        home.contains(&SHARD_A),
        "{queue} should live on shard-a, is on {home:?}"
    );
    let others = rig.others(&a);

    let t = Instant::now();
    rig.injector.reset(&a.name, SHARD_A);
    a.expect_forced_close(SHARD_A, t).await;
    let (_, text) = a.closed.borrow().clone().expect("closed");
    assert!(
        text.contains("no_ack"),
        "the close should say the consumer has no_ack: {text:?}"
    );
    rig.injector.wait_no_links(&a.name).await;
    rig.assert_unaffected(&others).await;
    rig.finish().await;
}

/// Not every exclusive or auto-delete queue loses messages with a shard link: a queue with a
/// control name and no sharded binding (Celery's rpc:// result queue, named by a UUID) only
/// ever gets messages on the control cluster. Its shard-a copy is declared again by the replay
/// and the client stays connected, its replies flowing (before, warren closed it and the
/// replies published while Celery reconnected were dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_rpc_reply_queue_survives_a_shard_link_loss() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let a = Client::connect(&rig.proxy, "fs-c-rpc").await;
    let (ch, mut events) = open_channel(&a.conn).await;
    let queue = support::uuid();
    cleanup.add(&queue);
    let queue = declare(&ch, QueueDeclareArguments::transient_autodelete(&queue)).await;
    let (_ctag, mut rx) = consume(&ch, &queue, true).await;
    round_trip(&ch, &ch, &mut rx, &queue, "before", 6).await;
    let others = rig.others(&a);

    let old = rig.injector.reset(&a.name, SHARD_A);
    rig.injector.wait_new_link(&a.name, SHARD_A, &old).await;
    rig.direct
        .wait_where(&queue, &ALL, "declared again on shard-a by the replay")
        .await;
    round_trip(&ch, &ch, &mut rx, &queue, "after", 6).await;
    events.assert_no_close("the channel");
    a.assert_open("a shard link of a reply queue's client failed over");
    rig.assert_unaffected(&others).await;
    a.close().await;
    rig.finish().await;
}

/// Direct reply-to across the loss of a caller's link. The address RabbitMQ gives each request
/// names the caller's connection to the cluster that took it, so replies owed to requests sent
/// through a lost link would be dropped there; on one broker the caller's connection, and so the
/// address, would still be up. So a caller with a reply still owed through the lost link is
/// closed with 320 saying why, instead of waiting for a reply that cannot come (Spring's
/// `RabbitTemplate` would return null after its timeout). A caller whose requests were all
/// answered keeps its connection, and its next calls get their replies through the new link.
async fn direct_reply_to_across_a_link_loss(answered: bool) {
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let prefix = if answered {
        "fs-i-answered"
    } else {
        "fs-i-owed"
    };
    let mut caller = Client::connect(&rig.proxy, prefix).await;
    let (cch, _ce) = open_channel(&caller.conn).await;
    let (_ctag, mut replies) = consume(&cch, "amq.rabbitmq.reply-to", false).await;
    let server = Client::connect(&rig.proxy, &format!("{prefix}-server")).await;
    let (sch, _se) = open_channel(&server.conn).await;
    let requests = cleanup.queue(prefix);
    declare(&sch, QueueDeclareArguments::durable_client_named(&requests)).await;
    let (_stag, mut inbox) = consume(&sch, &requests, true).await;
    let call = |i: usize| {
        let props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to")
            .with_correlation_id(&i.to_string())
            .finish();
        cch.basic_publish(
            props,
            format!("request-{i}").into_bytes(),
            BasicPublishArguments::new("", &requests),
        )
    };
    // Serves `n` requests: answers them when `answer`, acks them either way.
    async fn serve(
        sch: &Channel,
        inbox: &mut mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
        n: usize,
        answer: bool,
    ) {
        for _ in 0..n {
            let m = within("a request", inbox.recv()).await.expect("a request");
            let props = m.basic_properties.expect("properties");
            let reply_to = props.reply_to().expect("reply_to").clone();
            assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
            if answer {
                within(
                    "the reply",
                    sch.basic_publish(
                        BasicProperties::default(),
                        b"reply".to_vec(),
                        BasicPublishArguments::new("", &reply_to),
                    ),
                )
                .await
                .expect("the reply");
            }
            ack(sch, m.deliver.expect("deliver").delivery_tag()).await;
        }
    }
    // Four requests: round-robin puts two on each shard cluster.
    for i in 0..4 {
        within("a request", call(i)).await.expect("a request");
    }
    serve(&sch, &mut inbox, 4, answered).await;
    if answered {
        for _ in 0..4 {
            within("a reply", replies.recv()).await.expect("a reply");
        }
    }
    let others = rig.others(&caller);

    let t = Instant::now();
    let old = rig.injector.reset(&caller.name, SHARD_A);
    if answered {
        rig.injector
            .wait_new_link(&caller.name, SHARD_A, &old)
            .await;
        for i in 4..8 {
            within("a request", call(i)).await.expect("a request");
        }
        serve(&sch, &mut inbox, 4, true).await;
        for _ in 0..4 {
            within("a reply after the failover", replies.recv())
                .await
                .expect("a reply");
        }
        caller.assert_open("every reply was in when the shard link failed over");
        caller.close().await;
    } else {
        caller.expect_forced_close(SHARD_A, t).await;
        let (_, text) = caller.closed.borrow().clone().expect("closed");
        assert!(text.contains("direct reply-to"), "{text}");
    }
    rig.assert_unaffected(&others).await;
    server.close().await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_a_direct_reply_owed_through_a_lost_link_closes_the_caller_with_320() {
    if support::skip_live() {
        return;
    }
    direct_reply_to_across_a_link_loss(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_a_caller_with_every_direct_reply_in_keeps_its_connection_across_a_link_loss() {
    if support::skip_live() {
        return;
    }
    direct_reply_to_across_a_link_loss(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_single_active_consumer_lost_with_its_link_closes_the_client_with_320() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let queue = cleanup.queue("fs-e-sac");
    let mut sac = FieldTable::new();
    sac.insert(
        "x-single-active-consumer".try_into().unwrap(),
        FieldValue::t(true),
    );
    let sac_args = QueueDeclareArguments::durable_client_named(&queue)
        .arguments(sac)
        .finish();

    let p = Client::connect(&rig.proxy, "fs-e-publisher").await;
    let (pch, _pe) = open_channel(&p.conn).await;
    declare(&pch, sac_args.clone()).await;
    // Each consumer declares the queue it consumes from, as kombu and Celery workers do. c1
    // consumes first: it is the active consumer on every cluster.
    let mut c1 = Client::connect(&rig.proxy, "fs-e-first").await;
    let (c1ch, _c1e) = open_channel(&c1.conn).await;
    declare(&c1ch, sac_args.clone()).await;
    let (_t1, mut rx1) = consume(&c1ch, &queue, true).await;
    let c2 = Client::connect(&rig.proxy, "fs-e-second").await;
    let (c2ch, mut c2e) = open_channel(&c2.conn).await;
    declare(&c2ch, sac_args.clone()).await;
    let (_t2, mut rx2) = consume(&c2ch, &queue, true).await;
    round_trip(&pch, &c1ch, &mut rx1, &queue, "before", 10).await;
    assert_quiet(&mut rx2, "the waiting consumer (c2) before the fault").await;
    let others = rig.others(&c1);

    let t = Instant::now();
    rig.injector.reset(&c1.name, SHARD_A);
    c1.expect_forced_close(SHARD_A, t).await;
    rig.injector.wait_no_links(&c1.name).await;

    // c1 comes back, as a client would: c2 now holds the active place on both shards, so c2
    // alone receives.
    let c1b = Client::connect(&rig.proxy, "fs-e-first-again").await;
    let (c1bch, _c1be) = open_channel(&c1b.conn).await;
    declare(&c1bch, sac_args.clone()).await;
    let (_t1b, mut rx1b) = consume(&c1bch, &queue, true).await;
    // Leftovers of the first round may come to c2 first: drain them.
    while let Ok(Some(m)) = tokio::time::timeout(QUIET, rx2.recv()).await {
        ack(&c2ch, m.deliver.expect("deliver").delivery_tag()).await;
    }
    round_trip(&pch, &c2ch, &mut rx2, &queue, "after", 20).await;
    assert_quiet(&mut rx1b, "the returning consumer (waiting behind c2)").await;
    c2.assert_open("c2 after c1's link reset");
    c2e.assert_no_close("c2's channel");
    rig.assert_unaffected(&others).await;

    let _ = within(
        "queue.delete",
        pch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await;
    c1b.close().await;
    c2.close().await;
    p.close().await;
    rig.finish().await;
}

/// Fails the test if a delivery arrives within [`QUIET`].
async fn assert_quiet(rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>, who: &str) {
    if let Ok(Some(m)) = tokio::time::timeout(QUIET, rx.recv()).await {
        panic!(
            "{who} received {:?}: two consumers of a single-active-consumer queue received at once",
            m.content.map(|c| String::from_utf8_lossy(&c).into_owned())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// f. A synchronous method in flight when the link dies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_queue_declare_in_flight_when_the_link_dies_is_answered() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let a = Client::connect(&rig.proxy, "fs-f").await;
    let (ch, mut events) = open_channel(&a.conn).await;
    let (ch2, mut events2) = open_channel(&a.conn).await;
    // A queue that exists, with 5 messages on shard-a only: a declare-ok that counts them was
    // answered by shard-a, i.e. by its new link.
    let filled = cleanup.queue("fs-f-filled");
    declare(&ch2, QueueDeclareArguments::durable_client_named(&filled)).await;
    let home = rig.direct.where_is(&filled).await;
    assert!(
        home.contains(&SHARD_A) && home.contains(&SHARD_B),
        "a sharded queue is on {home:?}"
    );
    rig.direct.fill(SHARD_A, &filled, 5).await;
    let fresh = cleanup.queue("fs-f-fresh");
    let others = rig.others(&a);

    // Two declares in flight (one per channel): a new queue, and the filled one again.
    let old = rig.injector.stall(&a.name, SHARD_A);
    let declaring = ch.queue_declare(QueueDeclareArguments::durable_client_named(&fresh));
    let redeclaring = ch2.queue_declare(QueueDeclareArguments::durable_client_named(&filled));
    tokio::pin!(declaring, redeclaring);
    let both = async { tokio::join!(&mut declaring, &mut redeclaring) };
    assert!(
        tokio::time::timeout(Duration::from_secs(1), both)
            .await
            .is_err(),
        "the queue.declares were answered while the shard-a link was stalled"
    );
    let t = Instant::now();
    rig.injector.reset(&a.name, SHARD_A);
    let answered = |what: &str, r: Result<Option<(String, u32, u32)>, amqprs::error::Error>| match r
    {
        Ok(Some(ok)) => ok,
        Ok(None) => panic!("{what}: no declare-ok"),
        Err(e) => panic!("{what} in flight failed after the reset: {e}"),
    };
    let (name, _, _) = answered(
        "queue.declare (new queue)",
        within("declare-ok after the reset", &mut declaring).await,
    );
    assert_eq!(name, fresh);
    let (_, messages, _) = answered(
        "queue.declare (filled queue)",
        within("declare-ok after the reset", &mut redeclaring).await,
    );
    println!(
        "declare-oks {:?} after the reset; the filled queue's message_count {messages}",
        t.elapsed()
    );
    events.assert_no_close("the channel of the new queue");
    events2.assert_no_close("the channel of the filled queue");
    assert_eq!(
        messages, 5,
        "declare-ok of the filled queue must count shard-a's 5 messages: shard-a's new link \
         answers the request the old one did not"
    );
    rig.injector.wait_new_link(&a.name, SHARD_A, &old).await;
    rig.direct
        .wait_where(
            &fresh,
            &home,
            "declared where a queue declared without a fault is, shard-a by the new link",
        )
        .await;
    let (_ctag, mut rx) = consume(&ch, &fresh, true).await;
    round_trip(&ch, &ch, &mut rx, &fresh, "after", 10).await;
    a.assert_open("after the reset");
    rig.assert_unaffected(&others).await;
    for q in [&fresh, &filled] {
        let _ = within(
            "queue.delete",
            ch.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await;
    }
    a.close().await;
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// g. channel.open while a link is being re-established

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_channel_open_while_a_link_is_reestablished_gets_open_ok() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let a = Client::connect(&rig.proxy, "fs-g").await;
    let (ch1, mut events1) = open_channel(&a.conn).await;
    let q1 = cleanup.queue("fs-g-1");
    declare(&ch1, QueueDeclareArguments::new(&q1)).await;
    let (_c1, mut rx1) = consume(&ch1, &q1, true).await;
    let home = rig.direct.where_is(&q1).await;
    let others = rig.others(&a);

    // Both shard-a nodes refuse for 2 s: the link stays down and is retried meanwhile.
    rig.injector.refuse_cluster(SHARD_A, Duration::from_secs(2));
    let old = rig.injector.reset(&a.name, SHARD_A);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rig.injector
            .links_of(&a.name)
            .iter()
            .all(|l| l.cluster != SHARD_A),
        "the shard-a link should still be down"
    );
    let t = Instant::now();
    // amqprs waits for open-ok only: a channel.close 541 instead shows as this timeout (the
    // proxy's log has the close).
    let opened = tokio::time::timeout(STEP, a.conn.open_channel(None)).await;
    let ch2 = match opened {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => panic!("channel.open while the shard-a link was down failed: {e}"),
        Err(_) => panic!(
            "no channel.open-ok within {STEP:?} while the shard-a link was being re-established \
             (a 541 channel.close would look like this to amqprs); links: {:?}",
            rig.injector.links_of(&a.name)
        ),
    };
    let open_ok = t.elapsed();
    let back = rig.injector.wait_new_link(&a.name, SHARD_A, &old).await;
    println!(
        "open-ok {open_ok:?} after channel.open; the shard-a link ({back:?}) was back after {:?}",
        t.elapsed()
    );
    // Once the link has replayed (q1's consumer is back on shard-a), the new channel works on
    // every cluster. (A declare answered after the replay is the extra row below.)
    rig.direct.wait_consumers(SHARD_A, &q1, 1).await;
    let q2 = cleanup.queue("fs-g-2");
    declare(&ch2, QueueDeclareArguments::new(&q2)).await;
    rig.direct
        .wait_where(
            &q2,
            &home,
            "declared on the channel opened during the failover, where the first queue is",
        )
        .await;
    let (_c2, mut rx2) = consume(&ch2, &q2, true).await;
    round_trip(&ch2, &ch2, &mut rx2, &q2, "new channel", 10).await;
    round_trip(&ch1, &ch1, &mut rx1, &q1, "old channel", 10).await;
    events1.assert_no_close("channel 1");
    a.assert_open("after the failover");
    rig.assert_unaffected(&others).await;
    for q in [&q1, &q2] {
        let _ = within(
            "queue.delete",
            ch1.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await;
    }
    a.close().await;
    rig.finish().await;
}

/// Not a row of the table: a queue.declare made while the shard-a link is down, whose answer
/// (held by stalling the client's other links) comes after the new shard-a link has replayed,
/// must still reach shard-a. (Found by row g: a declare sent just as the link came back was
/// missing on shard-a.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_extra_queue_declared_during_the_outage_reaches_the_returning_cluster() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let a = Client::connect(&rig.proxy, "fs-g-extra").await;
    let (ch, mut events) = open_channel(&a.conn).await;
    let q1 = cleanup.queue("fs-gx-1");
    declare(&ch, QueueDeclareArguments::new(&q1)).await;
    let (_c1, _rx1) = consume(&ch, &q1, true).await;
    let home = rig.direct.where_is(&q1).await;
    let others = rig.others(&a);

    rig.injector.refuse_cluster(SHARD_A, Duration::from_secs(2));
    let old = rig.injector.reset(&a.name, SHARD_A);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in [SHARD_B, CONTROL] {
        rig.injector.stall(&a.name, c);
    }
    let q2 = cleanup.queue("fs-gx-2");
    let declaring = ch.queue_declare(QueueDeclareArguments::new(&q2));
    tokio::pin!(declaring);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut declaring)
            .await
            .is_err(),
        "queue.declare answered while every link of the client was down or stalled"
    );
    rig.injector.wait_new_link(&a.name, SHARD_A, &old).await;
    rig.direct.wait_consumers(SHARD_A, &q1, 1).await;
    for c in [SHARD_B, CONTROL] {
        rig.injector.resume(&a.name, c);
    }
    within("declare-ok once the links are back", &mut declaring)
        .await
        .unwrap_or_else(|e| panic!("queue.declare during the outage failed: {e}"));
    events.assert_no_close("the channel");
    rig.direct
        .wait_where(
            &q2,
            &home,
            "declared during the shard-a outage, answered after the new link's replay",
        )
        .await;
    a.assert_open("after the failover");
    rig.assert_unaffected(&others).await;
    for q in [&q1, &q2] {
        let _ = within(
            "queue.delete",
            ch.queue_delete(QueueDeleteArguments::new(q)),
        )
        .await;
    }
    a.close().await;
    rig.finish().await;
}

/// Not a row of the table either: a queue declared by a client while shard-a was unreachable
/// for it, by a client that is gone before shard-a is back, must still exist on shard-a before
/// another client's publishes are routed there (else every message placed on shard-a would be
/// dropped as unroutable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_fleet_queue_declared_by_a_client_gone_before_the_cluster_returned_reaches_it() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let rig = Rig::start(&cleanup).await;
    let x = Client::connect(&rig.proxy, "fs-g-fleet-declarer").await;
    let (xch, _xe) = open_channel(&x.conn).await;
    let queue = cleanup.queue("fs-g-fleet");

    rig.injector.refuse_cluster(SHARD_A, Duration::from_secs(3));
    rig.injector.reset(&x.name, SHARD_A);
    tokio::time::sleep(Duration::from_millis(300)).await;
    declare(&xch, QueueDeclareArguments::durable_client_named(&queue)).await;
    rig.direct
        .wait_where(
            &queue,
            &[SHARD_B, CONTROL],
            "declared while shard-a was away",
        )
        .await;
    x.close().await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let y = Client::connect(&rig.proxy, "fs-g-fleet-publisher").await;
    let (ych, mut yevents) = open_channel(&y.conn).await;
    confirm_select(&ych).await;
    const N: usize = 20;
    for i in 0..N {
        publish(&ych, &queue, &format!("m-{i}")).await;
    }
    let confirms = yevents.confirms(N as u64).await;
    assert!(
        confirms.iter().all(|&ack| ack),
        "every publish acked: {confirms:?}"
    );
    rig.direct
        .wait_where(
            &queue,
            &ALL,
            "replayed on shard-a before a publish went there",
        )
        .await;
    let mut total = 0;
    for c in ALL {
        if let Found::Yes { ready, .. } = rig.direct.queue(c, &queue).await {
            total += ready;
        }
    }
    assert_eq!(total as usize, N, "every confirmed publish is in the queue");
    let _ = within(
        "queue.delete",
        ych.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await;
    y.close().await;
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// h. Topology deleted while the owner's link was stalled

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_queue_deleted_meanwhile_is_not_recreated_on_one_cluster_only() {
    if support::skip_live() {
        return;
    }
    let cleanup = Cleanup::default();
    let mut rig = Rig::start(&cleanup).await;
    let queue = cleanup.queue("fs-h");
    let a = Client::connect(&rig.proxy, "fs-h-owner").await;
    let (ach, _ae) = open_channel(&a.conn).await;
    declare(&ach, QueueDeclareArguments::durable_client_named(&queue)).await;
    let home = rig.direct.where_is(&queue).await;
    assert!(
        home.contains(&SHARD_A) && home.contains(&SHARD_B),
        "a sharded queue is on {home:?}"
    );
    let b = Client::connect(&rig.proxy, "fs-h-deleter").await;
    let (bch, _be) = open_channel(&b.conn).await;
    let others = rig.others(&a);

    let old = rig.injector.stall(&a.name, SHARD_A);
    within(
        "queue.delete by b",
        bch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await
    .expect("queue.delete by b");
    rig.direct
        .wait_where(&queue, &[], "deleted by b through the proxy")
        .await;
    rig.injector.reset(&a.name, SHARD_A);

    // Wait for a's failover to be over (a new shard-a link, or a's connection closed), then
    // give the replay time to run.
    let deadline = Instant::now() + STEP;
    loop {
        let relinked = rig
            .injector
            .links_of(&a.name)
            .iter()
            .any(|l| l.cluster == SHARD_A && !old.iter().any(|o| o.id == l.id));
        if relinked || a.closed.borrow().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new shard-a link of a, and a not closed, within {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "a after the failover: closed {:?}",
        a.closed.borrow().clone()
    );
    for _ in 0..3 {
        let at = rig.direct.where_is(&queue).await;
        assert!(
            at.is_empty() || at == home,
            "{queue} deleted by b while a's shard-a link was stalled is now on {at:?} only \
             (it must be on none of the clusters or on all of {home:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rig.assert_unaffected(&others).await;
    let _ = within(
        "queue.delete",
        bch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await;
    a.close().await;
    b.close().await;
    rig.finish().await;
}
