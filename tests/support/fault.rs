//! A fault injector for the failover tests: TCP forwarders between the proxy and each RabbitMQ
//! node that can reset, stall or slow the upstream connections ("links") of **one** client
//! connection, and refuse new connections to a node for a while.
//!
//! # Why a forwarder
//!
//! Killing or pausing a RabbitMQ node hits every client of the proxy at once, and the shared test
//! clusters must stay up. A fault that hits one client connection's links only lets a test show
//! both sides: the failover of the client under test, and a bystander connection of the same
//! proxy that must not notice anything.
//!
//! # Usage
//!
//! Start a [`FaultInjector`] in front of the real clusters and configure the proxy under test
//! with [`FaultInjector::clusters`] (the forwarders' addresses, one per node, same names and
//! order). Each client connection to the proxy gets one link per cluster, each a TCP connection
//! through the forwarder of one node.
//!
//! # Which links belong to which client connection
//!
//! The proxy opens a client connection's links with the client's own `client_properties`
//! (`upstream_client_properties` in `src/upstream/link.rs`): the client's `connection_name`, or
//! `warren client <peer>` when the client gave none. The forwarder decodes the frames the proxy
//! sends up to `connection.start-ok` (with `warren::codec`) and files the link under that name,
//! before the start-ok is forwarded: once a client's `Connection::open` returned, all its links
//! are known. So tests give each amqprs connection a unique `connection_name` and address faults
//! by it; nothing depends on ports or timing.
//!
//! # Faults
//!
//! * [`reset`](FaultInjector::reset): both sockets of the link are closed with an RST (SO_LINGER
//!   0): the proxy sees the link fail at once, RabbitMQ sees the connection end and deletes what
//!   belonged to it (exclusive queues, its consumers, auto-delete queues they kept alive).
//! * [`stall`](FaultInjector::stall) / [`resume`](FaultInjector::resume): nothing is forwarded
//!   either way, the sockets stay open (a hung node or network); bytes read meanwhile are kept
//!   and forwarded on resume, or dropped by a reset.
//! * [`slow`](FaultInjector::slow): every chunk (at most [`SLOW_CHUNK`] bytes) waits the given
//!   delay before it is forwarded, in both directions: latency, and a throughput cap.
//! * [`refuse`](FaultInjector::refuse): new connections to one node are accepted and reset at
//!   once for a while (the proxy's handshake fails: it tries the cluster's other node, or backs
//!   off and retries when both are refused). Links already open are not touched.
//!
//! The forwarder tasks run on the runtime that started the injector; dropping the injector stops
//! them and resets whatever is still open, so drop it after the proxy has shut down.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use warren::codec::{self, FieldValue, FrameKind, Method};

use super::{Cluster, STEP};

/// In [`Mode::Slow`], the most bytes forwarded per delay (so a slow link is also a narrow one).
pub const SLOW_CHUNK: usize = 4096;

/// What the forwarder does with one link's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Flow,
    Stall,
    Slow(Duration),
    Reset,
}

/// One upstream connection through the injector, as [`FaultInjector::links_of`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Unique per injector, in accept order: a link opened by a failover has a new id.
    pub id: u64,
    /// The client connection's `connection_name` (from the link's `connection.start-ok`).
    pub connection_name: String,
    /// `client_address` of the start-ok: the client's peer address as the proxy saw it.
    pub client_address: Option<String>,
    pub cluster: String,
    /// Index of the node in the cluster's node list (0-based).
    pub node: usize,
}

/// A link the injector forwards: what is known of it, and the switch of its [`Mode`].
struct Entry {
    id: u64,
    cluster: String,
    node: usize,
    /// `None` until its start-ok went through (or when it had none: a health probe).
    name: Option<String>,
    client_address: Option<String>,
    mode: watch::Sender<Mode>,
}

impl Entry {
    fn info(&self) -> Option<LinkInfo> {
        Some(LinkInfo {
            id: self.id,
            connection_name: self.name.clone()?,
            client_address: self.client_address.clone(),
            cluster: self.cluster.clone(),
            node: self.node,
        })
    }
}

/// State shared by the accept loops and the forwarding tasks.
#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Open links, by id.
    links: HashMap<u64, Entry>,
    /// (cluster, node) -> until when new connections are refused.
    refused: HashMap<(String, usize), Instant>,
}

