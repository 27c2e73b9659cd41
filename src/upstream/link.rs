//! One AMQP connection to one node of a cluster.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::reader::{MethodReader, ReadError};
use crate::addr::NodeAddr;
use crate::codec::{self, FieldTable, FieldValue, FrameKind, LongStr, Method, ShortStr};
use crate::io::outbox::Writer;
use crate::io::stream::{ReadHalf, Stream};
use crate::io::{Assembler, Command, Gate, Outbox};
use crate::tls::ClientTls;

/// Index of a link within one client session.
pub type LinkId = usize;

/// Everything needed to open a link for one client connection.
#[derive(Debug, Clone)]
pub struct LinkSpec {
    pub cluster: Arc<str>,
    pub nodes: Vec<NodeAddr>,
    pub user: Bytes,
    pub password: Bytes,
    /// The password the client logged in with, when `password` is a secret it gave later
    /// (connection.update-secret): tried when the cluster refuses `password` with 403.
    /// RabbitMQ's internal users accept any update-secret and go on checking the password,
    /// while an OAuth backend needs the renewed token; a link must open in both cases, as
    /// the client's connection to one broker would go on working.
    pub fallback_password: Option<Bytes>,
    pub vhost: ShortStr,
    /// Sent in start-ok: the client's own properties, with the proxy's capabilities.
    pub client_properties: FieldTable,
    pub heartbeat_secs: u16,
    pub frame_max: u32,
    pub channel_max: u16,
    pub connect_timeout: Duration,
    pub buffer_limit: usize,
    /// Byte counters of this cluster.
    pub metrics: Option<crate::metrics::ClusterMetrics>,
    /// amqps to the nodes (the cluster's `tls`); `None`: plain AMQP.
    pub tls: Option<ClientTls>,
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker answered the handshake with connection.close: wrong credentials (403), unknown
    /// vhost (530)... The client gets the same code and text.
    #[error("{node} refused the connection: {code} {text}")]
    Refused {
        node: NodeAddr,
        code: u16,
        text: String,
    },
    /// No node of the cluster completed a handshake.
    #[error("no node of cluster {cluster} is reachable ({last})")]
    Unreachable { cluster: Arc<str>, last: String },
}

/// Why an open link stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkDown {
    #[error("connection closed by the broker")]
    Eof,
    #[error("i/o error: {0}")]
    Io(String),
    #[error("no heartbeat from the broker for {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("protocol error from the broker: {0}")]
    Protocol(String),
    /// The node said it is going away (stopped, or put into maintenance mode) and closed the
    /// connection with this text.
    #[error("the node is going away: {0}")]
    NodeLeaving(String),
}

/// Whether a connection.close from a broker means its node is going away rather than that this
/// connection was refused: RabbitMQ closes every connection with 320 CONNECTION_FORCED and one of
/// these texts when the node stops (`rabbitmqctl stop`, a service stop, a rolling restart) or is
/// put into maintenance mode (`rabbitmq-upgrade drain`). The cluster's other node serves on, so
/// a link closed so fails over; any other close (an operator closing that one connection, a
/// refusal) is the client's to hear.
pub fn node_leaving(code: u16, text: &str) -> bool {
    code == 320
        && (text.contains("broker forced connection closure with reason 'shutdown'")
            || text.contains("Node was put into maintenance mode"))
}

