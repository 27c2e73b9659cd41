//! warren must behave as one RabbitMQ: differential tests.
//!
//! Every scenario is an `async fn(addr)` written once to RabbitMQ's behaviour and run twice by
//! `differential!`: `direct_rabbitmq::NAME` against RabbitMQ itself (the first node of shard-a),
//! and `through_proxy::NAME` through a warren proxy in front of shard-a and shard-b (shards) and
//! control (control cluster, Celery preset), started in-process by
//! [`support::sharded::ShardedProxy`]. The assertions are the same both ways.
//!
//! Needs the three clusters in `WARREN_TEST_CLUSTERS` (`scripts/test.sh` exports them). Every
//! queue and exchange has a unique name and is deleted on every cluster when the test ends (the
//! Celery exchange `celeryev` is declared as Celery declares it and left in place).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicPublishArguments, BasicRejectArguments, Channel, ConsumerMessage, ExchangeBindArguments,
    ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
    QueuePurgeArguments,
};
use amqprs::connection::Connection;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use warren::codec::{self, FieldTable, FieldValue, FrameKind, LongStr, Method, ShortStr};

use support::sharded::Cleanup;
use support::{
    Event, Events, Got, Login, RawClient, STEP, close_connection, confirm_select, connect, consume,
    open_channel, publish, publish_with, unique, within, within_for,
};

/// Generates, for each `async fn NAME(addr: SocketAddr)` listed, `through_proxy::NAME` (a fresh
/// proxy in front of shard-a, shard-b and control) and `direct_rabbitmq::NAME` (RabbitMQ).
macro_rules! differential {
    ($($name:ident),* $(,)?) => {
        mod through_proxy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if crate::support::skip_live() {
                        return;
                    }
                    let proxy = crate::support::sharded::ShardedProxy::start().await;
                    super::$name(proxy.amqp_addr()).await;
                    proxy.shutdown().await;
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

differential!(
    passive_declare_of_a_reply_to_address_finds_the_caller,
    close_without_connection_close_keeps_every_publish,
    connection_close_behind_publishes_still_gets_close_ok,
    bindings_server_named_queue_to_user_fanout,
    bindings_server_named_queue_to_amq_fanout,
    bindings_server_named_queue_to_amq_topic,
    bindings_uuid_queue_to_user_fanout,
    bindings_uuid_queue_to_amq_fanout,
    bindings_uuid_queue_to_amq_topic,
    bindings_named_queue_to_celeryev,
    bindings_exchange_from_celeryev_to_user_exchange,
    bindings_exchange_from_user_exchange_to_celeryev,
    empty_queue_name_means_last_declared,
    empty_queue_name_before_any_declare_is_404,
    no_ack_is_per_get,
    x_expires_renewed_by_get,
    x_expires_renewed_by_gets_of_a_connection_that_did_not_declare_it,
    double_ack_is_406,
    acks_in_a_rolled_back_transaction_are_undone,
    ack_of_no_ack_get_tag_is_406,
    publish_on_channel_0_is_connection_error_504,
    body_frames_with_a_payload_of_frame_max_are_accepted,
    a_client_close_crossing_the_servers_close_keeps_the_connection,
    a_declare_right_before_connection_close_is_made,
    tune_ok_channel_max_0_is_refused,
    tune_ok_frame_max_0_is_refused,
    amqplain_login_failure_is_403_naming_amqplain,
    queue_delete_if_empty_with_messages_is_406_and_keeps_the_queue,
    queue_delete_if_unused_with_a_consumer_is_406_and_keeps_the_queue,
    dead_lettering_on_reject_reaches_the_dlq_once,
    message_ttl_expiry_dead_letters,
    exclusive_queue_from_another_connection_is_405,
    exclusive_consumer_blocks_a_second_consumer_with_403,
    racing_exclusive_declares_have_one_winner,
    racing_exclusive_consumers_have_one_winner,
    racing_conflicting_declares_have_one_winner,
    racing_nowait_conflicting_exchange_declares_have_one_winner,
    racing_nowait_exclusive_declares_have_one_winner,
    racing_nowait_exclusive_consumers_have_one_winner,
    server_named_quorum_queue_is_refused_with_406,
    declaring_a_server_named_queue_again_by_its_name_is_403,
    conditional_delete_of_a_quorum_queue_is_540_and_keeps_it,
    a_user_without_configure_permission_gets_403_before_any_other_refusal,
    a_per_consumer_prefetch_lifts_the_channel_prefetch_set_before_it,
    a_prefetch_raised_for_each_held_message_lets_every_message_through,
    no_basic_cancel_follows_the_clients_own_cancel_ok,
    deleting_a_consumed_quorum_queue_on_its_channel_keeps_the_connection,
    conditional_delete_of_a_control_quorum_queue_another_client_declared_is_540,
    conditional_delete_of_a_quorum_queue_declared_again_as_classic_is_made,
    a_refused_nowait_redeclare_changes_nothing,
    consume_from_missing_queue_is_404,
    passive_declare_of_missing_exchange_is_404,
    publish_to_missing_exchange_closes_the_channel_with_404,
    declaring_an_amq_prefixed_queue_is_403,
    declaring_an_amq_prefixed_exchange_is_403,
    confirm_select_on_a_tx_channel_is_406,
    tx_select_on_a_confirm_channel_is_406,
    basic_qos_with_prefetch_size_is_refused,
    consumer_is_cancelled_when_another_client_deletes_its_queue,
    mandatory_publish_to_a_bound_queue_is_not_returned,
    mandatory_publish_to_an_exchange_without_bindings_is_returned_once,
);

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(1000);

// ---------------------------------------------------------------------------------------------
// Helpers

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).expect("short string")
}

/// Unwraps an amqprs result; on an error, fails with the channel.close the broker sent (waited
/// for briefly) and `what`.
async fn ok<T>(what: &str, events: &mut Events, r: Result<T, amqprs::error::Error>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => {
            let close = close_of(events).await;
            panic!("{what} failed: {close} ({e})")
        }
    }
}

/// The channel.close the broker sent on a channel, as "CODE TEXT" (waits up to 5 s).
async fn close_of(events: &mut Events) -> String {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Close { code, text } = events.next().await {
                return format!("channel.close {code} {text}");
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| "no channel.close from the broker".into())
}

/// Waits for the broker's channel.close; returns its code and text.
async fn close_code(events: &mut Events, after: &str) -> (u16, String) {
    within_for(
        STEP,
        &format!("channel.close after {after}"),
        events.expect_close(),
    )
    .await
}

async fn exchange_declare(
    ch: &Channel,
    events: &mut Events,
    name: &str,
    kind: &str,
    durable: bool,
) {
    let args = ExchangeDeclareArguments::new(name, kind)
        .durable(durable)
        .finish();
    let what = format!("exchange.declare {name} ({kind})");
    let r = within(&what, ch.exchange_declare(args)).await;
    ok(&what, events, r).await;
}

/// queue.declare; returns the queue's name (the generated one for "").
async fn queue_declare(ch: &Channel, events: &mut Events, args: QueueDeclareArguments) -> String {
    let what = format!("queue.declare {args:?}");
    let r = within(&what, ch.queue_declare(args)).await;
    let (name, _, _) = ok(&what, events, r).await.expect("queue.declare-ok");
    name
}

async fn queue_bind(ch: &Channel, events: &mut Events, queue: &str, exchange: &str, key: &str) {
    let what = format!("queue.bind {queue:?} to {exchange:?} with {key:?}");
    let r = within(
        &what,
        ch.queue_bind(QueueBindArguments::new(queue, exchange, key)),
    )
    .await;
    ok(&what, events, r).await;
}

/// Publishes `bodies` to `exchange` with `routing_key` on a confirm-mode channel of its own and
/// waits until the broker has acked every one.
async fn confirmed_publishes(
    conn: &Connection,
    exchange: &str,
    routing_key: &str,
    bodies: &[String],
) {
    let (ch, mut events) = open_channel(conn).await;
    confirm_select(&ch).await;
    for body in bodies {
        publish(&ch, exchange, routing_key, body.as_bytes()).await;
    }
    let acks = events.confirms(bodies.len() as u64).await;
    assert!(
        acks.iter().all(|&a| a),
        "publishes to {exchange:?} / {routing_key:?} nacked: {acks:?}"
    );
    let _ = within("channel.close", ch.close()).await;
}

/// basic.get; `Err` with the broker's channel.close when the get fails.
async fn try_get(
    ch: &Channel,
    events: &mut Events,
    queue: &str,
    no_ack: bool,
) -> Result<Option<Got>, String> {
    let args = BasicGetArguments::new(queue).no_ack(no_ack).finish();
    match within(&format!("basic.get {queue:?}"), ch.basic_get(args)).await {
        Ok(r) => Ok(r.map(|(ok, _props, body)| Got {
            tag: ok.delivery_tag(),
            redelivered: ok.redelivered(),
            message_count: ok.message_count(),
            body,
        })),
        Err(e) => Err(format!("{} ({e})", close_of(events).await)),
    }
}

/// Ready messages in `queue` (passive declare on a fresh channel of `conn`); `Err` with the
/// broker's channel.close if the declare fails (404 when there is no such queue).
async fn depth(conn: &Connection, queue: &str) -> Result<u32, String> {
    let (ch, mut events) = open_channel(conn).await;
    let what = format!("passive queue.declare {queue}");
    let args = QueueDeclareArguments::new(queue).passive(true).finish();
    match within(&what, ch.queue_declare(args)).await {
        Ok(ok) => {
            let _ = within("channel.close", ch.close()).await;
            Ok(ok.expect("declare-ok").1)
        }
        Err(e) => Err(format!("{what}: {} ({e})", close_of(&mut events).await)),
    }
}

/// Queue depths asked over a connection of its own (through the proxy: summed over clusters).
struct Counter {
    conn: Connection,
}

impl Counter {
    async fn open(addr: SocketAddr) -> Counter {
        Counter {
            conn: connect(addr).await,
        }
    }

    async fn depth(&self, queue: &str) -> Result<u32, String> {
        depth(&self.conn, queue).await
    }

