//! One client connection, from accept to close.
//!
//! A single task owns all of a connection's protocol state, so nothing on the hot path takes a
//! lock other than the outboxes' short append. It waits on three things at once: the client
//! socket, the events of its upstream links, and timers. It reads the client only while every
//! upstream outbox has room, and takes link events only while the client's outbox has room: that
//! is the whole of the back-pressure story, and it never blocks one direction on the other.
//!
//! A client channel N is carried by channel N on every link of the session (each link is its own
//! connection, so the numbers never clash). Where a method goes is decided by [`crate::route`];
//! replies of fanned-out requests are merged by [`Rpc`]; tags and confirms are translated by the
//! maps in [`super::channel`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::channel::{
    Channel, ChannelState, ClientConfirm, Consumer, Held, InFlight, LinkSet, UpstreamAck,
    UpstreamConfirms,
};
use super::handshake::{self, ClientCaps, Refusal, reply_name, truncate};
use super::topology::Topology;
use crate::codec::{self, FrameKind, Method, ShortStr};
use crate::config::{Config, Role};
use crate::io::stream::{ReadHalf, Stream};
use crate::io::{Assembler, Command, Content, Outbox, command::AssembleError};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::proxy::Shared;
use crate::route::{Class, RoundRobin, Rules};
use crate::upstream::{self, ConnectError, Link, LinkDown, LinkId, LinkSpec};

/// How long a closing handshake may take before the proxy just drops the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves one accepted client socket until it closes.
pub async fn serve(
    mut stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    force_close: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let config = shared.config();
    let id = shared.next_connection_id();
    let mut rbuf = BytesMut::with_capacity(16 * 1024);

    let server_props =
        handshake::server_properties(shared.server_properties(&config).await.as_ref());
    let (greeting, vhost) =
        match handshake::greet(&mut stream, &mut rbuf, &config, server_props).await {
            Ok(g) => g,
            Err(Refusal::Drop { reason, reply }) => {
                if let Some(bytes) = reply {
                    let _ = stream.write_all(bytes).await;
                }
                let _ = stream.shutdown().await;
                info!(conn = id, %peer, %reason, "connection refused during handshake");
                shared.metrics.connections_refused.inc();
                return;
            }
            Err(Refusal::Close {
                code,
                text,
                class_id,
                method_id,
            }) => {
                warn!(conn = id, %peer, code, %text, "connection refused during handshake");
                shared.metrics.connections_refused.inc();
                handshake::refuse(&mut stream, &mut rbuf, code, &text, class_id, method_id).await;
                return;
            }
        };
    let user = String::from_utf8_lossy(&greeting.user).into_owned();

    // Open the upstream links before answering open-ok, so the broker's own verdict on the
    // credentials and the vhost reaches the client as RabbitMQ would give it.
    let base = LinkSpec {
        cluster: Arc::from(""),
        nodes: Vec::new(),
        user: greeting.user.clone(),
        password: greeting.password.clone(),
        vhost: vhost.clone(),
        client_properties: upstream::link::upstream_client_properties(
            &greeting.client_properties,
            peer,
        ),
        heartbeat_secs: config.timeouts.upstream_heartbeat_secs,
        frame_max: config.limits.frame_max,
        channel_max: greeting.channel_max,
        connect_timeout: Duration::from_millis(config.timeouts.connect_ms),
        buffer_limit: config.limits.client_buffer_bytes,
        metrics: None,
        tls: None,
    };
    let metrics = shared.metrics.clone();
    let links = match open_links(&config, &base, &metrics).await {
        Ok(links) => links,
        Err(ConnectError::Refused { node, code, text }) => {
            warn!(conn = id, %peer, user = %user, vhost = %vhost, %node, code, %text, "connection refused by the broker");
            metrics.connections_refused.inc();
            handshake::refuse(&mut stream, &mut rbuf, code, &text, 10, 40).await;
            return;
        }
        Err(e @ ConnectError::Unreachable { .. }) => {
            warn!(conn = id, %peer, user = %user, vhost = %vhost, error = %e, "no upstream cluster available");
            metrics.connections_refused.inc();
            let text = truncate(&format!("CONNECTION_FORCED - {e}"));
            handshake::refuse(&mut stream, &mut rbuf, 320, &text, 10, 40).await;
            return;
        }
    };
    if let Some(slot) = links.iter().find(|s| s.role == Role::Shard) {
        shared.learn_server_properties(&slot.link.server_properties);
    }

    let (rd, wr) = stream.into_split();
    let heartbeat =
        (greeting.heartbeat > 0).then(|| Duration::from_secs(u64::from(greeting.heartbeat)));
    let (client_out, writer) = Outbox::start(
        config.limits.client_buffer_bytes,
        wr,
        heartbeat.map(|h| h / 2),
        None,
    );
    client_out
        .push(|buf| codec::write_method(buf, 0, &Method::ConnectionOpenOk(Default::default())));
    let clusters: Vec<String> = links
        .iter()
        .map(|s| format!("{}@{}", s.link.cluster, s.link.node))
        .collect();
    info!(conn = id, %peer, user = %user, vhost = %vhost, links = ?clusters, "connection opened");
    metrics.connections.inc();
    metrics.connections_total.inc();

    let control = links.iter().position(|s| s.role == Role::Control);
    let (opened_tx, opened_rx) = mpsc::channel(4);
    let mut session = Session {
        shared: shared.clone(),
        vhost: vhost.as_str().into_owned(),
        base_spec: base,
        opened_tx,
        connecting: Vec::new(),
        topology: Topology::default(),
        retry_at: Default::default(),
        id,
        client_out: client_out.clone(),
        frame_max: greeting.frame_max as usize,
        caps: greeting.caps,
        channel_max: greeting.channel_max,
        links,
        control,
        rules: config.routing.clone(),
        last_route: None,
        rr: RoundRobin::default(),
        get_rotation: 0,
        channels: Vec::new(),
        closing: None,
        end: None,
        blocked_links: 0,
        next_ctag: 0,
        scratch_acks: Vec::new(),
        scratch_seqs: Vec::new(),
        scratch_confirms: Vec::new(),
        scratch_inflight: Vec::new(),
        held_bytes: 0,
        held_limit: config.limits.max_held_bytes_per_connection,
        hold_publishes: config.limits.hold_publishes,
        held_limit_total: config.limits.max_held_bytes,
        pending_release: Vec::new(),
        metrics: metrics.clone(),
        parked: VecDeque::new(),
        no_shard_since: None,
        next_read: 0,
    };
    let config_rx = shared.subscribe();
    let reason = session
        .run(Inputs {
            rd,
            rbuf,
            opened: opened_rx,
            config_rx,
            heartbeat,
            max_message: config.limits.max_message_size,
            force_close,
        })
        .await;
    session.release_gauges();
    metrics.connections.dec();

    client_out.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
    for slot in &session.links {
        if !slot.done {
            slot.link.shutdown(Duration::from_millis(500)).await;
        }
    }
    info!(conn = id, %peer, user = %user, vhost = %vhost, reason = %reason, "connection closed");
}

/// Runs the handshake and answers connection.open with connection.close `code`: how a refused
/// connection (limits) is told why, in AMQP, as RabbitMQ tells it.
pub async fn refuse_at_open(mut stream: Stream, shared: &Shared, code: u16, text: &str) {
    let _ = stream.set_nodelay(true);
    let config = shared.config();
    let mut rbuf = BytesMut::with_capacity(4096);
    let server_props =
        handshake::server_properties(shared.server_properties(&config).await.as_ref());
    match handshake::greet(&mut stream, &mut rbuf, &config, server_props).await {
        Ok(_) => handshake::refuse(&mut stream, &mut rbuf, code, text, 10, 40).await,
        Err(Refusal::Close {
            code,
            text,
            class_id,
            method_id,
        }) => {
            handshake::refuse(&mut stream, &mut rbuf, code, &text, class_id, method_id).await;
        }
        Err(Refusal::Drop { reply, .. }) => {
            if let Some(bytes) = reply {
                let _ = stream.write_all(bytes).await;
            }
        }
    }
}

/// Opens one link per cluster, concurrently. A refusal (credentials, vhost) from any cluster is
/// the client's answer; an unreachable cluster is left out as long as one shard cluster answers.
async fn open_links(
    config: &Config,
    base: &LinkSpec,
    metrics: &Metrics,
) -> Result<Vec<LinkSlot>, ConnectError> {
    let mut tasks = JoinSet::new();
    let clusters: Vec<_> = config.clusters.iter().take(LinkSet::CAPACITY).collect();
    for (i, cluster) in clusters.iter().enumerate() {
        let spec = LinkSpec {
            cluster: Arc::from(cluster.name.as_str()),
            nodes: cluster.nodes.clone(),
            metrics: Some(metrics.cluster(&cluster.name)),
            tls: cluster.tls.clone(),
            ..base.clone()
        };
        tasks.spawn(async move { (i, upstream::link::connect(&spec).await) });
    }
    let mut opened: Vec<Option<Link>> = (0..clusters.len()).map(|_| None).collect();
    let mut refusal = None;
    let mut unreachable = None;
    while let Some(joined) = tasks.join_next().await {
        let Ok((i, result)) = joined else { continue };
        match result {
            Ok(link) => opened[i] = Some(link),
            Err(e @ ConnectError::Refused { .. }) => refusal = Some(e),
            Err(e) => {
                warn!(cluster = %clusters[i].name, error = %e, "cluster unreachable; continuing without it");
                metrics.cluster(&clusters[i].name).link_failures.inc();
                unreachable = Some(e);
            }
        }
    }
    if let Some(e) = refusal {
        return Err(e);
    }
    let mut slots = Vec::with_capacity(clusters.len());
    let mut any_shard = false;
    for (cluster, link) in clusters.iter().zip(opened) {
        let Some(link) = link else { continue };
        any_shard |= cluster.role == Role::Shard;
        slots.push(LinkSlot::new(
            link,
            cluster.role,
            cluster.weight,
            cluster.drain,
            metrics.cluster(&cluster.name),
        ));
    }
    if !any_shard {
        return Err(unreachable.unwrap_or(ConnectError::Unreachable {
            cluster: Arc::from("(all shard clusters)"),
            last: "no shard cluster answered".into(),
        }));
    }
    Ok(slots)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpState {
    Closed,
    Opening,
    Open,
    Closing,
}

/// Who is waiting for the next synchronous reply on an upstream channel. AMQP answers
/// synchronous requests on a channel in order, so a queue per upstream channel pairs each reply
/// with its request.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// A request the proxy made itself (replaying channel modes): swallow the reply.
    #[allow(dead_code)] // made by the link replay of reload and failover
    Internal,
    /// Part of a client request.
    Rpc(u64),
    /// Part of replaying the client's state on a link added by a reload.
    Replay,
}

/// One upstream channel carrying (part of) a client channel of the same number.
#[derive(Debug)]
struct UpChan {
    state: UpState,
    /// The client reopened the channel while this one was still closing.
    reopen: bool,
    confirm_mode: bool,
    confirms: UpstreamConfirms,
    pending: std::collections::VecDeque<Pending>,
}

impl Default for UpChan {
    fn default() -> Self {
        UpChan {
            state: UpState::Closed,
            reopen: false,
            confirm_mode: false,
            confirms: UpstreamConfirms::default(),
            pending: Default::default(),
        }
    }
}