/// An open link. Dropping it aborts its writer; close it politely first with connection.close.
///
/// Its reading side, [`LinkReader`], is polled by the session that owns the link (no task of its
/// own): a delivery or a confirm reaches the session without a cross-task hand-off.
#[derive(Debug)]
pub struct Link {
    pub cluster: Arc<str>,
    pub node: NodeAddr,
    pub outbox: Arc<Outbox>,
    /// Negotiated frame_max of this leg (body frames written upstream are split to it).
    pub frame_max: usize,
    pub channel_max: u16,
    pub server_properties: FieldTable,
    /// `None` once the session stopped reading it (the link failed over, or the socket ended).
    pub reader: Option<LinkReader>,
    writer: Writer,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Link {
    /// Appends one method frame.
    pub fn send(&self, channel: u16, method: &Method) {
        self.outbox
            .push(|buf| codec::write_method(buf, channel, method));
    }

    /// Lets go of a link that failed: stops reading it and closes its socket now (both halves
    /// dropped), so the broker learns it is gone as soon as the network lets it, and releases
    /// what the link's connection held (an exclusive queue the replacement link declares
    /// again). Kept open until the slot is reused, it lived on for the whole reconnect.
    pub fn abandon(&mut self) {
        self.reader = None;
        // What this turn queued (the close-ok to a node that said it is leaving) goes out
        // first if the socket takes it now; nothing waits for it.
        self.outbox.flush();
        self.outbox.abandon();
        self.writer.abort();
    }

    /// Waits (bounded) until everything queued has been written, then stops the writer.
    pub async fn shutdown(&self, wait: Duration) {
        self.outbox.close();
        let _ = tokio::time::timeout(wait, self.outbox.flushed()).await;
    }
}

/// Opens a link to the first node of `spec.nodes` that completes the handshake.
///
/// A refusal by the broker (credentials, vhost) is final: trying the other node would only repeat
/// it. A node that refuses the TCP connection or does not answer in time is skipped.
pub async fn connect(spec: &LinkSpec) -> Result<Link, ConnectError> {
    let mut last = String::from("no nodes configured");
    for node in &spec.nodes {
        let attempt = tokio::time::timeout(spec.connect_timeout, handshake(node, spec)).await;
        if let (Ok(Err(HandshakeError::Refused { code: 403, .. })), Some(password)) =
            (&attempt, &spec.fallback_password)
        {
            debug!(cluster = %spec.cluster, %node, "the updated secret was refused; trying the login password");
            let earlier = LinkSpec {
                password: password.clone(),
                fallback_password: None,
                ..spec.clone()
            };
            let again = tokio::time::timeout(spec.connect_timeout, handshake(node, &earlier)).await;
            if let Ok(Ok(opened)) = again {
                return Ok(open(spec, node.clone(), opened));
            }
        }
        match attempt {
            Ok(Ok(opened)) => return Ok(open(spec, node.clone(), opened)),
            Ok(Err(HandshakeError::Refused { code, text })) => {
                return Err(ConnectError::Refused {
                    node: node.clone(),
                    code,
                    text,
                });
            }
            Ok(Err(HandshakeError::Failed(e))) => {
                debug!(cluster = %spec.cluster, %node, error = %e, "node unavailable");
                last = format!("{node}: {e}");
            }
            Err(_) => {
                debug!(cluster = %spec.cluster, %node, "node did not answer in time");
                last = format!("{node}: no answer within {:?}", spec.connect_timeout);
            }
        }
    }
    Err(ConnectError::Unreachable {
        cluster: spec.cluster.clone(),
        last,
    })
}

enum HandshakeError {
    Refused { code: u16, text: String },
    Failed(String),
}

impl From<ReadError> for HandshakeError {
    fn from(e: ReadError) -> Self {
        HandshakeError::Failed(e.to_string())
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Failed(e.to_string())
    }
}

struct Opened {
    stream: Stream,
    leftover: BytesMut,
    frame_max: usize,
    channel_max: u16,
    heartbeat: u16,
    server_properties: FieldTable,
}

async fn send(stream: &mut Stream, method: &Method) -> Result<(), HandshakeError> {
    let mut out = BytesMut::with_capacity(512);
    codec::write_method(&mut out, 0, method);
    stream.write_all(&out).await?;
    Ok(())
}

/// Answers a connection.close received during the handshake and turns it into a refusal.
async fn refused(stream: &mut Stream, close: codec::ConnectionClose) -> HandshakeError {
    let _ = send(stream, &Method::ConnectionCloseOk(Default::default())).await;
    HandshakeError::Refused {
        code: close.reply_code,
        text: close.reply_text.as_str().into_owned(),
    }
}

async fn handshake(node: &NodeAddr, spec: &LinkSpec) -> Result<Opened, HandshakeError> {
    let mut stream = Stream::connect(node, spec.tls.as_ref()).await?;
    stream.write_all(codec::PROTOCOL_HEADER).await?;
    let mut reader = MethodReader::default();

    let start = match reader.next(&mut stream).await? {
        Method::ConnectionStart(s) => s,
        other => {
            return Err(HandshakeError::Failed(format!(
                "expected connection.start, got {}",
                other.name()
            )));
        }
    };
    let mut response = BytesMut::with_capacity(2 + spec.user.len() + spec.password.len());
    response.extend_from_slice(b"\0");
    response.extend_from_slice(&spec.user);
    response.extend_from_slice(b"\0");
    response.extend_from_slice(&spec.password);
    send(
        &mut stream,
        &Method::ConnectionStartOk(codec::ConnectionStartOk {
            client_properties: spec.client_properties.clone(),
            mechanism: ShortStr::from_static("PLAIN"),
            response: LongStr::from(response.freeze()),
            locale: ShortStr::from_static("en_US"),
        }),
    )
    .await?;

    let tune = match reader.next(&mut stream).await {
        Ok(Method::ConnectionTune(t)) => t,
        Ok(Method::ConnectionClose(c)) => return Err(refused(&mut stream, c).await),
        Ok(other) => {
            return Err(HandshakeError::Failed(format!(
                "expected connection.tune, got {}",
                other.name()
            )));
        }
        // RabbitMQ drops the socket on a failed login only for clients that did not ask for
        // authentication_failure_close, and warren always asks (a refusal comes as
        // connection.close 403 above). A drop here is the node failing mid-handshake (killed,
        // shutting down): the next node is tried, and the client is never told its login was
        // refused when it was not.
        Err(e) => return Err(e.into()),
    };
    let limit = |ours: u32, theirs: u32| if theirs == 0 { ours } else { ours.min(theirs) };
    let frame_max = limit(spec.frame_max, tune.frame_max).max(codec::FRAME_MIN_SIZE);
    let channel_max = limit(u32::from(spec.channel_max), u32::from(tune.channel_max)) as u16;
    let heartbeat = spec.heartbeat_secs;
    send(
        &mut stream,
        &Method::ConnectionTuneOk(codec::ConnectionTuneOk {
            channel_max,
            frame_max,
            heartbeat,
        }),
    )
    .await?;
    send(
        &mut stream,
        &Method::ConnectionOpen(codec::ConnectionOpen {
            virtual_host: spec.vhost.clone(),
            capabilities: ShortStr::default(),
            insist: false,
        }),
    )
    .await?;
    match reader.next(&mut stream).await? {
        Method::ConnectionOpenOk(_) => {}
        Method::ConnectionClose(c) => return Err(refused(&mut stream, c).await),
        other => {
            return Err(HandshakeError::Failed(format!(
                "expected connection.open-ok, got {}",
                other.name()
            )));
        }
    }
    Ok(Opened {
        stream,
        leftover: reader.into_leftover(),
        frame_max: frame_max as usize,
        channel_max,
        heartbeat,
        server_properties: start.server_properties,
    })
}

fn open(spec: &LinkSpec, node: NodeAddr, open: Opened) -> Link {
    let (rd, wr) = open.stream.into_split();
    let heartbeat = (open.heartbeat > 0).then(|| Duration::from_secs(u64::from(open.heartbeat)));
    let bytes_to = spec.metrics.as_ref().map(|m| m.bytes_to.clone());
    let bytes_from = spec.metrics.as_ref().map(|m| m.bytes_from.clone());
    // Send at half the interval so the broker never sees a gap near its own deadline.
    let (outbox, writer) = Outbox::start(spec.buffer_limit, wr, heartbeat.map(|h| h / 2), bytes_to);
    Link {
        cluster: spec.cluster.clone(),
        node,
        outbox,
        frame_max: open.frame_max,
        channel_max: open.channel_max,
        server_properties: open.server_properties,
        reader: Some(LinkReader {
            rd,
            buf: open.leftover,
            // The broker enforces its own max message size; the proxy only needs whole contents.
            assembler: Assembler::new(u64::MAX),
            frame_max: open.frame_max,
            heartbeat,
            last_seen: Instant::now(),
            bytes_from,
            gate: Gate::new(),
            lazy: None,
            late: Lateness::default(),
        }),
        writer,
    }
}

/// The reading side of a link: frames from the broker, assembled into commands.
///
/// The session polls it only while its client's outbox has room, so a slow client stops the
/// proxy reading this socket and TCP pushes back on the broker.
#[derive(Debug)]
pub struct LinkReader {
    rd: ReadHalf,
    buf: BytesMut,
    assembler: Assembler,
    frame_max: usize,
    heartbeat: Option<Duration>,
    last_seen: Instant,
    bytes_from: Option<Counter>,
    /// The socket is polled only once it woke the session (see [`Gate`]).
    gate: Gate,
    /// While the socket's low-water mark is raised, when it was last read: the broker's bytes
    /// wait in the kernel until [`LAZY_LOWAT`] of them have come or the session reads them (see
    /// [`LinkReader::make_lazy`]).
    lazy: Option<Instant>,
    /// Whether what was read last may have waited in the kernel for warren.
    late: Lateness,
}

/// Whether the bytes a link read last may have waited in the kernel because warren was not
/// reading (a lazy link's batch, or what piled up while the session stopped reading for a slow
/// client), rather than arriving just before the read. A confirm read so is not timed:
/// `warren_confirm_latency_seconds` is the cluster's latency, not warren's pace or a client's
/// slowness. What piled up may take many reads to get through, so everything read is late until
/// a read finds the socket empty. An empty socket is not enough on its own: the broker holds
/// back what TCP would not take while warren did not read, and sends it once warren reads again,
/// so a confirm of a publish sent before the session last stopped reading is late however it is
/// read.
#[derive(Debug, Default, Clone, Copy)]
struct Lateness {
    /// The socket may hold bytes that waited for warren.
    behind: bool,
    /// What the last read returned may have waited.
    late: bool,
    /// When the session last did not read the socket for a slow client.
    stalled: Option<Instant>,
}

impl Lateness {
    /// The session stopped holding the socket's bytes back (a lazy link turned prompt).
    fn behind(&mut self) {
        self.behind = true;
    }