    /// The depth once it has not changed for 2 s (polled every 250 ms), at most `limit`.
    async fn stable_depth(&self, queue: &str, limit: Duration) -> u32 {
        let deadline = Instant::now() + limit;
        let mut last = None;
        let mut same = 0;
        loop {
            let d = self
                .depth(queue)
                .await
                .unwrap_or_else(|e| panic!("counting {queue}: {e}"));
            if last == Some(d) {
                same += 1;
            } else {
                same = 0;
                last = Some(d);
            }
            if same >= 8 || Instant::now() >= deadline {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn delete(&self, queue: &str) {
        if let Ok(ch) = within("channel.open", self.conn.open_channel(None)).await {
            let _ =
                tokio::time::timeout(STEP, ch.queue_delete(QueueDeleteArguments::new(queue))).await;
            let _ = tokio::time::timeout(STEP, ch.close()).await;
        }
    }

    async fn close(self) {
        close_connection(self.conn).await;
    }
}

/// Appends basic.publish + header + body (one body frame: bodies here are small).
fn publish_frames(
    out: &mut BytesMut,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) {
    support::encode_publish(out, channel, exchange, routing_key, body, 4096);
}

/// A raw client with channel 1 open and `queue` declared on it (transient, not exclusive).
async fn raw_with_queue(addr: SocketAddr, queue: &str) -> RawClient {
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    let declare = codec::QueueDeclare {
        queue: ss(queue),
        ..Default::default()
    };
    match c.call(1, &Method::QueueDeclare(declare)).await {
        Method::QueueDeclareOk(ok) => assert_eq!(ok.queue, queue),
        m => panic!("expected queue.declare-ok, got {}", m.name()),
    }
    c
}

fn connection_close() -> Method {
    Method::ConnectionClose(codec::ConnectionClose {
        reply_code: 200,
        reply_text: ss("bye"),
        class_id: 0,
        method_id: 0,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. A client that ends with FIN after its last publish (no connection.close)

const FIN_PUBLISHES: usize = 5_000;

/// A raw client declares a queue, writes 5,000 publishes (no confirms) in batches of 500 and
/// shuts its socket down (FIN) right after the last byte, without connection.close. RabbitMQ
/// keeps almost all of them (4,880-5,000 in 12 runs: the publishes still queued inside it when
/// it sees the FIN are dropped with the connection), so at least 95% must be in the queue.
async fn close_without_connection_close_keeps_every_publish(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("fin"));
    let mut c = raw_with_queue(addr, &queue).await;
    let body = [b'x'; 200];
    let mut batch = BytesMut::new();
    for i in 0..FIN_PUBLISHES {
        publish_frames(&mut batch, 1, "", &queue, &body);
        if (i + 1) % 500 == 0 || i + 1 == FIN_PUBLISHES {
            within("a batch of publishes", c.stream.write_all(&batch))
                .await
                .unwrap_or_else(|e| panic!("writing publishes up to {i} failed: {e}"));
            batch.clear();
        }
    }
    within("shutdown (FIN)", c.stream.shutdown())
        .await
        .expect("socket shutdown");
    // Read until the server closes its side too (it has nothing to say), so the socket goes
    // away with a FIN from each side rather than a reset.
    let mut sink = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(STEP, async {
        while let Ok(n) = c.stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    drop(c);

    let counter = Counter::open(addr).await;
    let kept = counter.stable_depth(&queue, Duration::from_secs(60)).await;
    counter.delete(&queue).await;
    counter.close().await;
    eprintln!("{kept} of {FIN_PUBLISHES} publishes kept after the client's FIN");
    assert!(
        kept as usize >= FIN_PUBLISHES * 95 / 100,
        "{kept} of {FIN_PUBLISHES} publishes are in {queue} after the client's FIN \
         (at least 95% expected: RabbitMQ keeps 97.6-100%)"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. connection.close right behind publishes

const CLOSE_PUBLISHES: usize = 2_000;

/// Reads frames until connection.close-ok on channel 0 (anything else skipped); `Err` says what
/// came instead (EOF, a reset, connection.close).
async fn await_close_ok(stream: &mut TcpStream) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut skipped = 0usize;
    loop {
        while let Some(f) =
            codec::decode_frame(&mut buf, 0).map_err(|e| format!("undecodable frame: {e}"))?
        {
            if f.kind != FrameKind::Method {
                skipped += 1;
                continue;
            }
            match Method::decode(f.payload) {
                Ok(Method::ConnectionCloseOk(_)) if f.channel == 0 => return Ok(()),
                Ok(Method::ConnectionClose(c)) => {
                    return Err(format!(
                        "got connection.close {} {} instead of close-ok",
                        c.reply_code, c.reply_text
                    ));
                }
                _ => skipped += 1,
            }
        }
        buf.reserve(64 * 1024);
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err(format!("EOF before close-ok ({skipped} other frames)")),
            Err(e) => {
                return Err(format!(
                    "read error before close-ok ({skipped} other frames): {e}"
                ));
            }
            Ok(_) => {}
        }
    }
}

/// Publishes written behind connection.close, as Node's amqplib writes what the application
/// published after it asked to close: at least this many bytes, more than the peer's socket
/// buffers hold (`tcp_rmem` may let a receive buffer grow to 32 MB), so the peer answers the
/// close while the client is still writing ...
const AFTER_CLOSE_BYTES: usize = 64 << 20;
/// ... and for at least this long after the close, so a peer that closes its socket soon after
/// close-ok does so while the client still writes (RabbitMQ reads on for 30 s, warren for 3 s).
const AFTER_CLOSE_TIME: Duration = Duration::from_millis(500);
/// At most this many bytes behind the close.
const AFTER_CLOSE_MAX: usize = 256 << 20;

/// A raw client writes 2,000 publishes and connection.close, then, without reading, publishes
/// of 64 KB in blocking writes of 4 MB (at least 64 MB and for at least 0.5 s), as Node's
/// amqplib does; only then it reads. It must get connection.close-ok, not EPIPE or a reset on
/// a write (a peer that closes its socket with unread data in its buffer resets the
/// connection), nor EOF. Every publish before the close must be in the queue, none after it.
async fn connection_close_behind_publishes_still_gets_close_ok(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("close-behind"));
    let mut c = raw_with_queue(addr, &queue).await;
    let mut out = BytesMut::new();
    for i in 0..CLOSE_PUBLISHES {
        publish_frames(&mut out, 1, "", &queue, format!("message {i}").as_bytes());
    }
    codec::write_method(&mut out, 0, &connection_close());
    let filler = vec![b'z'; 64 * 1024];
    let mut chunk = BytesMut::new();
    let mut per_chunk = 0;
    while chunk.len() < 4 << 20 {
        publish_frames(&mut chunk, 1, "", &queue, &filler);
        per_chunk += 1;
    }
    let started = Instant::now();
    let mut written_after = 0;
    let mut after = 0;
    let mut writes = 0;
    let write = async {
        c.stream.write_all(&out).await?;
        while written_after < AFTER_CLOSE_MAX
            && (written_after < AFTER_CLOSE_BYTES || started.elapsed() < AFTER_CLOSE_TIME)
        {
            c.stream.write_all(&chunk).await?;
            written_after += chunk.len();
            after += per_chunk;
            writes += 1;
        }
        Ok::<(), std::io::Error>(())
    };
    let written = within("publishes + connection.close + more publishes", write).await;
    if let Err(e) = written {
        panic!(
            "writing {CLOSE_PUBLISHES} publishes, connection.close and publishes after it \
             failed after {after} of those ({writes} writes of 4 MB, {:?} after the first write): {e} \
             (the peer reset the connection while the client was still writing)",
            started.elapsed()
        );
    }
    let wrote_for = started.elapsed();
    eprintln!(
        "{} MB of publishes written behind connection.close, {wrote_for:?} of writing",
        written_after >> 20
    );
    let got = within("connection.close-ok", await_close_ok(&mut c.stream)).await;
    let _ = c.stream.shutdown().await;
    drop(c);
    got.unwrap_or_else(|e| {
        panic!(
            "connection.close behind {CLOSE_PUBLISHES} publishes, with {after} publishes \
             ({} MB, {wrote_for:?} of writing) written after it: {e}",
            written_after >> 20
        )
    });

    let counter = Counter::open(addr).await;
    let kept = counter.stable_depth(&queue, Duration::from_secs(60)).await;
    counter.delete(&queue).await;
    counter.close().await;
    assert_eq!(
        kept as usize, CLOSE_PUBLISHES,
        "publishes in {queue} after connection.close-ok: the {CLOSE_PUBLISHES} before the close \
         and none of the {after} after it"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Bindings: each bound route carries 10 confirmed publishes, each delivered exactly once

/// Consumes `queue` (no-ack) on a channel of its own, makes 10 confirmed publishes to `exchange`
/// with `routing_key`, and checks the consumer gets each exactly once (bodies carry a unique
/// tag: other tests' messages through shared exchanges such as amq.fanout are ignored).
async fn ten_delivered_once(conn: &Connection, queue: &str, exchange: &str, routing_key: &str) {
    let (cons, _cons_events) = open_channel(conn).await;
    let (ctag, mut rx) = consume(&cons, queue, false).await;
    let tag = unique("body");
    let bodies: Vec<String> = (0..10).map(|i| format!("{tag} #{i}")).collect();
    confirmed_publishes(conn, exchange, routing_key, &bodies).await;

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut foreign = 0;
    let deadline = tokio::time::Instant::now() + STEP;
    let mut quiet_until = None;
    loop {
        let until = quiet_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(m)) => {
                let body = String::from_utf8_lossy(&m.content.unwrap_or_default()).into_owned();
                if bodies.contains(&body) {
                    *seen.entry(body).or_default() += 1;
                } else {
                    foreign += 1;
                }
            }
            Ok(None) => panic!("consumer of {queue} ended (channel closed?), got {seen:?}"),
            Err(_) => break,
        }
        if quiet_until.is_none() && seen.len() == bodies.len() {
            quiet_until = Some(tokio::time::Instant::now() + QUIET);
        }
    }
    let missing: Vec<&String> = bodies.iter().filter(|b| !seen.contains_key(*b)).collect();
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "publishes to {exchange:?} with key {routing_key:?} via {queue}: missing {missing:?}, \
         more than once {twice:?} ({foreign} other messages)"
    );
    let _ = within(
        "basic.cancel",
        cons.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await;
    let _ = within("channel.close", cons.close()).await;
}

#[derive(Clone, Copy, Debug)]
enum QueueKind {
    /// queue.declare "" (exclusive): the server names it.
    ServerNamed,
    /// A bare UUID (an rpc:// result queue): auto-delete, not exclusive.
    Uuid,
}

#[derive(Clone, Copy, Debug)]
enum BindTo {
    UserFanout,
    AmqFanout,
    AmqTopic,
}

async fn bind_queue_and_publish(addr: SocketAddr, kind: QueueKind, to: BindTo) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let queue = match kind {
        QueueKind::ServerNamed => {
            let args = QueueDeclareArguments::new("").exclusive(true).finish();
            queue_declare(&ch, &mut events, args).await
        }
        QueueKind::Uuid => {
            let args = QueueDeclareArguments::new(&support::uuid())
                .auto_delete(true)
                .finish();
            queue_declare(&ch, &mut events, args).await
        }
    };
    cleanup.queue(&queue);
    let (exchange, key) = match to {
        BindTo::UserFanout => {
            let x = cleanup.exchange(&unique("fanout"));
            exchange_declare(&ch, &mut events, &x, "fanout", false).await;
            (x, String::new())
        }
        BindTo::AmqFanout => ("amq.fanout".to_owned(), String::new()),
        BindTo::AmqTopic => ("amq.topic".to_owned(), unique("topic-key")),
    };
    queue_bind(&ch, &mut events, &queue, &exchange, &key).await;
    ten_delivered_once(&conn, &queue, &exchange, &key).await;
    close_connection(conn).await;
}

async fn bindings_server_named_queue_to_user_fanout(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::ServerNamed, BindTo::UserFanout).await;
}

async fn bindings_server_named_queue_to_amq_fanout(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::ServerNamed, BindTo::AmqFanout).await;
}

async fn bindings_server_named_queue_to_amq_topic(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::ServerNamed, BindTo::AmqTopic).await;
}

async fn bindings_uuid_queue_to_user_fanout(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::Uuid, BindTo::UserFanout).await;
}

async fn bindings_uuid_queue_to_amq_fanout(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::Uuid, BindTo::AmqFanout).await;
}

async fn bindings_uuid_queue_to_amq_topic(addr: SocketAddr) {
    bind_queue_and_publish(addr, QueueKind::Uuid, BindTo::AmqTopic).await;
}

/// Celery's event exchange, declared as kombu declares it (durable topic).
async fn declare_celeryev(ch: &Channel, events: &mut Events) {
    exchange_declare(ch, events, "celeryev", "topic", true).await;
}

/// An event routing key of this test only (`worker.<unique>`).
fn event_key() -> String {
    format!("worker.{}", unique("event").replace('.', "-"))
}

