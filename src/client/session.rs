//! One client connection, from accept to close.
//!
//! A single task owns all of a connection's protocol state, so nothing on the hot path takes a
//! lock other than the outboxes' short append. It waits on three things at once: the client
//! socket, the events of its upstream links, and timers. It reads the client only while every
//! upstream outbox has room, and takes link events only while the client's outbox has room: that
//! is the whole of the back-pressure story, and it never blocks one direction on the other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::channel::{Channel, ChannelState, ClientConfirm, Consumer, UpstreamAck, UpstreamConfirms};
use super::handshake::{self, ClientCaps, Greeting, Refusal, reply_name, truncate};
use crate::codec::{self, FrameKind, Method, ShortStr};
use crate::io::{Assembler, Command, Content, Outbox, command::AssembleError, run_writer};
use crate::proxy::Shared;
use crate::upstream::{self, ConnectError, Link, LinkDown, LinkEvent, LinkId, LinkSpec};

/// How long a closing handshake may take before the proxy just drops the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Link events buffered per connection; each is one read's worth of commands.
const LINK_EVENT_QUEUE: usize = 16;
/// The link that answers channel.open (the only one until a channel spans several clusters).
const PRIMARY: LinkId = 0;

/// Serves one accepted client socket until it closes.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, force_close: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let config = shared.config();
    let id = shared.next_connection_id();
    let mut rbuf = BytesMut::with_capacity(16 * 1024);

    let server_props = handshake::server_properties(shared.server_properties(&config).await.as_ref());
    let (greeting, vhost) = match handshake::greet(&mut stream, &mut rbuf, &config, server_props).await {
        Ok(g) => g,
        Err(Refusal::Drop { reason, reply }) => {
            if let Some(bytes) = reply {
                let _ = stream.write_all(bytes).await;
            }
            let _ = stream.shutdown().await;
            info!(conn = id, %peer, %reason, "connection refused during handshake");
            return;
        }
        Err(Refusal::Close { code, text, class_id, method_id }) => {
            warn!(conn = id, %peer, code, %text, "connection refused during handshake");
            handshake::refuse(&mut stream, &mut rbuf, code, &text, class_id, method_id).await;
            return;
        }
    };
    let user = String::from_utf8_lossy(&greeting.user).into_owned();

    // Open the upstream link before answering open-ok, so the broker's own verdict on the
    // credentials and the vhost reaches the client as RabbitMQ would give it.
    let Some(cluster) = config.shard_clusters().next().or_else(|| config.clusters.first()) else {
        handshake::refuse(&mut stream, &mut rbuf, 320, "CONNECTION_FORCED - no cluster configured", 10, 40).await;
        return;
    };
    let (events_tx, events_rx) = mpsc::channel(LINK_EVENT_QUEUE);
    let spec = LinkSpec {
        cluster: Arc::from(cluster.name.as_str()),
        nodes: cluster.nodes.clone(),
        user: greeting.user.clone(),
        password: greeting.password.clone(),
        vhost: vhost.clone(),
        client_properties: upstream::link::upstream_client_properties(&greeting.client_properties, peer),
        heartbeat_secs: config.timeouts.upstream_heartbeat_secs,
        frame_max: config.limits.frame_max,
        channel_max: greeting.channel_max,
        connect_timeout: Duration::from_millis(config.timeouts.connect_ms),
        buffer_limit: config.limits.client_buffer_bytes,
    };
    let link = match upstream::link::connect(PRIMARY, &spec, events_tx.clone()).await {
        Ok(link) => link,
        Err(ConnectError::Refused { node, code, text }) => {
            warn!(conn = id, %peer, user = %user, vhost = %vhost, %node, code, %text, "connection refused by the broker");
            handshake::refuse(&mut stream, &mut rbuf, code, &text, 10, 40).await;
            return;
        }
        Err(e @ ConnectError::Unreachable { .. }) => {
            warn!(conn = id, %peer, user = %user, vhost = %vhost, error = %e, "no upstream node available");
            let text = truncate(&format!("CONNECTION_FORCED - {e}"));
            handshake::refuse(&mut stream, &mut rbuf, 320, &text, 10, 40).await;
            return;
        }
    };
    shared.learn_server_properties(&link.server_properties);

    let (rd, wr) = stream.into_split();
    let client_out = Outbox::new(config.limits.client_buffer_bytes);
    client_out.push(|buf| {
        codec::write_method(buf, 0, &Method::ConnectionOpenOk(Default::default()));
    });
    let heartbeat = (greeting.heartbeat > 0).then(|| Duration::from_secs(u64::from(greeting.heartbeat)));
    let writer = tokio::spawn(run_writer(client_out.clone(), wr, heartbeat.map(|h| h / 2)));
    info!(conn = id, %peer, user = %user, vhost = %vhost, cluster = %link.cluster, node = %link.node, "connection opened");

    let mut session = Session {
        id,
        client_out: client_out.clone(),
        frame_max: greeting.frame_max as usize,
        caps: greeting.caps,
        channel_max: greeting.channel_max,
        links: vec![LinkSlot::new(link)],
        channels: Vec::new(),
        closing: None,
        blocked_links: 0,
        next_ctag: 0,
        scratch_acks: Vec::new(),
        scratch_seqs: Vec::new(),
        scratch_confirms: Vec::new(),
        greeting,
    };
    let reason = session.run(rd, rbuf, events_rx, heartbeat, config.limits.max_message_size, force_close).await;
    drop(events_tx);

    client_out.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
    for slot in &session.links {
        if !slot.done {
            slot.link.shutdown(Duration::from_millis(500)).await;
        }
    }
    info!(conn = id, %peer, user = %user, vhost = %vhost, reason = %reason, "connection closed");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpState {
    Closed,
    Opening,
    Open,
    Closing,
}