    /// The session is not reading the socket at `now` (a slow client).
    fn stalled(&mut self, now: Instant) {
        self.behind = true;
        self.stalled = Some(now);
    }

    /// Whether a confirm just read, of a publish sent at `sent`, came as the cluster sent it.
    fn on_time(&self, sent: Instant) -> bool {
        !self.late && self.stalled.is_none_or(|s| sent > s)
    }

    /// A read returned bytes; `lazy`: the socket's low-water mark held them back.
    fn read(&mut self, lazy: bool) {
        self.late = lazy || self.behind;
    }

    /// A read found the socket empty: what comes next comes as it is read.
    fn drained(&mut self) {
        self.behind = false;
    }
}

/// The low-water mark of a lazy link: about 390 basic.acks of 21 bytes, so a burst of
/// confirms still wakes the session before the held publishes they free pile up.
pub const LAZY_LOWAT: u32 = 8 * 1024;

impl LinkReader {
    /// Reads once from the socket into the buffer; take the commands with
    /// [`next_command`](Self::next_command).
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LinkDown>> {
        crate::io::read_buf::make_room(&mut self.buf, 8 * 1024, 64 * 1024);
        let (rd, buf) = (&mut self.rd, &mut self.buf);
        match self.gate.poll(cx, |cx| {
            tokio_util::io::poll_read_buf(Pin::new(rd), cx, buf)
        }) {
            Poll::Pending => {
                self.late.drained();
                Poll::Pending
            }
            Poll::Ready(Ok(0)) => Poll::Ready(Err(LinkDown::Eof)),
            Poll::Ready(Ok(n)) => {
                self.last_seen = Instant::now();
                self.late.read(self.lazy.is_some());
                if let Some(c) = &self.bytes_from {
                    c.inc_by(n as u64);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(LinkDown::Io(e.to_string()))),
        }
    }

    /// The next whole command in what was read (heartbeats are skipped).
    pub fn next_command(&mut self) -> Result<Option<Command>, LinkDown> {
        loop {
            let frame = match codec::decode_frame(&mut self.buf, self.frame_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(e) => return Err(LinkDown::Protocol(e.to_string())),
            };
            if frame.kind == FrameKind::Heartbeat {
                continue;
            }
            match self.assembler.push(frame) {
                Ok(Some(cmd)) => return Ok(Some(cmd)),
                Ok(None) => {}
                Err(e) => return Err(LinkDown::Protocol(e.to_string())),
            }
        }
    }

    /// The delivery or publisher confirm at the front of what was read, located without
    /// decoding it (see [`codec::peek`]), for a client whose frame_max is `out_frame_max`.
    /// `None` when there is none, or when a content is half assembled.
    pub fn peek(&self, out_frame_max: usize) -> Option<codec::peek::Peeked> {
        if !self.assembler.is_idle() {
            return None;
        }
        let limits = codec::peek::Limits {
            frame_max: self.frame_max,
            out_frame_max,
            max_body: self.assembler.max_message(),
        };
        codec::peek::peek(&self.buf, &limits)
    }

    /// What was read and not yet taken.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the first `n` bytes read: a command [`peek`](Self::peek) found, handled.
    pub fn consume(&mut self, n: usize) {
        bytes::Buf::advance(&mut self.buf, n);
    }

    /// Waits for the next command (for users without an event loop of their own).
    pub async fn recv(&mut self) -> Result<Command, LinkDown> {
        loop {
            if let Some(cmd) = self.next_command()? {
                return Ok(cmd);
            }
            std::future::poll_fn(|cx| self.poll_read(cx)).await?;
        }
    }

    /// Raises the socket's low-water mark to [`LAZY_LOWAT`]: the broker's bytes wait in the
    /// kernel until the session reads them with [`read_now`](Self::read_now) or that many have
    /// come. Returns whether the link is now lazy: a TLS link, or a socket that refuses the
    /// option, stays prompt.
    pub fn make_lazy(&mut self, now: Instant) -> bool {
        if self.lazy.is_none() {
            match self.rd.set_recv_lowat(LAZY_LOWAT) {
                Ok(set) => self.lazy = set.then_some(now),
                Err(e) => debug!(error = %e, "cannot raise the receive low-water mark of a link"),
            }
        }
        self.lazy.is_some()
    }

    /// Lowers the socket's low-water mark to one byte again, which signals whatever waits.
    pub fn make_prompt(&mut self) {
        if self.lazy.is_some() {
            match self.rd.set_recv_lowat(1) {
                Ok(_) => {
                    self.lazy = None;
                    self.late.behind();
                }
                // Still raised: the next turn tries again.
                Err(e) => debug!(error = %e, "cannot lower the receive low-water mark of a link"),
            }
        }
    }

    /// When a lazy link was last read (or became lazy); `None` when it is prompt.
    pub fn lazy_read_at(&self) -> Option<Instant> {
        self.lazy
    }

    /// Reads what waits on a lazy link's socket now, without waiting for it to be reported
    /// readable (its raised mark keeps it from being). Returns the bytes read, 0 when none
    /// waited; take the commands with [`next_command`](Self::next_command).
    pub fn read_now(&mut self, now: Instant) -> Result<usize, LinkDown> {
        let ReadHalf::Plain(rd) = &self.rd else {
            return Ok(0);
        };
        if self.lazy.is_some() {
            self.lazy = Some(now);
        }
        crate::io::read_buf::make_room(&mut self.buf, 8 * 1024, 64 * 1024);
        let start = self.buf.len();
        // Safe code cannot read into spare capacity: zero some first. 2 KiB is about 100 acks,
        // more than a read delay gathers at thousands of messages a second; whatever is left
        // is read at the next delay, or wakes the session once it reaches the mark.
        let room = (self.buf.capacity() - start).min(2 * 1024);
        self.buf.resize(start + room, 0);
        let read = std::io::Read::read(
            &mut &*socket2::SockRef::from(rd.as_ref()),
            &mut self.buf[start..],
        );
        self.buf.truncate(start + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) => Err(LinkDown::Eof),
            Ok(n) => {
                self.last_seen = now;
                self.late.read(true);
                if let Some(c) = &self.bytes_from {
                    c.inc_by(n as u64);
                }
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                self.late.drained();
                Ok(0)
            }
            Err(e) => Err(LinkDown::Io(e.to_string())),
        }
    }