struct LinkSlot {
    link: Link,
    m: ClusterMetrics,
    role: Role,
    weight: u32,
    drain: bool,
    chans: Vec<UpChan>,
    /// Closed (close-ok seen or the socket is gone): nothing more is sent.
    done: bool,
    blocked: bool,
    /// Takes publishes only once the topology replay (after a reload added it) is confirmed.
    ready: bool,
    replay_left: usize,
    /// The topology still has to be replayed on the next channel the client opens.
    needs_topology: bool,
    /// Removed from the configuration: draining, closed once quiet.
    removed: bool,
    /// connection.close sent on purpose; its end is not a failure.
    retiring: bool,
    last_delivery: Instant,
    removed_at: Option<Instant>,
    /// Held bytes released by `reset_chan`, for the session to subtract.
    released_held: usize,
    /// Opened to a cluster this session had no link to before (added by a reload).
    new_cluster: bool,
}

impl LinkSlot {
    fn new(link: Link, role: Role, weight: u32, drain: bool, m: ClusterMetrics) -> Self {
        m.links.inc();
        LinkSlot {
            link,
            m,
            role,
            weight,
            drain,
            chans: Vec::new(),
            done: false,
            blocked: false,
            ready: true,
            replay_left: 0,
            needs_topology: false,
            removed: false,
            retiring: false,
            last_delivery: Instant::now(),
            removed_at: None,
            released_held: 0,
            new_cluster: false,
        }
    }

    /// Marks the link closed; returns whether it was open.
    fn mark_done(&mut self) -> bool {
        let was_live = !std::mem::replace(&mut self.done, true);
        if was_live {
            self.m.links.dec();
        }
        was_live
    }

    /// Resets an upstream channel that is gone, releasing its pending confirms; returns its
    /// reopen flag and its first pending request.
    fn reset_chan(&mut self, ch: u16) -> (bool, Option<Pending>) {
        let m = self.m.confirms_pending.clone();
        let up = self.chan(ch);
        m.dec_by(up.confirms.pending() as i64);
        // The channel is gone: the broker processed or refused what was published on it.
        let released: usize = up.confirms.drain().iter().map(|p| p.held.size()).sum();
        let out = (up.reopen, up.pending.front().copied());
        *up = UpChan::default();
        self.released_held += released;
        out
    }

    fn chan(&mut self, ch: u16) -> &mut UpChan {
        let i = usize::from(ch);
        if self.chans.len() <= i {
            self.chans.resize_with(i + 1, UpChan::default);
        }
        &mut self.chans[i]
    }

    fn chan_state(&self, ch: u16) -> UpState {
        self.chans
            .get(usize::from(ch))
            .map_or(UpState::Closed, |c| c.state)
    }

    fn send(&self, ch: u16, method: &Method) {
        if !self.done {
            self.link.send(ch, method);
        }
    }

    /// Sends a synchronous request and remembers who waits for its reply.
    fn request(&mut self, ch: u16, method: &Method, pending: Pending) {
        if self.done {
            return;
        }
        self.chan(ch).pending.push_back(pending);
        self.link.send(ch, method);
    }

    fn send_content(&self, ch: u16, method: &Method, content: &Content) {
        if self.done {
            return;
        }
        let frame_max = self.link.frame_max;
        self.link.outbox.push(|buf| {
            codec::write_method(buf, ch, method);
            content.write(buf, ch, frame_max);
        });
    }

    /// Opens the upstream channel `ch` (or schedules it behind a close in progress).
    fn open(&mut self, ch: u16, pending: Pending) {
        let done = self.done;
        let up = self.chan(ch);
        match up.state {
            UpState::Closed => {
                *up = UpChan {
                    state: UpState::Opening,
                    ..UpChan::default()
                };
                if !done {
                    up.pending.push_back(pending);
                    self.link.send(ch, &Method::ChannelOpen(Default::default()));
                    if let Pending::Replay = pending {
                        self.replay_left += 1;
                        self.ready = false;
                    }
                }
            }
            UpState::Closing => {
                up.reopen = true;
                up.pending.push_back(pending);
            }
            UpState::Opening | UpState::Open => {}
        }
    }

    /// Sends channel.close for the client channel's part on this link, if it is open.
    fn close_chan(&mut self, ch: u16, close: &Method) -> bool {
        let done = self.done;
        let up = self.chan(ch);
        match up.state {
            UpState::Open | UpState::Opening => {
                up.state = UpState::Closing;
                up.reopen = false;
                up.pending.clear();
                if !done {
                    self.link.send(ch, close);
                }
                !done
            }
            UpState::Closing => !done,
            UpState::Closed => false,
        }
    }

    fn live(&self) -> bool {
        !self.done && !self.retiring
    }

    /// Sends a request whose reply only completes this link's replay.
    fn replay(&mut self, ch: u16, method: &Method) {
        if self.done {
            return;
        }
        self.replay_left += 1;
        self.ready = false;
        self.request(ch, method, Pending::Replay);
    }
}

/// Why the connection is ending.
enum Closing {
    /// The client sent connection.close; waiting for the links to confirm theirs.
    ByClient { deadline: Instant },
    /// The proxy sent connection.close to the client; waiting for its close-ok.
    ByProxy { deadline: Instant, reason: String },
}

/// A protocol error that ends the connection.
struct ConnError {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

impl ConnError {
    fn new(code: u16, detail: impl std::fmt::Display) -> Self {
        ConnError {
            code,
            text: format!("{} - {detail}", reply_name(code)),
            class_id: 0,
            method_id: 0,
        }
    }

    fn on(mut self, method: &Method) -> Self {
        (self.class_id, self.method_id) = method.ids();
        self
    }
}

struct Session {
    id: u64,
    client_out: Arc<Outbox>,
    frame_max: usize,
    caps: ClientCaps,
    channel_max: u16,
    links: Vec<LinkSlot>,
    /// The control cluster's link; control traffic goes to the first shard link without one.
    control: Option<LinkId>,
    rules: Rules,
    /// The last publish destination and its class (see `on_client_command`).
    last_route: Option<(ShortStr, ShortStr, Class)>,
    rr: RoundRobin,
    get_rotation: usize,
    channels: Vec<Option<Channel>>,
    closing: Option<Closing>,
    /// Set when the session must end after the current event.
    end: Option<String>,
    blocked_links: usize,
    next_ctag: u64,
    scratch_acks: Vec<UpstreamAck>,
    scratch_seqs: Vec<u64>,
    scratch_confirms: Vec<ClientConfirm>,
    scratch_inflight: Vec<InFlight>,
    /// Bytes of publishes this connection holds until their clusters confirm them.
    held_bytes: usize,
    held_limit: usize,
    /// `limits.hold_publishes`: put upstream channels in confirm mode and hold publishes.
    hold_publishes: bool,
    held_limit_total: usize,
    /// Links whose channel resets released held bytes to account for.
    pending_release: Vec<LinkId>,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    vhost: String,
    /// What new links are opened with (the client's credentials and vhost).
    base_spec: LinkSpec,
    opened_tx: mpsc::Sender<Opened>,
    /// Clusters a link is being opened to (after a reload).
    connecting: Vec<String>,
    /// The topology this client declared, in order, with where it lives; replayed on links
    /// opened later (a cluster added by a reload, a failover to the other node).
    topology: Topology,
    /// When each cluster without a live link may be tried again (exponential backoff).
    retry_at: std::collections::HashMap<String, Retry>,
    /// Publishes waiting for a shard link, oldest first: none was ready when they came (or when
    /// their link died), typically while the only live shard cluster's link fails over to its
    /// other node. Counted in `held_bytes`, so they are bounded like every held publish.
    parked: VecDeque<Parked>,
    /// Since when no shard link has been live; after `timeouts.failover_wait_secs` the parked
    /// publishes are given up (nacked) and the client is closed with 320.
    no_shard_since: Option<Instant>,
    /// The link [`poll_links`](Self::poll_links) tries first.
    next_read: usize,
}

/// When a cluster without a live link is tried again.
struct Retry {
    at: Instant,
    /// The current backoff delay, doubled on each failed attempt.
    delay: Duration,
    /// [`Shared::nodes_back`] of the cluster when the delay started: a node seen back by the
    /// health probes since then cuts the wait short.
    nodes_back: u64,
}

/// A publish waiting for a shard link (see [`Session::parked`]).
struct Parked {
    ch: u16,
    client: Option<u64>,
    held: Held,
}

/// A link opened after a reload added a cluster.
struct Opened {
    cluster: crate::config::ClusterConfig,
    result: Result<Link, ConnectError>,
}

/// When the health probes see a cluster come back, the sessions waiting for it reconnect
/// spread over time so that the proxy opens at most about this many links per second.
const RECONNECTS_PER_SEC: u64 = 500;

/// How long a removed cluster's link must have been quiet before it is closed.
const RETIRE_QUIET: Duration = Duration::from_secs(3);

fn close_method(code: u16, text: &'static str) -> Method {
    Method::ChannelClose(codec::ChannelClose {
        reply_code: code,
        reply_text: ShortStr::from_static(text),
        class_id: 0,
        method_id: 0,
    })
}

fn connection_close(code: u16, text: &'static str) -> Method {
    Method::ConnectionClose(codec::ConnectionClose {
        reply_code: code,
        reply_text: ShortStr::from_static(text),
        class_id: 0,
        method_id: 0,
    })
}

fn unacked_dec(links: &[LinkSlot], link: LinkId) {
    if let Some(slot) = links.get(link) {
        slot.m.unacked.dec();
    }
}

/// Splits a prefetch window over the shard links: each gets its share, the remainder going to
/// the first ones, and never less than one (0 stays "unlimited").
fn split_prefetch(window: u16, shards: u32, index: u32) -> u16 {
    if window == 0 || shards <= 1 {
        return window;
    }
    let w = u32::from(window);
    let share = w / shards + u32::from(index < w % shards);
    share.max(1) as u16
}

/// Replies to synchronous requests (the proxy pairs them with their requests in order).
fn is_reply(m: &Method) -> bool {
    matches!(
        m,
        Method::ChannelOpenOk(_)
            | Method::AccessRequestOk(_)
            | Method::ChannelFlowOk(_)
            | Method::ExchangeDeclareOk(_)
            | Method::ExchangeDeleteOk(_)
            | Method::ExchangeBindOk(_)
            | Method::ExchangeUnbindOk(_)
            | Method::QueueDeclareOk(_)
            | Method::QueueBindOk(_)
            | Method::QueueUnbindOk(_)
            | Method::QueuePurgeOk(_)
            | Method::QueueDeleteOk(_)
            | Method::BasicQosOk(_)
            | Method::BasicConsumeOk(_)
            | Method::BasicCancelOk(_)
            | Method::BasicGetOk(_)
            | Method::BasicGetEmpty(_)
            | Method::BasicRecoverOk(_)
            | Method::ConfirmSelectOk(_)
            | Method::TxSelectOk(_)
            | Method::TxCommitOk(_)
            | Method::TxRollbackOk(_)
    )
}

/// Whether a client request expects a reply (false for `nowait` and asynchronous methods).
fn expects_reply(m: &Method) -> bool {
    match m {
        Method::ExchangeDeclare(x) => !x.nowait,
        Method::ExchangeDelete(x) => !x.nowait,
        Method::ExchangeBind(x) => !x.nowait,
        Method::ExchangeUnbind(x) => !x.nowait,
        Method::QueueDeclare(x) => !x.nowait,
        Method::QueueBind(x) => !x.nowait,
        Method::QueuePurge(x) => !x.nowait,
        Method::QueueDelete(x) => !x.nowait,
        Method::BasicConsume(x) => !x.nowait,
        Method::BasicCancel(x) => !x.nowait,
        Method::ConfirmSelect(x) => !x.nowait,
        Method::QueueUnbind(_)
        | Method::BasicQos(_)
        | Method::BasicGet(_)
        | Method::BasicRecover(_)
        | Method::TxSelect(_)
        | Method::TxCommit(_)
        | Method::TxRollback(_)
        | Method::ChannelFlow(_)
        | Method::AccessRequest(_)
        | Method::ChannelOpen(_) => true,
        _ => false,
    }
}

/// What a session's event loop waits on, besides its own state.
struct Inputs {
    rd: ReadHalf,
    /// Bytes already read from the client (pipelined behind connection.open).
    rbuf: BytesMut,
    opened: mpsc::Receiver<Opened>,
    config_rx: tokio::sync::watch::Receiver<Arc<Config>>,
    heartbeat: Option<Duration>,
    max_message: u64,
    force_close: CancellationToken,
}

impl Session {
    async fn run(&mut self, inputs: Inputs) -> String {
        let Inputs {
            mut rd,
            mut rbuf,
            mut opened,
            mut config_rx,
            heartbeat,
            max_message,
            force_close,
        } = inputs;
        let mut assembler = Assembler::new(max_message);
        let mut last_seen = Instant::now();
        let mut forced = false;
        let client_out = self.client_out.clone();
        let mut was_reading = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Fires at the earliest time a link may have missed its heartbeats. Reset only when it
        // fires (and by the tick, for links opened since), not on every read: the deadlines move
        // with every byte, and the check at firing time sees where they are now.
        let link_silence = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(link_silence);
        // Frames pipelined behind connection.open are handled first.
        if !rbuf.is_empty() {
            self.on_client_bytes(&mut rbuf, &mut assembler);
        }
        loop {
            if let Some(reason) = self.end.take() {
                return reason;
            }
            for link in std::mem::take(&mut self.pending_release) {
                let released = std::mem::take(&mut self.links[link].released_held);
                self.release_held(released);
            }
            // One write per socket for everything the last turn produced.
            self.flush_all();
            let client_room = client_out.has_room();
            if !client_room {
                // The links are not read while the client is slow: not their silence.
                let now = std::time::Instant::now();
                for slot in &mut self.links {
                    if let Some(r) = slot.link.reader.as_mut() {
                        r.not_reading(now);
                    }
                }
            }
            let full_link = self
                .links
                .iter()
                .find(|s| s.live() && !s.link.outbox.has_room())
                .map(|s| s.link.outbox.clone());
            // Held publishes are bounded per connection and in total: at the bound, stop reading
            // the client until confirms free memory (they arrive as link events, or by the tick
            // when another connection frees the total).
            let held_ok = self.held_bytes < self.held_limit
                && (self.metrics.held_bytes.get() as usize) < self.held_limit_total;
            let read_client = full_link.is_none() && held_ok;
            if read_client && !was_reading {
                // Time spent not reading is not the client's silence.
                last_seen = Instant::now();
            }
            was_reading = read_client;
            let deadline = match &self.closing {
                Some(Closing::ByClient { deadline } | Closing::ByProxy { deadline, .. }) => {
                    Some(*deadline)
                }
                None => heartbeat.filter(|_| read_client).map(|h| last_seen + 2 * h),
            };
            rbuf.reserve(8 * 1024);
            tokio::select! {
                _ = force_close.cancelled(), if !forced => {
                    forced = true;
                    if self.closing.is_none() {
                        self.begin_proxy_close(ConnError::new(320, "broker forced connection closure with reason 'shutdown'"), "proxy shutdown");
                    }
                }
                (link, read) = std::future::poll_fn(|cx| self.poll_links(cx)), if client_room => {
                    self.on_link_readable(link, read);
                }
                Some(o) = opened.recv() => self.on_opened(o),
                Ok(()) = config_rx.changed(), if self.closing.is_none() => {
                    let config = config_rx.borrow_and_update().clone();
                    self.apply_config(&config);
                }
                _ = &mut link_silence => {
                    self.check_link_heartbeats();
                    link_silence.as_mut().reset(self.next_link_silence());
                }
                _ = tick.tick() => {
                    self.check_link_heartbeats();
                    let next = self.next_link_silence();
                    if next < link_silence.deadline() {
                        link_silence.as_mut().reset(next);
                    }
                    self.retire_quiet_links();
                    self.ensure_links();
                    self.check_no_shard();
                }
                r = tokio::io::AsyncReadExt::read_buf(&mut rd, &mut rbuf), if read_client => {
                    match r {
                        Ok(0) => return self.client_gone("client closed the TCP connection"),
                        Ok(_) => {
                            last_seen = Instant::now();
                            self.on_client_bytes(&mut rbuf, &mut assembler);
                        }
                        Err(e) => return self.client_gone(&format!("client socket error: {e}")),
                    }
                }
                _ = client_out.room(), if !client_room => {}
                _ = async { if let Some(o) = &full_link { o.room().await } }, if full_link.is_some() => {
                    // Time spent not reading is not the client's silence.
                    last_seen = Instant::now();
                }
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                    match &self.closing {
                        Some(Closing::ByClient { .. }) => {
                            self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
                            return "client closed the connection (upstream close timed out)".into();
                        }
                        Some(Closing::ByProxy { reason, .. }) => return format!("{reason} (no close-ok from client)"),
                        None => {
                            let h = heartbeat.unwrap_or_default();
                            return self.client_gone(&format!("missed heartbeats from client, timeout: {}s", h.as_secs()));
                        }
                    }
                }
            }
        }
    }