/// A plainly named queue bound to `celeryev` (topic) with an event key.
async fn bindings_named_queue_to_celeryev(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_celeryev(&ch, &mut events).await;
    let queue = cleanup.queue(&unique("events-named"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let key = event_key();
    queue_bind(&ch, &mut events, &queue, "celeryev", &key).await;
    ten_delivered_once(&conn, &queue, "celeryev", &key).await;
    close_connection(conn).await;
}

/// exchange.bind(destination = `destination`, source = `source`, `key`).
async fn exchange_bind(
    ch: &Channel,
    events: &mut Events,
    destination: &str,
    source: &str,
    key: &str,
) {
    let what = format!("exchange.bind {source:?} -> {destination:?} with {key:?}");
    let r = within(
        &what,
        ch.exchange_bind(ExchangeBindArguments::new(destination, source, key)),
    )
    .await;
    ok(&what, events, r).await;
}

/// celeryev -> a user topic exchange (exchange.bind with an event key); a named queue bound to
/// the user exchange gets what is published to celeryev with that key.
async fn bindings_exchange_from_celeryev_to_user_exchange(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_celeryev(&ch, &mut events).await;
    let x = cleanup.exchange(&unique("from-celeryev"));
    exchange_declare(&ch, &mut events, &x, "topic", false).await;
    let key = event_key();
    exchange_bind(&ch, &mut events, &x, "celeryev", &key).await;
    let queue = cleanup.queue(&unique("via-user-x"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    queue_bind(&ch, &mut events, &queue, &x, "#").await;
    ten_delivered_once(&conn, &queue, "celeryev", &key).await;
    close_connection(conn).await;
}

/// A user topic exchange -> celeryev (exchange.bind with an event key); a named queue bound to
/// celeryev with that key gets what is published to the user exchange.
async fn bindings_exchange_from_user_exchange_to_celeryev(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    declare_celeryev(&ch, &mut events).await;
    let x = cleanup.exchange(&unique("to-celeryev"));
    exchange_declare(&ch, &mut events, &x, "topic", false).await;
    let key = event_key();
    exchange_bind(&ch, &mut events, "celeryev", &x, &key).await;
    let queue = cleanup.queue(&unique("via-celeryev"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    queue_bind(&ch, &mut events, &queue, "celeryev", &key).await;
    ten_delivered_once(&conn, &queue, &x, &key).await;
    close_connection(conn).await;
}

// ---------------------------------------------------------------------------------------------
// 4. The empty queue name: the channel's last declared queue

/// After a server-named declare on a channel, queue.bind, basic.get, queue.purge, basic.consume
/// and queue.delete with queue "" act on that queue.
async fn empty_queue_name_means_last_declared(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let x = cleanup.exchange(&unique("last-declared"));
    exchange_declare(&ch, &mut events, &x, "fanout", false).await;
    let args = QueueDeclareArguments::new("").exclusive(true).finish();
    let queue = queue_declare(&ch, &mut events, args).await;
    cleanup.queue(&queue);
    // Checks go through other channels of the connection (the queue is exclusive), by name.
    let (other, mut other_events) = open_channel(&conn).await;

    // queue.bind "" binds the declared queue.
    queue_bind(&ch, &mut events, "", &x, "").await;
    confirmed_publishes(&conn, &x, "", &["one".into()]).await;
    let got = try_get(&other, &mut other_events, &queue, true).await;
    let got = got.unwrap_or_else(|e| panic!("basic.get {queue}: {e}"));
    assert_eq!(
        got.map(|g| g.body),
        Some(b"one".to_vec()),
        "queue.bind \"\" after declaring {queue}: a publish to {x} must reach {queue}"
    );

    // basic.get "" gets from it.
    confirmed_publishes(&conn, &x, "", &["two".into()]).await;
    let got = try_get(&ch, &mut events, "", true).await;
    let got = got.unwrap_or_else(|e| panic!("basic.get \"\": {e}"));
    assert_eq!(
        got.map(|g| g.body),
        Some(b"two".to_vec()),
        "basic.get \"\" must get from {queue}"
    );

    // queue.purge "" purges it.
    confirmed_publishes(&conn, &x, "", &["three".into(), "four".into()]).await;
    let r = within(
        "queue.purge \"\"",
        ch.queue_purge(QueuePurgeArguments::new("")),
    )
    .await;
    let purged = ok("queue.purge \"\"", &mut events, r).await;
    assert_eq!(purged, Some(2), "queue.purge \"\" must purge {queue}");
    assert_eq!(
        depth(&conn, &queue).await,
        Ok(0),
        "{queue} after queue.purge \"\""
    );

    // basic.consume "" consumes from it.
    let args = BasicConsumeArguments::new("", "")
        .manual_ack(false)
        .finish();
    let r = within("basic.consume \"\"", ch.basic_consume_rx(args)).await;
    let (ctag, mut rx) = ok("basic.consume \"\"", &mut events, r).await;
    confirmed_publishes(&conn, &x, "", &["five".into()]).await;
    let m = within("a delivery to the consumer of \"\"", rx.recv())
        .await
        .expect("consumer stream ended");
    assert_eq!(m.content.as_deref(), Some(&b"five"[..]));
    let r = within(
        "basic.cancel",
        ch.basic_cancel(BasicCancelArguments::new(&ctag)),
    )
    .await;
    ok("basic.cancel", &mut events, r).await;

    // queue.delete "" deletes it.
    confirmed_publishes(&conn, &x, "", &["six".into()]).await;
    let r = within(
        "queue.delete \"\"",
        ch.queue_delete(QueueDeleteArguments::new("")),
    )
    .await;
    let deleted = ok("queue.delete \"\"", &mut events, r).await;
    assert_eq!(deleted, Some(1), "queue.delete \"\" must delete {queue}");
    let after = depth(&conn, &queue).await;
    assert!(
        after.as_ref().is_err_and(|e| e.contains("404")),
        "{queue} after queue.delete \"\": expected 404, got {after:?}"
    );
    close_connection(conn).await;
}

/// "" on a channel that has declared no queue: basic.get and queue.bind are each refused with
/// channel.close 404 NOT_FOUND ("no previously declared queue").
async fn empty_queue_name_before_any_declare_is_404(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let x = cleanup.exchange(&unique("no-last-declared"));
    exchange_declare(&ch, &mut events, &x, "fanout", false).await;
    let _ = within("channel.close", ch.close()).await;

    let (ch, mut events) = open_channel(&conn).await;
    let r = try_get(&ch, &mut events, "", true).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("channel.close 404")),
        "basic.get \"\" before any queue.declare on the channel: expected channel.close 404, \
         got {r:?}"
    );

    let (ch, mut events) = open_channel(&conn).await;
    let r = within(
        "queue.bind \"\"",
        ch.queue_bind(QueueBindArguments::new("", &x, "")),
    )
    .await;
    let outcome = match r {
        Ok(()) => "bind-ok".to_owned(),
        Err(e) => format!("{} ({e})", close_of(&mut events).await),
    };
    assert!(
        outcome.contains("channel.close 404"),
        "queue.bind \"\" before any queue.declare on the channel: expected channel.close 404, \
         got {outcome}"
    );
    close_connection(conn).await;
}

// ---------------------------------------------------------------------------------------------
// 5. no_ack belongs to each basic.get

/// Two pipelined basic.get on one channel, the first with no_ack = false, the second with
/// no_ack = true; the first is acked and the channel closed: nothing is left to redeliver.
async fn no_ack_is_per_get(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("no-ack-per-get"));
    let mut c = raw_with_queue(addr, &queue).await;
    let frame_max = c.frame_max;
    c.publish(1, "", &queue, b"first", frame_max).await;
    c.publish(1, "", &queue, b"second", frame_max).await;
    let counter = Counter::open(addr).await;
    let what = format!("both messages in {queue}");
    let (cref, qref) = (&counter, &queue);
    support::eventually(&what, || async move {
        (cref.depth(qref).await == Ok(2)).then_some(())
    })
    .await;

    let mut out = BytesMut::new();
    for no_ack in [false, true] {
        codec::write_method(
            &mut out,
            1,
            &Method::BasicGet(codec::BasicGet {
                ticket: 0,
                queue: ss(&queue),
                no_ack,
            }),
        );
    }
    c.send(&out).await;
    let mut tags = Vec::new();
    for i in 0..2 {
        let (m, _body, _) = c.read_delivery().await;
        match m {
            Method::BasicGetOk(ok) => tags.push(ok.delivery_tag),
            other => panic!("get {i}: expected basic.get-ok, got {}", other.name()),
        }
    }
    c.send_method(
        1,
        &Method::BasicAck(codec::BasicAck {
            delivery_tag: tags[0],
            multiple: false,
        }),
    )
    .await;
    let close = Method::ChannelClose(codec::ChannelClose {
        reply_code: 200,
        reply_text: ss("done"),
        class_id: 0,
        method_id: 0,
    });
    match c.call(1, &close).await {
        Method::ChannelCloseOk(_) => {}
        m => panic!("expected channel.close-ok, got {m:?}"),
    }
    // Nothing may come back: sampled for 2 s.
    for _ in 0..8 {
        let d = counter.depth(&queue).await;
        assert_eq!(
            d,
            Ok(0),
            "{queue} after acking the first get (no_ack = false) and closing the channel: \
             the second get (no_ack = true) must not be redelivered"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    c.close().await;
    counter.delete(&queue).await;
    counter.close().await;
}

// ---------------------------------------------------------------------------------------------
// 6. basic.get keeps an x-expires queue alive

/// A queue with x-expires = 2000 ms and 20 messages, one basic.get every 1.2 s: every get finds
/// the queue (and a message); all 20 come out.
async fn x_expires_renewed_by_get(addr: SocketAddr) {
    poll_an_expiring_queue(addr, 20, false).await;
}

/// The same with 10 messages, the queue declared and filled by a connection that has closed
/// since: the polling connection never declared it (warren does not know its arguments from
/// it), and every get still keeps the whole queue alive.
async fn x_expires_renewed_by_gets_of_a_connection_that_did_not_declare_it(addr: SocketAddr) {
    poll_an_expiring_queue(addr, 10, true).await;
}

/// Declares a queue with x-expires = 2000 ms, publishes `n` messages, then takes them with one
/// basic.get every 1.2 s, on the declaring connection or (`elsewhere`) on a new one.
async fn poll_an_expiring_queue(addr: SocketAddr, n: usize, elsewhere: bool) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("expires"));
    let mut conn = connect(addr).await;
    let (mut ch, mut events) = open_channel(&conn).await;
    let mut args = amqprs::FieldTable::new();
    args.insert("x-expires".try_into().unwrap(), amqprs::FieldValue::l(2000));
    let declare = QueueDeclareArguments::new(&queue).arguments(args).finish();
    queue_declare(&ch, &mut events, declare).await;
    let bodies: Vec<String> = (0..n).map(|i| format!("message {i}")).collect();
    confirmed_publishes(&conn, "", &queue, &bodies).await;
    if elsewhere {
        close_connection(conn).await;
        conn = connect(addr).await;
        (ch, events) = open_channel(&conn).await;
    }

    let mut got = Vec::new();
    let mut gets = 0;
    while got.len() < bodies.len() {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        gets += 1;
        assert!(
            gets <= bodies.len() + 5,
            "{gets} gets every 1.2 s, only {} of {n} messages received",
            got.len()
        );
        match try_get(&ch, &mut events, &queue, true).await {
            Ok(Some(g)) => got.push(String::from_utf8_lossy(&g.body).into_owned()),
            Ok(None) => {}
            Err(e) => panic!(
                "basic.get {gets} of {queue} (x-expires 2000, a get every 1.2 s), after {} \
                 messages: {e}",
                got.len()
            ),
        }
    }
    got.sort();
    let mut expected = bodies.clone();
    expected.sort();
    assert_eq!(got, expected, "the {n} messages of {queue}");
    let counter = Counter::open(addr).await;
    assert_eq!(
        counter.depth(&queue).await,
        Ok(0),
        "{queue} must still exist after the last get"
    );
    counter.delete(&queue).await;
    counter.close().await;
    close_connection(conn).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Acks of unknown delivery tags

/// A queue with one (confirmed) message, and a channel to get it on.
async fn queue_with_one_message(
    addr: SocketAddr,
    cleanup: &mut Cleanup,
) -> (Connection, Channel, Events, String) {
    let queue = cleanup.queue(&unique("ack"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    confirmed_publishes(&conn, "", &queue, &["the message".into()]).await;
    (conn, ch, events, queue)
}

async fn ack(ch: &Channel, tag: u64) {
    within(
        "basic.ack",
        ch.basic_ack(BasicAckArguments::new(tag, false)),
    )
    .await
    .expect("basic.ack (sending it)");
}

/// Acks in a transaction take effect at tx.commit; tx.rollback undoes them: the deliveries are
/// unacknowledged again and may be acked again (no 406). Three gets, one `multiple` ack,
/// rollback; the same single ack again (a 406 if warren had forgotten the tag) and the
/// `multiple` ack again, commit: the queue is empty, nothing comes back when the channel closes.
async fn acks_in_a_rolled_back_transaction_are_undone(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("txack"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let bodies: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    confirmed_publishes(&conn, "", &queue, &bodies).await;
    within("tx.select", ch.tx_select())
        .await
        .expect("tx.select");
    let mut tags = Vec::new();
    for _ in 0..3 {
        let got = try_get(&ch, &mut events, &queue, false)
            .await
            .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
            .expect("a message");
        tags.push(got.tag);
    }
    let last = *tags.iter().max().expect("three tags");
    let ack_multiple = |tag| ch.basic_ack(BasicAckArguments::new(tag, true));
    within("basic.ack multiple", ack_multiple(last))
        .await
        .expect("basic.ack");
    within("tx.rollback", ch.tx_rollback())
        .await
        .expect("tx.rollback");
    ack(&ch, tags[0]).await;
    within("basic.ack multiple", ack_multiple(last))
        .await
        .expect("basic.ack");
    within("tx.commit", ch.tx_commit())
        .await
        .unwrap_or_else(|e| panic!("tx.commit after acking again: {e} ({})", ""));
    if let Some(e) = events.try_next() {
        panic!("acking again after the rollback: {e:?}");
    }
    within("channel.close", ch.close())
        .await
        .expect("channel.close");
    assert_eq!(
        depth(&conn, &queue).await,
        Ok(0),
        "the acks committed after the rollback stand"
    );
    close_connection(conn).await;
}

/// A delivery tag acked twice: RabbitMQ closes the channel with 406 PRECONDITION_FAILED
/// ("unknown delivery tag").
async fn double_ack_is_406(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let (conn, ch, mut events, queue) = queue_with_one_message(addr, &mut cleanup).await;
    let got = try_get(&ch, &mut events, &queue, false).await;
    let got = got
        .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
        .expect("a message");
    ack(&ch, got.tag).await;
    ack(&ch, got.tag).await;
    let (code, text) = close_code(&mut events, "acking a delivery tag twice").await;
    assert_eq!(
        code, 406,
        "the second ack of delivery tag {}: expected channel.close 406, got {code} {text}",
        got.tag
    );
    close_connection(conn).await;
}

/// The tag of a basic.get with no_ack = true acked: 406 PRECONDITION_FAILED ("unknown delivery
/// tag").
async fn ack_of_no_ack_get_tag_is_406(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let (conn, ch, mut events, queue) = queue_with_one_message(addr, &mut cleanup).await;
    let got = try_get(&ch, &mut events, &queue, true).await;
    let got = got
        .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"))
        .expect("a message");
    ack(&ch, got.tag).await;
    let (code, text) = close_code(&mut events, "acking the tag of a no-ack get").await;
    assert_eq!(
        code, 406,
        "ack of no-ack get tag {}: expected channel.close 406, got {code} {text}",
        got.tag
    );
    close_connection(conn).await;
}

// ---------------------------------------------------------------------------------------------
// 8. Connection-level errors

/// basic.publish (with its content) on channel 0: connection.close 504 CHANNEL_ERROR.
async fn publish_on_channel_0_is_connection_error_504(addr: SocketAddr) {
    let mut c = RawClient::open(addr, Login::default()).await;
    let mut out = BytesMut::new();
    publish_frames(&mut out, 0, "", "nowhere", b"on channel 0");
    c.send(&out).await;
    let ending = within("connection.close", c.read_until_close()).await;
    let code = ending.code();
    assert_eq!(
        code, 504,
        "basic.publish on channel 0: expected connection.close 504, got {ending:?}"
    );
}

/// exchange.declare and connection.close in one write: the declare-ok comes first, then
/// close-ok, and the exchange exists (on every cluster: warren's passive declare asks them
/// all). The same for a declare followed at once by the end of the socket (FIN).
async fn a_declare_right_before_connection_close_is_made(addr: SocketAddr) {
    for fin in [false, true] {
        let exchange = unique("before-close");
        let declare = |passive: bool| {
            Method::ExchangeDeclare(codec::ExchangeDeclare {
                exchange: ss(&exchange),
                kind: ss("fanout"),
                passive,
                ..Default::default()
            })
        };
        let mut c = RawClient::open(addr, Login::default()).await;
        c.open_channel(1).await;
        let mut out = BytesMut::new();
        codec::write_method(&mut out, 1, &declare(false));
        if fin {
            c.send(&out).await;
            within("shutdown (FIN)", c.stream.shutdown())
                .await
                .expect("shutdown");
        } else {
            codec::write_method(&mut out, 0, &connection_close());
            c.send(&out).await;
            match within("declare-ok", c.read_method()).await {
                (1, Method::ExchangeDeclareOk(_)) => {}
                other => panic!("expected declare-ok before close-ok, got {other:?}"),
            }
            match within("close-ok", c.read_method()).await {
                (0, Method::ConnectionCloseOk(_)) => {}
                other => panic!("expected close-ok, got {other:?}"),
            }
        }
        // With the FIN, the declare may still be on its way when the check starts.
        let mut check = None;
        for _ in 0..50 {
            let mut c = RawClient::open(addr, Login::default()).await;
            c.open_channel(1).await;
            if let Method::ExchangeDeclareOk(_) = c.call(1, &declare(true)).await {
                check = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(mut check) = check else {
            panic!("{exchange} missing 5 s after the declare (fin={fin})");
        };
        let delete = Method::ExchangeDelete(codec::ExchangeDelete {
            exchange: ss(&exchange),
            ..Default::default()
        });
        check.call(1, &delete).await;
        check.close().await;
    }
}

/// The client closes a channel while the server closes it (a publish to a missing exchange
/// and channel.close in one write, as amqp091-go's tests do): the server answers the client's
/// close with close-ok and takes the client's close-ok for its own; the connection and its
/// other channels carry on.
async fn a_client_close_crossing_the_servers_close_keeps_the_connection(addr: SocketAddr) {
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    c.open_channel(2).await;
    let mut out = BytesMut::new();
    publish_frames(&mut out, 1, &unique("no-such-exchange"), "k", b"x");
    codec::write_method(
        &mut out,
        1,
        &Method::ChannelClose(codec::ChannelClose {
            reply_code: 200,
            reply_text: ss("bye"),
            class_id: 0,
            method_id: 0,
        }),
    );
    c.send(&out).await;
    match within("the server's channel.close", c.read_method()).await {
        (1, Method::ChannelClose(close)) => assert_eq!(close.reply_code, 404, "{close:?}"),
        other => panic!("expected channel.close 404 on channel 1, got {other:?}"),
    }
    c.send_method(1, &Method::ChannelCloseOk(Default::default()))
        .await;
    let exchange = unique("crossing");
    let declare = Method::ExchangeDeclare(codec::ExchangeDeclare {
        exchange: ss(&exchange),
        kind: ss("direct"),
        auto_delete: true,
        ..Default::default()
    });
    match c.call(2, &declare).await {
        Method::ExchangeDeclareOk(_) => {}
        other => panic!("channel 2 after the crossing closes: {other:?}"),
    }
    c.close().await;
}

/// Body frames whose payload is frame_max bytes (each frame 8 bytes longer than frame_max, as
/// AMQPStorm and rabbitpy cut every message above 128 KiB): RabbitMQ tolerates them, and the
/// message arrives whole; a payload one byte longer is connection.close 501 FRAME_ERROR.
async fn body_frames_with_a_payload_of_frame_max_are_accepted(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("frame-slack"));
    let mut c = raw_with_queue(addr, &queue).await;
    let frame_max = c.frame_max;
    assert!(frame_max > 0, "no frame_max negotiated");
    let body: Vec<u8> = (0..frame_max * 2 + 100).map(|i| (i % 251) as u8).collect();
    // write_body cuts payloads of (its frame_max - 8) bytes: these are frame_max long.
    c.publish(1, "", &queue, &body, frame_max + codec::FRAME_OVERHEAD)
        .await;
    let counter = Counter::open(addr).await;
    let (cref, qref) = (&counter, &queue);
    support::eventually("the message in its queue", || async move {
        (cref.depth(qref).await == Ok(1)).then_some(())
    })
    .await;
    c.send_method(
        1,
        &Method::BasicGet(codec::BasicGet {
            ticket: 0,
            queue: ss(&queue),
            no_ack: true,
        }),
    )
    .await;
    let (m, got, _) = c.read_delivery().await;
    assert!(
        matches!(m, Method::BasicGetOk(_)),
        "expected basic.get-ok, got {}",
        m.name()
    );
    assert!(
        got == body,
        "the body came back changed ({} bytes)",
        got.len()
    );
    c.close().await;

    let mut c = raw_with_queue(addr, &queue).await;
    c.publish(1, "", &queue, &body[..frame_max + 1], frame_max + 9)
        .await;
    let ending = within("connection.close", c.read_until_close()).await;
    assert_eq!(
        ending.code(),
        501,
        "a body frame with a payload of frame_max + 1 bytes: expected connection.close 501, \
         got {ending:?}"
    );
}

/// How a hand-made handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handshake {
    /// connection.open-ok.
    Opened,
    /// connection.close with this code and text.
    Closed(u16, String),
    /// The socket closed (or was reset) without connection.close.
    Eof,
}

/// The next method frame of the handshake; connection.close is answered with close-ok.
async fn handshake_step(c: &mut RawClient) -> Result<Method, Handshake> {
    loop {
        let f = within("the server's handshake reply", c.read_frame())
            .await
            .expect("undecodable frame from the server");
        let Some(f) = f else {
            return Err(Handshake::Eof);
        };
        if f.kind != FrameKind::Method {
            continue;
        }
        let m = Method::decode(f.payload).expect("undecodable method from the server");
        if let Method::ConnectionClose(close) = m {
            let mut out = BytesMut::new();
            codec::write_method(&mut out, 0, &Method::ConnectionCloseOk(Default::default()));
            let _ = c.stream.write_all(&out).await;
            return Err(Handshake::Closed(
                close.reply_code,
                close.reply_text.as_str().into_owned(),
            ));
        }
        return Ok(m);
    }
}

/// A handshake with the given start-ok mechanism and response; tune-ok gets the server's values
/// changed by `tune` (channel_max, frame_max).
async fn handshake(
    addr: SocketAddr,
    mechanism: &str,
    response: Vec<u8>,
    tune: impl FnOnce(u16, u32) -> (u16, u32),
) -> Handshake {
    let mut c = RawClient::connect(addr).await;
    c.send(codec::PROTOCOL_HEADER).await;
    let outcome = async {
        match handshake_step(&mut c).await? {
            Method::ConnectionStart(_) => {}
            other => panic!("expected connection.start, got {}", other.name()),
        }
        let mut caps = FieldTable::default();
        for cap in [
            "authentication_failure_close",
            "consumer_cancel_notify",
            "publisher_confirms",
        ] {
            caps.insert(ss(cap), FieldValue::Bool(true));
        }
        let mut props = FieldTable::default();
        props.insert(ss("capabilities"), FieldValue::Table(caps));
        c.send_method(
            0,
            &Method::ConnectionStartOk(codec::ConnectionStartOk {
                client_properties: props,
                mechanism: ss(mechanism),
                response: LongStr::from(response),
                locale: ss("en_US"),
            }),
        )
        .await;
        let (channel_max, frame_max) = match handshake_step(&mut c).await? {
            Method::ConnectionTune(t) => tune(t.channel_max, t.frame_max),
            other => panic!("expected connection.tune, got {}", other.name()),
        };
        c.send_method(
            0,
            &Method::ConnectionTuneOk(codec::ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat: 0,
            }),
        )
        .await;
        // RabbitMQ answers a tune-ok it refuses with connection.close and closes the socket: an
        // open sent meanwhile would make that close a reset that loses the connection.close.
        // So the open waits a moment for such an answer.
        if let Ok(step) = tokio::time::timeout(Duration::from_secs(1), handshake_step(&mut c)).await
        {
            let m = step?;
            panic!("unexpected {} after tune-ok", m.name());
        }
        let open = Method::ConnectionOpen(codec::ConnectionOpen {
            virtual_host: ss("/"),
            capabilities: ShortStr::default(),
            insist: false,
        });
        let mut out = BytesMut::new();
        codec::write_method(&mut out, 0, &open);
        // The server may have closed meanwhile: a failed write shows as what it sent (or EOF)
        // below.
        let _ = c.stream.write_all(&out).await;
        match handshake_step(&mut c).await? {
            Method::ConnectionOpenOk(_) => Ok::<Handshake, Handshake>(Handshake::Opened),
            other => panic!("expected connection.open-ok, got {}", other.name()),
        }
    }
    .await;
    let outcome = outcome.unwrap_or_else(|e| e);
    if outcome == Handshake::Opened {
        c.close().await;
    }
    outcome
}

fn plain(user: &str, password: &str) -> Vec<u8> {
    format!("\0{user}\0{password}").into_bytes()
}

/// AMQPLAIN's response: a field table without its length prefix, LOGIN and PASSWORD.
fn amqplain(user: &str, password: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in [("LOGIN", user), ("PASSWORD", password)] {
        out.push(k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.push(b'S');
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Whether a handshake ended in a refusal of the negotiated values: RabbitMQ (3.10) logs
/// "negotiated channel_max = 0 (no limit) is higher than the maximum allowed value (2047)" (or the
/// same of frame_max) and closes the socket without connection.close; connection.close 530
/// NOT_ALLOWED is the same refusal, explained. Never connection.open-ok.
fn refused_tune(outcome: &Handshake) -> bool {
    matches!(outcome, Handshake::Eof | Handshake::Closed(530, _))
}

/// tune-ok with channel_max 0 (no limit) while the server proposed a limit: refused.
async fn tune_ok_channel_max_0_is_refused(addr: SocketAddr) {
    let outcome = handshake(addr, "PLAIN", plain("guest", "guest"), |_, f| (0, f)).await;
    assert!(
        refused_tune(&outcome),
        "tune-ok with channel_max 0: expected the connection refused (socket closed, or \
         connection.close 530), got {outcome:?}"
    );
}

/// tune-ok with frame_max 0 (no limit) while the server proposed a limit: refused.
async fn tune_ok_frame_max_0_is_refused(addr: SocketAddr) {
    let outcome = handshake(addr, "PLAIN", plain("guest", "guest"), |c, _| (c, 0)).await;
    assert!(
        refused_tune(&outcome),
        "tune-ok with frame_max 0: expected the connection refused (socket closed, or \
         connection.close 530), got {outcome:?}"
    );
}

/// A wrong password with AMQPLAIN: connection.close 403, whose text does not name PLAIN (the
/// mechanism the client did not use).
async fn amqplain_login_failure_is_403_naming_amqplain(addr: SocketAddr) {
    let outcome = handshake(
        addr,
        "AMQPLAIN",
        amqplain("guest", "wrong-password"),
        |c, f| (c, f),
    )
    .await;
    let Handshake::Closed(code, text) = &outcome else {
        panic!("AMQPLAIN with a wrong password: expected connection.close 403, got {outcome:?}");
    };
    assert_eq!(
        *code, 403,
        "AMQPLAIN with a wrong password: expected connection.close 403, got {outcome:?}"
    );
    assert!(
        !text.replace("AMQPLAIN", "").contains("PLAIN"),
        "AMQPLAIN login failure names PLAIN: {text:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Everyday features: refusals, dead-lettering, exclusivity, cancellation, mandatory

/// What became of a request: `Ok` if the broker accepted it, else the broker's channel.close
/// (code, text); code 0 when the request failed without one.
async fn outcome<T>(
    events: &mut Events,
    r: Result<T, amqprs::error::Error>,
) -> Result<T, (u16, String)> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let close = tokio::time::timeout(Duration::from_secs(5), events.expect_close()).await;
            Err(close.unwrap_or_else(|_| (0, format!("no channel.close from the broker ({e})"))))
        }
    }
}

/// Asserts that the broker refused `what` with channel.close `code`; returns the text.
async fn assert_refused<T>(
    what: &str,
    code: u16,
    events: &mut Events,
    r: Result<T, amqprs::error::Error>,
) -> String {
    match outcome(events, r).await {
        Ok(_) => panic!("{what}: expected channel.close {code}, the broker accepted it"),
        Err((got, text)) => {
            assert_eq!(
                got, code,
                "{what}: expected channel.close {code}, got {got} {text}"
            );
            text
        }
    }
}

/// `n` bodies "<tag> #i" (i from `from`), `tag` unique to the call.
fn bodies(n: usize, from: usize) -> Vec<String> {
    let tag = unique("body");
    (from..from + n).map(|i| format!("{tag} #{i}")).collect()
}

fn body_of(m: &ConsumerMessage) -> String {
    String::from_utf8_lossy(m.content.as_deref().unwrap_or_default()).into_owned()
}

/// What a consumer gets: waits (up to [`STEP`]) until `n` deliveries have come, then [`QUIET`]
/// more for any extra one.
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<ConsumerMessage>,
    n: usize,
    what: &str,
) -> Vec<ConsumerMessage> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!(
                "{what}: the consumer ended (channel closed?) after {} of {n} deliveries",
                got.len()
            ),
            Err(_) => panic!(
                "{what}: {} of {n} deliveries within {STEP:?}: {:?}",
                got.len(),
                got.iter().map(body_of).collect::<Vec<_>>()
            ),
        }
    }
    while let Ok(Some(m)) = tokio::time::timeout(QUIET, rx.recv()).await {
        got.push(m);
    }
    got
}

/// Asserts that `got` holds each of `expected` exactly once and nothing else.
fn assert_each_once(got: &[ConsumerMessage], expected: &[String], what: &str) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in got {
        *seen.entry(body_of(m)).or_default() += 1;
    }
    let missing: Vec<&String> = expected.iter().filter(|b| !seen.contains_key(*b)).collect();
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let foreign: Vec<&String> = seen.keys().filter(|b| !expected.contains(b)).collect();
    assert!(
        missing.is_empty() && twice.is_empty() && foreign.is_empty(),
        "{what}: missing {missing:?}, more than once {twice:?}, not published {foreign:?}"
    );
}

async fn cancel(ch: &Channel, ctag: &str) {
    let _ = within(
        "basic.cancel",
        ch.basic_cancel(BasicCancelArguments::new(ctag)),
    )
    .await;
}

// 9.1 queue.delete with if_empty / if_unused

/// queue.delete(if_empty) of a queue holding 3 messages (through warren they lie on one or two
/// shard clusters): channel.close 406 PRECONDITION_FAILED, and the queue is kept whole: a
/// passive declare on a new channel counts 3, and a consumer gets those and every later publish.
async fn queue_delete_if_empty_with_messages_is_406_and_keeps_the_queue(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("if-empty"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let first = bodies(3, 0);
    confirmed_publishes(&conn, "", &queue, &first).await;

    let args = QueueDeleteArguments::new(&queue).if_empty(true).finish();
    let r = within("queue.delete (if_empty)", ch.queue_delete(args)).await;
    let what = format!("queue.delete {queue} (if_empty) holding 3 messages");
    assert_refused(&what, 406, &mut events, r).await;
    assert_eq!(
        depth(&conn, &queue).await,
        Ok(3),
        "{queue} after the refused queue.delete (if_empty): kept with its 3 messages"
    );

    let (cons, _cons_events) = open_channel(&conn).await;
    let (ctag, mut rx) = consume(&cons, &queue, false).await;
    let later = bodies(10, 3);
    confirmed_publishes(&conn, "", &queue, &later).await;
    let all: Vec<String> = first.iter().chain(&later).cloned().collect();
    let got = receive(&mut rx, all.len(), &format!("consumer of {queue}")).await;
    assert_each_once(
        &got,
        &all,
        &format!("{queue} after the refused queue.delete (if_empty): the 3 kept and 10 later"),
    );
    cancel(&cons, &ctag).await;
    close_connection(conn).await;
}

/// queue.delete(if_unused) of a queue another connection consumes: channel.close 406
/// PRECONDITION_FAILED; the queue is kept with its consumer, which gets every later publish.
async fn queue_delete_if_unused_with_a_consumer_is_406_and_keeps_the_queue(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("if-unused"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let consumer_conn = connect(addr).await;
    let (cons, _cons_events) = open_channel(&consumer_conn).await;
    let (ctag, mut rx) = consume(&cons, &queue, false).await;

    let args = QueueDeleteArguments::new(&queue).if_unused(true).finish();
    let r = within("queue.delete (if_unused)", ch.queue_delete(args)).await;
    let what = format!("queue.delete {queue} (if_unused) with a consumer on another connection");
    assert_refused(&what, 406, &mut events, r).await;

    let (check, _check_events) = open_channel(&conn).await;
    let (messages, consumers) = support::queue_counts(&check, &queue).await;
    assert_eq!(
        (messages, consumers),
        (0, 1),
        "{queue} after the refused queue.delete (if_unused): (messages, consumers)"
    );
    let later = bodies(10, 0);
    confirmed_publishes(&conn, "", &queue, &later).await;
    let got = receive(&mut rx, later.len(), &format!("consumer of {queue}")).await;
    assert_each_once(
        &got,
        &later,
        &format!("{queue} after the refused queue.delete (if_unused)"),
    );
    cancel(&cons, &ctag).await;
    close_connection(consumer_conn).await;
    close_connection(conn).await;
}

// 9.2 Dead-lettering

/// A fanout dead-letter exchange with a queue bound to it, and a work queue dead-lettering to it
/// with the extra arguments `args`; returns (work queue, dead-letter queue).
async fn dead_letter_setup(
    ch: &Channel,
    events: &mut Events,
    cleanup: &mut Cleanup,
    mut args: amqprs::FieldTable,
) -> (String, String) {
    let dlx = cleanup.exchange(&unique("dlx"));
    exchange_declare(ch, events, &dlx, "fanout", false).await;
    let dlq = cleanup.queue(&unique("dlq"));
    queue_declare(ch, events, QueueDeclareArguments::new(&dlq)).await;
    queue_bind(ch, events, &dlq, &dlx, "").await;
    let work = cleanup.queue(&unique("dl-work"));
    args.insert(
        "x-dead-letter-exchange".try_into().unwrap(),
        amqprs::FieldValue::S(dlx.as_str().try_into().unwrap()),
    );
    let declare = QueueDeclareArguments::new(&work).arguments(args).finish();
    queue_declare(ch, events, declare).await;
    (work, dlq)
}

/// The first x-death entry of a dead-lettered message: (queue, reason, count).
fn x_death(m: &ConsumerMessage) -> Result<(String, String, i64), String> {
    let key = |k: &str| -> amqprs::FieldName { k.try_into().unwrap() };
    let headers = m
        .basic_properties
        .as_ref()
        .and_then(|p| p.headers())
        .ok_or("no headers")?;
    let Some(amqprs::FieldValue::A(deaths)) = headers.get(&key("x-death")) else {
        return Err(format!("no x-death array in the headers {headers}"));
    };
    let deaths: Vec<amqprs::FieldValue> = deaths.clone().into();
    let Some(amqprs::FieldValue::F(first)) = deaths.first() else {
        return Err(format!("x-death holds no table: {deaths:?}"));
    };
    let text = |k: &str| match first.get(&key(k)) {
        Some(amqprs::FieldValue::S(s)) => Ok(AsRef::<String>::as_ref(s).clone()),
        other => Err(format!("x-death {k}: {other:?}")),
    };
    let count = match first.get(&key("count")) {
        Some(amqprs::FieldValue::l(n)) => *n,
        other => return Err(format!("x-death count: {other:?}")),
    };
    Ok((text("queue")?, text("reason")?, count))
}

/// Asserts that every message in `got` was dead-lettered once from `work` for `reason`.
fn assert_dead_lettered(got: &[ConsumerMessage], work: &str, reason: &str) {
    for m in got {
        let death = x_death(m);
        assert_eq!(
            death,
            Ok((work.to_owned(), reason.to_owned(), 1)),
            "x-death (queue, reason, count) of {:?}",
            body_of(m)
        );
    }
}

/// A queue with x-dead-letter-exchange (a fanout with a bound queue); a manual-ack consumer
/// rejects (requeue = false) each of 10 messages: each reaches the dead-letter queue once, with
/// an x-death header naming the queue and "rejected".
async fn dead_lettering_on_reject_reaches_the_dlq_once(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let args = amqprs::FieldTable::new();
    let (work, dlq) = dead_letter_setup(&ch, &mut events, &mut cleanup, args).await;
    let (dl_ch, _dl_events) = open_channel(&conn).await;
    let (dl_tag, mut dead) = consume(&dl_ch, &dlq, false).await;

    let (cons, _cons_events) = open_channel(&conn).await;
    let (ctag, mut rx) = consume(&cons, &work, true).await;
    let sent = bodies(10, 0);
    confirmed_publishes(&conn, "", &work, &sent).await;
    let mut rejected = Vec::new();
    for _ in 0..sent.len() {
        let m = within("a delivery to reject", rx.recv())
            .await
            .expect("consumer stream ended (channel closed?)");
        let tag = m.deliver.as_ref().expect("basic.deliver").delivery_tag();
        within(
            "basic.reject",
            cons.basic_reject(BasicRejectArguments::new(tag, false)),
        )
        .await
        .expect("basic.reject (sending it)");
        rejected.push(m);
    }
    assert_each_once(&rejected, &sent, &format!("deliveries of {work}"));

    let got = receive(&mut dead, sent.len(), &format!("consumer of {dlq}")).await;
    assert_each_once(
        &got,
        &sent,
        &format!("{dlq} after rejecting each message of {work}"),
    );
    assert_dead_lettered(&got, &work, "rejected");
    assert_eq!(depth(&conn, &work).await, Ok(0), "{work} after the rejects");
    cancel(&cons, &ctag).await;
    cancel(&dl_ch, &dl_tag).await;
    close_connection(conn).await;
}

/// A queue with x-message-ttl = 200 ms and a dead-letter exchange, no consumer: each of 10
/// messages is dead-lettered once when it expires, with x-death "expired".
async fn message_ttl_expiry_dead_letters(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let mut args = amqprs::FieldTable::new();
    args.insert(
        "x-message-ttl".try_into().unwrap(),
        amqprs::FieldValue::l(200),
    );
    let (work, dlq) = dead_letter_setup(&ch, &mut events, &mut cleanup, args).await;
    let (dl_ch, _dl_events) = open_channel(&conn).await;
    let (dl_tag, mut dead) = consume(&dl_ch, &dlq, false).await;

    let sent = bodies(10, 0);
    confirmed_publishes(&conn, "", &work, &sent).await;
    let got = receive(&mut dead, sent.len(), &format!("consumer of {dlq}")).await;
    assert_each_once(
        &got,
        &sent,
        &format!("{dlq} after the messages of {work} expired"),
    );
    assert_dead_lettered(&got, &work, "expired");
    assert_eq!(depth(&conn, &work).await, Ok(0), "{work} after expiry");
    cancel(&dl_ch, &dl_tag).await;
    close_connection(conn).await;
}

// 9.3 Exclusivity

/// Every way another connection may touch `queue`, each on a fresh channel of `conn`: declare,
/// passive declare, consume, get, bind, purge, delete; each must be refused with 405
/// RESOURCE_LOCKED.
async fn assert_locked_for(conn: &Connection, queue: &str, who: &str) {
    let what = |op: &str| format!("{op} of {queue} (exclusive to another connection) by {who}");
    let (ch, mut ev) = open_channel(conn).await;
    let r = within(
        "queue.declare",
        ch.queue_declare(QueueDeclareArguments::new(queue)),
    )
    .await;
    assert_refused(&what("queue.declare"), 405, &mut ev, r).await;

    let (ch, mut ev) = open_channel(conn).await;
    let args = QueueDeclareArguments::new(queue).passive(true).finish();
    let r = within("passive queue.declare", ch.queue_declare(args)).await;
    assert_refused(&what("passive queue.declare"), 405, &mut ev, r).await;

    let (ch, mut ev) = open_channel(conn).await;
    let args = BasicConsumeArguments::new(queue, "").finish();
    let r = within("basic.consume", ch.basic_consume_rx(args)).await;
    assert_refused(&what("basic.consume"), 405, &mut ev, r).await;

    let (ch, mut ev) = open_channel(conn).await;
    let r = try_get(&ch, &mut ev, queue, true).await;
    assert!(
        r.as_ref().is_err_and(|e| e.contains("channel.close 405")),
        "{}: expected channel.close 405, got {r:?}",
        what("basic.get")
    );

    let (ch, mut ev) = open_channel(conn).await;
    let args = QueueBindArguments::new(queue, "amq.fanout", "");
    let r = within("queue.bind", ch.queue_bind(args)).await;
    assert_refused(&what("queue.bind"), 405, &mut ev, r).await;

    let (ch, mut ev) = open_channel(conn).await;
    let r = within(
        "queue.purge",
        ch.queue_purge(QueuePurgeArguments::new(queue)),
    )
    .await;
    assert_refused(&what("queue.purge"), 405, &mut ev, r).await;

    let (ch, mut ev) = open_channel(conn).await;
    let r = within(
        "queue.delete",
        ch.queue_delete(QueueDeleteArguments::new(queue)),
    )
    .await;
    assert_refused(&what("queue.delete"), 405, &mut ev, r).await;
}

/// Connections A and B each declare an exclusive queue; whatever the other one does with it
/// (declare, passive declare, consume, get, bind, purge, delete) is refused with 405
/// RESOURCE_LOCKED, and the owner still has its queue.
async fn exclusive_queue_from_another_connection_is_405(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let a = connect(addr).await;
    let b = connect(addr).await;
    let mut owned = Vec::new();
    for (conn, prefix) in [(&a, "exclusive-a"), (&b, "exclusive-b")] {
        let (ch, mut events) = open_channel(conn).await;
        let queue = cleanup.queue(&unique(prefix));
        let args = QueueDeclareArguments::new(&queue).exclusive(true).finish();
        queue_declare(&ch, &mut events, args).await;
        owned.push(queue);
    }
    assert_locked_for(&b, &owned[0], "connection B").await;
    assert_locked_for(&a, &owned[1], "connection A").await;
    for (conn, queue) in [(&a, &owned[0]), (&b, &owned[1])] {
        confirmed_publishes(conn, "", queue, &["still mine".into()]).await;
        assert_eq!(
            depth(conn, queue).await,
            Ok(1),
            "{queue} for its owner after the refusals"
        );
    }
    close_connection(a).await;
    close_connection(b).await;
}

fn quorum_declare(queue: &str) -> Method {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ss("x-queue-type"),
        FieldValue::LongStr(LongStr::from("quorum")),
    );
    Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(queue),
        durable: true,
        arguments,
        ..Default::default()
    })
}

/// queue.declare with an empty name and `x-queue-type=quorum`: RabbitMQ names only classic
/// queues, and refuses with 406 (warren must not make up a name and create a durable quorum
/// queue nothing deletes).
async fn server_named_quorum_queue_is_refused_with_406(addr: SocketAddr) {
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    match c.call(1, &quorum_declare("")).await {
        Method::ChannelClose(close) => {
            assert_eq!(close.reply_code, 406, "{close:?}");
            assert!(
                close
                    .reply_text
                    .as_str()
                    .contains("server-named queue for type rabbit_quorum_queue"),
                "{close:?}"
            );
        }
        other => panic!("a server-named quorum queue: expected channel.close 406, got {other:?}"),
    }
    c.close().await;
}

/// A server-named queue declared again by its name (not passive), by its own connection or
/// another: 403 ACCESS_REFUSED (RabbitMQ reserves its `amq.gen-` names; warren its own); a
/// passive declare of it is answered.
async fn declaring_a_server_named_queue_again_by_its_name_is_403(addr: SocketAddr) {
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    let declare = |queue: &str, passive: bool| {
        Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(queue),
            passive,
            exclusive: true,
            ..Default::default()
        })
    };
    let name = match c.call(1, &declare("", false)).await {
        Method::QueueDeclareOk(ok) => String::from_utf8_lossy(ok.queue.as_bytes()).into_owned(),
        other => panic!("a server-named queue: {other:?}"),
    };
    match c.call(1, &declare(&name, true)).await {
        Method::QueueDeclareOk(ok) => assert_eq!(ok.queue.as_bytes(), name.as_bytes()),
        other => panic!("a passive declare of {name}: {other:?}"),
    }
    let mut other = RawClient::open(addr, Login::default()).await;
    for (who, client) in [("its owner", &mut c), ("another connection", &mut other)] {
        client.open_channel(2).await;
        match client.call(2, &declare(&name, false)).await {
            Method::ChannelClose(close) => assert_eq!(
                close.reply_code, 403,
                "{who} declaring {name} again: {close:?}"
            ),
            m => panic!("{who} declaring {name} again: expected 403, got {m:?}"),
        }
    }
    other.close().await;
    c.close().await;
}