    /// The broker has been silent for two heartbeat intervals.
    pub fn heartbeat_missed(&self, now: Instant) -> Option<LinkDown> {
        let h = self.heartbeat?;
        (now.duration_since(self.last_seen) >= 2 * h).then_some(LinkDown::HeartbeatTimeout(2 * h))
    }

    /// When the broker will have been silent for two heartbeat intervals, unless it speaks.
    pub fn heartbeat_deadline(&self) -> Option<Instant> {
        self.heartbeat.map(|h| self.last_seen + 2 * h)
    }

    /// Time the session spent not reading is not the broker's silence.
    pub fn not_reading(&mut self, now: Instant) {
        self.last_seen = now;
        self.late.stalled(now);
    }

    /// Whether a confirm just read, of a publish sent upstream at `sent`, came as the cluster
    /// sent it: not held back in the kernel or in the broker for warren (see [`Lateness`]).
    pub fn confirm_on_time(&self, sent: Instant) -> bool {
        self.late.on_time(sent)
    }
}

/// The client properties sent upstream: the client's own, with the capabilities the proxy needs
/// from the broker and the client's address, so `rabbitmqctl list_connections` shows who is behind
/// each link.
pub fn upstream_client_properties(client: &FieldTable, peer: std::net::SocketAddr) -> FieldTable {
    let mut props = client.clone();
    let mut caps = FieldTable::default();
    for cap in [
        "authentication_failure_close",
        "connection.blocked",
        "consumer_cancel_notify",
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "per_consumer_qos",
    ] {
        caps.insert(ShortStr::from_static(cap), FieldValue::Bool(true));
    }
    props.insert(
        ShortStr::from_static("capabilities"),
        FieldValue::Table(caps),
    );
    props.insert(
        ShortStr::from_static("client_address"),
        FieldValue::LongStr(LongStr::from(peer.to_string())),
    );
    if props.get("connection_name").is_none() {
        props.insert(
            ShortStr::from_static("connection_name"),
            FieldValue::LongStr(LongStr::from(format!("warren client {peer}"))),
        );
    }
    props
}

#[cfg(test)]
mod tests {
    use super::Lateness;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn a_prompt_read_is_on_time() {
        let mut l = Lateness::default();
        l.read(false);
        assert!(!l.late);
    }