    /// The client socket is gone: release the upstream connections so the brokers requeue
    /// whatever the client had not acknowledged.
    fn client_gone(&mut self, reason: &str) -> String {
        for slot in &self.links {
            slot.send(0, &connection_close(200, "client connection lost"));
        }
        reason.to_owned()
    }

    fn on_client_bytes(&mut self, rbuf: &mut BytesMut, assembler: &mut Assembler) {
        while self.end.is_none() {
            let frame = match codec::decode_frame(rbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => return self.protocol_error(ConnError::new(e.reply_code(), e)),
            };
            if frame.kind == FrameKind::Heartbeat {
                if frame.channel != 0 {
                    return self.protocol_error(ConnError::new(
                        501,
                        "heartbeat frame on a non-zero channel",
                    ));
                }
                continue;
            }
            match assembler.push(frame) {
                Ok(None) => {}
                Ok(Some(cmd)) => {
                    if let Err(e) = self.on_client_command(cmd) {
                        return self.protocol_error(e);
                    }
                }
                Err(AssembleError::Connection { code, text }) => {
                    return self.protocol_error(ConnError {
                        code,
                        text,
                        class_id: 0,
                        method_id: 0,
                    });
                }
                Err(AssembleError::TooLarge {
                    channel,
                    method,
                    size,
                    max,
                }) => {
                    let text = format!(
                        "PRECONDITION_FAILED - message size {size} is larger than configured max size {max}"
                    );
                    self.close_channel(channel, 406, &text, &method);
                }
            }
        }
    }

    fn protocol_error(&mut self, e: ConnError) {
        if self.closing.is_some() {
            self.end = Some(format!("protocol error while closing: {}", e.text));
            return;
        }
        warn!(conn = self.id, code = e.code, text = %e.text, "closing connection on a protocol error");
        let reason = format!("protocol error: {}", e.text);
        self.begin_proxy_close(e, &reason);
    }

    fn to_client(&self, ch: u16, method: &Method) {
        self.client_out
            .push(|buf| codec::write_method(buf, ch, method));
    }

    fn channel_mut(&mut self, ch: u16) -> Option<&mut Channel> {
        self.channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
    }

    fn free_channel(&mut self, ch: u16) {
        if let Some(slot) = self.channels.get_mut(usize::from(ch))
            && let Some(mut channel) = slot.take()
        {
            channel.tags.forget_all(|l| unacked_dec(&self.links, l));
            self.metrics.channels.dec();
        }
    }

    /// Gives back what this session added to the shared gauges.
    fn release_gauges(&mut self) {
        let mut held = 0;
        for slot in &mut self.links {
            for up in &mut slot.chans {
                let drained = up.confirms.drain();
                slot.m.confirms_pending.dec_by(drained.len() as i64);
                held += drained.iter().map(|p| p.held.size()).sum::<usize>();
            }
        }
        self.release_held(held);
        for ch in 0..self.channels.len() {
            self.free_channel(ch as u16);
        }
        for slot in &mut self.links {
            let pending: usize = slot.chans.iter().map(|c| c.confirms.pending()).sum();
            slot.m.confirms_pending.dec_by(pending as i64);
            slot.chans.clear();
            slot.mark_done();
        }
    }

    /// Sends connection.close to the client and to every link; waits for the client's close-ok.
    fn begin_proxy_close(&mut self, e: ConnError, reason: &str) {
        let reply_text = ShortStr::try_from(truncate(&e.text)).unwrap_or_default();
        self.to_client(
            0,
            &Method::ConnectionClose(codec::ConnectionClose {
                reply_code: e.code,
                reply_text,
                class_id: e.class_id,
                method_id: e.method_id,
            }),
        );
        for slot in &self.links {
            slot.send(0, &connection_close(200, "client connection closing"));
        }
        self.closing = Some(Closing::ByProxy {
            deadline: Instant::now() + CLOSE_TIMEOUT,
            reason: reason.to_owned(),
        });
    }

    /// Ends a client-initiated close once every link has closed.
    fn maybe_finish_client_close(&mut self) {
        if let Some(Closing::ByClient { .. }) = self.closing
            && self.links.iter().all(|s| s.done)
        {
            self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
            self.end = Some("client closed the connection".into());
        }
    }

    // ----- links by role -------------------------------------------------------------------

    fn live_links(&self) -> LinkSet {
        let mut set = LinkSet::default();
        for (i, s) in self.links.iter().enumerate() {
            if s.live() {
                set.insert(i);
            }
        }
        set
    }

    fn shard_links(&self) -> LinkSet {
        let mut set = LinkSet::default();
        for (i, s) in self.links.iter().enumerate() {
            if s.live() && s.role == Role::Shard {
                set.insert(i);
            }
        }
        set
    }

    /// The link control traffic goes to.
    fn control_link(&self) -> Option<LinkId> {
        match self.control {
            Some(c) if self.links[c].live() => Some(c),
            Some(_) => None,
            None => self.shard_links().first(),
        }
    }

    fn targets(&self, class: Class) -> LinkSet {
        match class {
            Class::Sharded => self.shard_links(),
            Class::Control => self.control_link().map(LinkSet::one).unwrap_or_default(),
        }
    }

    // ----- reload ---------------------------------------------------------------------------

    /// Applies a reloaded configuration: weights and drains take effect for the next publish,
    /// removed clusters drain, added shard clusters get a link with this client's state.
    fn apply_config(&mut self, config: &Config) {
        self.rules = config.routing.clone();
        self.last_route = None;
        for slot in &mut self.links {
            if slot.done {
                continue;
            }
            match config.cluster(&slot.link.cluster) {
                Some(c) => {
                    slot.weight = c.weight;
                    slot.drain = c.drain;
                    slot.removed = false;
                    slot.removed_at = None;
                }
                None => {
                    if !slot.removed {
                        info!(conn = self.id, cluster = %slot.link.cluster, "cluster removed: draining its link");
                        slot.removed = true;
                        slot.removed_at = Some(Instant::now());
                        slot.last_delivery = Instant::now();
                    }
                    slot.drain = true;
                }
            }
        }
        for cluster in config.shard_clusters() {
            let have = self
                .links
                .iter()
                .any(|s| !s.done && *s.link.cluster == *cluster.name);
            if have || self.connecting.contains(&cluster.name) {
                continue;
            }
            if self.links.len() >= LinkSet::CAPACITY && !self.links.iter().any(|s| s.done) {
                warn!(conn = self.id, cluster = %cluster.name, "too many links in this session; not adding");
                continue;
            }
            self.spawn_connect(cluster);
        }
    }