/// queue.delete with `if_unused` or `if_empty` of an idle, empty quorum queue: RabbitMQ 3.10
/// does not support the conditions on quorum queues and closes the connection with 540; the
/// queue stays.
async fn conditional_delete_of_a_quorum_queue_is_540_and_keeps_it(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("quorum-delete"));
    for (if_unused, if_empty) in [(true, false), (false, true)] {
        let mut c = RawClient::open(addr, Login::default()).await;
        c.open_channel(1).await;
        match c.call(1, &quorum_declare(&queue)).await {
            Method::QueueDeclareOk(_) => {}
            other => panic!("declaring quorum queue {queue}: {other:?}"),
        }
        c.send_method(
            1,
            &Method::QueueDelete(codec::QueueDelete {
                queue: ss(&queue),
                if_unused,
                if_empty,
                ..Default::default()
            }),
        )
        .await;
        let ending = within("connection.close", c.read_until_close()).await;
        assert_eq!(
            ending.code(),
            540,
            "queue.delete if_unused={if_unused} if_empty={if_empty} of a quorum queue: {ending:?}"
        );
        let mut check = RawClient::open(addr, Login::default()).await;
        check.open_channel(1).await;
        match check.call(1, &passive_declare(&queue)).await {
            Method::QueueDeclareOk(_) => {}
            other => panic!("{queue} after the refused delete: {other:?}"),
        }
        check.close().await;
    }
}