    #[test]
    fn a_lazy_links_batch_is_late() {
        let mut l = Lateness::default();
        l.read(true);
        assert!(l.late);
        l.drained();
        l.read(false);
        assert!(!l.late, "prompt again, after a read found nothing");
    }

    #[test]
    fn what_piled_up_while_the_session_did_not_read_is_late_until_the_socket_is_empty() {
        let mut l = Lateness::default();
        l.behind();
        assert!(!l.late, "nothing read yet");
        for _ in 0..3 {
            l.read(false);
            assert!(l.late, "the backlog takes several reads");
        }
        l.drained();
        l.read(false);
        assert!(!l.late, "read as it came");
    }

    #[test]
    fn a_confirm_of_a_publish_sent_before_a_stall_is_late_even_from_an_empty_socket() {
        let start = Instant::now();
        let mut l = Lateness::default();
        l.stalled(start + Duration::from_millis(800));
        l.read(false);
        l.drained();
        // The broker sends what it held back once warren reads again.
        l.read(false);
        assert!(!l.on_time(start), "sent before the stall ended");
        assert!(
            l.on_time(start + Duration::from_millis(900)),
            "sent after it"
        );
    }

    #[test]
    fn a_lazy_link_turned_prompt_reads_what_it_held_back_as_late() {
        let mut l = Lateness::default();
        l.read(true);
        l.behind();
        l.read(false);
        assert!(l.late);
    }
}