type Shared = Arc<Mutex<Registry>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Registry> {
    // A panicking test thread must not turn every later call into a second panic.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// TCP forwarders in front of every node of some clusters (see the module docs).
pub struct FaultInjector {
    /// The clusters as the proxy must see them: same names, the forwarders' addresses.
    proxied: Vec<Cluster>,
    shared: Shared,
    accept_loops: Vec<AbortHandle>,
}

impl FaultInjector {
    /// Starts one forwarder (on 127.0.0.1, a free port) per node of `clusters`.
    pub async fn start(clusters: &[Cluster]) -> FaultInjector {
        let shared: Shared = Arc::default();
        let mut proxied = Vec::new();
        let mut accept_loops = Vec::new();
        for c in clusters {
            let mut nodes = Vec::new();
            for (i, upstream) in c.nodes.iter().enumerate() {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind a forwarder");
                let addr = listener.local_addr().expect("forwarder address");
                nodes.push(addr.to_string());
                let node = NodeForwarder {
                    cluster: c.name.clone(),
                    node: i,
                    upstream: upstream.clone(),
                    shared: shared.clone(),
                };
                accept_loops.push(tokio::spawn(node.run(listener)).abort_handle());
            }
            proxied.push(Cluster {
                name: c.name.clone(),
                nodes,
            });
        }
        FaultInjector {
            proxied,
            shared,
            accept_loops,
        }
    }

    /// The clusters to configure the proxy with: the forwarders' addresses.
    pub fn clusters(&self) -> &[Cluster] {
        &self.proxied
    }

    /// The open links of the client connection named `connection_name`, by id.
    pub fn links_of(&self, connection_name: &str) -> Vec<LinkInfo> {
        let mut v: Vec<LinkInfo> = self
            .all_links()
            .into_iter()
            .filter(|l| l.connection_name == connection_name)
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }

    /// Every open link whose client connection is known, by id.
    pub fn all_links(&self) -> Vec<LinkInfo> {
        let mut v: Vec<LinkInfo> = lock(&self.shared)
            .links
            .values()
            .filter_map(Entry::info)
            .collect();
        v.sort_by_key(|l| l.id);
        v
    }

    /// Fails the test unless every link of `links` is still open (a bystander's links survived).
    pub fn assert_open(&self, links: &[LinkInfo], who: &str) {
        let reg = lock(&self.shared);
        let gone: Vec<&LinkInfo> = links
            .iter()
            .filter(|l| !reg.links.contains_key(&l.id))
            .collect();
        assert!(
            gone.is_empty(),
            "{who}: these upstream links were closed, though no fault was aimed at them: {gone:?}"
        );
    }

    /// Closes both sockets of the client connection's links to `cluster` with an RST. Returns
    /// the links reset; fails the test if there was none.
    pub fn reset(&self, connection_name: &str, cluster: &str) -> Vec<LinkInfo> {
        self.set_mode(connection_name, cluster, Mode::Reset, "reset")
    }

    /// Stops forwarding the client connection's links to `cluster`, both ways, keeping the
    /// sockets open. Returns the links stalled; fails the test if there was none.
    pub fn stall(&self, connection_name: &str, cluster: &str) -> Vec<LinkInfo> {
        self.set_mode(connection_name, cluster, Mode::Stall, "stall")
    }

    /// Forwards the client connection's links to `cluster` normally again (after
    /// [`stall`](Self::stall) or [`slow`](Self::slow)), what was held first.
    pub fn resume(&self, connection_name: &str, cluster: &str) -> Vec<LinkInfo> {
        self.set_mode(connection_name, cluster, Mode::Flow, "resume")
    }

    /// Delays every chunk of the client connection's links to `cluster` by `delay`, both ways
    /// (at most [`SLOW_CHUNK`] bytes per chunk).
    pub fn slow(&self, connection_name: &str, cluster: &str, delay: Duration) -> Vec<LinkInfo> {
        self.set_mode(connection_name, cluster, Mode::Slow(delay), "slow")
    }

    /// New connections to node `node` (0-based) of `cluster` are reset at once for `period`.
    pub fn refuse(&self, cluster: &str, node: usize, period: Duration) {
        assert!(
            self.proxied
                .iter()
                .any(|c| c.name == cluster && node < c.nodes.len()),
            "refuse: no node {node} in cluster {cluster:?}"
        );
        lock(&self.shared)
            .refused
            .insert((cluster.to_owned(), node), Instant::now() + period);
    }

    /// [`refuse`](Self::refuse) for every node of `cluster`: the cluster cannot be reached for
    /// `period`, so a link lost meanwhile stays down at least that long.
    pub fn refuse_cluster(&self, cluster: &str, period: Duration) {
        let n = self
            .proxied
            .iter()
            .find(|c| c.name == cluster)
            .unwrap_or_else(|| panic!("refuse_cluster: no cluster {cluster:?}"))
            .nodes
            .len();
        for node in 0..n {
            self.refuse(cluster, node, period);
        }
    }

    /// Waits (up to [`STEP`]) until the client connection has an open link to `cluster` that is
    /// none of `old` (the link a failover opened), and returns it.
    pub async fn wait_new_link(
        &self,
        connection_name: &str,
        cluster: &str,
        old: &[LinkInfo],
    ) -> LinkInfo {
        let deadline = Instant::now() + STEP;
        loop {
            let found = self
                .links_of(connection_name)
                .into_iter()
                .find(|l| l.cluster == cluster && !old.iter().any(|o| o.id == l.id));
            if let Some(l) = found {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no new link of {connection_name:?} to {cluster} within {STEP:?}; open links: {:?}",
                self.links_of(connection_name)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to [`STEP`]) until the client connection has no open link any more.
    pub async fn wait_no_links(&self, connection_name: &str) {
        let deadline = Instant::now() + STEP;
        while !self.links_of(connection_name).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the links of {connection_name:?} are still open {STEP:?} after it closed: {:?}",
                self.links_of(connection_name)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set_mode(
        &self,
        connection_name: &str,
        cluster: &str,
        mode: Mode,
        what: &str,
    ) -> Vec<LinkInfo> {
        let reg = lock(&self.shared);
        let mut hit = Vec::new();
        for e in reg.links.values() {
            if e.cluster == cluster && e.name.as_deref() == Some(connection_name) {
                e.mode.send_replace(mode);
                hit.extend(e.info());
            }
        }
        if hit.is_empty() {
            let known: Vec<LinkInfo> = reg.links.values().filter_map(Entry::info).collect();
            panic!(
                "{what}: client connection {connection_name:?} has no open link to {cluster}; open links: {known:?}"
            );
        }
        hit.sort_by_key(|l| l.id);
        hit
    }
}

impl Drop for FaultInjector {
    fn drop(&mut self) {
        for a in &self.accept_loops {
            a.abort();
        }
        let reg = lock(&self.shared);
        for e in reg.links.values() {
            e.mode.send_replace(Mode::Reset);
        }
    }
}

/// The forwarder of one node: accepts the proxy's connections and forwards each to the node.
struct NodeForwarder {
    cluster: String,
    node: usize,
    upstream: String,
    shared: Shared,
}

impl NodeForwarder {
    async fn run(self, listener: TcpListener) {
        let this = Arc::new(self);
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                // Out of descriptors or the like: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let refused = lock(&this.shared)
                .refused
                .get(&(this.cluster.clone(), this.node))
                .is_some_and(|until| Instant::now() < *until);
            if refused {
                let _ = socket.set_zero_linger();
                drop(socket);
                continue;
            }
            let (mode_tx, mode_rx) = watch::channel(Mode::Flow);
            let id = {
                let mut reg = lock(&this.shared);
                reg.next_id += 1;
                let id = reg.next_id;
                reg.links.insert(
                    id,
                    Entry {
                        id,
                        cluster: this.cluster.clone(),
                        node: this.node,
                        name: None,
                        client_address: None,
                        mode: mode_tx,
                    },
                );
                id
            };
            tokio::spawn(this.clone().forward(id, socket, mode_rx));
        }
    }

    /// Forwards one link until either side closes it or the link is reset.
    async fn forward(self: Arc<Self>, id: u64, proxy_side: TcpStream, mode: watch::Receiver<Mode>) {
        // Unregisters the link however this ends (also when the task is aborted).
        let _registered = Unregister {
            shared: self.shared.clone(),
            id,
        };
        let node_side = match TcpStream::connect(&self.upstream).await {
            Ok(s) => s,
            Err(_) => {
                let _ = proxy_side.set_zero_linger();
                return;
            }
        };
        let _ = proxy_side.set_nodelay(true);
        let _ = node_side.set_nodelay(true);
        let (mut pr, mut pw) = proxy_side.into_split();
        let (mut nr, mut nw) = node_side.into_split();
        // Files the link under its client connection's name, before the start-ok goes on.
        let mut sniffer = StartOkSniffer::default();
        let mut sniff = |bytes: &[u8]| {
            if let Some((name, address)) = sniffer.feed(bytes)
                && let Some(e) = lock(&self.shared).links.get_mut(&id)
            {
                e.name = Some(name);
                e.client_address = address;
            }
        };
        let ended = tokio::select! {
            r = async {
                tokio::try_join!(
                    pump(&mut pr, &mut nw, mode.clone(), Some(&mut sniff)),
                    pump(&mut nr, &mut pw, mode.clone(), None),
                )
            } => r.map(|_| ()),
            () = until_reset(mode.clone()) => Err(io::Error::other("reset by the injector")),
        };
        if ended.is_err() {
            // An error on one side (or a reset) becomes an RST on both: the proxy and the node
            // each see the connection fail, as they would with a real network fault.
            for s in [pr.as_ref(), nr.as_ref()] {
                let _ = s.set_zero_linger();
            }
        }
        drop((pr, pw, nr, nw));
    }
}

/// Removes a link from the registry when its forwarding task ends.
struct Unregister {
    shared: Shared,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        lock(&self.shared).links.remove(&self.id);
    }
}

/// Looks at the bytes a pump forwards (the start-ok sniffer).
type Inspect<'a> = dyn FnMut(&[u8]) + Send + 'a;

/// Copies bytes one way, obeying the link's mode; at EOF, half-closes the other side.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut inspect: Option<&mut Inspect<'_>>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Not reading while stalled: the peer's writes back up in TCP, as with a hung node.
        let max = match flowing(&mut mode).await {
            Some(_) => SLOW_CHUNK,
            None => buf.len(),
        };
        let n = from.read(&mut buf[..max]).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if let Some(inspect) = inspect.as_mut() {
            inspect(&buf[..n]);
        }
        // The mode may have changed while the read waited: bytes read are held while stalled.
        if let Some(delay) = flowing(&mut mode).await {
            tokio::time::sleep(delay).await;
            flowing(&mut mode).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Waits while the link is stalled (or reset: the caller is dropped then); returns the delay of
/// a slow link, `None` for a normal one.
async fn flowing(mode: &mut watch::Receiver<Mode>) -> Option<Duration> {
    loop {
        match *mode.borrow_and_update() {
            Mode::Flow => return None,
            Mode::Slow(d) => return Some(d),
            Mode::Stall | Mode::Reset => {}
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn until_reset(mut mode: watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Reset {
            return;
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Reads the proxy's side of a link up to its `connection.start-ok`.
#[derive(Default)]
struct StartOkSniffer {
    buf: BytesMut,
    header_seen: bool,
    /// The start-ok was found, or the bytes are not what was expected: the rest is not looked at.
    done: bool,
}

impl StartOkSniffer {
    /// Feeds the next bytes; returns the start-ok's `connection_name` and `client_address` once
    /// it is complete.
    fn feed(&mut self, bytes: &[u8]) -> Option<(String, Option<String>)> {
        if self.done {
            return None;
        }
        self.buf.extend_from_slice(bytes);
        if !self.header_seen {
            if self.buf.len() < codec::PROTOCOL_HEADER.len() {
                return None;
            }
            self.buf.advance(codec::PROTOCOL_HEADER.len());
            self.header_seen = true;
        }
        loop {
            match codec::decode_frame(&mut self.buf, 0) {
                Ok(Some(f)) if f.kind == FrameKind::Method && f.channel == 0 => {
                    if let Ok(Method::ConnectionStartOk(ok)) = Method::decode(f.payload) {
                        self.done = true;
                        self.buf = BytesMut::new();
                        let text = |key: &str| match ok.client_properties.get(key) {
                            Some(FieldValue::LongStr(s)) => Some(s.as_str().into_owned()),
                            _ => None,
                        };
                        return text("connection_name").map(|n| (n, text("client_address")));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) if self.buf.len() <= 1 << 20 => return None,
                // Not AMQP as expected: forwarded anyway, just not filed under a name.
                Ok(None) | Err(_) => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}