/// A passive queue.declare of `queue`.
fn passive_declare(queue: &str) -> Method {
    Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(queue),
        passive: true,
        ..Default::default()
    })
}

/// Asks on channel 1 of `c` until `queue` holds `n` messages (10 s at most): publishes without
/// confirms are counted once the broker has routed them.
async fn wait_for_messages(c: &mut RawClient, queue: &str, n: u32) {
    let passive = passive_declare(queue);
    within_for(
        Duration::from_secs(10),
        &format!("{n} messages in {queue}"),
        async {
            while !matches!(c.call(1, &passive).await,
            Method::QueueDeclareOk(ok) if ok.message_count == n)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

/// A service deletes the quorum queue it consumes, on the consumer's channel: the consumer is
/// cancelled (`consumer_cancel_notify`), the delete answered, and the connection and the
/// channel go on working. (Through warren, its own cancel of the consumer on the other
/// clusters crossed the delete there, and RabbitMQ 3.10 closed the link, so the client, with
/// 541.)
async fn deleting_a_consumed_quorum_queue_on_its_channel_keeps_the_connection(addr: SocketAddr) {
    let (_cleanup, queue) = Cleanup::with_queue("quorum-consumed");
    for round in 0..3 {
        let mut c = RawClient::open(addr, Login::default()).await;
        c.open_channel(1).await;
        assert!(matches!(
            c.call(1, &quorum_declare(&queue)).await,
            Method::QueueDeclareOk(_)
        ));
        let consume = Method::BasicConsume(codec::BasicConsume {
            queue: ss(&queue),
            consumer_tag: ss("service"),
            ..Default::default()
        });
        assert!(matches!(
            c.call(1, &consume).await,
            Method::BasicConsumeOk(_)
        ));
        let delete = Method::QueueDelete(codec::QueueDelete {
            queue: ss(&queue),
            ..Default::default()
        });
        c.send_method(1, &delete).await;
        let mut seen = Vec::new();
        within("the delete-ok", async {
            loop {
                let (ch, m) = c.read_method().await;
                seen.push(format!("ch{ch} {}", m.name()));
                match m {
                    Method::QueueDeleteOk(_) => break,
                    Method::ConnectionClose(close) => {
                        panic!("round {round}: connection closed: {close:?} after {seen:?}")
                    }
                    _ => {}
                }
            }
        })
        .await;
        // The channel and the connection still answer.
        let qos = Method::BasicQos(codec::BasicQos::default());
        c.send_method(1, &qos).await;
        within("a round trip after the delete", async {
            loop {
                let (ch, m) = c.read_method().await;
                seen.push(format!("ch{ch} {}", m.name()));
                match m {
                    Method::BasicQosOk(_) => break,
                    Method::ConnectionClose(_) | Method::ChannelClose(_) => {
                        panic!("round {round}: closed: {m:?} after {seen:?}")
                    }
                    _ => {}
                }
            }
        })
        .await;
        assert!(
            seen.iter().filter(|m| m.ends_with("basic.cancel")).count() <= 1,
            "round {round}: {seen:?}"
        );
        c.close().await;
    }
}

/// A client deletes the queue it consumes and cancels its consumer in one write (the queue may
/// as well go by another connection's hand while the cancel is on its way). The broker's
/// basic.cancel of the consumer (`consumer_cancel_notify`) may come before the client's
/// cancel-ok, never after it: by then the tag names nothing the client has (py-amqp raises
/// ConsumerCancelled for it).
async fn no_basic_cancel_follows_the_clients_own_cancel_ok(addr: SocketAddr) {
    let (_cleanup, queue) = Cleanup::with_queue("cancel-race");
    for round in 0..5 {
        let mut c = RawClient::open(addr, Login::default()).await;
        c.open_channel(1).await;
        let declare = Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(&queue),
            ..Default::default()
        });
        assert!(matches!(
            c.call(1, &declare).await,
            Method::QueueDeclareOk(_)
        ));
        let consume = Method::BasicConsume(codec::BasicConsume {
            queue: ss(&queue),
            consumer_tag: ss("race"),
            ..Default::default()
        });
        assert!(matches!(
            c.call(1, &consume).await,
            Method::BasicConsumeOk(_)
        ));
        let mut out = BytesMut::new();
        let delete = Method::QueueDelete(codec::QueueDelete {
            queue: ss(&queue),
            ..Default::default()
        });
        let cancel = Method::BasicCancel(codec::BasicCancel {
            consumer_tag: ss("race"),
            nowait: false,
        });
        codec::write_method(&mut out, 1, &delete);
        codec::write_method(&mut out, 1, &cancel);
        let qos = Method::BasicQos(codec::BasicQos::default());
        c.send(&out).await;
        let mut seen = Vec::new();
        // Up to the cancel-ok, then one round trip more: what the server had for the channel
        // comes before its reply.
        let mut asked = false;
        within("the replies", async {
            loop {
                let (ch, m) = c.read_method().await;
                if ch != 1 {
                    continue;
                }
                seen.push(m.name());
                match m {
                    Method::BasicCancelOk(_) if !asked => {
                        c.send_method(1, &qos).await;
                        asked = true;
                    }
                    Method::BasicQosOk(_) => break,
                    _ => {}
                }
            }
        })
        .await;
        let ok = seen.iter().position(|m| *m == "basic.cancel-ok");
        assert!(
            seen.contains(&"queue.delete-ok") && ok.is_some(),
            "round {round}: {seen:?}"
        );
        assert!(
            !seen[ok.unwrap_or(0)..].contains(&"basic.cancel"),
            "round {round}: a basic.cancel after the cancel-ok: {seen:?}"
        );
        c.close().await;
    }
}

/// RabbitMQ keeps two prefetch settings per channel, but a per-consumer basic.qos lifts the
/// channel's limit set before it (kombu sends one for a `Consumer(prefetch_count=N)` on a
/// channel with a global qos): with qos(2, global) then qos(5), a consumer of a queue holding
/// 10 messages gets 5, not 2.
async fn a_per_consumer_prefetch_lifts_the_channel_prefetch_set_before_it(addr: SocketAddr) {
    let (_cleanup, queue) = Cleanup::with_queue("prefetch-order");
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(&queue),
        ..Default::default()
    });
    assert!(matches!(
        c.call(1, &declare).await,
        Method::QueueDeclareOk(_)
    ));
    let frame_max = c.frame_max;
    for i in 0..10 {
        c.publish(1, "", &queue, format!("m{i}").as_bytes(), frame_max)
            .await;
    }
    wait_for_messages(&mut c, &queue, 10).await;
    c.close().await;
    // The consumer's connection sets both before it names a queue (before warren needs links
    // to the shard clusters), as a worker does.
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    for (prefetch_count, global) in [(2, true), (5, false)] {
        let qos = Method::BasicQos(codec::BasicQos {
            prefetch_count,
            global,
            ..Default::default()
        });
        assert!(matches!(c.call(1, &qos).await, Method::BasicQosOk(_)));
    }
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss(&queue),
        consumer_tag: ss("prefetch"),
        ..Default::default()
    });
    assert!(matches!(
        c.call(1, &consume).await,
        Method::BasicConsumeOk(_)
    ));
    let mut delivered = 0;
    while tokio::time::timeout(Duration::from_secs(1), c.read_delivery())
        .await
        .is_ok()
    {
        delivered += 1;
    }
    assert_eq!(delivered, 5, "deliveries held unacknowledged");
    c.close().await;
}

