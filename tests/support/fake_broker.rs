//! A scriptable stand-in for a RabbitMQ cluster, for tests of warren's session logic that must
//! run under a plain `cargo test` (no broker on the machine).
//!
//! A [`FakeCluster`] listens on one or more `127.0.0.1:0` ports (its *nodes*) and speaks as much
//! AMQP 0-9-1 as warren's links use, with warren's own codec (`warren::codec`, and
//! `warren::io::Assembler` to join method, header and body frames):
//!
//! * the handshake as RabbitMQ answers it (its product and capabilities), heartbeats, channels;
//! * exchanges and queues (passive declares answer 404 for unknown names), direct and fanout
//!   bindings, the default exchange;
//! * publishes stored per queue; on a confirm-mode channel each publish is acked, nacked or held
//!   as the test's [`FakeCluster::on_publish`] decides, and held ones are confirmed when the test
//!   says, in any order, with `multiple` or not ([`FakeCluster::confirm`]);
//! * consumers fed from the queues within the prefetch they were given, basic.get, and
//!   ack / nack / reject (with `multiple`, with or without requeue);
//! * transactions (publishes and acks applied at commit; the commit can be made to hang or to go
//!   unanswered, [`FakeCluster::on_commit`]);
//! * faults: drop a connection with an RST or a FIN, refuse new connections on a node, close a
//!   channel with a code, stall a connection's output (late replies, a hung node).
//!
//! The nodes of one cluster share its queues and exchanges, as the nodes of a RabbitMQ cluster
//! with mirrored queues do, so a link that fails over to the other node finds them there. Every
//! connection keeps a [`Ledger`] of what it received and sent, for the test to assert on.
//!
//! Simplifications (each one chosen so that a test can say exactly where a message is):
//! * a publish held for its confirm is routed only when acked: a connection that dies first
//!   loses it, as a node that dies before writing a message does (RabbitMQ may also have routed
//!   it; warren's duplicates in that case are documented, not tested here);
//! * topic exchanges match the routing key exactly; exchange-to-exchange bindings route nothing;
//! * basic.qos `prefetch_count` applies to every consumer of the channel (`global = false`) or
//!   to the channel as a whole (`global = true`), whenever the consumer was created.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use warren::codec::{
    self, BasicProperties, ContentHeader, FieldTable, FieldValue, FrameKind, LongStr, Method,
    ReplyCode, ShortStr,
};
use warren::io::{Assembler, Command};

/// A connection of a cluster, numbered from 0 in accept order (health probes included).
pub type ConnId = usize;

/// How long [`wait_for`] waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every few milliseconds until it returns `Some`, failing the test after
/// [`WAIT`] with `what`.
pub async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "not reached within {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ss(s: &str) -> ShortStr {
    ShortStr::try_from(s).expect("short string")
}

// ---------------------------------------------------------------------------------------------
// What the test sees and scripts

/// How a connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// SO_LINGER 0: the peer reads ECONNRESET (a node that vanished from the network).
    Rst,
    /// An orderly end of stream (a node process that exited).
    Fin,
}

/// What the broker does with a publish on a confirm-mode channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Route it and ack it at once.
    Ack,
    /// Refuse it (basic.nack), as a full `reject-publish` queue does; it is not routed.
    Nack,
    /// Keep it unconfirmed (and unrouted) until [`FakeCluster::confirm`] settles it.
    Hold,
}

/// What the broker does with a tx.commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitVerdict {
    /// Apply the transaction and answer commit-ok.
    Commit,
    /// Neither apply nor answer: the commit is lost if the connection dies.
    Hang,
    /// Apply the transaction but never answer (a node that dies right after committing).
    CommitSilently,
}

/// A publish on a confirm-mode channel, as [`FakeCluster::on_publish`] sees it.
#[derive(Debug, Clone)]
pub struct PublishInfo {
    pub conn: ConnId,
    pub node: usize,
    pub channel: u16,
    /// The channel's publish sequence number (what its confirm names).
    pub seq: u64,
    pub exchange: String,
    pub routing_key: String,
    pub body: Bytes,
}

/// One method a connection received or sent, with the body of its content.
#[derive(Debug, Clone)]
pub struct Frame {
    pub channel: u16,
    pub method: Method,
    pub body: Option<Bytes>,
}

/// Everything one connection received and sent, in order.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub node: usize,
    /// The handshake reached connection.open-ok (false for warren's probes).
    pub opened: bool,
    /// The socket is still up.
    pub alive: bool,
    pub received: Vec<Frame>,
    pub sent: Vec<Frame>,
    /// Methods received on a channel that was not open, which RabbitMQ answers by closing the
    /// connection (504): each is a bug in warren.
    pub violations: Vec<String>,
}

impl Ledger {
    /// The received methods called `name` ("basic.qos"), with their channel.
    pub fn received_named(&self, name: &str) -> Vec<(u16, Method)> {
        named(&self.received, name)
    }

    /// The sent methods called `name`, with their channel.
    pub fn sent_named(&self, name: &str) -> Vec<(u16, Method)> {
        named(&self.sent, name)
    }

    /// Bodies of the publishes received on `channel`, in order.
    pub fn published(&self, channel: u16) -> Vec<Bytes> {
        self.received
            .iter()
            .filter(|f| f.channel == channel && matches!(f.method, Method::BasicPublish(_)))
            .filter_map(|f| f.body.clone())
            .collect()
    }

    /// The basic.ack / basic.nack / basic.reject received on `channel`, in order.
    pub fn settlements(&self, channel: u16) -> Vec<Method> {
        self.received
            .iter()
            .filter(|f| f.channel == channel)
            .filter(|f| {
                matches!(
                    f.method,
                    Method::BasicAck(_) | Method::BasicNack(_) | Method::BasicReject(_)
                )
            })
            .map(|f| f.method.clone())
            .collect()
    }
}