    /// A link to an added cluster is open: replay what this client set up, then let publishes
    /// go there (see [`LinkSlot::ready`]).
    fn on_opened(&mut self, opened: Opened) {
        self.connecting.retain(|c| *c != opened.cluster.name);
        let link = match opened.result {
            Ok(link) => link,
            Err(e) => {
                warn!(conn = self.id, cluster = %opened.cluster.name, error = %e, "cannot open a link to the cluster; will retry");
                self.metrics
                    .cluster(&opened.cluster.name)
                    .link_failures
                    .inc();
                self.backoff(&opened.cluster.name);
                return;
            }
        };
        if self.closing.is_some()
            || !self
                .shared
                .config()
                .clusters
                .iter()
                .any(|c| c.name == opened.cluster.name)
        {
            // Closing, or the cluster was removed while connecting: drop the link.
            return;
        }
        let c = &opened.cluster;
        self.retry_at.remove(&c.name);
        let mut slot = LinkSlot::new(
            link,
            c.role,
            c.weight,
            c.drain,
            self.metrics.cluster(&c.name),
        );
        slot.ready = false;
        let class = if c.role == Role::Shard {
            Class::Sharded
        } else {
            Class::Control
        };
        slot.new_cluster = !self.links.iter().any(|s| *s.link.cluster == *c.name);
        slot.needs_topology = self.topology.has(class)
            || (slot.new_cluster
                && class == Class::Sharded
                && self.shared.topology_of(&self.vhost).has(Class::Sharded));
        // Reuse the slot of this cluster's dead link: everything that pointed at it was released
        // when it died, and link ids must stay below LinkSet::CAPACITY.
        let index = match self
            .links
            .iter()
            .position(|s| s.done && *s.link.cluster == *c.name)
        {
            Some(i) => {
                self.links[i] = slot;
                i
            }
            None => {
                self.links.push(slot);
                self.links.len() - 1
            }
        };
        if c.role == Role::Control {
            self.control = Some(index);
        }
        info!(conn = self.id, cluster = %c.name, node = %self.links[index].link.node, "link opened; replaying this client's topology, channels and consumers");

        let open: Vec<u16> = self
            .channels
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.as_ref()
                    .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening))
            })
            .map(|(i, _)| i as u16)
            .collect();
        for &ch in &open {
            self.links[index].open(ch, Pending::Replay);
            let Some(channel) = self.channels[usize::from(ch)].as_ref() else {
                continue;
            };
            let (tx, confirm, qos) = (channel.tx, channel.confirms.is_some(), channel.qos.clone());
            if tx {
                self.links[index].replay(ch, &Method::TxSelect(Default::default()));
            }
            if confirm {
                self.links[index].chan(ch).confirm_mode = true;
                self.links[index].replay(
                    ch,
                    &Method::ConfirmSelect(codec::ConfirmSelect { nowait: false }),
                );
            }
            if let Some(q) = qos {
                // The split changed for every shard link; existing links get their new share too.
                self.send_qos(ch, &q, Pending::Internal, Some(index));
            }
        }
        if let Some(&ch) = open.first() {
            self.replay_topology(index, ch);
        }
        for &ch in &open {
            let Some(channel) = self.channels[usize::from(ch)].as_mut() else {
                continue;
            };
            let mut requests = Vec::new();
            let class = match self.links[index].role {
                Role::Shard => Class::Sharded,
                Role::Control => Class::Control,
            };
            for consumer in &mut channel.consumers {
                if let Some(req) = &consumer.request
                    && consumer.class == class
                {
                    consumer.links.insert(index);
                    requests.push(Method::BasicConsume(codec::BasicConsume {
                        nowait: false,
                        ..req.clone()
                    }));
                }
            }
            for m in requests {
                self.links[index].replay(ch, &m);
            }
        }
        let slot = &mut self.links[index];
        if slot.replay_left == 0 && !slot.needs_topology {
            slot.ready = true;
            self.unpark();
        }
    }

    /// Which traffic a link carries.
    fn link_class(&self, link: LinkId) -> Option<Class> {
        self.links.get(link).map(|s| match s.role {
            Role::Shard => Class::Sharded,
            Role::Control => Class::Control,
        })
    }

    /// Starts opening a link to `cluster` in the background; [`on_opened`](Self::on_opened)
    /// gets the result.
    fn spawn_connect(&mut self, cluster: &crate::config::ClusterConfig) {
        self.connecting.push(cluster.name.clone());
        let spec = LinkSpec {
            cluster: Arc::from(cluster.name.as_str()),
            nodes: cluster.nodes.clone(),
            metrics: Some(self.metrics.cluster(&cluster.name)),
            tls: cluster.tls.clone(),
            ..self.base_spec.clone()
        };
        let (opened, cluster) = (self.opened_tx.clone(), cluster.clone());
        tokio::spawn(async move {
            let result = upstream::link::connect(&spec).await;
            let _ = opened.send(Opened { cluster, result }).await;
        });
    }

    /// Reopens links to configured clusters that have none (a failover, a cluster back from an
    /// outage), each cluster with its own exponential backoff and jitter so a fleet of
    /// sessions does not reconnect in lockstep.
    fn ensure_links(&mut self) {
        if self.closing.is_some() {
            return;
        }
        let config = self.shared.config();
        let now = Instant::now();
        for cluster in &config.clusters {
            let live = self
                .links
                .iter()
                .any(|s| s.live() && *s.link.cluster == *cluster.name);
            if live || self.connecting.contains(&cluster.name) {
                continue;
            }
            if self.links.len() >= LinkSet::CAPACITY && !self.links.iter().any(|s| s.done) {
                continue;
            }
            if let Some(retry) = self.retry_at.get_mut(&cluster.name)
                && retry.at > now
            {
                let back = self.shared.nodes_back(&cluster.name);
                if back != retry.nodes_back {
                    // A node of the cluster is back: retry soon, spread by connection over a
                    // window that keeps the whole proxy under RECONNECTS_PER_SEC.
                    retry.nodes_back = back;
                    let conns = self.metrics.connections.get().max(1) as u64;
                    let window_ms = (conns * 1000 / RECONNECTS_PER_SEC).max(1000);
                    retry.at = now + Duration::from_millis(self.id.wrapping_mul(7919) % window_ms);
                }
                continue;
            }
            self.spawn_connect(cluster);
        }
    }

    fn backoff(&mut self, cluster: &str) {
        let prev = self
            .retry_at
            .get(cluster)
            .map_or(Duration::from_millis(500), |r| r.delay);
        let next = (prev * 2).min(Duration::from_secs(30));
        // Jitter: up to a quarter of the delay, from the clock and the connection id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = next.mul_f64(
            f64::from((nanos ^ (self.id as u32).wrapping_mul(2_654_435_761)) % 1000) / 4000.0,
        );
        let retry = Retry {
            at: Instant::now() + next + jitter,
            delay: next,
            nodes_back: self.shared.nodes_back(cluster),
        };
        self.retry_at.insert(cluster.to_owned(), retry);
    }

    /// Declares this client's topology of the link's class again on `link`; on a cluster new to
    /// this session, first the proxy's shared sharded topology of the vhost (declared by any
    /// client, maybe long gone), so no publish routed there finds its queue missing.
    fn replay_topology(&mut self, link: LinkId, ch: u16) {
        let class = self.link_class(link);
        let slot = &self.links[link];
        let mut methods: Vec<Method> = Vec::new();
        if slot.new_cluster && class == Some(Class::Sharded) {
            methods.extend(
                self.shared
                    .topology_of(&self.vhost)
                    .entries()
                    .map(|(_, m)| m.clone()),
            );
        }
        methods.extend(
            self.topology
                .entries()
                .filter(|(c, _)| Some(*c) == class)
                .map(|(_, m)| m.clone()),
        );
        for m in &methods {
            self.links[link].replay(ch, m);
        }
        self.links[link].needs_topology = false;
    }

    /// Closes the links of removed clusters once nothing is in flight on them and their
    /// consumers have been quiet for a while (their queues are drained), or at the deadline.
    fn retire_quiet_links(&mut self) {
        let deadline = Duration::from_secs(self.shared.config().timeouts.drain_deadline_secs);
        for i in 0..self.links.len() {
            let slot = &self.links[i];
            if !slot.removed || slot.done || slot.retiring {
                continue;
            }
            let unacked: usize = self
                .channels
                .iter()
                .flatten()
                .map(|c| c.tags.count_link(i))
                .sum();
            let pending: usize = slot
                .chans
                .iter()
                .map(|c| c.confirms.pending() + c.pending.len())
                .sum();
            let quiet = slot.last_delivery.elapsed() >= RETIRE_QUIET;
            let overdue = slot.removed_at.is_some_and(|t| t.elapsed() >= deadline);
            if (unacked == 0 && pending == 0 && quiet) || overdue {
                info!(conn = self.id, cluster = %slot.link.cluster, unacked, overdue, "closing the link of a removed cluster");
                let slot = &mut self.links[i];
                slot.retiring = true;
                slot.link.send(
                    0,
                    &connection_close(200, "cluster removed from the proxy configuration"),
                );
                for channel in self.channels.iter_mut().flatten() {
                    channel.tags.forget_link(i);
                    for consumer in &mut channel.consumers {
                        consumer.links.remove(i);
                    }
                }
            }
        }
    }

    // ----- client to upstream -------------------------------------------------------------

    fn on_client_command(&mut self, cmd: Command) -> Result<(), ConnError> {
        let Command {
            channel: ch,
            method,
            content,
        } = cmd;
        if let Some(closing) = &self.closing {
            match (closing, &method) {
                (Closing::ByProxy { .. }, Method::ConnectionCloseOk(_)) => {
                    self.end = Some(match closing {
                        Closing::ByProxy { reason, .. } => reason.clone(),
                        Closing::ByClient { .. } => String::new(),
                    });
                }
                (Closing::ByProxy { .. }, Method::ConnectionClose(_)) => {
                    self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
                    self.end = Some("connection closed by both sides".into());
                }
                _ => {}
            }
            return Ok(());
        }
        if ch == 0 {
            return self.on_client_connection_method(method);
        }
        if ch > self.channel_max {
            // RabbitMQ's answer to a channel beyond channel_max.
            return Err(ConnError::new(
                530,
                format!(
                    "number of channels opened ({ch}) has reached the negotiated channel_max ({})",
                    self.channel_max
                ),
            )
            .on(&method));
        }
        if let Method::ChannelOpen(_) = method {
            return self.open_channel(ch, &method);
        }
        let Some(channel) = self
            .channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
        else {
            return Err(ConnError::new(504, "expected 'channel.open'").on(&method));
        };
        match channel.state {
            ChannelState::AwaitingCloseOk => {
                match method {
                    Method::ChannelCloseOk(_) => self.free_channel(ch),
                    Method::ChannelClose(_) => {
                        self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                        self.free_channel(ch);
                    }
                    _ => {}
                }
                return Ok(());
            }
            ChannelState::ClientClosing => return Ok(()),
            ChannelState::Opening | ChannelState::Open => {}
        }
        match method {
            Method::BasicPublish(ref p) => {
                // Producers publish to the same destination over and over: remember the last
                // classification instead of matching the patterns for every message.
                let class = match &self.last_route {
                    Some((x, k, c)) if *x == p.exchange && *k == p.routing_key => *c,
                    _ => {
                        let c = self
                            .rules
                            .publish(p.exchange.as_bytes(), p.routing_key.as_bytes());
                        self.last_route = Some((p.exchange.clone(), p.routing_key.clone(), c));
                        c
                    }
                };
                // The assembler only completes a publish together with its content.
                if let Some(content) = content {
                    self.publish(ch, class, &method, &content);
                }
            }
            Method::BasicAck(ref a) => {
                self.ack(ch, a.delivery_tag, a.multiple, &method, |t, m| {
                    Method::BasicAck(codec::BasicAck {
                        delivery_tag: t,
                        multiple: m,
                    })
                });
            }
            Method::BasicNack(ref n) => {
                let requeue = n.requeue;
                self.ack(ch, n.delivery_tag, n.multiple, &method, |t, m| {
                    Method::BasicNack(codec::BasicNack {
                        delivery_tag: t,
                        multiple: m,
                        requeue,
                    })
                });
            }
            Method::BasicReject(ref r) => {
                let requeue = r.requeue;
                self.ack(ch, r.delivery_tag, false, &method, |t, _| {
                    Method::BasicReject(codec::BasicReject {
                        delivery_tag: t,
                        requeue,
                    })
                });
            }
            Method::ChannelClose(_) => {
                if let Some(channel) = self.channel_mut(ch) {
                    channel.state = ChannelState::ClientClosing;
                    channel.rpcs.clear();
                }
                let mut waiting = false;
                for slot in &mut self.links {
                    waiting |= slot.close_chan(ch, &method);
                }
                if !waiting {
                    self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                    self.free_channel(ch);
                }
            }
            Method::ChannelCloseOk(_) => {}
            Method::BasicConsume(mut c) => {
                if c.consumer_tag.is_empty() {
                    // Generated here, not by a broker, so the tag is the same on every cluster.
                    self.next_ctag += 1;
                    c.consumer_tag = ShortStr::try_from(format!(
                        "amq.ctag-warren-{}-{}",
                        self.id, self.next_ctag
                    ))
                    .unwrap_or_default();
                }
                let class = self.rules.queue(c.queue.as_bytes());
                let targets = self.targets(class);
                let consumer = Consumer {
                    tag: c.consumer_tag.clone(),
                    no_ack: c.no_ack,
                    links: targets,
                    request: Some(c.clone()),
                    class,
                    // A broker sends consume-ok before any delivery; with several clusters the
                    // first one may deliver before the last one answers, so deliveries wait.
                    ready: c.nowait,
                };
                if let Some(channel) = self.channel_mut(ch) {
                    channel.consumers.push(consumer);
                }
                self.fan_out(ch, &Method::BasicConsume(c), targets)?;
            }
            Method::BasicCancel(ref c) => {
                let channel = self.channel_mut(ch).expect("checked above");
                let mut targets = channel
                    .consumer_mut(&c.consumer_tag)
                    .map(|k| k.links)
                    .unwrap_or_default();
                if c.nowait {
                    channel.remove_consumer(&c.consumer_tag);
                }
                if targets.is_empty() {
                    // Unknown tag: a broker answers cancel-ok anyway; let one do so.
                    targets = self
                        .live_links()
                        .first()
                        .map(LinkSet::one)
                        .unwrap_or_default();
                }
                self.fan_out(ch, &method, targets)?;
            }
            Method::BasicGet(ref g) => {
                channel.get_no_ack = Some(g.no_ack);
                let class = self.rules.queue(g.queue.as_bytes());
                self.get(ch, &method, class)?;
            }
            Method::BasicQos(q) => {
                channel.qos = Some(q.clone());
                let targets = self.live_links();
                let id = self
                    .channel_mut(ch)
                    .expect("checked above")
                    .push_rpc(targets.len(), Vec::new());
                self.send_qos(ch, &q, Pending::Rpc(id), None);
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                // The brokers redeliver everything unacknowledged with new tags.
                channel.tags.forget_all(|l| unacked_dec(&self.links, l));
                self.fan_out(ch, &method, self.live_links())?;
            }
            Method::ConfirmSelect(_) => {
                if !channel.tx && channel.confirms.is_none() {
                    channel.confirms = Some(Default::default());
                }
                let targets = self.live_links();
                for link in targets.iter() {
                    self.links[link].chan(ch).confirm_mode = true;
                }
                self.fan_out(ch, &method, targets)?;
            }
            Method::TxSelect(_) => {
                channel.tx = true;
                self.fan_out(ch, &method, self.live_links())?;
            }
            Method::TxCommit(_) | Method::TxRollback(_) => self.end_transaction(ch, &method)?,
            Method::ChannelFlow(_) | Method::ChannelFlowOk(_) => {
                self.fan_out(ch, &method, self.live_links())?
            }
            Method::ExchangeDeclare(_)
            | Method::ExchangeDelete(_)
            | Method::ExchangeBind(_)
            | Method::ExchangeUnbind(_)
            | Method::QueueDeclare(_)
            | Method::QueueBind(_)
            | Method::QueueUnbind(_)
            | Method::QueueDelete(_) => {
                let class = self.rules.topology(&method).unwrap_or(Class::Sharded);
                let t = self.targets(class);
                self.fan_out_topology(ch, &method, t, class == Class::Sharded)?;
            }
            Method::QueuePurge(ref x) => {
                let t = self.targets(self.rules.queue(x.queue.as_bytes()));
                self.fan_out(ch, &method, t)?;
            }
            // Anything else a client may send on a channel is for the broker to judge.
            other => {
                let t = self
                    .shard_links()
                    .first()
                    .map(LinkSet::one)
                    .unwrap_or_default();
                match content {
                    Some(content) => {
                        if let Some(link) = t.first() {
                            self.links[link].send_content(ch, &other, &content);
                        }
                    }
                    None => self.fan_out(ch, &other, t)?,
                }
            }
        }
        Ok(())
    }

    fn open_channel(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let i = usize::from(ch);
        if self.channels.len() <= i {
            self.channels.resize_with(i + 1, || None);
        }
        if self.channels[i].is_some() {
            return Err(ConnError::new(504, "second 'channel.open' seen").on(method));
        }
        let targets = self.live_links();
        let mut channel = Channel::new();
        let id = channel.push_rpc(targets.len(), Vec::new());
        self.channels[i] = Some(channel);
        self.metrics.channels.inc();
        for link in targets.iter() {
            self.links[link].open(ch, Pending::Rpc(id));
        }
        for link in 0..self.links.len() {
            if self.links[link].needs_topology && self.links[link].live() {
                self.replay_topology(link, ch);
            }
        }
        Ok(())
    }

    /// Sends a method to every target link; a synchronous one becomes an [`Rpc`] whose merged
    /// reply goes to the client once every target has answered.
    fn fan_out(&mut self, ch: u16, method: &Method, targets: LinkSet) -> Result<(), ConnError> {
        if targets.is_empty() {
            let text = format!("no cluster available for {}", method.name());
            self.close_channel(ch, 541, &format!("INTERNAL_ERROR - {text}"), method);
            return Ok(());
        }
        if expects_reply(method) {
            let Some(channel) = self.channel_mut(ch) else {
                return Ok(());
            };
            let id = channel.push_rpc(targets.len(), Vec::new());
            for link in targets.iter() {
                self.links[link].request(ch, method, Pending::Rpc(id));
            }
        } else {
            for link in targets.iter() {
                self.links[link].send(ch, method);
            }
        }
        Ok(())
    }

    /// Like [`fan_out`](Self::fan_out), and a sharded topology change is remembered once every
    /// cluster accepted it, to be replayed on clusters added later.
    fn fan_out_topology(
        &mut self,
        ch: u16,
        method: &Method,
        targets: LinkSet,
        sharded: bool,
    ) -> Result<(), ConnError> {
        let passive = match method {
            Method::ExchangeDeclare(x) => x.passive,
            // Server-named queues cannot be declared again by name (`amq.` is reserved).
            Method::QueueDeclare(x) => x.passive || x.queue.is_empty(),
            _ => false,
        };
        let class = if sharded {
            Class::Sharded
        } else {
            Class::Control
        };
        let record = !passive && !targets.is_empty();
        if record && !expects_reply(method) {
            self.record_topology(class, method.clone());
        }
        self.fan_out(ch, method, targets)?;
        if record
            && expects_reply(method)
            && let Some(channel) = self.channel_mut(ch)
            && let Some(rpc) = channel.rpcs.back_mut()
        {
            rpc.on_success = Some((class, method.clone()));
        }
        Ok(())
    }

    /// Updates the replay logs with a topology change every cluster accepted: this session's
    /// own, and the proxy's shared one for sharded, non-exclusive entries.
    fn record_topology(&mut self, class: Class, method: Method) {
        match &method {
            Method::QueueDeclare(x) if class == Class::Sharded && !x.queue.is_empty() => {
                self.shared.note_queue(&self.vhost, &x.queue.as_str());
            }
            Method::QueueDelete(x) if class == Class::Sharded => {
                self.shared.forget_queue(&self.vhost, &x.queue.as_str())
            }
            _ => {}
        }
        if class == Class::Sharded && self.topology.shareable(&method) {
            self.shared.record_topology(&self.vhost, method.clone());
        }
        self.topology.record(class, method);
    }

    /// Sends the client's qos to every link of the channel, the window split over the shard
    /// clusters so the client never holds more than it asked for (see docs/routing.md); a control
    /// consumer gets the whole window.
    fn send_qos(
        &mut self,
        ch: u16,
        q: &codec::BasicQos,
        pending: Pending,
        replay_on: Option<LinkId>,
    ) {
        let shards: Vec<LinkId> = self.shard_links().iter().collect();
        let n = shards.len() as u32;
        for link in self.live_links().iter() {
            let share = match shards.iter().position(|&s| s == link) {
                Some(k) => split_prefetch(q.prefetch_count, n, k as u32),
                None => q.prefetch_count,
            };
            let m = Method::BasicQos(codec::BasicQos {
                prefetch_count: share,
                ..q.clone()
            });
            if Some(link) == replay_on {
                self.links[link].replay(ch, &m);
            } else {
                self.links[link].request(ch, &m, pending);
            }
        }
    }

    /// basic.get: a control queue lives on one cluster; a sharded queue is tried cluster by
    /// cluster (starting from a rotating one, so no cluster is always drained first) until one
    /// has a message.
    fn get(&mut self, ch: u16, method: &Method, class: Class) -> Result<(), ConnError> {
        let mut order: Vec<LinkId> = self.targets(class).iter().collect();
        if order.is_empty() {
            return self.fan_out(ch, method, LinkSet::default());
        }
        self.get_rotation = self.get_rotation.wrapping_add(1);
        let r = self.get_rotation % order.len();
        order.rotate_left(r);
        let first = order.remove(0);
        order.reverse(); // popped from the back
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(());
        };
        let id = channel.push_rpc(1, order);
        if let Some(rpc) = channel.rpc_mut(id) {
            rpc.get_request = Some(method.clone());
        }
        self.links[first].request(ch, method, Pending::Rpc(id));
        Ok(())
    }

    fn on_client_connection_method(&mut self, method: Method) -> Result<(), ConnError> {
        match method {
            Method::ConnectionClose(_) => {
                for slot in &self.links {
                    slot.send(0, &connection_close(200, "client closed the connection"));
                }
                self.closing = Some(Closing::ByClient {
                    deadline: Instant::now() + CLOSE_TIMEOUT,
                });
                self.maybe_finish_client_close();
                Ok(())
            }
            Method::ConnectionCloseOk(_) => Ok(()),
            Method::ConnectionUpdateSecret(_) => {
                for slot in &self.links {
                    slot.send(0, &method);
                }
                self.to_client(0, &Method::ConnectionUpdateSecretOk(Default::default()));
                Ok(())
            }
            other => Err(
                ConnError::new(503, format!("unexpected {} on channel 0", other.name())).on(&other),
            ),
        }
    }

    /// Forwards a publish whole to the cluster it is routed to.
    fn publish(&mut self, ch: u16, class: Class, method: &Method, content: &Content) {
        let Method::BasicPublish(publish) = method else {
            return;
        };
        let tx = self.channel_mut(ch).is_some_and(|c| c.tx);
        let held = Held {
            publish: publish.clone(),
            content: content.clone(),
        };
        let link = match class {
            Class::Control => self.control_link(),
            Class::Sharded if tx => match self.tx_link(ch) {
                Ok(link) => {
                    let limit = self.held_limit;
                    if let Some(channel) = self.channel_mut(ch) {
                        channel.tx_log.record(&held, limit);
                    }
                    Some(link)
                }
                Err(text) => {
                    self.close_channel(ch, 541, text, method);
                    return;
                }
            },
            Class::Sharded => self.pick_shard(None),
        };
        if link.is_none() && class == Class::Sharded && !tx && self.closing.is_none() {
            // No shard link is ready (a failover in progress): wait for one.
            let client_seq = self
                .channel_mut(ch)
                .and_then(|c| c.confirms.as_mut())
                .map(|c| c.next_seq());
            self.park(ch, client_seq, held);
            return;
        }
        let Some(link) = link else {
            self.close_channel(
                ch,
                541,
                "INTERNAL_ERROR - no cluster available for basic.publish",
                method,
            );
            return;
        };
        let client_seq = self
            .channel_mut(ch)
            .and_then(|c| c.confirms.as_mut())
            .map(|c| c.next_seq());
        self.send_publish(ch, link, client_seq, held, tx);
    }

    /// The link of the channel's open transaction, chosen at its first publish. When that link
    /// died under the transaction, the transaction's publishes are published again on the new
    /// link first, so the commit covers all of them.
    fn tx_link(&mut self, ch: u16) -> Result<LinkId, &'static str> {
        let current = self.channel_mut(ch).and_then(|c| c.tx_link);
        if let Some(link) = current
            && self.links[link].live()
        {
            return Ok(link);
        }
        let Some(picked) = self.pick_shard(None) else {
            return Err("INTERNAL_ERROR - no shard cluster available for this transaction");
        };
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(picked);
        };
        channel.tx_link = Some(picked);
        if channel.tx_log.lost {
            if channel.tx_log.overflowed {
                return Err("INTERNAL_ERROR - the cluster of this transaction failed; \
                            the transaction is too large to publish again");
            }
            channel.tx_log.lost = false;
            let redo = std::mem::take(&mut channel.tx_log.publishes);
            debug!(conn = self.id, channel = ch, publishes = redo.len(), to = %self.links[picked].link.cluster,
                "the transaction's cluster failed; publishing its messages again");
            self.redo_transaction(ch, picked, redo.iter());
            if let Some(channel) = self.channel_mut(ch) {
                channel.tx_log.publishes = redo;
            }
        }
        Ok(picked)
    }

    /// tx.commit / tx.rollback: answered by every live link (the transaction's publishes are
    /// on one of them). A commit keeps the transaction's publishes until it is answered, to
    /// commit them elsewhere if their link dies first.
    fn end_transaction(&mut self, ch: u16, method: &Method) -> Result<(), ConnError> {
        let commit = matches!(method, Method::TxCommit(_));
        if commit && self.channel_mut(ch).is_some_and(|c| c.tx_log.lost) {
            // The transaction's link died: publish its messages again before committing.
            if let Err(text) = self.tx_link(ch) {
                self.close_channel(ch, 541, text, method);
                return Ok(());
            }
        }
        let Some(channel) = self.channel_mut(ch) else {
            return Ok(());
        };
        let link = channel.tx_link.take();
        // The next transaction starts empty; this one's publishes go with its commit.
        let log = std::mem::take(&mut channel.tx_log);
        let targets = self.live_links();
        self.fan_out(ch, method, targets)?;
        // With no target, fan_out closed the channel and sent nothing to wait for.
        if commit
            && !targets.is_empty()
            && let Some(link) = link
            && let Some(channel) = self.channel_mut(ch)
            && let Some(rpc) = channel.rpcs.back()
        {
            let kept = (!log.overflowed).then_some(log.publishes);
            channel.tx_log.committing = Some((rpc.id, link, kept));
        }
        Ok(())
    }

    /// The link that had a transaction's publishes died while its commit was unanswered: the
    /// broker may or may not have committed. Publish the transaction again on another link and
    /// commit there (a duplicate is possible, counted in `warren_republished`); the new link's
    /// answer stands in for the dead one's. Returns false when `id` is not such a commit.
    fn redo_commit(&mut self, ch: u16, dead: LinkId, id: u64) -> bool {
        let Some(channel) = self.channel_mut(ch) else {
            return false;
        };
        match &channel.tx_log.committing {
            Some((cid, link, _)) if *cid == id && *link == dead => {}
            _ => return false,
        }
        let Some((_, _, kept)) = channel.tx_log.committing.take() else {
            return false;
        };
        let commit = Method::TxCommit(Default::default());
        let Some(publishes) = kept else {
            self.close_channel(
                ch,
                541,
                "INTERNAL_ERROR - the cluster of this transaction failed during tx.commit; \
                 the transaction was too large to publish again",
                &commit,
            );
            return true;
        };
        let Some(target) = self.pick_shard(Some(dead)).filter(|&l| l != dead) else {
            self.close_channel(
                ch,
                541,
                "INTERNAL_ERROR - the cluster of this transaction failed during tx.commit \
                 and no other shard cluster is available",
                &commit,
            );
            return true;
        };
        warn!(conn = self.id, channel = ch, from = %self.links[dead].link.cluster, to = %self.links[target].link.cluster,
            publishes = publishes.len(), "transaction's cluster failed during tx.commit; committing it again elsewhere");
        self.redo_transaction(ch, target, publishes.iter());
        self.links[target].request(ch, &commit, Pending::Rpc(id));
        if let Some(channel) = self.channel_mut(ch) {
            channel.tx_log.committing = Some((id, target, Some(publishes)));
        }
        true
    }

    /// Counts bytes of publishes this connection holds (per connection and in the total).
    fn add_held(&mut self, size: usize) {
        self.held_bytes += size;
        self.metrics.held_bytes.inc_by(size as i64);
    }

    /// Releases bytes counted by [`add_held`](Self::add_held).
    fn release_held(&mut self, size: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(size);
        self.metrics.held_bytes.dec_by(size as i64);
    }

    /// Publishes a transaction's messages again on `link` (its first link died).
    fn redo_transaction<'a>(
        &mut self,
        ch: u16,
        link: LinkId,
        publishes: impl Iterator<Item = &'a Held>,
    ) {
        for held in publishes {
            self.metrics.republished.inc();
            self.send_publish(ch, link, None, held.clone(), true);
        }
    }

    /// Keeps a publish until a shard link is ready (see [`Session::parked`]).
    fn park(&mut self, ch: u16, client: Option<u64>, held: Held) {
        let size = held.size();
        self.add_held(size);
        if self.parked.is_empty() {
            info!(
                conn = self.id,
                "no shard cluster ready; holding publishes until one is"
            );
        }
        self.parked.push_back(Parked { ch, client, held });
        self.no_shard_since.get_or_insert_with(Instant::now);
    }

    /// A shard link became ready: send the parked publishes, in order.
    fn unpark(&mut self) {
        while let Some(p) = self.parked.pop_front() {
            let Some(link) = self.pick_shard(None) else {
                self.parked.push_front(p);
                return;
            };
            let size = p.held.size();
            self.release_held(size);
            let open = self
                .channel_mut(p.ch)
                .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening));
            if open {
                self.send_publish(p.ch, link, p.client, p.held, false);
            } else {
                self.metrics.dropped.inc();
                warn!(conn = self.id, channel = p.ch, exchange = %p.held.publish.exchange, routing_key = %p.held.publish.routing_key,
                    "publish lost: its channel was closed while it waited for a shard cluster");
            }
        }
        if !self.shard_links().is_empty() {
            self.no_shard_since = None;
        }
    }

    /// On the tick: no shard cluster for longer than `timeouts.failover_wait_secs` gives up the
    /// parked publishes (nacks to confirm-mode clients) and closes the client with 320, so it
    /// reconnects (maybe to another warren) instead of waiting forever.
    fn check_no_shard(&mut self) {
        if !self.parked.is_empty() {
            // A failed pick changes no round-robin state; unpark keeps what it cannot send.
            self.unpark();
        }
        let Some(since) = self.no_shard_since else {
            return;
        };
        if !self.shard_links().is_empty() && self.parked.is_empty() {
            self.no_shard_since = None;
            return;
        }
        let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
        if since.elapsed() < wait || self.closing.is_some() {
            return;
        }
        for p in std::mem::take(&mut self.parked) {
            let size = p.held.size();
            self.release_held(size);
            match p.client {
                Some(seq) => self.nack_lost(p.ch, &[seq]),
                None => {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = p.ch, exchange = %p.held.publish.exchange, routing_key = %p.held.publish.routing_key,
                        "publish lost: no shard cluster came back in time and the client did not ask for confirms");
                }
            }
        }
        let text = "no shard cluster is reachable";
        warn!(
            conn = self.id,
            waited_secs = wait.as_secs(),
            "{text}; closing the client"
        );
        self.begin_proxy_close(ConnError::new(320, text), text);
    }

    /// The next shard link by smooth weighted round-robin over the live, ready, non-draining
    /// ones; `avoid` is skipped unless it is the only one.
    fn pick_shard(&mut self, avoid: Option<LinkId>) -> Option<LinkId> {
        // A cluster under a resource alarm (connection.blocked) gets publishes only when every
        // other one is blocked too: publishes move rather than pause.
        let any_unblocked = self.links.iter().enumerate().any(|(i, s)| {
            s.live()
                && s.ready
                && s.role == Role::Shard
                && !s.drain
                && !s.blocked
                && Some(i) != avoid
        });
        let eligible = |i: usize, s: &LinkSlot| {
            s.live()
                && s.ready
                && s.role == Role::Shard
                && !s.drain
                && Some(i) != avoid
                && (!any_unblocked || !s.blocked)
        };
        let links = &self.links;
        let picked = self.rr.pick(
            links
                .iter()
                .enumerate()
                .filter(|(i, s)| eligible(*i, s))
                .map(|(i, s)| (i, s.weight)),
        );
        picked.or_else(|| avoid.filter(|&a| self.links.get(a).is_some_and(|s| s.live())))
    }

    /// Writes a publish to a link. Outside transactions the upstream channel is in confirm mode
    /// and the publish is held until the cluster confirms it, so a nack or a lost link gets it
    /// published again elsewhere instead of lost.
    fn send_publish(
        &mut self,
        ch: u16,
        link: LinkId,
        client_seq: Option<u64>,
        held: Held,
        tx: bool,
    ) {
        let slot = &mut self.links[link];
        slot.m.publishes.inc();
        if matches!(slot.chan_state(ch), UpState::Closed | UpState::Closing) {
            slot.open(ch, Pending::Internal);
        }
        let done = slot.done;
        let up = slot.chan(ch);
        if !tx && !up.confirm_mode && !done && self.hold_publishes {
            up.confirm_mode = true;
            slot.link.send(
                ch,
                &Method::ConfirmSelect(codec::ConfirmSelect { nowait: true }),
            );
        }
        let method = Method::BasicPublish(held.publish.clone());
        slot.send_content(ch, &method, &held.content);
        let up = slot.chan(ch);
        if up.confirm_mode {
            let size = held.size();
            up.confirms.record(client_seq, held);
            slot.m.confirms_pending.inc();
            self.add_held(size);
        }
    }

    /// Publishes again a message a cluster nacked or lost. A duplicate is possible when the
    /// cluster took the message and died before confirming it: counted in `warren_republished`.
    fn republish(&mut self, ch: u16, failed: LinkId, inflight: InFlight) {
        self.metrics.republished.inc();
        let InFlight { client, held, .. } = inflight;
        let class = self.rules.publish(
            held.publish.exchange.as_bytes(),
            held.publish.routing_key.as_bytes(),
        );
        let open = self
            .channel_mut(ch)
            .is_some_and(|c| matches!(c.state, ChannelState::Open | ChannelState::Opening));
        let target = match class {
            Class::Control => self.control_link().filter(|&l| l != failed),
            Class::Sharded => self
                .pick_shard(Some(failed))
                .filter(|&l| self.links[l].live()),
        };
        match target {
            Some(link) if open => {
                debug!(conn = self.id, channel = ch, from = %self.links[failed].link.cluster, to = %self.links[link].link.cluster, "publishing again");
                self.send_publish(ch, link, client, held, false);
            }
            None if open && class == Class::Sharded && self.closing.is_none() => {
                // The only shard cluster is failing over: wait for its link to come back.
                self.park(ch, client, held);
            }
            _ => {
                if let Some(seq) = client {
                    self.nack_lost(ch, &[seq]);
                } else {
                    self.metrics.dropped.inc();
                    warn!(conn = self.id, channel = ch, exchange = %held.publish.exchange, routing_key = %held.publish.routing_key,
                        "publish lost: no cluster can take it and the client did not ask for confirms");
                }
            }
        }
    }

    /// Maps a client ack / nack / reject to the links that delivered the messages.
    fn ack(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        method: &Method,
        make: impl Fn(u64, bool) -> Method,
    ) {
        let mut acks = std::mem::take(&mut self.scratch_acks);
        let resolved = match self.channel_mut(ch) {
            Some(channel) => channel.tags.resolve(tag, multiple, &mut acks),
            None => Ok(()),
        };
        match resolved {
            Ok(()) => {
                for a in &acks {
                    if let Some(slot) = self.links.get(a.link) {
                        slot.m.acks.inc();
                        slot.m.unacked.dec_by(i64::from(a.count));
                        slot.send(ch, &make(a.upstream_tag, a.multiple));
                    }
                }
            }
            Err(unknown) => {
                let text = format!("PRECONDITION_FAILED - unknown delivery tag {}", unknown.0);
                self.close_channel(ch, 406, &text, method);
            }
        }
        self.scratch_acks = acks;
    }

    /// Closes a client channel on the proxy's own initiative (as the broker would), and the
    /// upstream channels behind it.
    fn close_channel(&mut self, ch: u16, code: u16, text: &str, method: &Method) {
        debug!(conn = self.id, channel = ch, code, text, "closing channel");
        let (class_id, method_id) = method.ids();
        let reply_text = ShortStr::try_from(truncate(text)).unwrap_or_default();
        self.to_client(
            ch,
            &Method::ChannelClose(codec::ChannelClose {
                reply_code: code,
                reply_text,
                class_id,
                method_id,
            }),
        );
        if let Some(channel) = self
            .channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
        {
            channel.state = ChannelState::AwaitingCloseOk;
            channel.rpcs.clear();
            channel.tags.forget_all(|l| unacked_dec(&self.links, l));
        }
        let close = close_method(200, "client channel closed by the proxy");
        for slot in &mut self.links {
            slot.close_chan(ch, &close);
        }
    }

    // ----- upstream to client -------------------------------------------------------------

    /// A link's socket gave bytes (or ended): handle every whole command they complete.
    fn on_link_readable(&mut self, link: LinkId, read: Result<(), LinkDown>) {
        if let Err(reason) = read {
            self.links[link].link.reader = None;
            return self.on_link_down(link, reason);
        }
        while self.end.is_none() {
            let Some(reader) = self.links[link].link.reader.as_mut() else {
                return;
            };
            match reader.next_command() {
                Ok(Some(cmd)) => self.on_link_command(link, cmd),
                Ok(None) => return,
                Err(reason) => {
                    self.links[link].link.reader = None;
                    return self.on_link_down(link, reason);
                }
            }
        }
    }

    /// Polls the links' sockets, starting after the one read last so none starves the others.
    fn poll_links(&mut self, cx: &mut Context<'_>) -> Poll<(LinkId, Result<(), LinkDown>)> {
        let n = self.links.len();
        for i in 0..n {
            let link = (self.next_read + i) % n;
            if let Some(reader) = self.links[link].link.reader.as_mut()
                && let Poll::Ready(r) = reader.poll_read(cx)
            {
                self.next_read = link + 1;
                return Poll::Ready((link, r));
            }
        }
        Poll::Pending
    }

    /// Links silent for two heartbeat intervals are dead (checked by the tick).
    fn check_link_heartbeats(&mut self) {
        let now = std::time::Instant::now();
        for link in 0..self.links.len() {
            let missed = self.links[link]
                .link
                .reader
                .as_ref()
                .and_then(|r| r.heartbeat_missed(now));
            if let Some(reason) = missed {
                self.links[link].link.reader = None;
                self.on_link_down(link, reason);
            }
        }
    }

    /// The earliest time a link may have been silent for two heartbeat intervals (an hour away
    /// when no link has heartbeats).
    fn next_link_silence(&self) -> tokio::time::Instant {
        let earliest = self
            .links
            .iter()
            .filter_map(|s| s.link.reader.as_ref()?.heartbeat_deadline())
            .min();
        match earliest {
            Some(at) => tokio::time::Instant::from_std(at),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    /// Sends what this turn of the event loop wrote, one write per socket.
    fn flush_all(&self) {
        self.client_out.flush();
        for slot in &self.links {
            slot.link.outbox.flush();
        }
    }

    fn on_link_down(&mut self, link: LinkId, reason: LinkDown) {
        let Some(slot) = self.links.get_mut(link) else {
            return;
        };
        let retiring = slot.retiring;
        let was_done = !slot.mark_done() || retiring;
        if !was_done && self.closing.is_none() {
            slot.m.link_failures.inc();
        }
        match &self.closing {
            Some(Closing::ByClient { .. }) => self.maybe_finish_client_close(),
            Some(Closing::ByProxy { .. }) => {}
            None if was_done => {}
            None => {
                let slot = &self.links[link];
                warn!(conn = self.id, cluster = %slot.link.cluster, node = %slot.link.node, %reason, "upstream link lost; failing over");
                self.fail_link(link);
            }
        }
    }

    /// Makes the held bytes a channel reset will release count after this command is handled.
    fn release_held_later(&mut self, link: LinkId) {
        let slot = &mut self.links[link];
        let released = std::mem::take(&mut slot.released_held);
        self.release_held(released);
        self.pending_release.push(link);
    }

    /// Releases everything that depended on a dead link, so the client sees no error: its
    /// unacknowledged deliveries become dead tags (the broker requeues the messages; acks for
    /// the old tags are swallowed), its consumers and pending replies are settled by the other
    /// links, publishes it had not confirmed are nacked to confirm-mode clients. The tick then
    /// reconnects the cluster (the other node, if this one is down) and replays this client's
    /// state on the new link.
    fn fail_link(&mut self, link: LinkId) {
        let slot = &mut self.links[link];
        slot.mark_done();
        let cluster = slot.link.cluster.to_string();
        // Whatever it still had to say is moot: stop reading it.
        slot.link.reader = None;
        let chans = std::mem::take(&mut slot.chans);
        let m = slot.m.clone();
        for (ch, up) in chans.into_iter().enumerate() {
            let ch = ch as u16;
            m.confirms_pending.dec_by(up.confirms.pending() as i64);
            let mut up = up;
            let lost = up.confirms.drain();
            if let Some(channel) = self.channel_mut(ch)
                && channel.tx_link == Some(link)
            {
                channel.tx_link = None;
                channel.tx_log.lost =
                    !channel.tx_log.publishes.is_empty() || channel.tx_log.overflowed;
            }
            for pending in up.pending {
                if let Pending::Rpc(id) = pending
                    && !self.redo_commit(ch, link, id)
                {
                    self.settle_dead_rpc(ch, id);
                }
            }
            let freed: usize = lost.iter().map(|p| p.held.size()).sum();
            self.release_held(freed);
            for inflight in lost {
                self.republish(ch, link, inflight);
            }
            self.flush_rpcs(ch);
        }
        for channel in self.channels.iter_mut().flatten() {
            let n = channel.tags.kill_link(link);
            m.unacked.dec_by(n as i64);
            for consumer in &mut channel.consumers {
                consumer.links.remove(link);
            }
        }
        // `control` keeps pointing at the dead control slot: control traffic fails with a clear
        // channel error (not a hang, and never silently on a shard) until the link is back.
        let retry = Retry {
            at: Instant::now(),
            delay: Duration::from_millis(250),
            nodes_back: self.shared.nodes_back(&cluster),
        };
        self.retry_at.insert(cluster, retry);
        if self.shard_links().is_empty() && self.no_shard_since.is_none() {
            self.no_shard_since = Some(Instant::now());
            warn!(
                conn = self.id,
                wait_secs = self.shared.config().timeouts.failover_wait_secs,
                "no shard cluster is reachable; holding publishes until one is back"
            );
        }
    }

    /// A request was waiting for a link that died: count it as answered by that link (the
    /// other links' replies make the answer), or try the next cluster for a basic.get.
    fn settle_dead_rpc(&mut self, ch: u16, id: u64) {
        let Some(channel) = self
            .channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(rpc) = channel.rpc_mut(id) else {
            return;
        };
        if let Some(get) = rpc.get_request.clone() {
            while let Some(next) = rpc.get_next.pop() {
                if self.links[next].live() {
                    self.links[next].request(ch, &get, Pending::Rpc(id));
                    return;
                }
            }
            if rpc.reply.is_none() {
                rpc.reply = Some(super::channel::Reply {
                    method: Method::BasicGetEmpty(Default::default()),
                    content: None,
                    link: LinkId::MAX,
                });
            }
        }
        rpc.waiting = rpc.waiting.saturating_sub(1);
    }

    /// Publishes that were in flight on a dead link: a confirm-mode client gets a nack (kombu
    /// and most clients republish on nack), as the broker may or may not have taken them.
    fn nack_lost(&mut self, ch: u16, client_seqs: &[u64]) {
        let mut sorted = client_seqs.to_vec();
        sorted.sort_unstable();
        let mut out = Vec::new();
        if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
            confirms.settle(&sorted, &mut out);
        }
        for c in out {
            self.to_client(
                ch,
                &Method::BasicNack(codec::BasicNack {
                    delivery_tag: c.seq,
                    multiple: c.multiple,
                    requeue: false,
                }),
            );
        }
    }

    fn on_link_command(&mut self, link: LinkId, cmd: Command) {
        let Command {
            channel: ch,
            method,
            content,
        } = cmd;
        if ch == 0 {
            return self.on_link_connection_method(link, method);
        }
        if self.closing.is_some() {
            return;
        }
        // After sending channel.close a peer discards everything on that channel but close and
        // close-ok (a late reply must not be taken for the reply to a reopened channel).
        let closing = self.links[link].chan_state(ch) == UpState::Closing;
        if closing && !matches!(method, Method::ChannelClose(_) | Method::ChannelCloseOk(_)) {
            return;
        }
        // Upstream channel bookkeeping first: it is independent of the client channel's fate.
        if matches!(method, Method::ChannelClose(_) | Method::ChannelCloseOk(_)) {
            self.release_held_later(link);
        }
        match &method {
            Method::ChannelClose(_) => {
                let slot = &mut self.links[link];
                slot.send(ch, &Method::ChannelCloseOk(Default::default()));
                if let (true, pending) = slot.reset_chan(ch) {
                    // The client closed and reopened while this close was in flight.
                    if let Some(p) = pending {
                        slot.open(ch, p);
                    }
                    return;
                }
            }
            Method::ChannelCloseOk(_) => {
                let slot = &mut self.links[link];
                if slot.chan(ch).state != UpState::Closing {
                    return;
                }
                if let (true, pending) = slot.reset_chan(ch) {
                    if let Some(p) = pending {
                        slot.open(ch, p);
                    }
                    return;
                }
            }
            Method::ChannelOpenOk(_) => {
                let up = self.links[link].chan(ch);
                if up.state == UpState::Opening {
                    up.state = UpState::Open;
                }
            }
            _ => {}
        }
        let Some(channel) = self
            .channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
        else {
            return;
        };
        match channel.state {
            ChannelState::AwaitingCloseOk => return,
            ChannelState::ClientClosing => {
                if matches!(method, Method::ChannelCloseOk(_) | Method::ChannelClose(_))
                    && self
                        .links
                        .iter()
                        .all(|s| s.done || s.chan_state(ch) != UpState::Closing)
                {
                    self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                    self.free_channel(ch);
                }
                return;
            }
            ChannelState::Opening | ChannelState::Open => {}
        }
        if is_reply(&method) {
            return self.on_reply(link, ch, method, content);
        }
        match method {
            Method::ChannelClose(c) => {
                // One cluster refused: the client channel fails as a whole, with that cluster's
                // code and text; its parts on the other clusters are closed behind it.
                channel.state = ChannelState::AwaitingCloseOk;
                channel.rpcs.clear();
                channel.tags.forget_all(|l| unacked_dec(&self.links, l));
                self.to_client(ch, &Method::ChannelClose(c));
                let close = close_method(200, "sibling channel closed");
                for slot in &mut self.links {
                    slot.close_chan(ch, &close);
                }
            }
            Method::ChannelCloseOk(_) => {}
            Method::BasicDeliver(mut d) => {
                let needs_ack = !channel.consumer_no_ack(&d.consumer_tag);
                d.delivery_tag = channel.tags.issue(link, d.delivery_tag, needs_ack);
                let slot = &mut self.links[link];
                slot.m.deliveries.inc();
                if needs_ack {
                    slot.m.unacked.inc();
                }
                if slot.removed {
                    slot.last_delivery = Instant::now();
                }
                let Some(channel) = self
                    .channels
                    .get_mut(usize::from(ch))
                    .and_then(Option::as_mut)
                else {
                    return;
                };
                if !channel.held.is_empty() || channel.consumers.iter().any(|c| !c.ready) {
                    // Until the client has its consume-ok, deliveries of the channel wait, in
                    // order (their tags are already issued, in arrival order).
                    channel.held.push((Method::BasicDeliver(d), content));
                    return;
                }
                self.deliver(ch, &Method::BasicDeliver(d), content.as_ref());
            }
            Method::BasicAck(a) => self.confirm(link, ch, a.delivery_tag, a.multiple, true),
            Method::BasicNack(n) => self.confirm(link, ch, n.delivery_tag, n.multiple, false),
            Method::BasicCancel(ref c) => {
                // A cluster cancelled the consumer (its queue was deleted there). The client
                // hears of it once no cluster is left feeding the consumer.
                let gone = match channel.consumer_mut(&c.consumer_tag) {
                    Some(consumer) => {
                        consumer.links.remove(link);
                        consumer.links.is_empty()
                    }
                    None => false,
                };
                if gone {
                    channel.remove_consumer(&c.consumer_tag);
                    if self.caps.consumer_cancel_notify {
                        self.to_client(ch, &method);
                    }
                }
            }
            _ => self.deliver(ch, &method, content.as_ref()),
        }
    }

    /// A reply to a synchronous request: pair it with its request and answer the client once
    /// the request is complete.
    fn on_reply(&mut self, link: LinkId, ch: u16, method: Method, content: Option<Content>) {
        let pending = self.links[link].chan(ch).pending.pop_front();
        if let Some(Pending::Replay) = pending {
            let slot = &mut self.links[link];
            slot.replay_left = slot.replay_left.saturating_sub(1);
            if slot.replay_left == 0 && !slot.needs_topology && !slot.ready {
                slot.ready = true;
                info!(conn = self.id, cluster = %slot.link.cluster, "added cluster ready: topology and consumers replayed");
                self.unpark();
            }
            return;
        }
        let Some(Pending::Rpc(id)) = pending else {
            return;
        };
        let Some(channel) = self
            .channels
            .get_mut(usize::from(ch))
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Some(rpc) = channel.rpc_mut(id) else {
            return;
        };
        if let Method::BasicGetEmpty(_) = method
            && let Some(get) = rpc.get_request.clone()
        {
            while let Some(next) = rpc.get_next.pop() {
                if self.links[next].live() {
                    self.links[next].request(ch, &get, Pending::Rpc(id));
                    return;
                }
            }
        }
        rpc.merge(method, content, link);
        self.flush_rpcs(ch);
    }

    /// Answers completed requests at the head of the channel's queue, in request order.
    fn flush_rpcs(&mut self, ch: u16) {
        loop {
            let Some(channel) = self
                .channels
                .get_mut(usize::from(ch))
                .and_then(Option::as_mut)
            else {
                return;
            };
            if channel.rpcs.front().is_none_or(|r| r.waiting != 0) {
                return;
            }
            let Some(rpc) = channel.rpcs.pop_front() else {
                return;
            };
            let Some(reply) = rpc.reply else {
                // Every cluster this request went to died before answering.
                let m = Method::ChannelOpen(Default::default());
                self.close_channel(
                    ch,
                    541,
                    "INTERNAL_ERROR - the cluster(s) for this request became unavailable",
                    &m,
                );
                return;
            };
            if let Some((class, m)) = rpc.on_success {
                self.record_topology(class, m);
            }
            let Some(channel) = self
                .channels
                .get_mut(usize::from(ch))
                .and_then(Option::as_mut)
            else {
                return;
            };
            match reply.method {
                Method::ChannelOpenOk(ok) => {
                    if channel.state == ChannelState::Opening {
                        channel.state = ChannelState::Open;
                        self.to_client(ch, &Method::ChannelOpenOk(ok));
                    }
                }
                Method::BasicGetOk(mut g) => {
                    let needs_ack = !channel.get_no_ack.take().unwrap_or(false);
                    g.delivery_tag = channel.tags.issue(reply.link, g.delivery_tag, needs_ack);
                    let m = &self.links[reply.link].m;
                    m.deliveries.inc();
                    if needs_ack {
                        m.unacked.inc();
                    }
                    self.deliver(ch, &Method::BasicGetOk(g), reply.content.as_ref());
                }
                Method::BasicGetEmpty(e) => {
                    channel.get_no_ack = None;
                    self.to_client(ch, &Method::BasicGetEmpty(e));
                }
                Method::BasicCancelOk(c) => {
                    channel.remove_consumer(&c.consumer_tag);
                    self.to_client(ch, &Method::BasicCancelOk(c));
                }
                Method::BasicConsumeOk(ok) => {
                    if let Some(c) = channel.consumer_mut(&ok.consumer_tag) {
                        c.ready = true;
                    }
                    let release = channel.consumers.iter().all(|c| c.ready);
                    let held = if release {
                        std::mem::take(&mut channel.held)
                    } else {
                        Vec::new()
                    };
                    self.to_client(ch, &Method::BasicConsumeOk(ok));
                    for (m, content) in held {
                        self.deliver(ch, &m, content.as_ref());
                    }
                }
                Method::TxCommitOk(ok) => {
                    channel.tx_log.committing = None;
                    self.to_client(ch, &Method::TxCommitOk(ok));
                }
                other => self.to_client(ch, &other),
            }
        }
    }

    fn deliver(&self, ch: u16, method: &Method, content: Option<&Content>) {
        let frame_max = self.frame_max;
        self.client_out.push(|buf| {
            codec::write_method(buf, ch, method);
            if let Some(content) = content {
                content.write(buf, ch, frame_max);
            }
        });
    }

    /// Maps a broker's publisher confirm back to the client's sequence numbers. A nack gets
    /// the publish sent again to another cluster; the client hears only the final outcome.
    fn confirm(&mut self, link: LinkId, ch: u16, upstream_seq: u64, multiple: bool, ack: bool) {
        let mut settled = std::mem::take(&mut self.scratch_inflight);
        let mut seqs = std::mem::take(&mut self.scratch_seqs);
        let mut out = std::mem::take(&mut self.scratch_confirms);
        self.links[link]
            .chan(ch)
            .confirms
            .resolve(upstream_seq, multiple, &mut settled);
        let n = settled.len() as u64;
        {
            // Borrowed, not cloned: a clone is a dozen atomic increments per confirm.
            let m = &self.links[link].m;
            if let Some(first) = settled.first() {
                m.confirm_latency.observe(first.at.elapsed().as_secs_f64());
            }
            m.confirms_pending.dec_by(n as i64);
            if ack {
                m.confirm_acks.inc_by(n);
            } else {
                m.confirm_nacks.inc_by(n);
            }
        }
        let freed: usize = settled.iter().map(|p| p.held.size()).sum();
        self.release_held(freed);
        if ack {
            seqs.clear();
            seqs.extend(settled.iter().filter_map(|p| p.client));
            seqs.sort_unstable();
            if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
                confirms.settle(&seqs, &mut out);
                for c in &out {
                    self.to_client(
                        ch,
                        &Method::BasicAck(codec::BasicAck {
                            delivery_tag: c.seq,
                            multiple: c.multiple,
                        }),
                    );
                }
            }
            settled.clear();
        } else {
            warn!(conn = self.id, cluster = %self.links[link].link.cluster, count = n, "cluster nacked publishes; publishing them again elsewhere");
            for inflight in settled.drain(..) {
                self.republish(ch, link, inflight);
            }
        }
        self.scratch_inflight = settled;
        self.scratch_seqs = seqs;
        self.scratch_confirms = out;
    }

    fn on_link_connection_method(&mut self, link: LinkId, method: Method) {
        match method {
            Method::ConnectionClose(c) => {
                let slot = &mut self.links[link];
                slot.send(0, &Method::ConnectionCloseOk(Default::default()));
                slot.mark_done();
                match &self.closing {
                    Some(Closing::ByClient { .. }) => self.maybe_finish_client_close(),
                    Some(Closing::ByProxy { .. }) => {}
                    None => {
                        let slot = &self.links[link];
                        warn!(conn = self.id, cluster = %slot.link.cluster, code = c.reply_code, text = %c.reply_text, "broker closed the connection");
                        let reason = format!(
                            "broker closed the connection: {} {}",
                            c.reply_code, c.reply_text
                        );
                        let e = ConnError {
                            code: c.reply_code,
                            text: c.reply_text.as_str().into_owned(),
                            class_id: c.class_id,
                            method_id: c.method_id,
                        };
                        self.begin_proxy_close(e, &reason);
                    }
                }
            }
            Method::ConnectionCloseOk(_) => {
                self.links[link].mark_done();
                self.maybe_finish_client_close();
            }
            Method::ConnectionBlocked(b) => {
                let slot = &mut self.links[link];
                if !std::mem::replace(&mut slot.blocked, true) {
                    self.blocked_links += 1;
                    if self.blocked_links == 1 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionBlocked(b));
                    }
                }
            }
            Method::ConnectionUnblocked(u) => {
                let slot = &mut self.links[link];
                if std::mem::replace(&mut slot.blocked, false) {
                    self.blocked_links -= 1;
                    if self.blocked_links == 0 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionUnblocked(u));
                    }
                }
            }
            _ => {}
        }
    }
}