/// Celery's ETA tasks: a worker with prefetch 1 (`global`, as Celery sets it for classic
/// queues) keeps each ETA task unacknowledged until its time and raises its prefetch to 1 +
/// what it holds as each one arrives, acking the others at once. One broker delivers every
/// held message, then every new one. (Through warren, the one free place went to one shard
/// cluster each time: the other stayed shut at the one message it held, and half of the
/// messages, new ones included, waited for the ETA.)
async fn a_prefetch_raised_for_each_held_message_lets_every_message_through(addr: SocketAddr) {
    const HELD: usize = 10;
    let (_cleanup, queue) = Cleanup::with_queue("prefetch-raised");
    let mut p = RawClient::open(addr, Login::default()).await;
    p.open_channel(1).await;
    let declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(&queue),
        ..Default::default()
    });
    assert!(matches!(
        p.call(1, &declare).await,
        Method::QueueDeclareOk(_)
    ));
    let frame_max = p.frame_max;
    for _ in 0..HELD {
        p.publish(1, "", &queue, b"held", frame_max).await;
    }
    wait_for_messages(&mut p, &queue, HELD as u32).await;
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    let qos = |held: usize| {
        Method::BasicQos(codec::BasicQos {
            prefetch_count: 1 + held as u16,
            global: true,
            ..Default::default()
        })
    };
    assert!(matches!(c.call(1, &qos(0)).await, Method::BasicQosOk(_)));
    let consume = Method::BasicConsume(codec::BasicConsume {
        queue: ss(&queue),
        consumer_tag: ss("eta"),
        ..Default::default()
    });
    c.send_method(1, &consume).await;
    let (mut held, mut now) = (0, 0);
    let mut published_now = false;
    // Deliveries and replies as they come, until nothing has come for a second.
    while let Ok((method, body)) =
        tokio::time::timeout(Duration::from_secs(1), c.read_command()).await
    {
        let Method::BasicDeliver(d) = method else {
            continue;
        };
        if body.as_deref() == Some(&b"held"[..]) {
            held += 1;
            c.send_method(1, &qos(held)).await;
        } else {
            now += 1;
            let ack = Method::BasicAck(codec::BasicAck {
                delivery_tag: d.delivery_tag,
                multiple: false,
            });
            c.send_method(1, &ack).await;
        }
        if held == HELD && !published_now {
            published_now = true;
            for _ in 0..HELD {
                p.publish(1, "", &queue, b"now", frame_max).await;
            }
        }
    }
    assert_eq!(held, HELD, "held messages delivered");
    assert_eq!(
        now,
        if published_now { HELD } else { 0 },
        "new messages delivered"
    );
    c.close().await;
    p.close().await;
}

/// The user of [`limited_login`]: it may configure only queues whose names contain `limited-`
/// (test names start with a common prefix), and write and read everything, in vhost `/` of every test cluster (made once per
/// test run, on each cluster's first node; permissions are the clusters' own, the same on each).
const LIMITED_USER: &str = "warren-test-limited";

fn limited_login() -> Login {
    static MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        for (cluster, _) in support::sharded::SHARDED_CLUSTERS {
            let node = format!("{cluster}-1");
            let users = support::rabbit_ctl(&node, &["list_users", "-q"]);
            if !users
                .lines()
                .any(|l| l.split_whitespace().next() == Some(LIMITED_USER))
            {
                support::rabbit_ctl(&node, &["add_user", LIMITED_USER, "limited"]);
            }
            support::rabbit_ctl(
                &node,
                &[
                    "set_permissions",
                    "-p",
                    "/",
                    LIMITED_USER,
                    "limited-",
                    ".*",
                    ".*",
                ],
            );
        }
    });
    Login {
        user: LIMITED_USER.into(),
        password: "limited".into(),
        ..Login::default()
    }
}

/// RabbitMQ checks a user's configure permission on a queue before anything else about a
/// queue.declare or queue.delete: a user without it gets 403 ACCESS_REFUSED on the channel,
/// whatever the queue is. Shown where another answer would come first from what the queue is:
/// conditional deletes of a queue holding a message, of another connection's exclusive queue
/// and of a quorum queue (406, 405 and a 540 connection error for a user allowed), and a
/// stream declare (warren refuses streams with 540). A conditional delete of a queue that does
/// not exist, by a user allowed to configure it, is delete-ok, and leaves no queue behind.
async fn a_user_without_configure_permission_gets_403_before_any_other_refusal(addr: SocketAddr) {
    let login = tokio::task::block_in_place(limited_login);
    let mut cleanup = Cleanup::default();
    let full = cleanup.queue(&unique("denied-full"));
    let quorum = cleanup.queue(&unique("denied-quorum"));
    let exclusive = unique("denied-exclusive");
    let stream = cleanup.queue(&unique("denied-stream"));
    let missing = cleanup.queue(&unique("limited-missing"));
    let mut owner = RawClient::open(addr, Login::default()).await;
    owner.open_channel(1).await;
    for declare in [
        Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(&full),
            ..Default::default()
        }),
        Method::QueueDeclare(codec::QueueDeclare {
            queue: ss(&exclusive),
            exclusive: true,
            ..Default::default()
        }),
        quorum_declare(&quorum),
    ] {
        let ok = owner.call(1, &declare).await;
        assert!(matches!(ok, Method::QueueDeclareOk(_)), "{ok:?}");
    }
    let frame_max = owner.frame_max;
    owner.publish(1, "", &full, b"waiting", frame_max).await;
    wait_for_messages(&mut owner, &full, 1).await;

    let mut limited = RawClient::open(addr, login).await;
    let conditional = |queue: &str, if_empty: bool, if_unused: bool| {
        Method::QueueDelete(codec::QueueDelete {
            queue: ss(queue),
            if_empty,
            if_unused,
            ..Default::default()
        })
    };
    let mut stream_args = FieldTable::default();
    stream_args.insert(
        ss("x-queue-type"),
        FieldValue::LongStr(LongStr::from("stream")),
    );
    let stream_declare = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(&stream),
        durable: true,
        arguments: stream_args,
        ..Default::default()
    });
    let refused = [
        (conditional(&full, true, false), &full, (50, 40)),
        (conditional(&exclusive, false, true), &exclusive, (50, 40)),
        (conditional(&exclusive, true, false), &exclusive, (50, 40)),
        (conditional(&quorum, false, true), &quorum, (50, 40)),
        (conditional(&quorum, true, false), &quorum, (50, 40)),
        (stream_declare, &stream, (50, 10)),
    ];
    for (request, queue, ids) in refused {
        limited.open_channel(1).await;
        match limited.call(1, &request).await {
            Method::ChannelClose(close) => {
                assert_eq!(
                    close.reply_code,
                    403,
                    "{} of {queue}: {close:?}",
                    request.name()
                );
                let text = close.reply_text.as_str();
                assert!(
                    text.contains(&format!("access to queue '{queue}'"))
                        && text.contains(LIMITED_USER),
                    "{close:?}"
                );
                assert_eq!((close.class_id, close.method_id), ids, "{close:?}");
            }
            other => panic!("{} of {queue}: expected 403, got {other:?}", request.name()),
        }
        limited
            .send_method(1, &Method::ChannelCloseOk(Default::default()))
            .await;
    }
    limited.open_channel(1).await;
    let ok = limited.call(1, &conditional(&missing, true, true)).await;
    assert!(matches!(ok, Method::QueueDeleteOk(_)), "{ok:?}");
    limited.close().await;
    match owner.call(1, &passive_declare(&missing)).await {
        Method::ChannelClose(close) => assert_eq!(close.reply_code, 404, "{close:?}"),
        other => panic!("{missing} made by the check: {other:?}"),
    }
    owner
        .send_method(1, &Method::ChannelCloseOk(Default::default()))
        .await;
    owner.open_channel(1).await;
    match owner.call(1, &passive_declare(&full)).await {
        Method::QueueDeclareOk(ok) => assert_eq!(ok.message_count, 1, "{full} kept"),
        other => panic!("{full} after the refusals: {other:?}"),
    }
    owner.close().await;
}