fn named(frames: &[Frame], name: &str) -> Vec<(u16, Method)> {
    frames
        .iter()
        .filter(|f| f.method.name() == name)
        .map(|f| (f.channel, f.method.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The cluster's state: one lock over everything, so each command is handled atomically and a
// delivery can go from one connection's publish to another's consumer at once.

/// A stored message. The content header is kept as received, so a delivery carries the
/// publisher's properties.
#[derive(Debug, Clone)]
struct Message {
    header: Bytes,
    body: Bytes,
    exchange: ShortStr,
    routing_key: ShortStr,
    redelivered: bool,
}

#[derive(Debug, Default)]
struct Exchange {
    fanout: bool,
    /// (queue, routing key).
    bindings: Vec<(String, String)>,
}

#[derive(Debug)]
struct Consumer {
    tag: ShortStr,
    queue: String,
    no_ack: bool,
}

/// A delivery the client has not settled yet.
#[derive(Debug)]
struct Unacked {
    queue: String,
    /// None for basic.get.
    consumer: Option<ShortStr>,
    message: Message,
}

/// An ack, nack or reject of a client, deferred to the commit on a tx channel.
#[derive(Debug, Clone, Copy)]
struct Settle {
    tag: u64,
    multiple: bool,
    /// None: ack; Some(requeue): nack or reject.
    requeue: Option<bool>,
}

#[derive(Debug, Default)]
struct Chan {
    /// The broker sent channel.close: everything but close / close-ok is discarded.
    closing: bool,
    confirm: bool,
    tx: bool,
    next_seq: u64,
    /// Publishes held for their confirm, by sequence number: the queues they route to.
    held: BTreeMap<u64, (Vec<String>, Message)>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    consumers: Vec<Consumer>,
    prefetch: u16,
    global_prefetch: u16,
    tx_publishes: Vec<(Vec<String>, Message)>,
    tx_settles: Vec<Settle>,
}

/// What a connection's socket task is told to do, in order.
enum Out {
    Bytes(Bytes),
    Close(Kill),
    /// Stop writing (keep what is queued, heartbeats included) or resume.
    Stall(bool),
    /// Resume, writing what waited as one stream cut into pieces of this many bytes, a
    /// millisecond apart: frames and commands reach the peer split across its reads.
    Release(usize),
}

struct Conn {
    out: mpsc::UnboundedSender<Out>,
    ledger: Ledger,
    channels: BTreeMap<u16, Chan>,
    frame_max: usize,
}

type PublishScript = Box<dyn FnMut(&PublishInfo) -> Verdict + Send>;
type CommitScript = Box<dyn FnMut(ConnId, u16) -> CommitVerdict + Send>;

struct State {
    name: String,
    conns: Vec<Conn>,
    queues: BTreeMap<String, VecDeque<Message>>,
    exchanges: BTreeMap<String, Exchange>,
    refusing: Vec<bool>,
    /// Connections each node refused.
    refused: Vec<usize>,
    /// The only password a login may give (PLAIN's response ends with it); `None`: any.
    password: Option<String>,
    /// Queues whose (non-passive) declare is refused with 403, as for a user without configure
    /// permission on them.
    denied: BTreeSet<String>,
    on_publish: PublishScript,
    on_commit: CommitScript,
    next_name: u64,
    /// Turns over the consumers of a queue.
    round: usize,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The cluster handle

/// A fake RabbitMQ cluster of one or more nodes (see the module docs).
pub struct FakeCluster {
    name: String,
    addrs: Vec<SocketAddr>,
    state: Arc<Mutex<State>>,
    acceptors: Vec<JoinHandle<()>>,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        for a in &self.acceptors {
            a.abort();
        }
        for c in &lock(&self.state).conns {
            let _ = c.out.send(Out::Close(Kill::Fin));
        }
    }
}

impl FakeCluster {
    /// Starts a cluster called `name` with `nodes` nodes, each on its own port. Must be called
    /// inside a tokio runtime (the tasks run there).
    pub async fn start(name: &str, nodes: usize) -> FakeCluster {
        let mut exchanges = BTreeMap::new();
        for x in ["", "amq.direct", "amq.topic", "amq.headers", "amq.match"] {
            exchanges.insert(x.to_owned(), Exchange::default());
        }
        exchanges.insert(
            "amq.fanout".to_owned(),
            Exchange {
                fanout: true,
                ..Exchange::default()
            },
        );
        let state = Arc::new(Mutex::new(State {
            name: name.to_owned(),
            conns: Vec::new(),
            queues: BTreeMap::new(),
            exchanges,
            refusing: vec![false; nodes],
            refused: vec![0; nodes],
            password: None,
            denied: BTreeSet::new(),
            on_publish: Box::new(|_| Verdict::Ack),
            on_commit: Box::new(|_, _| CommitVerdict::Commit),
            next_name: 0,
            round: 0,
        }));
        let mut addrs = Vec::new();
        let mut acceptors = Vec::new();
        for node in 0..nodes {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("local addr"));
            acceptors.push(tokio::spawn(accept(listener, node, state.clone())));
        }
        FakeCluster {
            name: name.to_owned(),
            addrs,
            state,
            acceptors,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `host:port` of each node, in order (for the proxy's configuration).
    pub fn nodes(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }

    // ----- scripts and faults ------------------------------------------------------------

    /// Decides, from now on, what happens to each publish on a confirm-mode channel.
    pub fn on_publish(&self, f: impl FnMut(&PublishInfo) -> Verdict + Send + 'static) {
        lock(&self.state).on_publish = Box::new(f);
    }

    /// Decides, from now on, what happens to each tx.commit (connection, channel).
    pub fn on_commit(&self, f: impl FnMut(ConnId, u16) -> CommitVerdict + Send + 'static) {
        lock(&self.state).on_commit = Box::new(f);
    }

    /// Node `node` accepts new TCP connections and drops them at once (`true`), or serves them.
    pub fn refuse(&self, node: usize, refuse: bool) {
        lock(&self.state).refusing[node] = refuse;
    }

    /// From now on a login must give `password`, or gets connection.close 403, as RabbitMQ
    /// answers a wrong password.
    pub fn require_password(&self, password: &str) {
        lock(&self.state).password = Some(password.to_owned());
    }

    /// Refuses (`true`) or allows again a non-passive queue.declare and a queue.delete of `queue`
    /// with 403 ACCESS_REFUSED, as RabbitMQ refuses a user without configure permission on it.
    pub fn deny_declare(&self, queue: &str, deny: bool) {
        let mut s = lock(&self.state);
        if deny {
            s.denied.insert(queue.to_owned());
        } else {
            s.denied.remove(queue);
        }
    }

    /// How many connections node `node` refused so far.
    pub fn refused(&self, node: usize) -> usize {
        lock(&self.state).refused[node]
    }

    /// Drops connection `conn`. Its unacknowledged deliveries are requeued and its held
    /// confirms and open transactions forgotten once the socket is closed, as RabbitMQ does.
    pub fn kill(&self, conn: ConnId, how: Kill) {
        let _ = lock(&self.state).conns[conn].out.send(Out::Close(how));
    }

    /// Connection `conn` stops writing (`true`): it still reads and handles what it reads, but
    /// its replies, deliveries, confirms and heartbeats wait, in order, until it resumes
    /// (`false`). A broker that answers late, or a stalled node.
    pub fn stall(&self, conn: ConnId, stall: bool) {
        let _ = lock(&self.state).conns[conn].out.send(Out::Stall(stall));
    }

    /// Resumes a stalled connection as [`stall`](Self::stall)`(conn, false)` does, but writes
    /// what waited as one stream cut into `piece`-byte pieces, a millisecond apart, so that
    /// frames and commands reach warren split across its reads.
    pub fn release_in_pieces(&self, conn: ConnId, piece: usize) {
        let _ = lock(&self.state).conns[conn]
            .out
            .send(Out::Release(piece.max(1)));
    }

    /// Closes connection `conn` with connection.close `code` and `text`, as RabbitMQ closes
    /// every connection of a node that stops (320, "broker forced connection closure with
    /// reason 'shutdown'") or one connection an operator closes; the socket ends at the peer's
    /// close-ok.
    pub fn close_connection(&self, conn: ConnId, code: ReplyCode, text: &str) {
        let mut s = lock(&self.state);
        let close = Method::ConnectionClose(codec::ConnectionClose {
            reply_code: code.code(),
            reply_text: ss(&code.text(text)),
            class_id: 0,
            method_id: 0,
        });
        s.send(conn, 0, close, None);
        s.dispatch();
    }

    /// Closes channel `channel` of `conn` with `code` (its unacked deliveries are requeued).
    pub fn close_channel(&self, conn: ConnId, channel: u16, code: ReplyCode, detail: &str) {
        let mut s = lock(&self.state);
        s.channel_error(conn, channel, code, detail, (0, 0));
        s.dispatch();
    }

    /// Settles held publishes of `conn`'s `channel`: `seq` alone, or with `multiple` every held
    /// one up to `seq`; acked ones are routed. Panics when that settles nothing (a test bug).
    pub fn confirm(&self, conn: ConnId, channel: u16, seq: u64, multiple: bool, ack: bool) {
        let mut s = lock(&self.state);
        let chan = s.conns[conn]
            .channels
            .get_mut(&channel)
            .expect("confirm on an open channel");
        let seqs: Vec<u64> = if multiple {
            chan.held.range(..=seq).map(|(k, _)| *k).collect()
        } else {
            chan.held
                .contains_key(&seq)
                .then_some(seq)
                .into_iter()
                .collect()
        };
        assert!(
            !seqs.is_empty(),
            "no held publish {seq} (multiple: {multiple}) on {conn}/{channel}"
        );
        let settled: Vec<_> = seqs.iter().filter_map(|k| chan.held.remove(k)).collect();
        if ack {
            for (queues, m) in settled {
                s.route(&queues, m);
            }
        }
        let method = if ack {
            Method::BasicAck(codec::BasicAck {
                delivery_tag: seq,
                multiple,
            })
        } else {
            Method::BasicNack(codec::BasicNack {
                delivery_tag: seq,
                multiple,
                requeue: false,
            })
        };
        s.send(conn, channel, method, None);
        s.dispatch();
    }

    /// Puts a message on `queue` (created if missing), as if published there.
    pub fn enqueue(&self, queue: &str, body: &[u8]) {
        let mut header = BytesMut::new();
        ContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: BasicProperties::default(),
        }
        .encode(&mut header);
        let mut s = lock(&self.state);
        s.queues.entry(queue.to_owned()).or_default();
        let m = Message {
            header: header.freeze(),
            body: Bytes::copy_from_slice(body),
            exchange: ShortStr::default(),
            routing_key: ss(queue),
            redelivered: false,
        };
        s.route(&[queue.to_owned()], m);
        s.dispatch();
    }

    /// Deletes `queue` (as another client would), cancelling its consumers.
    pub fn delete_queue(&self, queue: &str) {
        let mut s = lock(&self.state);
        s.delete_queue(queue);
    }

    /// Deletes exchange `name` (as another client would, or RabbitMQ when an auto-delete
    /// exchange loses its last binding).
    pub fn delete_exchange(&self, name: &str) {
        lock(&self.state).exchanges.remove(name);
    }

    /// Whether exchange `name` exists.
    pub fn has_exchange(&self, name: &str) -> bool {
        lock(&self.state).exchanges.contains_key(name)
    }

    /// Whether `queue` is bound to `exchange` with `key`.
    pub fn has_binding(&self, exchange: &str, queue: &str, key: &str) -> bool {
        lock(&self.state)
            .exchanges
            .get(exchange)
            .is_some_and(|x| x.bindings.contains(&(queue.to_owned(), key.to_owned())))
    }

    // ----- inspection --------------------------------------------------------------------

    /// The ledger of connection `conn`.
    pub fn ledger(&self, conn: ConnId) -> Ledger {
        lock(&self.state).conns[conn].ledger.clone()
    }

    /// Connections that completed the handshake and are still up (warren's live links here).
    pub fn links(&self) -> Vec<ConnId> {
        lock(&self.state)
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ledger.opened && c.ledger.alive)
            .map(|(i, _)| i)
            .collect()
    }

    /// Every connection that completed the handshake, up or not, in accept order.
    pub fn opened(&self) -> Vec<ConnId> {
        lock(&self.state)
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ledger.opened)
            .map(|(i, _)| i)
            .collect()
    }

    /// Waits until exactly one link is up, and returns it.
    pub async fn only_link(&self) -> ConnId {
        wait_for(&format!("one link to {}", self.name), || {
            let links = self.links();
            (links.len() == 1).then(|| links[0])
        })
        .await
    }

    /// Bodies of the messages ready on `queue` (empty when it does not exist).
    pub fn ready(&self, queue: &str) -> Vec<Bytes> {
        lock(&self.state)
            .queues
            .get(queue)
            .map(|q| q.iter().map(|m| m.body.clone()).collect())
            .unwrap_or_default()
    }

    pub fn has_queue(&self, queue: &str) -> bool {
        lock(&self.state).queues.contains_key(queue)
    }

    /// Bodies delivered to `conn` and not settled yet, on every channel, by delivery tag.
    pub fn unacked(&self, conn: ConnId) -> Vec<Bytes> {
        let s = lock(&self.state);
        s.conns[conn]
            .channels
            .values()
            .flat_map(|c| c.unacked.values().map(|u| u.message.body.clone()))
            .collect()
    }

    /// Sequence numbers of the publishes `conn` holds on `channel` for their confirm.
    pub fn held(&self, conn: ConnId, channel: u16) -> Vec<u64> {
        let s = lock(&self.state);
        s.conns[conn]
            .channels
            .get(&channel)
            .map(|c| c.held.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Bodies `conn` holds on `channel` for their confirm, by sequence number.
    pub fn held_bodies(&self, conn: ConnId, channel: u16) -> Vec<(u64, Bytes)> {
        let s = lock(&self.state);
        s.conns[conn]
            .channels
            .get(&channel)
            .map(|c| {
                c.held
                    .iter()
                    .map(|(k, (_, m))| (*k, m.body.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets: one acceptor per node, one task per connection. The task reads frames into commands
// for the state to handle and writes what the state queued for it, in order.

async fn accept(listener: TcpListener, node: usize, state: Arc<Mutex<State>>) {
    while let Ok((stream, _)) = listener.accept().await {
        {
            let mut s = lock(&state);
            if s.refusing[node] {
                // Accepted and closed at once: the handshake fails, the next node is tried.
                s.refused[node] += 1;
                drop(stream);
                continue;
            }
        }
        tokio::spawn(serve(stream, node, state.clone()));
    }
}

async fn serve(mut stream: TcpStream, node: usize, state: Arc<Mutex<State>>) {
    let _ = stream.set_nodelay(true);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut s = lock(&state);
        s.conns.push(Conn {
            out: tx,
            ledger: Ledger {
                node,
                alive: true,
                ..Ledger::default()
            },
            channels: BTreeMap::new(),
            frame_max: codec::FRAME_MIN_SIZE as usize,
        });
        s.conns.len() - 1
    };
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut assembler = Assembler::new(u64::MAX);
    let mut greeted = false;
    // Heartbeats once the peer asked for them in tune-ok, at half its interval.
    let mut heartbeat: Option<tokio::time::Interval> = None;
    let mut kill = None;
    // While stalled, what would be written waits here.
    let mut stalled: Option<Vec<Bytes>> = None;
    // An orderly close asked for while stalled (see `Out::Close`).
    let mut close_after_stall = false;
    {
        let (mut rd, mut wr) = stream.split();
        'conn: loop {
            tokio::select! {
                r = rd.read_buf(&mut buf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        break;
                    }
                    if !greeted {
                        if buf.len() < codec::PROTOCOL_HEADER.len() {
                            continue;
                        }
                        if &buf[..8] != codec::PROTOCOL_HEADER {
                            let _ = wr.write_all(codec::PROTOCOL_HEADER).await;
                            break;
                        }
                        let _ = buf.split_to(8);
                        greeted = true;
                        lock(&state).greet(id);
                    }
                    loop {
                        let frame = match codec::decode_frame(&mut buf, 0) {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(_) => break 'conn,
                        };
                        if frame.kind == FrameKind::Heartbeat {
                            continue;
                        }
                        match assembler.push(frame) {
                            Ok(Some(cmd)) => {
                                if let Method::ConnectionTuneOk(t) = &cmd.method && t.heartbeat > 0 {
                                    let period = Duration::from_secs(u64::from(t.heartbeat)) / 2;
                                    heartbeat = Some(tokio::time::interval(period));
                                }
                                lock(&state).handle(id, cmd);
                            }
                            Ok(None) => {}
                            Err(_) => break 'conn,
                        }
                    }
                }
                out = rx.recv() => match out {
                    Some(Out::Bytes(b)) => {
                        if let Some(backlog) = stalled.as_mut() {
                            backlog.push(b);
                        } else if wr.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::Stall(true)) => {
                        stalled.get_or_insert_with(Vec::new);
                    }
                    Some(Out::Stall(false)) => {
                        for b in stalled.take().unwrap_or_default() {
                            if wr.write_all(&b).await.is_err() {
                                break 'conn;
                            }
                        }
                        if close_after_stall {
                            kill = Some(Kill::Fin);
                            break;
                        }
                    }
                    Some(Out::Release(piece)) => {
                        let backlog = stalled.take().unwrap_or_default().concat();
                        for chunk in backlog.chunks(piece) {
                            if wr.write_all(chunk).await.is_err() {
                                break 'conn;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    // A stalled connection's orderly close waits behind its replies, as
                    // its close-ok does; a reset is at once.
                    Some(Out::Close(Kill::Fin)) if stalled.is_some() => close_after_stall = true,
                    Some(Out::Close(how)) => {
                        kill = Some(how);
                        break;
                    }
                    None => break,
                },
                _ = async { heartbeat.as_mut().expect("checked").tick().await }, if heartbeat.is_some() => {
                    if stalled.is_some() {
                        continue;
                    }
                    let mut b = BytesMut::new();
                    codec::write_heartbeat(&mut b);
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    if kill == Some(Kill::Rst) {
        #[allow(deprecated)] // SO_LINGER 0 does not block: the drop resets at once.
        let _ = stream.set_linger(Some(Duration::ZERO));
    } else {
        let _ = stream.shutdown().await;
    }
    drop(stream);
    let mut s = lock(&state);
    s.gone(id);
    s.dispatch();
}

// ---------------------------------------------------------------------------------------------
// The protocol

impl State {
    /// Queues a method (and its content) for connection `id`, noting it in the ledger.
    fn send(&mut self, id: ConnId, ch: u16, method: Method, content: Option<(&Bytes, &Bytes)>) {
        let conn = &mut self.conns[id];
        let mut out = BytesMut::new();
        codec::write_method(&mut out, ch, &method);
        if let Some((header, body)) = content {
            codec::write_header_raw(&mut out, ch, header);
            codec::write_body(&mut out, ch, body, conn.frame_max);
        }
        conn.ledger.sent.push(Frame {
            channel: ch,
            method,
            body: content.map(|(_, b)| b.clone()),
        });
        let _ = conn.out.send(Out::Bytes(out.freeze()));
    }

    /// Answers `method` unless the client asked for no reply.
    fn reply(&mut self, id: ConnId, ch: u16, nowait: bool, method: Method) {
        if !nowait {
            self.send(id, ch, method, None);
        }
    }

    /// The protocol header came: connection.start, with what RabbitMQ 3.13 advertises.
    fn greet(&mut self, id: ConnId) {
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(ss(cap), FieldValue::Bool(true));
        }
        let mut props = FieldTable::default();
        for (k, v) in [
            ("product", "RabbitMQ"),
            ("version", "3.13.7"),
            ("platform", "Erlang/OTP 26.2"),
            ("cluster_name", self.name.as_str()),
        ] {
            props.insert(ss(k), FieldValue::LongStr(LongStr::from(v)));
        }
        props.insert(ss("capabilities"), FieldValue::Table(caps));
        let start = Method::ConnectionStart(codec::ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: LongStr::from("PLAIN AMQPLAIN"),
            locales: LongStr::from("en_US"),
        });
        self.send(id, 0, start, None);
    }

    /// The socket of `id` is closed: what RabbitMQ does when a connection ends.
    fn gone(&mut self, id: ConnId) {
        self.conns[id].ledger.alive = false;
        let channels: Vec<u16> = self.conns[id].channels.keys().copied().collect();
        for ch in channels {
            self.drop_channel(id, ch);
        }
    }

    /// Forgets channel `ch` of `id`: unacked deliveries requeued (oldest first in the queue,
    /// marked redelivered), consumers, held confirms and the open transaction dropped.
    fn drop_channel(&mut self, id: ConnId, ch: u16) {
        let Some(chan) = self.conns[id].channels.remove(&ch) else {
            return;
        };
        for (_, u) in chan.unacked.into_iter().rev() {
            self.requeue(u);
        }
    }

    fn requeue(&mut self, u: Unacked) {
        if let Some(q) = self.queues.get_mut(&u.queue) {
            q.push_front(Message {
                redelivered: true,
                ..u.message
            });
        }
    }

    /// Closes channel `ch` with an error, as RabbitMQ does when it refuses a method.
    fn channel_error(
        &mut self,
        id: ConnId,
        ch: u16,
        code: ReplyCode,
        detail: &str,
        (class_id, method_id): (u16, u16),
    ) {
        let close = Method::ChannelClose(codec::ChannelClose {
            reply_code: code.code(),
            reply_text: ss(&code.text(detail)),
            class_id,
            method_id,
        });
        self.send(id, ch, close, None);
        // Requeue now; the channel stays (closing) until the peer's close-ok.
        if let Some(chan) = self.conns[id].channels.get_mut(&ch) {
            let unacked = std::mem::take(&mut chan.unacked);
            *chan = Chan {
                closing: true,
                ..Chan::default()
            };
            for (_, u) in unacked.into_iter().rev() {
                self.requeue(u);
            }
        }
    }

    fn handle(&mut self, id: ConnId, cmd: Command) {
        let Command {
            channel: ch,
            method,
            content,
        } = cmd;
        let header = content.as_ref().map(|c| c.header.clone());
        let body = content.as_ref().map(|c| c.body_bytes());
        self.conns[id].ledger.received.push(Frame {
            channel: ch,
            method: method.clone(),
            body: body.clone(),
        });
        if ch == 0 {
            self.on_connection_method(id, method);
        } else {
            self.on_channel_method(id, ch, method, header, body);
        }
        self.dispatch();
    }

    fn on_connection_method(&mut self, id: ConnId, method: Method) {
        match method {
            Method::ConnectionStartOk(ok) => {
                if let Some(p) = &self.password
                    && !ok
                        .response
                        .as_bytes()
                        .ends_with(format!("\0{p}").as_bytes())
                {
                    let close = Method::ConnectionClose(codec::ConnectionClose {
                        reply_code: 403,
                        reply_text: codec::ShortStr::from_static(
                            "ACCESS_REFUSED - Login was refused",
                        ),
                        class_id: 0,
                        method_id: 0,
                    });
                    self.send(id, 0, close, None);
                    let _ = self.conns[id].out.send(Out::Close(Kill::Fin));
                    return;
                }
                let tune = Method::ConnectionTune(codec::ConnectionTune {
                    channel_max: 2047,
                    frame_max: 131_072,
                    heartbeat: 60,
                });
                self.send(id, 0, tune, None);
            }
            Method::ConnectionTuneOk(t) => {
                self.conns[id].frame_max =
                    (t.frame_max as usize).max(codec::FRAME_MIN_SIZE as usize);
            }
            Method::ConnectionOpen(_) => {
                self.conns[id].ledger.opened = true;
                self.send(id, 0, Method::ConnectionOpenOk(Default::default()), None);
            }
            Method::ConnectionClose(_) => {
                self.send(id, 0, Method::ConnectionCloseOk(Default::default()), None);
                let _ = self.conns[id].out.send(Out::Close(Kill::Fin));
            }
            Method::ConnectionCloseOk(_) => {
                let _ = self.conns[id].out.send(Out::Close(Kill::Fin));
            }
            _ => {}
        }
    }

    fn on_channel_method(
        &mut self,
        id: ConnId,
        ch: u16,
        method: Method,
        header: Option<Bytes>,
        body: Option<Bytes>,
    ) {
        let ids = method.ids();
        if let Method::ChannelOpen(_) = method {
            self.drop_channel(id, ch);
            self.conns[id].channels.insert(ch, Chan::default());
            let ok = Method::ChannelOpenOk(Default::default());
            return self.send(id, ch, ok, None);
        }
        let Some(chan) = self.conns[id].channels.get_mut(&ch) else {
            // Not open: RabbitMQ closes the connection.
            let name = method.name();
            self.conns[id]
                .ledger
                .violations
                .push(format!("{name} on channel {ch}, which is not open"));
            let close = Method::ConnectionClose(codec::ConnectionClose {
                reply_code: ReplyCode::ChannelError.code(),
                reply_text: ss(&ReplyCode::ChannelError.text("expected 'channel.open'")),
                class_id: ids.0,
                method_id: ids.1,
            });
            return self.send(id, 0, close, None);
        };
        if chan.closing {
            // As RabbitMQ: closes that crossed are answered with close-ok, and the channel
            // stays closing until the peer's close-ok for ours; anything else is dropped.
            match method {
                Method::ChannelCloseOk(_) => {
                    self.conns[id].channels.remove(&ch);
                }
                Method::ChannelClose(_) => {
                    self.send(id, ch, Method::ChannelCloseOk(Default::default()), None);
                }
                _ => {}
            }
            return;
        }
        match method {
            Method::ChannelClose(_) => {
                self.drop_channel(id, ch);
                self.send(id, ch, Method::ChannelCloseOk(Default::default()), None);
            }
            Method::ChannelFlow(f) => {
                let ok = Method::ChannelFlowOk(codec::ChannelFlowOk { active: f.active });
                self.send(id, ch, ok, None);
            }

            // ----- modes
            Method::ConfirmSelect(c) => {
                if chan.tx {
                    let text = "cannot switch from tx to confirm mode";
                    return self.channel_error(id, ch, ReplyCode::PreconditionFailed, text, ids);
                }
                chan.confirm = true;
                self.reply(
                    id,
                    ch,
                    c.nowait,
                    Method::ConfirmSelectOk(Default::default()),
                );
            }
            Method::TxSelect(_) => {
                if chan.confirm {
                    let text = "cannot switch from confirm to tx mode";
                    return self.channel_error(id, ch, ReplyCode::PreconditionFailed, text, ids);
                }
                chan.tx = true;
                self.send(id, ch, Method::TxSelectOk(Default::default()), None);
            }
            Method::TxCommit(_) | Method::TxRollback(_) => {
                if !chan.tx {
                    let text = "channel is not transactional";
                    return self.channel_error(id, ch, ReplyCode::PreconditionFailed, text, ids);
                }
                if let Method::TxRollback(_) = method {
                    chan.tx_publishes.clear();
                    chan.tx_settles.clear();
                    return self.send(id, ch, Method::TxRollbackOk(Default::default()), None);
                }
                let verdict = (self.on_commit)(id, ch);
                if verdict == CommitVerdict::Hang {
                    return;
                }
                let chan = self.conns[id].channels.get_mut(&ch).expect("open");
                let publishes = std::mem::take(&mut chan.tx_publishes);
                let settles = std::mem::take(&mut chan.tx_settles);
                for (queues, m) in publishes {
                    self.route(&queues, m);
                }
                for s in settles {
                    if !self.settle(id, ch, s, ids) {
                        return;
                    }
                }
                if verdict == CommitVerdict::Commit {
                    self.send(id, ch, Method::TxCommitOk(Default::default()), None);
                }
            }

            // ----- topology
            Method::ExchangeDeclare(x) => {
                let name = x.exchange.as_str().into_owned();
                if !self.exchanges.contains_key(&name) {
                    if x.passive {
                        let text = format!("no exchange '{name}' in vhost '/'");
                        return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                    }
                    let fanout = x.kind == "fanout";
                    self.exchanges.insert(
                        name,
                        Exchange {
                            fanout,
                            ..Exchange::default()
                        },
                    );
                }
                self.reply(
                    id,
                    ch,
                    x.nowait,
                    Method::ExchangeDeclareOk(Default::default()),
                );
            }
            Method::ExchangeDelete(x) => {
                self.exchanges.remove(&*x.exchange.as_str());
                self.reply(
                    id,
                    ch,
                    x.nowait,
                    Method::ExchangeDeleteOk(Default::default()),
                );
            }
            Method::ExchangeBind(x) => {
                self.reply(id, ch, x.nowait, Method::ExchangeBindOk(Default::default()));
            }
            Method::ExchangeUnbind(x) => {
                self.reply(
                    id,
                    ch,
                    x.nowait,
                    Method::ExchangeUnbindOk(Default::default()),
                );
            }
            Method::QueueDeclare(q) => {
                let mut name = q.queue.as_str().into_owned();
                if name.is_empty() {
                    self.next_name += 1;
                    name = format!("amq.gen-fake-{}", self.next_name);
                }
                if !q.passive && self.denied.contains(&name) {
                    let text =
                        format!("access to queue '{name}' in vhost '/' refused for user 'guest'");
                    return self.channel_error(id, ch, ReplyCode::AccessRefused, &text, ids);
                }
                // RabbitMQ checks an `x-dead-letter-exchange` argument's type before it creates
                // anything (and a queue that exists fails the equivalence check instead).
                if !q.passive
                    && let Some(dlx) = q.arguments.get("x-dead-letter-exchange")
                    && !matches!(dlx, codec::FieldValue::LongStr(_))
                {
                    let text = format!(
                        "invalid arg 'x-dead-letter-exchange' for queue '{name}' in vhost '/'"
                    );
                    return self.channel_error(id, ch, ReplyCode::PreconditionFailed, &text, ids);
                }
                if !self.queues.contains_key(&name) {
                    if q.passive {
                        let text = format!("no queue '{name}' in vhost '/'");
                        return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                    }
                    self.queues.insert(name.clone(), VecDeque::new());
                }
                let ok = Method::QueueDeclareOk(codec::QueueDeclareOk {
                    queue: ss(&name),
                    message_count: self.queues[&name].len() as u32,
                    consumer_count: self.consumer_count(&name),
                });
                self.reply(id, ch, q.nowait, ok);
            }
            Method::QueueBind(b) => {
                let (queue, exchange) = (b.queue.as_str(), b.exchange.as_str());
                if !self.queues.contains_key(&*queue) {
                    let text = format!("no queue '{queue}' in vhost '/'");
                    return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                }
                let Some(x) = self.exchanges.get_mut(&*exchange) else {
                    let text = format!("no exchange '{exchange}' in vhost '/'");
                    return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                };
                let binding = (queue.into_owned(), b.routing_key.as_str().into_owned());
                if !x.bindings.contains(&binding) {
                    x.bindings.push(binding);
                }
                self.reply(id, ch, b.nowait, Method::QueueBindOk(Default::default()));
            }
            Method::QueueUnbind(b) => {
                if let Some(x) = self.exchanges.get_mut(&*b.exchange.as_str()) {
                    let binding = (
                        b.queue.as_str().into_owned(),
                        b.routing_key.as_str().into_owned(),
                    );
                    x.bindings.retain(|have| *have != binding);
                }
                self.send(id, ch, Method::QueueUnbindOk(Default::default()), None);
            }
            Method::QueuePurge(p) => {
                let n = self
                    .queues
                    .get_mut(&*p.queue.as_str())
                    .map_or(0, |q| std::mem::take(q).len());
                let ok = Method::QueuePurgeOk(codec::QueuePurgeOk {
                    message_count: n as u32,
                });
                self.reply(id, ch, p.nowait, ok);
            }
            Method::QueueDelete(d) => {
                let name = d.queue.as_str().into_owned();
                if self.denied.contains(&name) {
                    let text =
                        format!("access to queue '{name}' in vhost '/' refused for user 'guest'");
                    return self.channel_error(id, ch, ReplyCode::AccessRefused, &text, ids);
                }
                let n = self.delete_queue(&name);
                let ok = Method::QueueDeleteOk(codec::QueueDeleteOk {
                    message_count: n as u32,
                });
                self.reply(id, ch, d.nowait, ok);
            }

            // ----- publishing
            Method::BasicPublish(p) => {
                let (Some(header), Some(body)) = (header, body) else {
                    return;
                };
                let exchange = p.exchange.as_str().into_owned();
                let Some(queues) = self.routes(&exchange, &p.routing_key.as_str()) else {
                    let text = format!("no exchange '{exchange}' in vhost '/'");
                    return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                };
                if queues.is_empty() && p.mandatory {
                    let ret = Method::BasicReturn(codec::BasicReturn {
                        reply_code: ReplyCode::NoRoute.code(),
                        reply_text: ss("NO_ROUTE"),
                        exchange: p.exchange.clone(),
                        routing_key: p.routing_key.clone(),
                    });
                    self.send(id, ch, ret, Some((&header, &body)));
                }
                let m = Message {
                    header,
                    body: body.clone(),
                    exchange: p.exchange.clone(),
                    routing_key: p.routing_key.clone(),
                    redelivered: false,
                };
                let chan = self.conns[id].channels.get_mut(&ch).expect("open");
                if chan.tx {
                    chan.tx_publishes.push((queues, m));
                    return;
                }
                if !chan.confirm {
                    return self.route(&queues, m);
                }
                chan.next_seq += 1;
                let seq = chan.next_seq;
                let info = PublishInfo {
                    conn: id,
                    node: self.conns[id].ledger.node,
                    channel: ch,
                    seq,
                    exchange,
                    routing_key: p.routing_key.as_str().into_owned(),
                    body,
                };
                match (self.on_publish)(&info) {
                    Verdict::Ack => {
                        self.route(&queues, m);
                        let ack = Method::BasicAck(codec::BasicAck {
                            delivery_tag: seq,
                            multiple: false,
                        });
                        self.send(id, ch, ack, None);
                    }
                    Verdict::Nack => {
                        let nack = Method::BasicNack(codec::BasicNack {
                            delivery_tag: seq,
                            multiple: false,
                            requeue: false,
                        });
                        self.send(id, ch, nack, None);
                    }
                    Verdict::Hold => {
                        let chan = self.conns[id].channels.get_mut(&ch).expect("open");
                        chan.held.insert(seq, (queues, m));
                    }
                }
            }

            // ----- consuming
            Method::BasicQos(q) => {
                if q.global {
                    chan.global_prefetch = q.prefetch_count;
                } else {
                    chan.prefetch = q.prefetch_count;
                }
                self.send(id, ch, Method::BasicQosOk(Default::default()), None);
            }
            Method::BasicConsume(c) => {
                let queue = c.queue.as_str().into_owned();
                if !self.queues.contains_key(&queue) {
                    let text = format!("no queue '{queue}' in vhost '/'");
                    return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                }
                let tag = if c.consumer_tag.is_empty() {
                    self.next_name += 1;
                    ss(&format!("amq.ctag-fake-{}", self.next_name))
                } else {
                    c.consumer_tag.clone()
                };
                let chan = self.conns[id].channels.get_mut(&ch).expect("open");
                chan.consumers.push(Consumer {
                    tag: tag.clone(),
                    queue,
                    no_ack: c.no_ack,
                });
                let ok = Method::BasicConsumeOk(codec::BasicConsumeOk { consumer_tag: tag });
                self.reply(id, ch, c.nowait, ok);
            }
            Method::BasicCancel(c) => {
                chan.consumers.retain(|k| k.tag != c.consumer_tag);
                let ok = Method::BasicCancelOk(codec::BasicCancelOk {
                    consumer_tag: c.consumer_tag.clone(),
                });
                self.reply(id, ch, c.nowait, ok);
            }
            Method::BasicGet(g) => {
                let queue = g.queue.as_str().into_owned();
                let Some(q) = self.queues.get_mut(&queue) else {
                    let text = format!("no queue '{queue}' in vhost '/'");
                    return self.channel_error(id, ch, ReplyCode::NotFound, &text, ids);
                };
                let Some(m) = q.pop_front() else {
                    let empty = Method::BasicGetEmpty(Default::default());
                    return self.send(id, ch, empty, None);
                };
                let left = q.len() as u32;
                let chan = self.conns[id].channels.get_mut(&ch).expect("open");
                chan.next_tag += 1;
                let tag = chan.next_tag;
                let ok = Method::BasicGetOk(codec::BasicGetOk {
                    delivery_tag: tag,
                    redelivered: m.redelivered,
                    exchange: m.exchange.clone(),
                    routing_key: m.routing_key.clone(),
                    message_count: left,
                });
                let (header, body) = (m.header.clone(), m.body.clone());
                if !g.no_ack {
                    chan.unacked.insert(
                        tag,
                        Unacked {
                            queue,
                            consumer: None,
                            message: m,
                        },
                    );
                }
                self.send(id, ch, ok, Some((&header, &body)));
            }
            Method::BasicAck(a) => {
                self.settle_or_defer(id, ch, a.delivery_tag, a.multiple, None, ids)
            }
            Method::BasicNack(n) => {
                self.settle_or_defer(id, ch, n.delivery_tag, n.multiple, Some(n.requeue), ids)
            }
            Method::BasicReject(r) => {
                self.settle_or_defer(id, ch, r.delivery_tag, false, Some(r.requeue), ids)
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                let unacked = std::mem::take(&mut chan.unacked);
                for (_, u) in unacked.into_iter().rev() {
                    self.requeue(u);
                }
                if let Method::BasicRecover(_) = method {
                    self.send(id, ch, Method::BasicRecoverOk(Default::default()), None);
                }
            }
            _ => {}
        }
    }

    /// An ack / nack / reject: applied now, or at commit on a tx channel.
    fn settle_or_defer(
        &mut self,
        id: ConnId,
        ch: u16,
        tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        ids: (u16, u16),
    ) {
        let s = Settle {
            tag,
            multiple,
            requeue,
        };
        let chan = self.conns[id].channels.get_mut(&ch).expect("open");
        if chan.tx {
            chan.tx_settles.push(s);
        } else {
            self.settle(id, ch, s, ids);
        }
    }

    /// Settles deliveries as RabbitMQ does: `multiple` covers every unacked tag up to `tag`
    /// (tag 0: all); a tag that is not unacked closes the channel with 406. Returns false then.
    fn settle(&mut self, id: ConnId, ch: u16, s: Settle, ids: (u16, u16)) -> bool {
        let chan = self.conns[id].channels.get_mut(&ch).expect("open");
        let known = chan.unacked.contains_key(&s.tag) || (s.multiple && s.tag == 0);
        if !known {
            let text = format!("unknown delivery tag {}", s.tag);
            self.channel_error(id, ch, ReplyCode::PreconditionFailed, &text, ids);
            return false;
        }
        let tags: Vec<u64> = if s.multiple {
            let end = if s.tag == 0 { u64::MAX } else { s.tag };
            chan.unacked.range(..=end).map(|(k, _)| *k).collect()
        } else {
            vec![s.tag]
        };
        let settled: Vec<Unacked> = tags.iter().filter_map(|t| chan.unacked.remove(t)).collect();
        if s.requeue == Some(true) {
            for u in settled.into_iter().rev() {
                self.requeue(u);
            }
        }
        true
    }

    // ----- queues and routing

    /// The queues a publish to `exchange` with `key` reaches; None when the exchange is unknown.
    fn routes(&self, exchange: &str, key: &str) -> Option<Vec<String>> {
        if exchange.is_empty() {
            return Some(
                self.queues
                    .contains_key(key)
                    .then(|| key.to_owned())
                    .into_iter()
                    .collect(),
            );
        }
        let x = self.exchanges.get(exchange)?;
        Some(
            x.bindings
                .iter()
                .filter(|(q, k)| (x.fanout || k == key) && self.queues.contains_key(q))
                .map(|(q, _)| q.clone())
                .collect(),
        )
    }

    fn route(&mut self, queues: &[String], m: Message) {
        for q in queues {
            if let Some(q) = self.queues.get_mut(q) {
                q.push_back(m.clone());
            }
        }
    }

    fn consumer_count(&self, queue: &str) -> u32 {
        self.conns
            .iter()
            .flat_map(|c| c.channels.values())
            .flat_map(|c| &c.consumers)
            .filter(|k| k.queue == queue)
            .count() as u32
    }

    /// Deletes a queue; its consumers get basic.cancel. Returns how many messages it had.
    fn delete_queue(&mut self, queue: &str) -> usize {
        let n = self.queues.remove(queue).map_or(0, |q| q.len());
        for id in 0..self.conns.len() {
            let chans: Vec<u16> = self.conns[id].channels.keys().copied().collect();
            for ch in chans {
                let chan = self.conns[id].channels.get_mut(&ch).expect("listed");
                let (gone, kept) = std::mem::take(&mut chan.consumers)
                    .into_iter()
                    .partition(|k| k.queue == queue);
                chan.consumers = kept;
                let gone: Vec<Consumer> = gone;
                for k in gone {
                    let cancel = Method::BasicCancel(codec::BasicCancel {
                        consumer_tag: k.tag,
                        nowait: true,
                    });
                    self.send(id, ch, cancel, None);
                }
            }
        }
        n
    }

    /// Hands ready messages to consumers with room in their prefetch, turning over the
    /// consumers of each queue, until no more can go.
    fn dispatch(&mut self) {
        loop {
            let mut moved = false;
            let queues: Vec<String> = self
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(n, _)| n.clone())
                .collect();
            for queue in queues {
                let q: &str = &queue;
                let room: Vec<(ConnId, u16, usize)> = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.ledger.alive)
                    .flat_map(|(id, c)| {
                        c.channels.iter().flat_map(move |(&ch, chan)| {
                            chan.consumers
                                .iter()
                                .enumerate()
                                .filter(move |(_, k)| k.queue == q && has_room(chan, k))
                                .map(move |(i, _)| (id, ch, i))
                        })
                    })
                    .collect();
                if room.is_empty() {
                    continue;
                }
                let (id, ch, i) = room[self.round % room.len()];
                self.round += 1;
                let Some(m) = self.queues.get_mut(&queue).and_then(VecDeque::pop_front) else {
                    continue;
                };
                self.deliver(id, ch, i, queue, m);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn deliver(&mut self, id: ConnId, ch: u16, consumer: usize, queue: String, m: Message) {
        let chan = self.conns[id].channels.get_mut(&ch).expect("listed");
        chan.next_tag += 1;
        let tag = chan.next_tag;
        let k = &chan.consumers[consumer];
        let deliver = Method::BasicDeliver(codec::BasicDeliver {
            consumer_tag: k.tag.clone(),
            delivery_tag: tag,
            redelivered: m.redelivered,
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
        });
        let (header, body) = (m.header.clone(), m.body.clone());
        if !k.no_ack {
            let consumer = Some(k.tag.clone());
            chan.unacked.insert(
                tag,
                Unacked {
                    queue,
                    consumer,
                    message: m,
                },
            );
        }
        self.send(id, ch, deliver, Some((&header, &body)));
    }
}

/// Whether consumer `k` of `chan` may get one more delivery under the channel's prefetch.
fn has_room(chan: &Chan, k: &Consumer) -> bool {
    if chan.closing {
        return false;
    }
    if k.no_ack {
        return true;
    }
    let mine = chan
        .unacked
        .values()
        .filter(|u| u.consumer.as_ref() == Some(&k.tag))
        .count();
    (chan.prefetch == 0 || mine < usize::from(chan.prefetch))
        && (chan.global_prefetch == 0 || chan.unacked.len() < usize::from(chan.global_prefetch))
}