/// One upstream channel carrying (part of) a client channel of the same number.
#[derive(Debug)]
struct UpChan {
    state: UpState,
    /// The client reopened the channel while this one was still closing.
    reopen: bool,
    confirm_mode: bool,
    confirms: UpstreamConfirms,
}

impl Default for UpChan {
    fn default() -> Self {
        UpChan { state: UpState::Closed, reopen: false, confirm_mode: false, confirms: UpstreamConfirms::default() }
    }
}

struct LinkSlot {
    link: Link,
    chans: Vec<UpChan>,
    /// Closed (close-ok seen or the socket is gone): nothing more is sent.
    done: bool,
    blocked: bool,
}

impl LinkSlot {
    fn new(link: Link) -> Self {
        LinkSlot { link, chans: Vec::new(), done: false, blocked: false }
    }

    fn chan(&mut self, ch: u16) -> &mut UpChan {
        let i = usize::from(ch);
        if self.chans.len() <= i {
            self.chans.resize_with(i + 1, UpChan::default);
        }
        &mut self.chans[i]
    }

    fn chan_state(&self, ch: u16) -> UpState {
        self.chans.get(usize::from(ch)).map_or(UpState::Closed, |c| c.state)
    }

    fn send(&self, ch: u16, method: &Method) {
        if !self.done {
            self.link.send(ch, method);
        }
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
    fn open(&mut self, ch: u16) {
        let done = self.done;
        let up = self.chan(ch);
        match up.state {
            UpState::Closed => {
                *up = UpChan { state: UpState::Opening, ..UpChan::default() };
                if !done {
                    self.link.send(ch, &Method::ChannelOpen(Default::default()));
                }
            }
            UpState::Closing => up.reopen = true,
            UpState::Opening | UpState::Open => {}
        }
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
        ConnError { code, text: format!("{} - {detail}", reply_name(code)), class_id: 0, method_id: 0 }
    }

    fn on(mut self, method: &Method) -> Self {
        (self.class_id, self.method_id) = method.ids();
        self
    }
}

enum Flow {
    Continue,
    End(String),
}

struct Session {
    id: u64,
    client_out: Arc<Outbox>,
    frame_max: usize,
    caps: ClientCaps,
    channel_max: u16,
    links: Vec<LinkSlot>,
    channels: Vec<Option<Channel>>,
    closing: Option<Closing>,
    blocked_links: usize,
    next_ctag: u64,
    scratch_acks: Vec<UpstreamAck>,
    scratch_seqs: Vec<u64>,
    scratch_confirms: Vec<ClientConfirm>,
    #[allow(dead_code)]
    greeting: Greeting,
}

impl Session {
    async fn run(
        &mut self,
        mut rd: OwnedReadHalf,
        mut rbuf: BytesMut,
        mut events: mpsc::Receiver<LinkEvent>,
        heartbeat: Option<Duration>,
        max_message: u64,
        force_close: CancellationToken,
    ) -> String {
        let mut assembler = Assembler::new(max_message);
        let mut last_seen = Instant::now();
        let mut forced = false;
        let client_out = self.client_out.clone();
        // Frames that arrived with open (pipelined by eager clients) are handled first.
        let mut pending_input = !rbuf.is_empty();
        loop {
            if pending_input {
                pending_input = false;
                if let Flow::End(reason) = self.on_client_bytes(&mut rbuf, &mut assembler) {
                    return reason;
                }
            }
            let client_room = client_out.has_room();
            let full_link = self.links.iter().find(|s| !s.done && !s.link.outbox.has_room()).map(|s| s.link.outbox.clone());
            let read_client = full_link.is_none();
            let deadline = match &self.closing {
                Some(Closing::ByClient { deadline } | Closing::ByProxy { deadline, .. }) => Some(*deadline),
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
                ev = events.recv(), if client_room => {
                    let Some(ev) = ev else { return "link events ended".into() };
                    if let Flow::End(reason) = self.on_link_event(ev) {
                        return reason;
                    }
                }
                r = tokio::io::AsyncReadExt::read_buf(&mut rd, &mut rbuf), if read_client => {
                    match r {
                        Ok(0) => return self.client_gone("client closed the TCP connection"),
                        Ok(_) => {
                            last_seen = Instant::now();
                            if let Flow::End(reason) = self.on_client_bytes(&mut rbuf, &mut assembler) {
                                return reason;
                            }
                        }
                        Err(e) => return self.client_gone(&format!("client socket error: {e}")),
                    }
                }
                _ = client_out.room(), if !client_room => {}
                _ = async { if let Some(o) = &full_link { o.room().await } }, if !read_client => {
                    // Time spent not reading is not the client's silence.
                    last_seen = Instant::now();
                }
                _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                    match &self.closing {
                        Some(Closing::ByClient { .. }) => {
                            self.finish_client_close();
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
        for slot in &mut self.links {
            if !slot.done {
                slot.send(
                    0,
                    &Method::ConnectionClose(codec::ConnectionClose {
                        reply_code: 200,
                        reply_text: ShortStr::from_static("client connection lost"),
                        class_id: 0,
                        method_id: 0,
                    }),
                );
            }
        }
        reason.to_owned()
    }

    fn on_client_bytes(&mut self, rbuf: &mut BytesMut, assembler: &mut Assembler) -> Flow {
        loop {
            let frame = match codec::decode_frame(rbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => return Flow::Continue,
                Err(e) => return self.protocol_error(ConnError::new(e.reply_code(), e)),
            };
            if frame.kind == FrameKind::Heartbeat {
                if frame.channel != 0 {
                    return self.protocol_error(ConnError::new(501, "heartbeat frame on a non-zero channel"));
                }
                continue;
            }
            match assembler.push(frame) {
                Ok(None) => {}
                Ok(Some(cmd)) => {
                    if let Err(e) = self.on_client_command(cmd) {
                        return self.protocol_error(e);
                    }
                    if let Some(Closing::ByClient { .. }) = self.closing
                        && self.links.iter().all(|s| s.done)
                    {
                        self.finish_client_close();
                        return Flow::End("client closed the connection".into());
                    }
                }
                Err(AssembleError::Connection { code, text }) => {
                    return self.protocol_error(ConnError { code, text, class_id: 0, method_id: 0 });
                }
                Err(AssembleError::TooLarge { channel, method, size, max }) => {
                    let text = format!("PRECONDITION_FAILED - message size {size} is larger than configured max size {max}");
                    self.close_channel(channel, 406, &text, &method);
                }
            }
            if let Some(Closing::ByProxy { .. }) = &self.closing {
                // Only close-ok matters now; keep draining frames.
            }
        }
    }

    fn protocol_error(&mut self, e: ConnError) -> Flow {
        if self.closing.is_some() {
            return Flow::End(format!("protocol error while closing: {}", e.text));
        }
        warn!(conn = self.id, code = e.code, text = %e.text, "closing connection on a protocol error");
        let reason = format!("protocol error: {}", e.text);
        self.begin_proxy_close(e, &reason);
        Flow::Continue
    }

    fn to_client(&self, ch: u16, method: &Method) {
        self.client_out.push(|buf| codec::write_method(buf, ch, method));
    }

    fn channel_mut(&mut self, ch: u16) -> Option<&mut Channel> {
        self.channels.get_mut(usize::from(ch)).and_then(Option::as_mut)
    }

    fn free_channel(&mut self, ch: u16) {
        if let Some(slot) = self.channels.get_mut(usize::from(ch)) {
            *slot = None;
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
        for slot in &mut self.links {
            if !slot.done {
                slot.send(
                    0,
                    &Method::ConnectionClose(codec::ConnectionClose {
                        reply_code: 200,
                        reply_text: ShortStr::from_static("client connection closing"),
                        class_id: 0,
                        method_id: 0,
                    }),
                );
            }
        }
        self.closing = Some(Closing::ByProxy { deadline: Instant::now() + CLOSE_TIMEOUT, reason: reason.to_owned() });
    }

    fn finish_client_close(&mut self) {
        self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
    }

    fn on_client_command(&mut self, cmd: Command) -> Result<(), ConnError> {
        let Command { channel: ch, method, content } = cmd;
        if let Some(closing) = &self.closing {
            match (closing, &method) {
                (Closing::ByProxy { .. }, Method::ConnectionCloseOk(_)) => {
                    // The connection is done; the run loop ends on the deadline or EOF, but end now.
                    self.closing = Some(Closing::ByProxy { deadline: Instant::now(), reason: "closed".into() });
                }
                (Closing::ByProxy { .. }, Method::ConnectionClose(_)) => {
                    self.to_client(0, &Method::ConnectionCloseOk(Default::default()));
                    self.closing = Some(Closing::ByProxy { deadline: Instant::now(), reason: "closed".into() });
                }
                _ => {}
            }
            return Ok(());
        }
        if ch == 0 {
            return self.on_client_connection_method(method);
        }
        if ch > self.channel_max {
            return Err(ConnError::new(504, format!("channel {ch} is above the negotiated channel_max {}", self.channel_max)).on(&method));
        }
        if let Method::ChannelOpen(_) = method {
            let i = usize::from(ch);
            if self.channels.len() <= i {
                self.channels.resize_with(i + 1, || None);
            }
            if self.channels[i].is_some() {
                return Err(ConnError::new(504, "second 'channel.open' seen").on(&method));
            }
            self.channels[i] = Some(Channel::new());
            self.links[PRIMARY].open(ch);
            return Ok(());
        }
        let Some(channel) = self.channel_mut(ch) else {
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
            Method::BasicPublish(_) => {
                // The assembler only completes a publish together with its content.
                if let Some(content) = content {
                    self.publish(ch, &method, &content);
                }
            }
            Method::BasicAck(ref a) => {
                self.ack(ch, a.delivery_tag, a.multiple, &method, |t, m| {
                    Method::BasicAck(codec::BasicAck { delivery_tag: t, multiple: m })
                });
            }
            Method::BasicNack(ref n) => {
                let requeue = n.requeue;
                self.ack(ch, n.delivery_tag, n.multiple, &method, |t, m| {
                    Method::BasicNack(codec::BasicNack { delivery_tag: t, multiple: m, requeue })
                });
            }
            Method::BasicReject(ref r) => {
                let requeue = r.requeue;
                self.ack(ch, r.delivery_tag, false, &method, |t, _| {
                    Method::BasicReject(codec::BasicReject { delivery_tag: t, requeue })
                });
            }
            Method::BasicConsume(mut c) => {
                if c.consumer_tag.is_empty() {
                    // Generated here, not by a broker, so the tag is the same on every cluster.
                    self.next_ctag += 1;
                    c.consumer_tag = ShortStr::try_from(format!("amq.ctag-warren-{}-{}", self.id, self.next_ctag))
                        .unwrap_or_default();
                }
                if let Some(channel) = self.channel_mut(ch) {
                    channel.consumers.push(Consumer { tag: c.consumer_tag.clone(), no_ack: c.no_ack });
                }
                self.links[PRIMARY].send(ch, &Method::BasicConsume(c));
            }
            Method::BasicCancel(ref c) => {
                if c.nowait {
                    channel.remove_consumer(&c.consumer_tag);
                }
                self.links[PRIMARY].send(ch, &method);
            }
            Method::BasicGet(ref g) => {
                channel.get_no_ack = Some(g.no_ack);
                self.links[PRIMARY].send(ch, &method);
            }
            Method::BasicRecover(_) | Method::BasicRecoverAsync(_) => {
                // The broker redelivers everything unacknowledged with new tags.
                channel.tags.forget_all();
                self.links[PRIMARY].send(ch, &method);
            }
            Method::ConfirmSelect(_) => {
                if !channel.tx && channel.confirms.is_none() {
                    channel.confirms = Some(Default::default());
                }
                self.links[PRIMARY].chan(ch).confirm_mode = true;
                self.links[PRIMARY].send(ch, &method);
            }
            Method::TxSelect(_) => {
                channel.tx = true;
                self.links[PRIMARY].send(ch, &method);
            }
            Method::ChannelClose(_) => {
                channel.state = ChannelState::ClientClosing;
                let mut waiting = false;
                for slot in &mut self.links {
                    let up = slot.chan(ch);
                    if matches!(up.state, UpState::Open | UpState::Opening) {
                        up.state = UpState::Closing;
                        slot.send(ch, &method);
                        waiting = true;
                    } else if up.state == UpState::Closing {
                        waiting = true;
                    }
                }
                if !waiting {
                    self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                    self.free_channel(ch);
                }
            }
            Method::ChannelCloseOk(_) => {}
            _ => match content {
                Some(content) => self.links[PRIMARY].send_content(ch, &method, &content),
                None => self.links[PRIMARY].send(ch, &method),
            },
        }
        Ok(())
    }

    fn on_client_connection_method(&mut self, method: Method) -> Result<(), ConnError> {
        match method {
            Method::ConnectionClose(_) => {
                for slot in &mut self.links {
                    if !slot.done {
                        slot.send(
                            0,
                            &Method::ConnectionClose(codec::ConnectionClose {
                                reply_code: 200,
                                reply_text: ShortStr::from_static("client closed the connection"),
                                class_id: 0,
                                method_id: 0,
                            }),
                        );
                    }
                }
                self.closing = Some(Closing::ByClient { deadline: Instant::now() + CLOSE_TIMEOUT });
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
            other => Err(ConnError::new(503, format!("unexpected {} on channel 0", other.name())).on(&other)),
        }
    }

    /// Forwards a publish whole to the cluster it is routed to.
    fn publish(&mut self, ch: u16, method: &Method, content: &Content) {
        let link = PRIMARY;
        let client_seq = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()).map(|c| c.next_seq());
        let slot = &mut self.links[link];
        let up = slot.chan(ch);
        match client_seq {
            Some(seq) => up.confirms.record(seq),
            None if up.confirm_mode => up.confirms.skip(),
            None => {}
        }
        slot.send_content(ch, method, content);
    }

    /// Maps a client ack / nack / reject to the links that delivered the messages.
    fn ack(&mut self, ch: u16, tag: u64, multiple: bool, method: &Method, make: impl Fn(u64, bool) -> Method) {
        let mut acks = std::mem::take(&mut self.scratch_acks);
        let resolved = match self.channel_mut(ch) {
            Some(channel) => channel.tags.resolve(tag, multiple, &mut acks),
            None => Ok(()),
        };
        match resolved {
            Ok(()) => {
                for a in &acks {
                    if let Some(slot) = self.links.get(a.link) {
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
        self.to_client(ch, &Method::ChannelClose(codec::ChannelClose { reply_code: code, reply_text, class_id, method_id }));
        if let Some(channel) = self.channel_mut(ch) {
            channel.state = ChannelState::AwaitingCloseOk;
        }
        for slot in &mut self.links {
            let up = slot.chan(ch);
            if matches!(up.state, UpState::Open | UpState::Opening) {
                up.state = UpState::Closing;
                slot.send(
                    ch,
                    &Method::ChannelClose(codec::ChannelClose {
                        reply_code: 200,
                        reply_text: ShortStr::from_static("client channel closed by the proxy"),
                        class_id: 0,
                        method_id: 0,
                    }),
                );
            }
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent) -> Flow {
        match ev {
            LinkEvent::Commands { link, commands } => {
                for cmd in commands {
                    if let Flow::End(reason) = self.on_link_command(link, cmd) {
                        return Flow::End(reason);
                    }
                }
                Flow::Continue
            }
            LinkEvent::Down { link, reason } => self.on_link_down(link, reason),
        }
    }

    fn on_link_down(&mut self, link: LinkId, reason: LinkDown) -> Flow {
        let Some(slot) = self.links.get_mut(link) else { return Flow::Continue };
        let was_done = std::mem::replace(&mut slot.done, true);
        match &self.closing {
            Some(Closing::ByClient { .. }) => {
                if self.links.iter().all(|s| s.done) {
                    self.finish_client_close();
                    return Flow::End("client closed the connection".into());
                }
                Flow::Continue
            }
            Some(Closing::ByProxy { .. }) => Flow::Continue,
            None if was_done => Flow::Continue,
            None => {
                let slot = &self.links[link];
                warn!(conn = self.id, cluster = %slot.link.cluster, node = %slot.link.node, %reason, "upstream link lost");
                let text = format!("upstream connection to cluster '{}' lost: {reason}", slot.link.cluster);
                self.begin_proxy_close(ConnError::new(320, &text), &text);
                Flow::Continue
            }
        }
    }

    fn on_link_command(&mut self, link: LinkId, cmd: Command) -> Flow {
        let Command { channel: ch, method, content } = cmd;
        if ch == 0 {
            return self.on_link_connection_method(link, method);
        }
        if self.closing.is_some() {
            return Flow::Continue;
        }
        // Upstream channel bookkeeping first: it is independent of the client channel's fate.
        match &method {
            Method::ChannelOpenOk(_) => {
                let up = self.links[link].chan(ch);
                if up.state == UpState::Opening {
                    up.state = UpState::Open;
                }
            }
            Method::ChannelClose(_) => {
                let slot = &mut self.links[link];
                slot.send(ch, &Method::ChannelCloseOk(Default::default()));
                let up = slot.chan(ch);
                let reopen = up.reopen;
                *up = UpChan::default();
                if reopen {
                    slot.open(ch);
                }
            }
            Method::ChannelCloseOk(_) => {
                let slot = &mut self.links[link];
                let up = slot.chan(ch);
                if up.state == UpState::Closing {
                    let reopen = up.reopen;
                    *up = UpChan::default();
                    if reopen {
                        slot.open(ch);
                    }
                }
            }
            _ => {}
        }
        let Some(channel) = self.channels.get_mut(usize::from(ch)).and_then(Option::as_mut) else {
            return Flow::Continue;
        };
        match channel.state {
            ChannelState::AwaitingCloseOk => return Flow::Continue,
            ChannelState::ClientClosing => {
                if matches!(method, Method::ChannelCloseOk(_) | Method::ChannelClose(_))
                    && self.links.iter().all(|s| s.chan_state(ch) != UpState::Closing)
                {
                    self.to_client(ch, &Method::ChannelCloseOk(Default::default()));
                    self.free_channel(ch);
                }
                return Flow::Continue;
            }
            ChannelState::Opening | ChannelState::Open => {}
        }
        match method {
            Method::ChannelOpenOk(_) => {
                if link == PRIMARY && channel.state == ChannelState::Opening {
                    channel.state = ChannelState::Open;
                    self.to_client(ch, &method);
                }
            }
            Method::ChannelClose(c) => {
                channel.state = ChannelState::AwaitingCloseOk;
                channel.tags.forget_link(link);
                self.to_client(ch, &Method::ChannelClose(c));
            }
            Method::ChannelCloseOk(_) => {}
            Method::BasicDeliver(mut d) => {
                let needs_ack = !channel.consumer_no_ack(&d.consumer_tag);
                d.delivery_tag = channel.tags.issue(link, d.delivery_tag, needs_ack);
                self.deliver(ch, &Method::BasicDeliver(d), content.as_ref());
            }
            Method::BasicGetOk(mut g) => {
                let needs_ack = !channel.get_no_ack.take().unwrap_or(false);
                g.delivery_tag = channel.tags.issue(link, g.delivery_tag, needs_ack);
                self.deliver(ch, &Method::BasicGetOk(g), content.as_ref());
            }
            Method::BasicGetEmpty(_) => {
                channel.get_no_ack = None;
                self.to_client(ch, &method);
            }
            Method::BasicAck(a) => self.confirm(link, ch, a.delivery_tag, a.multiple, true),
            Method::BasicNack(n) => self.confirm(link, ch, n.delivery_tag, n.multiple, false),
            Method::BasicCancel(ref c) => {
                channel.remove_consumer(&c.consumer_tag);
                if self.caps.consumer_cancel_notify {
                    self.to_client(ch, &method);
                }
            }
            Method::BasicCancelOk(ref c) => {
                channel.remove_consumer(&c.consumer_tag);
                self.to_client(ch, &method);
            }
            _ => self.deliver(ch, &method, content.as_ref()),
        }
        Flow::Continue
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

    /// Maps a broker's publisher confirm back to the client's sequence numbers.
    fn confirm(&mut self, link: LinkId, ch: u16, upstream_seq: u64, multiple: bool, ack: bool) {
        let mut seqs = std::mem::take(&mut self.scratch_seqs);
        let mut out = std::mem::take(&mut self.scratch_confirms);
        self.links[link].chan(ch).confirms.resolve(upstream_seq, multiple, &mut seqs);
        if let Some(confirms) = self.channel_mut(ch).and_then(|c| c.confirms.as_mut()) {
            confirms.settle(&seqs, &mut out);
            for c in &out {
                let m = if ack {
                    Method::BasicAck(codec::BasicAck { delivery_tag: c.seq, multiple: c.multiple })
                } else {
                    Method::BasicNack(codec::BasicNack { delivery_tag: c.seq, multiple: c.multiple, requeue: false })
                };
                self.to_client(ch, &m);
            }
        }
        self.scratch_seqs = seqs;
        self.scratch_confirms = out;
    }

    fn on_link_connection_method(&mut self, link: LinkId, method: Method) -> Flow {
        match method {
            Method::ConnectionClose(c) => {
                let slot = &mut self.links[link];
                slot.send(0, &Method::ConnectionCloseOk(Default::default()));
                slot.done = true;
                match &self.closing {
                    Some(Closing::ByClient { .. }) => {
                        if self.links.iter().all(|s| s.done) {
                            self.finish_client_close();
                            return Flow::End("client closed the connection".into());
                        }
                    }
                    Some(Closing::ByProxy { .. }) => {}
                    None => {
                        let slot = &self.links[link];
                        warn!(conn = self.id, cluster = %slot.link.cluster, code = c.reply_code, text = %c.reply_text, "broker closed the connection");
                        let reason = format!("broker closed the connection: {} {}", c.reply_code, c.reply_text);
                        let e = ConnError { code: c.reply_code, text: c.reply_text.as_str().into_owned(), class_id: c.class_id, method_id: c.method_id };
                        self.begin_proxy_close(e, &reason);
                    }
                }
                Flow::Continue
            }
            Method::ConnectionCloseOk(_) => {
                self.links[link].done = true;
                if let Some(Closing::ByClient { .. }) = self.closing
                    && self.links.iter().all(|s| s.done)
                {
                    self.finish_client_close();
                    return Flow::End("client closed the connection".into());
                }
                Flow::Continue
            }
            Method::ConnectionBlocked(b) => {
                let slot = &mut self.links[link];
                if !std::mem::replace(&mut slot.blocked, true) {
                    self.blocked_links += 1;
                    if self.blocked_links == 1 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionBlocked(b));
                    }
                }
                Flow::Continue
            }
            Method::ConnectionUnblocked(u) => {
                let slot = &mut self.links[link];
                if std::mem::replace(&mut slot.blocked, false) {
                    self.blocked_links -= 1;
                    if self.blocked_links == 0 && self.caps.connection_blocked {
                        self.to_client(0, &Method::ConnectionUnblocked(u));
                    }
                }
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }
}