fn delete_queue(queue: &str, if_empty: bool) -> Method {
    Method::QueueDelete(codec::QueueDelete {
        queue: ss(queue),
        if_empty,
        ..Default::default()
    })
}

/// A quorum queue of a control name (one cluster holds it), declared by one connection, then
/// deleted with `if_empty` by another: RabbitMQ closes that connection with 540 and keeps the
/// queue, whoever declared it.
async fn conditional_delete_of_a_control_quorum_queue_another_client_declared_is_540(
    addr: SocketAddr,
) {
    let queue = format!("celeryev.{}", unique("quorum"));
    let mut a = RawClient::open(addr, Login::default()).await;
    a.open_channel(1).await;
    match a.call(1, &quorum_declare(&queue)).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("declaring quorum queue {queue}: {other:?}"),
    }
    let mut b = RawClient::open(addr, Login::default()).await;
    b.open_channel(1).await;
    b.send_method(1, &delete_queue(&queue, true)).await;
    let ending = within("connection.close", b.read_until_close()).await;
    assert_eq!(ending.code(), 540, "if_empty delete of {queue}: {ending:?}");
    match a.call(1, &passive_declare(&queue)).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("{queue} after the refused delete: {other:?}"),
    }
    match a.call(1, &delete_queue(&queue, false)).await {
        Method::QueueDeleteOk(_) => {}
        other => panic!("deleting {queue}: {other:?}"),
    }
    a.close().await;
}

/// One connection declares a quorum queue; another deletes it and declares it again as a
/// classic queue; the first then deletes it with `if_empty`: RabbitMQ judges the queue as it is
/// now, a classic one, and deletes it (delete-ok), where the first connection's own declare
/// would say quorum (540).
async fn conditional_delete_of_a_quorum_queue_declared_again_as_classic_is_made(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("retyped"));
    let mut a = RawClient::open(addr, Login::default()).await;
    a.open_channel(1).await;
    match a.call(1, &quorum_declare(&queue)).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("declaring quorum queue {queue}: {other:?}"),
    }
    let mut b = RawClient::open(addr, Login::default()).await;
    b.open_channel(1).await;
    match b.call(1, &delete_queue(&queue, false)).await {
        Method::QueueDeleteOk(_) => {}
        other => panic!("deleting {queue}: {other:?}"),
    }
    let classic = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(&queue),
        durable: true,
        ..Default::default()
    });
    match b.call(1, &classic).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("declaring {queue} again as a classic queue: {other:?}"),
    }
    match a.call(1, &delete_queue(&queue, true)).await {
        Method::QueueDeleteOk(ok) => assert_eq!(ok.message_count, 0),
        other => panic!("if_empty delete of the classic {queue}: {other:?}"),
    }
    b.close().await;
    a.close().await;
}

/// A classic queue is redeclared as a quorum queue with `nowait` by one connection: RabbitMQ
/// refuses (channel.close 406) and the queue stays classic, so another connection's
/// `if_empty` delete of it is made (delete-ok), not refused as for a quorum queue (540).
async fn a_refused_nowait_redeclare_changes_nothing(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("nowait-redeclare"));
    let mut a = RawClient::open(addr, Login::default()).await;
    a.open_channel(1).await;
    let classic = Method::QueueDeclare(codec::QueueDeclare {
        queue: ss(&queue),
        durable: true,
        ..Default::default()
    });
    match a.call(1, &classic).await {
        Method::QueueDeclareOk(_) => {}
        other => panic!("declaring {queue}: {other:?}"),
    }
    let mut quorum = quorum_declare(&queue);
    if let Method::QueueDeclare(q) = &mut quorum {
        q.nowait = true;
    }
    a.send_method(1, &quorum).await;
    match within("the refusal", a.read_method()).await {
        (1, Method::ChannelClose(close)) => assert_eq!(close.reply_code, 406, "{close:?}"),
        other => panic!("a nowait quorum redeclare of the classic {queue}: {other:?}"),
    }
    a.send_method(1, &Method::ChannelCloseOk(Default::default()))
        .await;
    let mut b = RawClient::open(addr, Login::default()).await;
    b.open_channel(1).await;
    match b.call(1, &delete_queue(&queue, true)).await {
        Method::QueueDeleteOk(ok) => assert_eq!(ok.message_count, 0),
        other => panic!("if_empty delete of the classic {queue}: {other:?}"),
    }
    b.close().await;
    a.close().await;
}

/// How a raced request ended for one client: the reply's name, or the channel.close code.
async fn race_outcome(c: &mut RawClient) -> String {
    loop {
        match within("the raced request's answer", c.read_method()).await {
            (1, Method::ChannelClose(close)) => return close.reply_code.to_string(),
            (1, m) => return m.name().to_owned(),
            _ => {}
        }
    }
}

/// Sends `request(queue)` from two connections at the same moment, 10 times (a fresh queue
/// each time, `setup` run first on a third connection); each time exactly one must win, as on
/// one broker: the other gets `refused`. (Through several clusters, each cluster could pick its
/// own winner and both racers be refused.) A `nowait` request's winner is the one whose
/// basic.qos behind it is answered: `winner` is then "basic.qos-ok".
async fn race_twice(
    addr: SocketAddr,
    prefix: &str,
    setup: Option<fn(&str) -> Method>,
    request: fn(&str, usize) -> Method,
    winner: &str,
    refused: &str,
) {
    let mut cleanup = Cleanup::default();
    let mut outcomes = BTreeMap::new();
    for _ in 0..10 {
        let queue = cleanup.queue(&unique(prefix));
        // The name may be an exchange's (a raced exchange.declare).
        cleanup.exchange(&queue);
        if let Some(setup) = setup {
            let mut c = RawClient::open(addr, Login::default()).await;
            c.open_channel(1).await;
            c.call(1, &setup(&queue)).await;
            c.close().await;
        }
        let mut a = RawClient::open(addr, Login::default()).await;
        let mut b = RawClient::open(addr, Login::default()).await;
        a.open_channel(1).await;
        b.open_channel(1).await;
        let (mut wa, mut wb) = (BytesMut::new(), BytesMut::new());
        codec::write_method(&mut wa, 1, &request(&queue, 0));
        codec::write_method(&mut wb, 1, &request(&queue, 1));
        if !request(&queue, 0).expects_reply() {
            // A nowait request is answered by nothing: a basic.qos behind it tells whether the
            // channel is still open (its qos-ok) or was closed for it.
            let qos = Method::BasicQos(codec::BasicQos::default());
            codec::write_method(&mut wa, 1, &qos);
            codec::write_method(&mut wb, 1, &qos);
        }
        let (ra, rb) = tokio::join!(a.stream.write_all(&wa), b.stream.write_all(&wb));
        ra.and(rb).expect("sending the raced requests");
        let (oa, ob) = tokio::join!(race_outcome(&mut a), race_outcome(&mut b));
        let mut pair = [oa, ob];
        pair.sort();
        *outcomes.entry(pair.join("+")).or_insert(0) += 1;
        // A's queue, if exclusive, goes with A: close the winner last.
        b.close().await;
        a.close().await;
    }
    let mut want = [winner.to_owned(), refused.to_owned()];
    want.sort();
    assert_eq!(
        outcomes,
        BTreeMap::from([(want.join("+"), 10)]),
        "10 races of two connections: exactly one winner each time"
    );
}

/// Two connections declare the same exclusive queue at the same moment: one gets declare-ok,
/// the other 405 RESOURCE_LOCKED, every time.
async fn racing_exclusive_declares_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-exclusive",
        None,
        |q, _| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: ss(q),
                exclusive: true,
                ..Default::default()
            })
        },
        "queue.declare-ok",
        "405",
    )
    .await;
}

/// Two connections declare one queue at the same moment, one durable and one not: one gets
/// declare-ok, the other 406 PRECONDITION_FAILED (inequivalent arg 'durable'), every time, and
/// the queue is what the winner declared on every cluster.
async fn racing_conflicting_declares_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-durable",
        None,
        |q, racer| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: ss(q),
                durable: racer == 0,
                ..Default::default()
            })
        },
        "queue.declare-ok",
        "406",
    )
    .await;
}

/// Two connections start an exclusive consumer on one queue at the same moment: one gets
/// consume-ok, the other 403 ACCESS_REFUSED, every time.
async fn racing_exclusive_consumers_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-consumer",
        Some(|q| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: ss(q),
                ..Default::default()
            })
        }),
        |q, _| {
            Method::BasicConsume(codec::BasicConsume {
                queue: ss(q),
                exclusive: true,
                ..Default::default()
            })
        },
        "basic.consume-ok",
        "403",
    )
    .await;
}

/// Two connections declare one exchange with `nowait` at the same moment, one as fanout and
/// one as direct: one wins and the other's channel is closed with 406, every time. (Declares
/// sent to every cluster at once used to have both racers refused about half the time, the
/// exchange fanout on some clusters and direct on others: a binding then routed differently
/// from cluster to cluster.)
async fn racing_nowait_conflicting_exchange_declares_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-nowait-x",
        None,
        |q, racer| {
            Method::ExchangeDeclare(codec::ExchangeDeclare {
                exchange: ss(q),
                kind: ss(if racer == 0 { "fanout" } else { "direct" }),
                nowait: true,
                ..Default::default()
            })
        },
        "basic.qos-ok",
        "406",
    )
    .await;
}

/// Two connections declare the same exclusive queue with `nowait` at the same moment: one
/// owns it, the other's channel is closed with 405, every time (not each cluster's copy owned
/// by a different connection and both refused).
async fn racing_nowait_exclusive_declares_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-nowait-exclusive",
        None,
        |q, _| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: ss(q),
                exclusive: true,
                nowait: true,
                ..Default::default()
            })
        },
        "basic.qos-ok",
        "405",
    )
    .await;
}

/// Two connections start an exclusive consumer with `nowait` on one queue at the same moment:
/// one consumes, the other's channel is closed with 403, every time (not both refused).
async fn racing_nowait_exclusive_consumers_have_one_winner(addr: SocketAddr) {
    race_twice(
        addr,
        "race-nowait-consumer",
        Some(|q| {
            Method::QueueDeclare(codec::QueueDeclare {
                queue: ss(q),
                ..Default::default()
            })
        }),
        |q, _| {
            Method::BasicConsume(codec::BasicConsume {
                queue: ss(q),
                exclusive: true,
                nowait: true,
                ..Default::default()
            })
        },
        "basic.qos-ok",
        "403",
    )
    .await;
}

/// An exclusive consumer (connection A) on a queue: a consumer from connection B is refused with
/// 403 ACCESS_REFUSED; A keeps getting every message. Once A cancels, B consumes; then an
/// exclusive consumer from A is refused with 403 too (the queue has a consumer).
async fn exclusive_consumer_blocks_a_second_consumer_with_403(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("exclusive-consumer"));
    let a = connect(addr).await;
    let (ch, mut events) = open_channel(&a).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let (a_ch, mut a_events) = open_channel(&a).await;
    let args = BasicConsumeArguments::new(&queue, "")
        .manual_ack(false)
        .exclusive(true)
        .finish();
    let r = within("exclusive basic.consume", a_ch.basic_consume_rx(args)).await;
    let (a_tag, mut a_rx) = ok("exclusive basic.consume", &mut a_events, r).await;

    let b = connect(addr).await;
    let (b_ch, mut b_events) = open_channel(&b).await;
    let args = BasicConsumeArguments::new(&queue, "")
        .manual_ack(false)
        .finish();
    let r = within("basic.consume", b_ch.basic_consume_rx(args)).await;
    let what = format!("basic.consume of {queue} while A consumes it exclusively");
    assert_refused(&what, 403, &mut b_events, r).await;

    let sent = bodies(10, 0);
    confirmed_publishes(&a, "", &queue, &sent).await;
    let got = receive(&mut a_rx, sent.len(), "the exclusive consumer").await;
    assert_each_once(&got, &sent, &format!("exclusive consumer of {queue}"));
    cancel(&a_ch, &a_tag).await;

    let (b_ch, _b_events) = open_channel(&b).await;
    let (b_tag, _b_rx) = consume(&b_ch, &queue, false).await;
    let (a_ch, mut a_events) = open_channel(&a).await;
    let args = BasicConsumeArguments::new(&queue, "")
        .manual_ack(false)
        .exclusive(true)
        .finish();
    let r = within("exclusive basic.consume", a_ch.basic_consume_rx(args)).await;
    let what = format!("exclusive basic.consume of {queue} while B consumes it");
    assert_refused(&what, 403, &mut a_events, r).await;
    cancel(&b_ch, &b_tag).await;
    close_connection(b).await;
    close_connection(a).await;
}

// 9.4 Missing and reserved names

