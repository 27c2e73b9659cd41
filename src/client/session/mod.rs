//! One client connection, from accept to close.
//!
//! A single task owns all of a connection's protocol state and does its socket I/O, so nothing on
//! the hot path takes a lock other than the outboxes' short append and no message crosses a task
//! boundary. It waits on the client socket, the sockets of its upstream links, and timers. It
//! reads the client only while every upstream outbox has room, and reads the links only while the
//! client's outbox has room: that is the whole of the back-pressure story, and it never blocks
//! one direction on the other.
//!
//! A client channel N is carried by channel N on every link of the session (each link is its own
//! connection, so the numbers never clash). Where a method goes is decided by [`crate::route`];
//! replies of fanned-out requests are merged by [`crate::client::channel::Rpc`]; tags and confirms are
//! translated by the maps in [`super::channel`].
//!
//! The files follow a message: [`from_client`] (what the client sends), [`publish`] (where a
//! publish goes and how it is held), [`upstream`] (the links and their channels),
//! [`from_cluster`] (deliveries, confirms, replies), [`links`] (links opened, failed over,
//! retired), [`vanished`] (what a failover's replay finds missing), [`reply_to`] (direct
//! reply-to across clusters); this file has the event loop and the connection's life.

mod barrier;
mod fast_lane;
mod from_client;
mod from_cluster;
mod input_skip;
mod joining;
mod link_slot;
mod links;
mod permission;
mod publish;
mod read_pace;
mod reply_to;
mod up_consumers;
mod vanished;
mod wake;

use input_skip::InputSkip;
use link_slot::{LinkSlot, Pending, TopologyPlan, UpChan, UpState};
use up_consumers::UpConsumers;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::handshake::{self, ClientCaps, Refusal, truncate};
use crate::client::channel::{
    AfterReply, Channel, ChannelState, ClientConfirm, Consumer, Held, HeldDelivery, InFlight,
    LinkRef, LinkSet, PendingClose, Rpc, UpstreamAck, UpstreamConfirms,
};
use crate::codec::{self, FrameKind, Method, ReplyCode, ShortStr};
use crate::config::{Config, Role};
use crate::held::{HeldLedger, HeldTicket, Receiving};
use crate::io::stream::{ReadHalf, Stream};
use crate::io::{Assembler, Command, Content, Gate, Outbox, command::AssembleError};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::route::{Class, KeyedRoundRobin, Rules};
use crate::state::Shared;
use crate::topology::Topology;
use crate::upstream::{self, ConnectError, Link, LinkDown, LinkId, LinkSpec};

/// How long a closing handshake may take before the proxy just drops the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a basic.consume waits for another connection's turn to subscribe to a
/// single-active-consumer queue (see [`crate::single_active`]) before going without it: a
/// subscribe held up by a cluster (a quorum queue without a leader answers after about 65 s)
/// must not hold every other subscriber for as long.
const TURN_WAIT: Duration = Duration::from_secs(10);

/// How often a basic.consume waiting for a turn looks again.
const TURN_POLL: Duration = Duration::from_millis(5);