/// basic.consume of a queue that does not exist: channel.close 404 NOT_FOUND; the connection
/// carries on.
async fn consume_from_missing_queue_is_404(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("missing"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let args = BasicConsumeArguments::new(&queue, "").finish();
    let r = within("basic.consume", ch.basic_consume_rx(args)).await;
    let what = format!("basic.consume of the missing queue {queue}");
    assert_refused(&what, 404, &mut events, r).await;
    let (ch, mut events) = open_channel(&conn).await;
    let other = cleanup.queue(&unique("after-404"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&other)).await;
    close_connection(conn).await;
}

/// An RPC server checks that its caller is still there before it answers: a queue.declare,
/// passive or not, of the request's direct reply-to address answers declare-ok with that name
/// and one consumer while the caller consumes, and 404 once the caller has gone; the server's
/// connection carries on; a mandatory reply then comes back with basic.return naming that
/// address. (Through warren the address names its cluster; sent to every cluster, the others
/// closed the server's connection with 541.)
async fn passive_declare_of_a_reply_to_address_finds_the_caller(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("rpc-check"));
    let caller = connect(addr).await;
    let (ch, mut events) = open_channel(&caller).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let (_ctag, _replies) = consume(&ch, "amq.rabbitmq.reply-to", false).await;
    support::send_rpc_requests(&ch, &queue, 1).await;
    let server = connect(addr).await;
    let (sch, _server_events) = open_channel(&server).await;
    let (_stag, mut requests) = consume(&sch, &queue, false).await;
    let request = within("the request", requests.recv())
        .await
        .expect("request stream");
    let reply_to = request
        .basic_properties
        .expect("request properties")
        .reply_to()
        .expect("reply_to")
        .clone();
    for passive in [true, false] {
        let (check, mut check_events) = open_channel(&server).await;
        let args = QueueDeclareArguments::new(&reply_to)
            .passive(passive)
            .finish();
        let what = format!("queue.declare (passive: {passive}) of {reply_to}");
        let r = within(&what, check.queue_declare(args)).await;
        let (name, _messages, consumers) =
            ok(&what, &mut check_events, r).await.expect("declare-ok");
        assert_eq!((name.as_str(), consumers), (reply_to.as_str(), 1), "{what}");
    }
    close_connection(caller).await;
    let (check, mut check_events) = open_channel(&server).await;
    let args = QueueDeclareArguments::new(&reply_to).passive(true).finish();
    let what = format!("passive queue.declare of {reply_to} after the caller left");
    let r = within(&what, check.queue_declare(args)).await;
    assert_refused(&what, 404, &mut check_events, r).await;
    // A mandatory reply to the caller that has gone comes back naming the address it went to.
    let (rch, mut reply_events) = open_channel(&server).await;
    let mandatory = BasicPublishArguments::new("", &reply_to)
        .mandatory(true)
        .finish();
    publish_with(&rch, mandatory, b"too late").await;
    match reply_events.next().await {
        Event::Return {
            code, routing_key, ..
        } => assert_eq!((code, routing_key.as_str()), (312, reply_to.as_str())),
        other => panic!("expected basic.return of the reply, got {other:?}"),
    }
    let (ch, mut events) = open_channel(&server).await;
    let other = cleanup.queue(&unique("after-reply-check"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&other)).await;
    close_connection(server).await;
}

/// A passive exchange.declare of an exchange that does not exist: channel.close 404 NOT_FOUND.
async fn passive_declare_of_missing_exchange_is_404(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&unique("missing-x"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let args = ExchangeDeclareArguments::new(&exchange, "direct")
        .passive(true)
        .finish();
    let r = within("passive exchange.declare", ch.exchange_declare(args)).await;
    let what = format!("passive exchange.declare of the missing exchange {exchange}");
    assert_refused(&what, 404, &mut events, r).await;
    close_connection(conn).await;
}

/// basic.publish to an exchange that does not exist: channel.close 404 NOT_FOUND (asynchronous,
/// after the publish); the connection carries on.
async fn publish_to_missing_exchange_closes_the_channel_with_404(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&unique("missing-x"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    publish(&ch, &exchange, "key", b"to nowhere").await;
    let (code, text) = close_code(&mut events, "a publish to a missing exchange").await;
    assert_eq!(
        code, 404,
        "basic.publish to the missing exchange {exchange}: expected channel.close 404, got \
         {code} {text}"
    );
    let (ch, mut events) = open_channel(&conn).await;
    let other = cleanup.queue(&unique("after-404"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&other)).await;
    close_connection(conn).await;
}

/// queue.declare of a name starting with `amq.` (reserved to the broker): channel.close 403
/// ACCESS_REFUSED.
async fn declaring_an_amq_prefixed_queue_is_403(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&format!("amq.{}", unique("reserved")));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let r = within(
        "queue.declare",
        ch.queue_declare(QueueDeclareArguments::new(&queue)),
    )
    .await;
    assert_refused(&format!("queue.declare {queue}"), 403, &mut events, r).await;
    close_connection(conn).await;
}

/// exchange.declare of a name starting with `amq.` (reserved to the broker): channel.close 403
/// ACCESS_REFUSED.
async fn declaring_an_amq_prefixed_exchange_is_403(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let exchange = cleanup.exchange(&format!("amq.{}", unique("reserved")));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let args = ExchangeDeclareArguments::new(&exchange, "direct");
    let r = within("exchange.declare", ch.exchange_declare(args)).await;
    assert_refused(&format!("exchange.declare {exchange}"), 403, &mut events, r).await;
    close_connection(conn).await;
}

// 9.5 Channel modes

/// confirm.select on a channel in tx mode (after a committed publish): channel.close 406
/// PRECONDITION_FAILED; the committed message is in the queue.
async fn confirm_select_on_a_tx_channel_is_406(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("tx-then-confirm"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let r = within("tx.select", ch.tx_select()).await;
    ok("tx.select", &mut events, r).await;
    publish(&ch, "", &queue, b"committed").await;
    let r = within("tx.commit", ch.tx_commit()).await;
    ok("tx.commit", &mut events, r).await;
    let args = amqprs::channel::ConfirmSelectArguments::default();
    let r = within("confirm.select", ch.confirm_select(args)).await;
    assert_refused("confirm.select on a tx channel", 406, &mut events, r).await;
    assert_eq!(depth(&conn, &queue).await, Ok(1), "{queue} after tx.commit");
    close_connection(conn).await;
}

/// tx.select on a channel in confirm mode (after a confirmed publish): channel.close 406
/// PRECONDITION_FAILED; the confirmed message is in the queue.
async fn tx_select_on_a_confirm_channel_is_406(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("confirm-then-tx"));
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    confirm_select(&ch).await;
    publish(&ch, "", &queue, b"confirmed").await;
    assert_eq!(
        events.confirms(1).await,
        vec![true],
        "the publish's confirm"
    );
    let r = within("tx.select", ch.tx_select()).await;
    assert_refused("tx.select on a confirm channel", 406, &mut events, r).await;
    assert_eq!(
        depth(&conn, &queue).await,
        Ok(1),
        "{queue} after the confirm"
    );
    close_connection(conn).await;
}

/// How a raw client's request was refused: ("connection" or "channel", code, text).
async fn raw_refusal(c: &mut RawClient) -> (&'static str, u16, String) {
    loop {
        let f = within("the refusal", c.read_frame())
            .await
            .expect("undecodable frame from the server");
        let Some(f) = f else {
            panic!("the server closed the socket without connection.close or channel.close");
        };
        if f.kind != FrameKind::Method {
            continue;
        }
        match Method::decode(f.payload).expect("undecodable method") {
            Method::ConnectionClose(close) => {
                c.send_method(0, &Method::ConnectionCloseOk(Default::default()))
                    .await;
                let text = close.reply_text.as_str().into_owned();
                return ("connection", close.reply_code, text);
            }
            Method::ChannelClose(close) => {
                let text = close.reply_text.as_str().into_owned();
                return ("channel", close.reply_code, text);
            }
            _ => {}
        }
    }
}

/// basic.qos with prefetch_size 4096: RabbitMQ does not implement it and closes the connection
/// with 540 NOT_IMPLEMENTED ("prefetch_size!=0").
async fn basic_qos_with_prefetch_size_is_refused(addr: SocketAddr) {
    let mut c = RawClient::open(addr, Login::default()).await;
    c.open_channel(1).await;
    let qos = Method::BasicQos(codec::BasicQos {
        prefetch_size: 4096,
        prefetch_count: 10,
        global: false,
    });
    c.send_method(1, &qos).await;
    let (scope, code, text) = raw_refusal(&mut c).await;
    assert_eq!(
        (scope, code),
        ("connection", 540),
        "basic.qos with prefetch_size 4096: expected connection.close 540, got {scope}.close \
         {code} {text}"
    );
    assert!(
        text.contains("prefetch_size"),
        "the refusal of basic.qos with prefetch_size 4096 should say why: {text:?}"
    );
}

// 9.6 Consumer cancellation

/// Client A consumes a queue (amqprs advertises consumer_cancel_notify); client B deletes the
/// queue: A gets exactly one basic.cancel for its consumer tag, and its channel stays usable.
async fn consumer_is_cancelled_when_another_client_deletes_its_queue(addr: SocketAddr) {
    let mut cleanup = Cleanup::default();
    let queue = cleanup.queue(&unique("cancelled"));
    let a = connect(addr).await;
    let (ch, mut events) = open_channel(&a).await;
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    let (ctag, mut rx) = consume(&ch, &queue, false).await;

    let b = connect(addr).await;
    let (b_ch, mut b_events) = open_channel(&b).await;
    let r = within(
        "queue.delete",
        b_ch.queue_delete(QueueDeleteArguments::new(&queue)),
    )
    .await;
    ok(&format!("queue.delete {queue} by B"), &mut b_events, r).await;

    match events.next().await {
        Event::Cancel { consumer_tag } => assert_eq!(
            consumer_tag, ctag,
            "basic.cancel after B deleted {queue}: the consumer's tag"
        ),
        other => panic!("expected basic.cancel after B deleted {queue}, got {other:?}"),
    }
    let end = within("the consumer to end after basic.cancel", rx.recv()).await;
    assert!(
        end.is_none(),
        "a delivery after basic.cancel: {:?}",
        end.as_ref().map(body_of)
    );
    tokio::time::sleep(QUIET).await;
    if let Some(e) = events.try_next() {
        panic!("after the one basic.cancel: {e:?}");
    }
    let other = cleanup.queue(&unique("after-cancel"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&other)).await;
    close_connection(b).await;
    close_connection(a).await;
}

// 9.7 mandatory

/// Confirmed mandatory publishes that have a route, to a direct exchange bound to a queue and
/// to the queue through the default exchange: each acked, none returned; all in the queue.
async fn mandatory_publish_to_a_bound_queue_is_not_returned(addr: SocketAddr) {
    const N: usize = 10;
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let exchange = cleanup.exchange(&unique("mandatory-x"));
    exchange_declare(&ch, &mut events, &exchange, "direct", false).await;
    let queue = cleanup.queue(&unique("mandatory-q"));
    queue_declare(&ch, &mut events, QueueDeclareArguments::new(&queue)).await;
    queue_bind(&ch, &mut events, &queue, &exchange, "bound").await;

    confirm_select(&ch).await;
    for i in 0..N {
        let (x, key) = if i % 2 == 0 {
            (exchange.as_str(), "bound")
        } else {
            ("", queue.as_str())
        };
        let args = BasicPublishArguments::new(x, key).mandatory(true).finish();
        publish_with(&ch, args, format!("routable {i}").as_bytes()).await;
    }
    // Any basic.return fails here (an event other than a confirm).
    let acks = events.confirms(N as u64).await;
    assert!(acks.iter().all(|&a| a), "confirms: {acks:?}");
    tokio::time::sleep(QUIET).await;
    if let Some(e) = events.try_next() {
        panic!("after the confirms of routable mandatory publishes: {e:?}");
    }
    assert_eq!(
        depth(&conn, &queue).await,
        Ok(N as u32),
        "{queue} after {N} routable mandatory publishes"
    );
    close_connection(conn).await;
}

/// Confirmed mandatory publishes without a route, to an exchange with no binding and to a
/// missing queue through the default exchange: each returned once (312 NO_ROUTE), before its
/// ack.
async fn mandatory_publish_to_an_exchange_without_bindings_is_returned_once(addr: SocketAddr) {
    const N: u64 = 10;
    let mut cleanup = Cleanup::default();
    let conn = connect(addr).await;
    let (ch, mut events) = open_channel(&conn).await;
    let exchange = cleanup.exchange(&unique("unbound-x"));
    exchange_declare(&ch, &mut events, &exchange, "fanout", false).await;
    let missing = cleanup.queue(&unique("no-such-queue"));

    confirm_select(&ch).await;
    for i in 0..N {
        let (x, key) = if i % 2 == 0 {
            (exchange.as_str(), "any")
        } else {
            ("", missing.as_str())
        };
        let args = BasicPublishArguments::new(x, key).mandatory(true).finish();
        publish_with(&ch, args, format!("unroutable {i}").as_bytes()).await;
    }
    // Publish i has sequence number i + 1.
    let seq_of = |body: &[u8]| -> u64 {
        let text = String::from_utf8_lossy(body);
        let i: u64 = text
            .strip_prefix("unroutable ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("returned a message not published here: {text:?}"));
        i + 1
    };
    let mut returned = std::collections::BTreeSet::new();
    let mut acked = std::collections::BTreeSet::new();
    let mut log = Vec::new();
    while (acked.len() as u64) < N {
        let e = events.next().await;
        log.push(e.clone());
        match e {
            Event::Return { code, body, .. } => {
                assert_eq!(code, 312, "basic.return code (NO_ROUTE): {log:?}");
                let seq = seq_of(&body);
                assert!(
                    !acked.contains(&seq),
                    "{seq} returned after its ack: {log:?}"
                );
                assert!(returned.insert(seq), "{seq} returned twice: {log:?}");
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
                        "ack of {s} before its return: {log:?}"
                    );
                    assert!(acked.insert(s), "{s} acked twice: {log:?}");
                }
            }
            other => panic!("expected basic.return and basic.ack, got {other:?} ({log:?})"),
        }
    }
    tokio::time::sleep(QUIET).await;
    if let Some(e) = events.try_next() {
        panic!("after every publish was returned and acked: {e:?} ({log:?})");
    }
    close_connection(conn).await;
}