/// Serves one accepted client socket until it closes.
pub async fn serve(
    mut stream: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    force_close: CancellationToken,
) {
    let config = shared.config();
    let id = shared.next_connection_id();
    let mut rbuf = BytesMut::with_capacity(16 * 1024);

    let (greeting, vhost) = match greet(&mut stream, &mut rbuf, &shared, &config).await {
        Ok(g) => g,
        Err(refusal) => {
            match &refusal {
                // A bare TCP connect (a load balancer's health check): not a refused client.
                Refusal::Drop {
                    reason,
                    silent: true,
                    ..
                } => {
                    debug!(conn = id, %peer, %reason, "TCP probe: connection closed before the handshake");
                    shared.metrics.probes.inc();
                }
                Refusal::Drop { reason, .. } => {
                    info!(conn = id, %peer, %reason, "connection refused during handshake");
                    shared.metrics.connections_refused.inc();
                }
                Refusal::Close { code, text, .. } => {
                    warn!(conn = id, %peer, code, %text, "connection refused during handshake");
                    shared.metrics.connections_refused.inc();
                }
            }
            answer_refusal(&mut stream, &mut rbuf, refusal).await;
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
        fallback_password: None,
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
    // With lazy links the credentials are checked against the control cluster alone; the shard
    // clusters get links when the client first needs them (see `Session::wake_shard_links`).
    // An unreachable control cluster falls back to every cluster at once.
    let control_only = if config.limits.lazy_links
        && config.clusters.iter().any(|c| c.role == Role::Control)
        && config.clusters.iter().any(|c| c.role == Role::Shard)
    {
        Some(open_links(id, &config, &base, &metrics, Some(Role::Control)).await)
    } else {
        None
    };
    let lazy = matches!(control_only, Some(Ok(_)));
    let opened = match control_only {
        None | Some(Err(ConnectError::Unreachable { .. })) => {
            open_links(id, &config, &base, &metrics, None).await
        }
        Some(result) => result,
    };
    let links = match opened {
        Ok(links) => links,
        Err(ConnectError::Refused {
            node,
            code,
            mut text,
        }) => {
            // warren logs in to the clusters with PLAIN; the client should read its own
            // mechanism in RabbitMQ's "Login was refused using authentication mechanism ...".
            if greeting.amqplain {
                text = text.replace("mechanism PLAIN", "mechanism AMQPLAIN");
            }
            warn!(conn = id, %peer, user = %user, vhost = %vhost, %node, code, %text, "connection refused by the broker");
            metrics.connections_refused.inc();
            handshake::refuse(&mut stream, &mut rbuf, code, &text, 10, 40).await;
            return;
        }
        Err(e @ ConnectError::Unreachable { .. }) => {
            warn!(conn = id, %peer, user = %user, vhost = %vhost, error = %e, "no upstream cluster available");
            metrics.connections_refused.inc();
            let code = ReplyCode::ConnectionForced;
            let text = truncate(&code.text(&e));
            handshake::refuse(&mut stream, &mut rbuf, code.code(), &text, 10, 40).await;
            return;
        }
    };
    if let Some(slot) = links.iter().find(|s| s.role == Role::Shard) {
        shared.learn_server_properties(&slot.link.server_properties);
    }

    // Listed in GET /clients from here until the session ends.
    let mut identity = crate::clients::Identity::from_properties(&greeting.client_properties);
    identity.peer = Some(peer);
    identity.user = user.clone();
    identity.vhost = vhost.as_str().into_owned();
    let registration = shared.clients.register(id, identity);
    let info = registration.client().clone();

    let (rd, wr) = stream.into_split();
    let heartbeat =
        (greeting.heartbeat > 0).then(|| Duration::from_secs(u64::from(greeting.heartbeat)));
    let (client_out, writer) = Outbox::start(
        config.limits.client_buffer_bytes,
        wr,
        heartbeat.map(|h| h / 2),
        Some(info.bytes_out.clone()),
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

    // A cluster that missed a shared topology change (unreachable while a client declared)
    // gets the changes before this client publishes there: its link joins once the session
    // runs, after the other clusters were asked about what the changes declare (see
    // `Session::admit`).
    let mut links = links;
    let mut behind = Vec::new();
    let mut i = 0;
    while i < links.len() {
        let cluster = &links[i].link.cluster;
        if shared.is_stale(&vhost.as_str(), cluster)
            && shared
                .with_topology(&vhost.as_str(), |t| t.has(Class::Sharded))
                .unwrap_or(false)
            && let Some(c) = config.cluster(cluster).cloned()
        {
            // What the cluster missed (see `Session::replay_topology`); all of the shared
            // topology only when it may lack any of it.
            let all = shared.lacks_shared_topology(&vhost.as_str(), cluster);
            let plan = TopologyPlan {
                shared: all,
                declare: all,
                check: true,
            };
            behind.push((links.remove(i).into_link(), c, plan));
            continue;
        }
        i += 1;
    }
    let control = links.iter().position(|s| s.role == Role::Control);
    let (opened_tx, opened_rx) = mpsc::channel(4);
    let mut session = Session {
        info,
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
        rr: KeyedRoundRobin::default(),
        get_rotation: 0,
        channels: Vec::new(),
        closing: None,
        end: None,
        blocked_links: 0,
        close_requested: None,
        idle: None,
        scratch_acks: Vec::new(),
        scratch_seqs: Vec::new(),
        scratch_confirms: Vec::new(),
        scratch_inflight: Vec::new(),
        held: HeldLedger::new(shared.held.clone()),
        receiving: Receiving::new(shared.held.clone()),
        held_limit: config.limits.max_held_bytes_per_connection,
        hold_publishes: config.limits.hold_publishes,
        noted_cc: false,
        metrics: metrics.clone(),
        parked: VecDeque::new(),
        nacks_log: LogThrottle::default(),
        refused_drops_log: LogThrottle::default(),
        no_shard_since: None,
        next_read: 0,
        tx_swaps: 0,
        reopen_wait: false,
        rpc_stall: None,
        input_stalled: false,
        write_stall: None,
        links_unread_at: None,
        skip: InputSkip::None,
        eof_drain: None,
        eof_reason: None,
        orphans: Vec::new(),
        input_waits_for: None,
        proxy_close_held_until: None,
        client_close_held: None,
        turns: Vec::new(),
        held_close_cut: false,
        awaiting_turn: None,
        turn_waited: None,
        tx_end: None,
        replay_checks: Default::default(),
        joining: Vec::new(),
        next_join: 0,
        in_turn_hold: None,
        proven_exchanges: Default::default(),
        leases_renewed: Default::default(),
        barrier: None,
        stale_topology: Default::default(),
        lazy,
        deferred: None,
        tx_wait_since: None,
        woken: Vec::new(),
        reopened_idle: Vec::new(),
    };
    for (link, cluster, plan) in behind {
        session.admit(link, cluster, plan, plan.shared);
    }
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
        if !slot.done() {
            slot.link.shutdown(Duration::from_millis(500)).await;
        }
    }
    drop(registration);
    info!(conn = id, %peer, user = %user, vhost = %vhost, reason = %reason, "connection closed");
}

/// Runs the handshake and answers connection.open with connection.close `code`: how a refused
/// connection (limits) is told why, in AMQP, as RabbitMQ tells it.
pub async fn refuse_at_open(mut stream: Stream, shared: &Shared, code: ReplyCode, detail: &str) {
    let config = shared.config();
    let mut rbuf = BytesMut::with_capacity(4096);
    let text = code.text(detail);
    match greet(&mut stream, &mut rbuf, shared, &config).await {
        Ok(_) => handshake::refuse(&mut stream, &mut rbuf, code.code(), &text, 10, 40).await,
        Err(refusal) => answer_refusal(&mut stream, &mut rbuf, refusal).await,
    }
}

/// The handshake up to connection.open, with the clusters' product and version in
/// connection.start.
async fn greet(
    stream: &mut Stream,
    rbuf: &mut BytesMut,
    shared: &Shared,
    config: &Config,
) -> Result<(handshake::Greeting, ShortStr), Refusal> {
    let _ = stream.set_nodelay(true);
    let server_props =
        handshake::server_properties(shared.server_properties(config).await.as_ref());
    handshake::greet(stream, rbuf, config, server_props).await
}

/// Tells the client why its handshake failed: connection.close with the code (and waits for
/// close-ok), or the bytes of a dropped connection (the protocol header RabbitMQ answers a wrong
/// one with), then the end of the stream.
async fn answer_refusal(stream: &mut Stream, rbuf: &mut BytesMut, refusal: Refusal) {
    match refusal {
        Refusal::Close {
            code,
            text,
            class_id,
            method_id,
        } => handshake::refuse(stream, rbuf, code, &text, class_id, method_id).await,
        Refusal::Drop { reply, .. } => {
            if let Some(bytes) = reply {
                let _ = stream.write_all(bytes).await;
            }
            let _ = stream.shutdown().await;
        }
    }
}

/// Opens one link per cluster (of `only` that role, if given), concurrently. A refusal
/// (credentials, vhost) from any cluster is the client's answer; an unreachable cluster is left
/// out as long as one shard cluster (or with `only`, one cluster) answers.
async fn open_links(
    conn: u64,
    config: &Config,
    base: &LinkSpec,
    metrics: &Metrics,
    only: Option<Role>,
) -> Result<Vec<LinkSlot>, ConnectError> {
    let mut tasks = JoinSet::new();
    // The configuration holds at most LinkSet::CAPACITY clusters (config::MAX_CLUSTERS).
    let clusters: Vec<_> = config
        .clusters
        .iter()
        .filter(|c| only.is_none_or(|role| c.role == role))
        .collect();
    for (i, cluster) in clusters.iter().enumerate() {
        let spec = LinkSpec {
            cluster: Arc::from(cluster.name.as_str()),
            nodes: cluster.link_nodes(conn),
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
        any_shard |= cluster.role == Role::Shard || only.is_some();
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

/// The client's socket ended without connection.close; publishes read before are still held
/// until confirmed (see [`Session::client_gone`]).
struct EofDrain {
    deadline: Instant,
    reason: String,
}

/// What a client's connection.close waits for before the links close (see
/// [`Session::maybe_close_requested`]).
#[derive(Debug, Clone, Copy)]
struct CloseWait {
    /// Until then, for the replies to requests sent before the close.
    rpcs_until: Instant,
    /// Until then (`timeouts.failover_wait_secs`), for the confirms of publishes sent before
    /// it: a link that dies meanwhile gets them published again elsewhere.
    held_until: Instant,
}

/// A client request that was in flight on a link that died (see [`Session::orphan_rpc`]).
struct Orphan {
    cluster: String,
    ch: u16,
    id: u64,
    since: Instant,
}

/// Why the connection is ending.
enum Closing {
    /// The client sent connection.close; waiting for the links to confirm theirs.
    ByClient { deadline: Instant },
    /// The proxy sent connection.close to the client; waiting for its close-ok.
    ByProxy { deadline: Instant, reason: String },
}

/// A connection.close warren started, kept back from the client until `until`.
struct HeldClose {
    close: Method,
    until: SendCloseWhen,
}

/// When a connection.close warren keeps back goes to the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SendCloseWhen {
    /// Every link is closed: nothing was held, and RabbitMQ deletes a connection's exclusive
    /// queues as it closes.
    LinksClosed,
    /// The client is owed no publisher confirm: its publishes on their way to clusters that
    /// are up are confirmed to it first, so that it does not count as lost (and publish again)
    /// what the clusters routed.
    ConfirmsSettled,
}

/// A protocol error that ends the connection.
struct ConnError {
    code: u16,
    text: String,
    class_id: u16,
    method_id: u16,
}

impl ConnError {
    fn new(code: ReplyCode, detail: impl std::fmt::Display) -> Self {
        ConnError {
            code: code.code(),
            text: code.text(detail),
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
    /// This connection's entry in `GET /clients` (see `crate::clients`).
    info: Arc<crate::clients::Client>,
    client_out: Arc<Outbox>,
    frame_max: usize,
    caps: ClientCaps,
    channel_max: u16,
    links: Vec<LinkSlot>,
    /// The control cluster's link; control traffic goes to the first shard link without one.
    control: Option<LinkId>,
    rules: Rules,
    /// The last publish destination and its class (see `on_client_command`).
    last_route: Option<(ShortStr, ShortStr, Class, Option<usize>)>,
    rr: KeyedRoundRobin,
    get_rotation: usize,
    channels: Vec<Option<Channel>>,
    closing: Option<Closing>,
    /// Set when the session must end after the current event.
    end: Option<String>,
    blocked_links: usize,
    scratch_acks: Vec<UpstreamAck>,
    scratch_seqs: Vec<u64>,
    scratch_confirms: Vec<ClientConfirm>,
    scratch_inflight: Vec<InFlight>,
    /// Bytes of publishes this connection holds until their clusters confirm them.
    held: Arc<HeldLedger>,
    /// Body bytes of publishes still arriving, counted in the process budget.
    receiving: Receiving,
    held_limit: usize,
    /// `limits.hold_publishes`: put upstream channels in confirm mode and hold publishes.
    hold_publishes: bool,
    /// A publish with a `CC` or `BCC` header was noted in the shared state (once is enough).
    noted_cc: bool,
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
    /// Publishes waiting for a link, oldest first: none was ready for their class when they
    /// came (or when their link died), typically while the control cluster's link, or the only
    /// live shard cluster's, fails over to its other node. Counted in `held`, so they are
    /// bounded like every held publish.
    parked: VecDeque<Parked>,
    /// Nacks from clusters, and refused publishes dropped, are each logged at most every
    /// [`LogThrottle::EVERY`]: a full `reject-publish` queue refuses every publish for as long
    /// as it stays full.
    nacks_log: LogThrottle,
    refused_drops_log: LogThrottle,
    /// Since when publishes have been parked (or no shard link has been live); after
    /// `timeouts.failover_wait_secs` the parked publishes are given up (nacked) and the client
    /// is closed with 320.
    no_shard_since: Option<Instant>,
    /// The shard clusters have no link yet, on purpose: the connection has so far only talked
    /// to the control cluster (`[limits] lazy_links`; a Celery event connection never does more).
    lazy: bool,
    /// The shard links look idle (see `close_idle_shard_links`): what they had been sent when
    /// that was first seen, and since when.
    idle: Option<(u64, Instant)>,
    /// The first command that needed the shard clusters, waiting (with the client's input)
    /// until their links are open and this client's state is replayed on them.
    deferred: Option<(Command, Instant)>,
    /// Since when the deferred command, a transaction's, has been waiting for a shard link
    /// (see `wait_for_shard_link`); `None` once it has run.
    tx_wait_since: Option<Instant>,
    /// Clusters whose first link in this session was opened by [`Session::wake_shard_links`]:
    /// not new to the proxy, only to this connection (their replay declares this client's
    /// control-cluster topology, not the vhost's shared one).
    woken: Vec<String>,
    /// Clusters whose link warren closed for idleness, being opened again by
    /// [`Session::wake_shard_links`]: their replay declares and checks nothing.
    reopened_idle: Vec<String>,
    /// The link [`poll_links`](Self::poll_links) tries first.
    next_read: usize,
    /// Upstream channels being reopened without confirm mode for a tx.select
    /// ([`select_tx`](Self::select_tx)). While any is, the client's input waits: what it sends
    /// after tx.select must reach those channels after their tx.select.
    tx_swaps: usize,
    /// A client channel's open waits behind the close of its previous upstream part on some
    /// link (see [`input_paused`](Self::input_paused)); cleared once none does.
    reopen_wait: bool,
    /// A channel with [`MAX_PIPELINED_RPCS`] requests unanswered: the client's input waits
    /// until it has fewer.
    rpc_stall: Option<u16>,
    /// Client frames are buffered but were left unprocessed because of `tx_swaps` or
    /// `rpc_stall`.
    input_stalled: bool,
    /// Since when the client's outbox has been full with no write getting through, and the
    /// outbox's write count then (see [`client_not_reading`](Self::client_not_reading)).
    write_stall: Option<(Instant, u64)>,
    /// When the links were last left unread because the client's outbox was full (see
    /// [`starved_link_lost`](Self::starved_link_lost)).
    links_unread_at: Option<Instant>,
    /// Client bytes to drop before frames are decoded again, after a frame warren refused
    /// (see [`InputSkip`]).
    skip: InputSkip,
    /// Requests in flight on links that died, waiting for their clusters' next links.
    orphans: Vec<Orphan>,
    /// A request warren must see answered before it reads more of the client's input (channel,
    /// request id): the check of a queue.delete with `if_empty` / `if_unused` (see
    /// `checked_delete`), or of the client's permission before warren refuses a request itself
    /// (see `permission.rs`). What the client sent behind it must not overtake it.
    input_waits_for: Option<(u16, u64)>,
    /// A close warren started while publishes were unconfirmed: until when their links stay
    /// open for them (see `begin_proxy_close`).
    proxy_close_held_until: Option<Instant>,
    /// A connection.close warren started and keeps back from the client for a moment (see
    /// `begin_proxy_close`).
    client_close_held: Option<HeldClose>,
    /// Turns to subscribe to single-active-consumer queues this connection holds, each until
    /// its basic.consume (channel, request id) is answered (see [`crate::single_active`]).
    turns: Vec<(crate::single_active::Turn, (u16, u64))>,
    /// While a close waits for the client's confirms: the client sent something other than an
    /// ack, which was discarded, and so is everything after it (see `on_client_command`).
    held_close_cut: bool,
    /// A basic.consume waiting for another connection's turn, and since when: the client's
    /// input waits behind it.
    awaiting_turn: Option<(Command, Instant)>,
    /// While a waiting basic.consume runs again: since when it has waited.
    turn_waited: Option<Instant>,
    /// A tx.commit or tx.rollback not yet answered (channel, request id): the client's input
    /// waits until it is. RabbitMQ handles nothing else on a channel while it commits (what
    /// arrives meanwhile is refused: "unexpected command while processing 'tx.commit'"), and
    /// the next transaction's publishes must not join the one being committed.
    tx_end: Option<(u16, u64)>,
    /// A failover's passive checks of the client's queues and exchanges, and what the other
    /// clusters say of one the cluster no longer has (see [`vanished`]).
    replay_checks: vanished::ReplayChecks,
    /// Links opened and held back until the other clusters say which names their replay
    /// would declare still exist (see [`joining`]); their clusters stay in `connecting`.
    joining: Vec<joining::Joining>,
    next_join: u64,
    /// A request sent to clusters one after the other (channel and request id): a declare or
    /// delete (`Rpc::in_turn`) or a basic.get (`Rpc::get_next`). The client's input waits until
    /// every cluster that is to get it has been sent it, so that what the client pipelined
    /// behind it (publishes to the queue it declares, a bind of it, a publish behind a get)
    /// reaches each cluster after it, as one broker handles a channel's methods in order.
    in_turn_hold: Option<(u16, u64)>,
    /// The topology changes each cluster missed, having no live link when this client made
    /// them: its next link applies them (see `Session::replay_topology`).
    stale_topology: std::collections::HashMap<String, crate::topology::Missed>,
    /// Exchanges a publish of this connection was accepted to (see `barrier.rs`).
    proven_exchanges: std::collections::HashSet<ShortStr>,
    /// When this connection's gets last renewed each queue's lease on the clusters they did not
    /// ask (see `Session::renew_lease`).
    leases_renewed: std::collections::HashMap<ShortStr, Instant>,
    /// A publish being checked before the client's next frames are read (see `barrier.rs`).
    barrier: Option<barrier::Barrier>,
    /// The client's socket ended; waiting for its publishes' confirms before closing links.
    eof_drain: Option<EofDrain>,
    /// The client sent connection.close behind requests still unanswered or publishes not yet
    /// confirmed: the links close once those are settled, or at the deadlines.
    close_requested: Option<CloseWait>,
    /// Why the session ends once the links closed after an [`EofDrain`].
    eof_reason: Option<String>,
}

/// Synchronous requests one channel may have outstanding before warren stops reading the client
/// (each is remembered until its reply). Clients wait for each reply, or pipeline a few
/// declares; this bounds what one that never reads its replies can make warren keep.
const MAX_PIPELINED_RPCS: usize = 256;

/// When a cluster without a live link is tried again.
struct Retry {
    at: Instant,
    /// Failed attempts in a row since the link was lost ([`RECONNECT`] says how long each waits).
    failures: u32,
    /// [`Shared::nodes_back`] of the cluster when the delay started: a node seen back by the
    /// health probes since then cuts the wait short.
    nodes_back: u64,
    /// Why the last attempt failed ("127.0.0.1:5701 refused the connection: 403 ..."), for the
    /// client's connection.close if it has to be closed for want of this cluster.
    last_error: Option<String>,
    /// Since when the cluster has had no live link (the first failure of this run of them).
    down_since: Instant,
}

/// Lets a repeated warning through once per [`Self::EVERY`], counting what it held back, so a
/// condition that lasts (a full queue refusing publishes) is one log line every few seconds
/// per connection, not one per message.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<Instant>,
    held_back: u64,
}

impl LogThrottle {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(n)` when this occurrence should be logged, `n` being how many were not since the
    /// last one that was.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// A publish waiting for a link of its class (see [`Session::parked`]).
struct Parked {
    class: Class,
    ch: u16,
    client: Option<u64>,
    held: Held,
    /// A broker may refuse it (see `barrier.rs`): nothing more is read from the client until
    /// it is sent and checked.
    check: bool,
    /// Its bytes, counted against the session's bound while it waits.
    _ticket: HeldTicket,
}

/// A link opened after a reload added a cluster.
struct Opened {
    cluster: crate::config::ClusterConfig,
    result: Result<Link, ConnectError>,
}

/// When the health probes see a cluster come back, the sessions waiting for it reconnect
/// spread over time so that the proxy opens at most about this many links per second.
const RECONNECTS_PER_SEC: u64 = 500;

/// How long a session waits before trying a cluster again after a failed attempt to open a link.
const RECONNECT: crate::backoff::Backoff =
    crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// How long a removed cluster's link must have been quiet before it is closed.
const RETIRE_QUIET: Duration = Duration::from_secs(3);

/// The open client channel `ch`. A free function rather than a method so that a caller can keep
/// it while it uses other parts of the session, such as the links.
fn channel_in(channels: &mut [Option<Channel>], ch: u16) -> Option<&mut Channel> {
    channels.get_mut(usize::from(ch)).and_then(Option::as_mut)
}

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

fn unacked_dec(links: &[LinkSlot], link: LinkRef) {
    if let Some(slot) = slot_of(links, link) {
        slot.m.unacked.dec();
    }
}

/// The slot of `link` if it still holds that link: not dead, and not a later link of the slot's
/// cluster reusing it (see [`LinkRef`]).
fn slot_of(links: &[LinkSlot], link: LinkRef) -> Option<&LinkSlot> {
    links
        .get(link.slot()?)
        .filter(|s| s.generation == link.generation())
}

/// [`slot_of`], to change the slot.
fn slot_of_mut(links: &mut [LinkSlot], link: LinkRef) -> Option<&mut LinkSlot> {
    links
        .get_mut(link.slot()?)
        .filter(|s| s.generation == link.generation())
}

/// Splits a prefetch window over the shard links: link `index` keeps room for the `held[index]`
/// deliveries it has unacknowledged, and what the window has left over is shared out evenly, the
/// remainder to the first links. When the links hold the whole window or more (the client
/// lowered its prefetch below what it holds), the window itself is shared out evenly: each
/// cluster sends nothing more until what it holds is below its share, so the client, once it
/// has acked, never holds more than the window (a share that kept room for what a link held
/// would let it fill up to that again). Never 0 (which would mean no limit): at least 1. A
/// window of 0 (no limit) stays 0.
///
/// When the room left over is smaller than the number of links, every link gets room for one
/// more: the client may then hold up to `links - 1` more than its window, as with a window
/// below the number of links. Splitting it exactly would leave the links without a share shut
/// for as long as the client holds what it has, even when only they have messages: Celery
/// raises its prefetch by one for each ETA task it holds, so with a prefetch of 1 the room
/// would always go to one cluster, and the other cluster's tasks would wait for the ETA.
fn split_window(window: u16, held: &[u32], index: usize) -> u16 {
    if window == 0 || held.len() <= 1 {
        return window;
    }
    let n = held.len() as u32;
    let window = u32::from(window);
    let total: u32 = held.iter().sum();
    let share = if total >= window {
        window / n + u32::from((index as u32) < window % n)
    } else if window - total < n {
        held[index] + 1
    } else {
        let rest = window - total;
        held[index] + rest / n + u32::from((index as u32) < rest % n)
    };
    share.clamp(1, u32::from(u16::MAX)) as u16
}

/// Replies the proxy pairs with the requests waiting on an upstream channel, in order (the
/// spec's replies, from the codec's method table). channel.close-ok is left out: it answers a
/// close, which the upstream channel's state tracks instead.
fn is_reply(m: &Method) -> bool {
    m.is_reply() && !matches!(m, Method::ChannelCloseOk(_))
}

/// Whether a client request expects a reply (false for `nowait` and asynchronous methods).
fn expects_reply(m: &Method) -> bool {
    m.expects_reply()
}

/// What ended one wait of a session's event loop.
enum Woke {
    /// A link's socket was read (or failed).
    Link(LinkId, Result<(), LinkDown>),
    Rare(wake::Rare),
    /// The earliest deadline came.
    Deadline,
    /// The client's socket was read: bytes, end of stream (0) or an error.
    Client(std::io::Result<usize>),
    /// Room appeared where back-pressure waited for it.
    Room,
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
            opened,
            config_rx,
            heartbeat,
            max_message,
            force_close,
        } = inputs;
        let mut assembler = Assembler::new(max_message);
        let mut last_seen = Instant::now();
        let client_out = self.client_out.clone();
        let info = self.info.clone();
        let shared = self.shared.clone();
        self.publish_usage();
        let mut was_reading = true;
        let mut rare = wake::rare_events(info.close_token(), force_close, config_rx, opened);
        // The client socket and the rare events are polled only once they woke the task (the
        // links have gates of their own): every poll of them goes through these.
        let mut client_gate = Gate::new();
        let mut rare_gate = Gate::new();
        let mut deadlines = wake::Deadlines::new(Instant::now());
        // Frames pipelined behind connection.open are handled first.
        if !rbuf.is_empty() {
            self.on_client_bytes(&mut rbuf, &mut assembler);
        }
        // False once the client's socket ended (EOF or an error).
        let mut client_open = true;
        // Whether the links are polled before the client this turn (they alternate).
        let mut links_first = false;
        loop {
            deadlines.pace = self.pace_link_reads().unwrap_or(deadlines.tick);
            if self.awaiting_turn.is_some() {
                // Another connection's turn ends without a word to this one: look again soon.
                deadlines.pace = deadlines.pace.min(Instant::now() + TURN_POLL);
            }
            self.run_deferred_when_linked();
            self.maybe_finish_eof_drain();
            self.maybe_close_requested();
            self.maybe_tell_client_close();
            self.give_back_turns();
            self.run_when_turn_free();
            if let Some(reason) = self.end.take() {
                // After a close warren started, the client's close-ok ends it: the socket is
                // closed at once, as RabbitMQ closes it (clients wait for the end of the
                // stream: the Java client's shutdown listeners and automatic recovery).
                let by_proxy = matches!(self.closing, Some(Closing::ByProxy { .. }));
                if client_open && !by_proxy {
                    // As RabbitMQ does: read (and discard) until the client hangs up, so a
                    // client still writing what it queued before its connection.close reads
                    // our close-ok instead of a reset.
                    self.client_out.flush();
                    crate::io::read_buf::drain(&mut rd, CLOSE_TIMEOUT).await;
                }
                return reason;
            }
            if self.input_stalled && !self.input_paused() {
                self.input_stalled = false;
                self.rpc_stall = None;
                self.on_client_bytes(&mut rbuf, &mut assembler);
                continue;
            }
            // One write per socket for everything the last turn produced.
            let (client_room, full_link) = self.flush_all();
            if !client_room {
                // The links are not read while the client is slow: not their silence.
                let now = Instant::now();
                self.links_unread_at = Some(now);
                for slot in &mut self.links {
                    if let Some(r) = slot.link.reader.as_mut() {
                        r.not_reading(now);
                    }
                }
            }
            // Held publishes are bounded per connection and in total: at the bound, stop reading
            // the client until confirms free memory (this connection's arrive as link events;
            // another connection freeing the total wakes `held.room()`).
            let total_ok = self.receiving.may_read();
            let held_ok = self.held.used() < self.held_limit && total_ok;
            let read_client = client_open
                && self.eof_drain.is_none()
                && full_link.is_none()
                && held_ok
                && !self.input_paused();
            if read_client && !was_reading {
                // Time spent not reading is not the client's silence.
                last_seen = Instant::now();
            }
            was_reading = read_client;
            let deadline = match &self.closing {
                Some(Closing::ByClient { deadline } | Closing::ByProxy { deadline, .. }) => {
                    Some(*deadline)
                }
                // RabbitMQ checks a client's heartbeats once per interval and gives up at the
                // second check that finds nothing new: between two and three intervals after
                // the client last spoke. Three, so that no client one broker keeps is dropped.
                None => heartbeat.filter(|_| read_client).map(|h| last_seen + 3 * h),
            };
            deadlines.arm(deadline);
            crate::io::read_buf::make_room(&mut rbuf, 8 * 1024, 16 * 1024);
            let woke = if client_room && total_ok && full_link.is_none() {
                // Nothing is blocked: the turn of nearly every message, polled by hand
                // (tokio's `select!` draws a random branch order and builds every branch's
                // future on every turn). Links and the client take turns going first, so a
                // busy side cannot starve the other.
                links_first = !links_first;
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(Some(event)) =
                        rare_gate.poll(cx, |cx| rare.poll_next_unpin(cx))
                    {
                        return Poll::Ready(Woke::Rare(event));
                    }
                    if deadlines.poll_fired(cx).is_ready() {
                        return Poll::Ready(Woke::Deadline);
                    }
                    if links_first && let Poll::Ready((link, read)) = self.poll_links(cx) {
                        return Poll::Ready(Woke::Link(link, read));
                    }
                    if read_client
                        && let Poll::Ready(r) = client_gate
                            .poll(cx, |cx| poll_read_buf(Pin::new(&mut rd), cx, &mut rbuf))
                    {
                        return Poll::Ready(Woke::Client(r));
                    }
                    if !links_first && let Poll::Ready((link, read)) = self.poll_links(cx) {
                        return Poll::Ready(Woke::Link(link, read));
                    }
                    Poll::Pending
                })
                .await
            } else {
                // Back-pressure somewhere: also wait for the room that ends it.
                tokio::select! {
                    (link, read) = std::future::poll_fn(|cx| self.poll_links(cx)), if client_room => Woke::Link(link, read),
                    Some(event) = std::future::poll_fn(|cx| rare_gate.poll(cx, |cx| rare.poll_next_unpin(cx))) => Woke::Rare(event),
                    () = deadlines.fired() => Woke::Deadline,
                    r = std::future::poll_fn(|cx| client_gate.poll(cx, |cx| poll_read_buf(Pin::new(&mut rd), cx, &mut rbuf))), if read_client => Woke::Client(r),
                    _ = client_out.room(), if !client_room => Woke::Room,
                    _ = shared.held.room(), if !total_ok => Woke::Room,
                    _ = async { if let Some(o) = &full_link { o.room().await } }, if full_link.is_some() => {
                        // Time spent not reading is not the client's silence.
                        last_seen = Instant::now();
                        Woke::Room
                    }
                }
            };
            match woke {
                Woke::Link(link, read) => {
                    crate::io::busy_poll::touch();
                    self.on_link_readable(link, read);
                }
                Woke::Rare(event) => match event {
                    wake::Rare::Opened(o) => self.on_opened(*o),
                    wake::Rare::Config(config) => {
                        // A session closing keeps the configuration it had.
                        if self.closing.is_none() {
                            self.apply_config(&config);
                        }
                    }
                    wake::Rare::OperatorClose => {
                        if self.closing.is_none() {
                            let reason = info.close_reason().unwrap_or_default();
                            info!(conn = self.id, %reason, "closing the connection at an operator's request");
                            self.begin_proxy_close(
                                ConnError::new(ReplyCode::ConnectionForced, &reason),
                                &format!("closed by an operator: {reason}"),
                            );
                        }
                    }
                    wake::Rare::Shutdown => {
                        if self.closing.is_none() {
                            self.begin_proxy_close(
                                ConnError::new(
                                    ReplyCode::ConnectionForced,
                                    "broker forced connection closure with reason 'shutdown'",
                                ),
                                "proxy shutdown",
                            );
                        }
                    }
                },
                Woke::Deadline => {
                    let now = Instant::now();
                    if now >= deadlines.pace {
                        self.read_lazy_links(now);
                    }
                    let due = deadlines.due(now, deadline);
                    if due.links {
                        self.check_link_heartbeats();
                        deadlines.links = self.next_link_silence();
                    }
                    if due.tick {
                        deadlines.tick = now + wake::TICK;
                        // Links opened since the last check may be due sooner.
                        deadlines.links = deadlines.links.min(self.next_link_silence());
                        self.retire_quiet_links();
                        self.close_idle_shard_links();
                        self.ensure_links();
                        self.publish_usage();
                        self.expire_orphans();
                        self.check_no_shard();
                        if client_open && let Some(reason) = self.client_not_reading(now) {
                            client_open = false;
                            // It takes nothing, so a connection.close could not reach it:
                            // what waits for it is dropped and the socket closed.
                            self.client_out.abandon();
                            self.client_gone(&reason);
                        }
                    }
                    if due.client {
                        match &self.closing {
                            Some(Closing::ByClient { .. }) => {
                                self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
                                return "client closed the connection (upstream close timed out)"
                                    .into();
                            }
                            Some(Closing::ByProxy { .. }) if self.client_close_held.is_some() => {
                                // The links did not all close in time, or the clusters did not
                                // confirm in time: the client hears now, and has the close
                                // timeout from now to answer.
                                if let Some(held) = self.client_close_held.take() {
                                    self.to_client(0, &held.close);
                                }
                                if let Some(Closing::ByProxy { deadline, .. }) = &mut self.closing {
                                    *deadline = now + CLOSE_TIMEOUT;
                                }
                            }
                            Some(Closing::ByProxy { reason, .. }) => {
                                let reason = format!("{reason} (no close-ok from client)");
                                if self.proxy_close_held_until.is_none() {
                                    return reason;
                                }
                                client_open = false;
                                self.end_proxy_close(reason);
                            }
                            None => {
                                let h = heartbeat.unwrap_or_default();
                                client_open = false;
                                self.client_gone(&format!(
                                    "missed heartbeats from client, timeout: {}s",
                                    h.as_secs()
                                ));
                            }
                        }
                    }
                }
                Woke::Client(r) => match r {
                    Ok(0) => {
                        client_open = false;
                        self.client_gone("client closed the TCP connection");
                    }
                    Ok(n) => {
                        crate::io::busy_poll::touch();
                        info.bytes_in.inc_by(n as u64);
                        last_seen = Instant::now();
                        self.on_client_bytes(&mut rbuf, &mut assembler);
                    }
                    Err(e) => {
                        client_open = false;
                        self.client_gone(&format!("client socket error: {e}"));
                    }
                },
                Woke::Room => {
                    if self.links_unread_at.is_some() {
                        self.links_unread_at = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// The client socket ended without connection.close (a process that exits): every whole
    /// publish read before the end still goes to its cluster and is held until confirmed, as
    /// any other (RabbitMQ, too, routes what it read before the end). Nothing more can reach
    /// the client, so its outbox is closed (deliveries meanwhile stay unacknowledged upstream
    /// and are requeued when the links close); once nothing is held, or after
    /// `timeouts.failover_wait_secs`, the links are closed, so the brokers requeue whatever
    /// the client had not acknowledged.
    fn client_gone(&mut self, reason: &str) {
        if self.closing.is_some() {
            // Already closing: the close handshake ends the connection.
            self.end = Some(reason.to_owned());
            return;
        }
        self.client_out.close();
        if self.publishes_held() {
            // Deliveries meanwhile would go nowhere: a no-ack consumer's would be lost.
            self.stop_consuming();
            self.requeue_deliveries();
            self.delete_exclusive_queues();
        }
        let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
        self.eof_drain = Some(EofDrain {
            deadline: Instant::now() + wait,
            reason: reason.to_owned(),
        });
    }

    /// Whether the client has taken nothing of what warren has to send it for
    /// `timeouts.client_write_timeout_secs` (0 by default: never, as RabbitMQ, whose writes to
    /// a client have no timeout unless `tcp_listen_options.send_timeout` sets one): its outbox
    /// full (so its links are not read, and their brokers' writes to warren block in turn) and
    /// no write getting through. With a timeout set to match the brokers', warren closes the
    /// client first, and its links with it, so that the brokers requeue what it had not
    /// acknowledged instead of closing the links under it, which warren, not reading them,
    /// would only notice once the client reads again, with deliveries of dead links in hand.
    /// Checked on the tick; returns the reason to close with.
    fn client_not_reading(&mut self, now: Instant) -> Option<String> {
        let secs = self.shared.config().timeouts.client_write_timeout_secs;
        if secs == 0 || self.client_out.has_room() {
            self.write_stall = None;
            return None;
        }
        let writes = self.client_out.writes();
        match self.write_stall {
            Some((since, seen)) if seen == writes => {
                if now.duration_since(since) < Duration::from_secs(secs) {
                    return None;
                }
                let pending = self.client_out.pending();
                let reason = format!(
                    "the client read nothing for {secs}s with {pending} bytes waiting for it \
                     (timeouts.client_write_timeout_secs): disconnected, as a broker with a \
                     send timeout disconnects a client whose writes time out"
                );
                warn!(conn = self.id, pending, "{reason}");
                Some(reason)
            }
            _ => {
                self.write_stall = Some((now, writes));
                None
            }
        }
    }

    /// Ends an [`EofDrain`] once no publish is held any more (or at its deadline): the links
    /// are closed and the session ends when they are.
    fn maybe_finish_eof_drain(&mut self) {
        let Some(drain) = &self.eof_drain else {
            return;
        };
        if self.deferred.is_some() && Instant::now() < drain.deadline {
            // A publish read before the end waits for its cluster's link.
            return;
        }
        // Requests read before the end (a declare going cluster by cluster) are finished too.
        let (held, asked) = (self.publishes_held(), self.rpcs_outstanding());
        let overdue = Instant::now() >= drain.deadline;
        if (held || asked) && !overdue {
            return;
        }
        if held {
            warn!(
                conn = self.id,
                "client gone; publishes still unconfirmed at the deadline"
            );
        } else if asked {
            warn!(
                conn = self.id,
                "client gone; requests still unanswered at the deadline"
            );
        }
        let reason = drain.reason.clone();
        self.eof_drain = None;
        for slot in &self.links {
            slot.send(0, &connection_close(200, "client connection lost"));
        }
        self.closing = Some(Closing::ByClient {
            deadline: Instant::now() + CLOSE_TIMEOUT,
        });
        if self.links_closed() {
            self.end = Some(reason);
        } else {
            self.eof_reason = Some(reason);
        }
    }

    /// The client's input waits while a tx.select reopens upstream channels, while a channel the
    /// client opened again waits for the close of its previous upstream part (what the client
    /// sends on it must follow the new channel.open), and while a channel
    /// has [`MAX_PIPELINED_RPCS`] requests unanswered (but not while the connection closes: the
    /// client's close-ok must be read).
    fn input_paused(&self) -> bool {
        if self.closing.is_some() {
            return false;
        }
        self.tx_swaps > 0
            || self.deferred.is_some()
            || self.awaiting_turn.is_some()
            || (self.reopen_wait && self.links.iter().any(LinkSlot::reopen_pending))
            || self.barrier_holds()
            || self.parked.iter().any(|p| p.check)
            || self.in_turn_holds()
            || self.rpc_stall.is_some_and(|ch| self.rpcs_full(ch))
            || self.input_waits_for.is_some_and(|w| self.unanswered(w))
            || self.tx_end.is_some_and(|w| self.unanswered(w))
    }

    /// Whether request `id` of channel `ch` still waits for its reply to reach the client.
    fn unanswered(&self, (ch, id): (u16, u64)) -> bool {
        self.rpc(ch, id).is_some()
    }

    /// Request `id` of channel `ch`, while it waits for its reply to reach the client.
    pub(super) fn rpc(&self, ch: u16, id: u64) -> Option<&Rpc> {
        self.channels
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .and_then(|c| c.rpc(id))
    }

    /// Whether a live link to `cluster` is open.
    pub(super) fn has_live_link(&self, cluster: &str) -> bool {
        self.links
            .iter()
            .any(|s| s.live() && *s.link.cluster == *cluster)
    }

    /// True while the request in `in_turn_hold` may still be sent to more clusters.
    pub(super) fn in_turn_holds(&self) -> bool {
        self.in_turn_hold.is_some_and(|(ch, id)| {
            self.rpc(ch, id).is_some_and(|r| {
                !r.in_turn.is_empty() || (r.reply.is_none() && !r.get_next.is_empty())
            })
        })
    }

    /// True if channel `ch` has [`MAX_PIPELINED_RPCS`] requests unanswered.
    fn rpcs_full(&self, ch: u16) -> bool {
        self.channels
            .get(ch as usize)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.rpcs.len() >= MAX_PIPELINED_RPCS)
    }

    fn on_client_bytes(&mut self, rbuf: &mut BytesMut, assembler: &mut Assembler) {
        self.decode_client_bytes(rbuf, assembler);
        // Bodies still arriving count in the process budget (see `held::Receiving`).
        self.receiving
            .set(usize::try_from(assembler.buffered()).unwrap_or(usize::MAX));
    }

    fn decode_client_bytes(&mut self, rbuf: &mut BytesMut, assembler: &mut Assembler) {
        // Only a whole command (or a refused one) changes what pauses the input: the header and
        // body frames of a publish do not, so they skip the check.
        let mut may_pause = true;
        while self.end.is_none() {
            if !self.skip.drop_from(rbuf) {
                return;
            }
            if may_pause && self.input_paused() {
                self.input_stalled = true;
                return;
            }
            may_pause = true;
            let frame = match codec::decode_client_frame(rbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    self.skip = InputSkip::after(&e);
                    self.protocol_error(ConnError::new(e.reply_code(), e));
                    continue;
                }
            };
            if frame.kind == FrameKind::Heartbeat {
                let refused = if frame.channel != 0 {
                    Some("heartbeat frame on a non-zero channel")
                } else if !frame.payload.is_empty() {
                    Some("heartbeat frame with a payload")
                } else {
                    None
                };
                if let Some(detail) = refused {
                    self.protocol_error(ConnError::new(ReplyCode::FrameError, detail));
                }
                continue;
            }
            match assembler.push(frame) {
                Ok(None) => may_pause = false,
                Ok(Some(cmd)) => {
                    let ch = cmd.channel;
                    if let Err(e) = self.on_client_command(cmd) {
                        self.protocol_error(e);
                        continue;
                    }
                    if self.rpcs_full(ch) {
                        debug!(
                            conn = self.id,
                            channel = ch,
                            "{MAX_PIPELINED_RPCS} requests unanswered: reading the client waits for replies"
                        );
                        self.rpc_stall = Some(ch);
                    }
                }
                Err(AssembleError::Connection { code, text, method }) => {
                    self.protocol_error(ConnError {
                        code: code.code(),
                        text,
                        class_id: method.0,
                        method_id: method.1,
                    });
                    continue;
                }
                Err(AssembleError::TooLarge {
                    channel,
                    method,
                    size,
                    others,
                    max,
                }) => {
                    let text = if others == 0 {
                        // RabbitMQ's words for the same refusal.
                        format!("message size {size} is larger than configured max size {max}")
                    } else {
                        format!(
                            "message size {size} with {others} bytes of \
                             messages in progress on other channels is larger than configured \
                             max size {max}"
                        )
                    };
                    self.close_channel(channel, ReplyCode::PreconditionFailed, &text, &method);
                }
            }
        }
    }

    /// Updates this connection's entry in `GET /clients` (on the tick, off the hot path).
    fn publish_usage(&self) {
        let channels = self.channels.iter().filter(|c| c.is_some()).count();
        let links = self
            .links
            .iter()
            .filter(|s| s.live())
            .map(|s| format!("{}@{}", s.link.cluster, s.link.node))
            .collect();
        self.info.publish_usage(channels, self.held.used(), links);
    }

    fn protocol_error(&mut self, e: ConnError) {
        if let Some(Closing::ByProxy { .. }) = self.closing {
            // warren has sent connection.close: the client's close-ok (or the end of its
            // socket, or the close timeout) ends the connection. Closing the socket now, with
            // the client's frames unread, would reset it, and a client still writing (the rest
            // of a frame too large) would see the reset instead of the reason.
            debug!(conn = self.id, code = e.code, text = %e.text, "protocol error while closing: ignored");
            return;
        }
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

    /// What a delivery remembers of link `link` (the link now in that slot).
    pub(super) fn link_ref(&self, link: LinkId) -> LinkRef {
        self.links
            .get(link)
            .map_or(LinkRef::DEAD, |s| LinkRef::new(link, s.generation))
    }

    fn channel_mut(&mut self, ch: u16) -> Option<&mut Channel> {
        channel_in(&mut self.channels, ch)
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
        // Dropping the held publishes gives their bytes back (see `HeldTicket`).
        self.parked.clear();
        for slot in &mut self.links {
            for up in &mut slot.chans {
                let drained = up.confirms.drain();
                slot.m.confirms_pending.dec_by(drained.len() as i64);
            }
        }
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
        let close = Method::ConnectionClose(codec::ConnectionClose {
            reply_code: e.code,
            reply_text,
            class_id: e.class_id,
            method_id: e.method_id,
        });
        let now = Instant::now();
        if self.publishes_held() {
            // Publishes read from the client and not yet confirmed (those of a lost link
            // already sent again elsewhere) are still on their way: the links close once their
            // clusters have confirmed them, as after the client's own close, not under them.
            // Nothing more is delivered to a client that is being closed.
            self.stop_consuming();
            self.delete_exclusive_queues();
            let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
            self.proxy_close_held_until = Some(now + wait);
            if self.client_owed_confirms() {
                // The client hears once their confirms are passed on (within CLOSE_TIMEOUT):
                // told of the close first, it would count them lost and publish them again,
                // though the clusters routed them. Its acks meanwhile are passed on too.
                self.client_close_held = Some(HeldClose {
                    close,
                    until: SendCloseWhen::ConfirmsSettled,
                });
            } else {
                self.to_client(0, &close);
            }
        } else {
            // The client hears of it once the links are closed: RabbitMQ deletes a
            // connection's exclusive queues as it closes, and a client that reconnects at once
            // (py-amqp's test suite does) must find them gone on every cluster, not locked
            // (405) by links still closing. Within CLOSE_TIMEOUT, whatever the links do.
            for slot in &self.links {
                slot.send(0, &connection_close(200, "client connection closing"));
            }
            self.client_close_held = Some(HeldClose {
                close,
                until: SendCloseWhen::LinksClosed,
            });
        }
        self.closing = Some(Closing::ByProxy {
            deadline: now + CLOSE_TIMEOUT,
            reason: reason.to_owned(),
        });
        self.maybe_tell_client_close();
    }

    /// Every link of the connection is closed.
    fn links_closed(&self) -> bool {
        self.links.iter().all(|s| s.done())
    }

    /// Sends the client the connection.close `begin_proxy_close` keeps back, once what it
    /// waits for is done (the close timeout sends it otherwise).
    pub(super) fn maybe_tell_client_close(&mut self) {
        let Some(held) = &self.client_close_held else {
            return;
        };
        let ready = match held.until {
            SendCloseWhen::LinksClosed => self.links_closed(),
            SendCloseWhen::ConfirmsSettled => !self.client_owed_confirms(),
        };
        if ready && let Some(held) = self.client_close_held.take() {
            self.to_client(0, &held.close);
        }
    }

    /// Gives back the turns to subscribe whose basic.consume every cluster has answered.
    fn give_back_turns(&mut self) {
        if self.turns.is_empty() {
            return;
        }
        let turns = std::mem::take(&mut self.turns);
        self.turns = turns
            .into_iter()
            .filter(|(_, request)| self.unanswered(*request))
            .collect();
    }

    /// Runs again the basic.consume that waited for another connection's turn.
    fn run_when_turn_free(&mut self) {
        if let Some((cmd, since)) = self.awaiting_turn.take() {
            self.turn_waited = Some(since);
            let result = self.on_client_command(cmd);
            self.turn_waited = None;
            if let Err(e) = result {
                self.protocol_error(e);
            }
        }
    }

    /// Whether a connection.close warren keeps back waits for the client's confirms: until
    /// it goes out, the clusters' confirms and the client's acks still pass.
    pub(super) fn close_waits_for_confirms(&self) -> bool {
        self.client_close_held
            .as_ref()
            .is_some_and(|h| h.until == SendCloseWhen::ConfirmsSettled)
    }

    /// Whether a publish of the client in confirm mode has not been confirmed to it yet.
    fn client_owed_confirms(&self) -> bool {
        self.channels.iter().flatten().any(|c| {
            c.confirms
                .as_ref()
                .is_some_and(|confirms| confirms.outstanding() > 0)
        })
    }

    /// The client has answered (or not, in time) the connection.close warren sent it: the
    /// session ends, unless publishes it sent are still unconfirmed (see `begin_proxy_close`);
    /// then its socket is closed and the links stay until their clusters have confirmed them,
    /// as when a client's socket ends (an [`EofDrain`]).
    fn end_proxy_close(&mut self, reason: String) {
        // The client answered a close of its own, or its socket ended: a close kept back is
        // not sent now.
        self.client_close_held = None;
        let Some(deadline) = self.proxy_close_held_until.take() else {
            self.end = Some(reason);
            return;
        };
        self.client_out.close();
        self.closing = None;
        self.eof_drain = Some(EofDrain { deadline, reason });
    }

    /// Whether a client request is still waiting for a reply from a live link. One waiting
    /// only for a cluster that has no link (see `Orphan`), or on links already closed, cannot
    /// be finished by keeping the others open: a connection ending keeps its links for what
    /// can still complete, not until `timeouts.failover_wait_secs` for what cannot.
    fn rpcs_outstanding(&self) -> bool {
        self.links.iter().filter(|s| s.live()).any(|s| {
            s.chans.iter().any(|up| {
                up.pending
                    .iter()
                    .any(|w| matches!(w.who, Pending::Rpc(_) | Pending::Fence(_)))
            })
        })
    }

    /// The client's connection.close: closes the links; close-ok follows once they are closed.
    fn close_links_for_client(&mut self) {
        for slot in &self.links {
            slot.send(0, &connection_close(200, "client closed the connection"));
        }
        self.closing = Some(Closing::ByClient {
            deadline: Instant::now() + CLOSE_TIMEOUT,
        });
        self.maybe_finish_client_close();
    }

    /// The client's connection.close. RabbitMQ answers what came before it first, and has
    /// taken every publish before it when it answers close-ok: so the links close once the
    /// requests before the close are answered (declares going cluster by cluster reach every
    /// cluster) and the publishes before it are confirmed (held, they are published again
    /// elsewhere if a link dies meanwhile), then the client gets close-ok.
    pub(super) fn client_close(&mut self) {
        let now = Instant::now();
        let wait = Duration::from_secs(self.shared.config().timeouts.failover_wait_secs);
        self.close_requested = Some(CloseWait {
            rpcs_until: now + CLOSE_TIMEOUT,
            held_until: now + wait,
        });
        if self.publishes_held() {
            // Nothing more may be delivered to a client that is leaving (a no-ack consumer's
            // messages would be lost) while the publishes wait for their confirms, and what it
            // holds goes back to the queues, as one broker requeues it at the close.
            self.stop_consuming();
            self.requeue_deliveries();
            self.delete_exclusive_queues();
        }
        self.maybe_close_requested();
    }

    /// Carries out a connection.close once what it waits for is settled (or overdue).
    fn maybe_close_requested(&mut self) {
        let Some(wait) = self.close_requested else {
            return;
        };
        let now = Instant::now();
        if self.rpcs_outstanding() && now < wait.rpcs_until {
            return;
        }
        let held = self.publishes_held();
        if held && now < wait.held_until {
            return;
        }
        if held {
            warn!(
                conn = self.id,
                "client closed the connection; publishes still unconfirmed at the deadline"
            );
        }
        self.close_requested = None;
        self.close_links_for_client();
    }

    /// Publishes read from the client that no cluster has confirmed yet: waiting for a link,
    /// parked, or sent and unconfirmed on a live link.
    fn publishes_held(&self) -> bool {
        self.deferred.is_some()
            || !self.parked.is_empty()
            || self
                .links
                .iter()
                .any(|s| s.live() && s.chans.iter().any(|c| c.confirms.pending() > 0))
    }

    /// Gives back what a client that is leaving held, as one broker does when the connection
    /// ends, while warren keeps the links open for the confirms of its publishes: every
    /// delivery it had not acknowledged is requeued (a `multiple` nack of each channel's
    /// outstanding tags, on each link), so other consumers get the messages at once instead of
    /// when the links close. Not in a transaction: the broker applies its settlements only at
    /// a commit that never comes, and closing the link requeues them.
    fn requeue_deliveries(&mut self) {
        for ch in 0..self.channels.len() {
            let outstanding = self.channels[ch]
                .as_ref()
                .is_some_and(|c| !c.tx && c.tags.outstanding() > 0);
            if !outstanding {
                continue;
            }
            let nack = |tag, multiple| {
                Method::BasicNack(codec::BasicNack {
                    delivery_tag: tag,
                    multiple,
                    requeue: true,
                })
            };
            self.ack(ch as u16, 0, true, &nack(0, true), nack);
        }
    }

    /// Deletes the client's exclusive queues on every link, for a client that is leaving while
    /// its publishes wait for their confirms. RabbitMQ deletes a connection's exclusive queues
    /// as it closes; warren's links stay open meanwhile, up to `timeouts.failover_wait_secs`,
    /// and would keep them, so a client that reconnects at once and declares one again would
    /// be refused with 405 (locked by a connection that is gone). Each delete goes on a channel
    /// of warren's own, which a refusal closes alone. A declare still unanswered is not in the
    /// connection's topology yet, and is left to the link's close.
    fn delete_exclusive_queues(&mut self) {
        let queues: Vec<ShortStr> = self
            .topology
            .entries()
            .filter_map(|(_, m)| match m {
                Method::QueueDeclare(q) if q.exclusive => Some(q.queue.clone()),
                _ => None,
            })
            .collect();
        for queue in queues {
            debug!(conn = self.id, queue = %queue.as_str(), "client leaving: deleting its exclusive queue");
            let delete = Method::QueueDelete(codec::QueueDelete {
                queue,
                ..Default::default()
            });
            for link in self.live_links().iter() {
                self.own_channel_request(link, 0, &delete, Pending::Internal);
            }
        }
    }

    /// Cancels every consumer on every link, for a client that is leaving while its
    /// publishes wait for their confirms: what a no-ack consumer is sent meanwhile would be
    /// lost, what a manual-ack one is sent requeued later. Nothing is told to the client.
    fn stop_consuming(&mut self) {
        for (ch, channel) in self.channels.iter_mut().enumerate() {
            let Some(channel) = channel else {
                continue;
            };
            for consumer in &mut channel.consumers {
                if consumer.request.take().is_none() {
                    continue;
                }
                let cancel = Method::BasicCancel(codec::BasicCancel {
                    consumer_tag: consumer.tag.clone(),
                    nowait: false,
                });
                for link in consumer.links.iter() {
                    self.links[link].request(ch as u16, &cancel, Pending::Internal);
                }
            }
        }
    }

    fn maybe_finish_client_close(&mut self) {
        if let Some(Closing::ByClient { .. }) = self.closing
            && self.links_closed()
        {
            if let Some(reason) = self.eof_reason.take() {
                self.end = Some(reason);
                return;
            }
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

    // ----- reload ---------------------------------------------------------------------------

    // ----- client to upstream -------------------------------------------------------------

    // ----- upstream to client -------------------------------------------------------------
}

#[cfg(test)]
mod tests {
    use super::split_window;

    fn split(window: u16, held: &[u32]) -> Vec<u16> {
        (0..held.len())
            .map(|k| split_window(window, held, k))
            .collect()
    }

    #[test]
    fn an_empty_window_is_shared_out_evenly() {
        assert_eq!(split(10, &[0, 0]), [5, 5]);
        assert_eq!(split(7, &[0, 0, 0]), [3, 2, 2]);
        assert_eq!(
            split(1, &[0, 0]),
            [1, 1],
            "never 0: that would mean no limit"
        );
        assert_eq!(split(0, &[3, 0]), [0, 0], "no limit stays no limit");
        assert_eq!(split(9, &[4]), [9], "one shard link: the whole window");
    }

    #[test]
    fn what_a_link_holds_stays_its_own() {
        // Celery raised its prefetch from 2 to 10 for 8 ETA tasks, all on the first cluster.
        assert_eq!(split(10, &[8, 0]), [9, 1]);
        assert_eq!(split(10, &[4, 4]), [5, 5]);
        // The client lowered its prefetch to what it holds or below: the shares add up to the
        // new window, so once the client has acked it never holds more than that again.
        assert_eq!(split(2, &[3, 1]), [1, 1]);
        assert_eq!(split(2, &[3, 0]), [1, 1]);
        assert_eq!(split(4, &[4, 0]), [2, 2]);
    }

    #[test]
    fn less_room_than_links_gives_each_link_one_more() {
        // One free place and two links: each may deliver one more (the client may hold 6),
        // rather than one link shut while it may be the only one with messages.
        assert_eq!(split(5, &[3, 1]), [4, 2]);
        assert_eq!(split(7, &[2, 2, 1]), [3, 3, 2]);
        assert_eq!(
            split(9, &[2, 2, 1]),
            [4, 3, 2],
            "four free places: split exactly"
        );
    }

    /// Celery with a prefetch of 1 and ETA tasks on two clusters: it holds each ETA task
    /// unacknowledged and raises its prefetch to 1 + what it holds after each one arrives. Every
    /// task must reach it, as from one broker, however the clusters' tasks are spread.
    #[test]
    fn a_prefetch_raised_for_each_held_message_opens_every_link() {
        for queued in [[5, 5], [10, 1], [1, 10], [0, 7], [3, 4]] {
            let mut held = [0u32; 2];
            let mut window = 1u16;
            loop {
                let shares = split(window, &held);
                let Some(k) =
                    (0..2).find(|&k| held[k] < queued[k] && held[k] < u32::from(shares[k]))
                else {
                    break;
                };
                held[k] += 1;
                window = 1 + (held[0] + held[1]) as u16;
            }
            assert_eq!(held, queued, "every ETA task delivered");
        }
    }
}
