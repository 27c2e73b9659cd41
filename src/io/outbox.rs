//! A bounded, batching write buffer for one socket.
//!
//! Why not an mpsc of frames: the session encodes frames straight into the outbox's `BytesMut`, so a
//! batch of deliveries becomes one `write` syscall and no per-frame allocation happens.
//!
//! Why the session writes the socket itself: handing every batch to a writer task costs a
//! cross-task wake-up per batch, which at low rates is most of the latency a proxy adds. So
//! [`push`](Outbox::push) only appends, and the session calls [`flush`](Outbox::flush) once per
//! turn of its event loop (after it has handled everything one socket read brought): on plain
//! TCP that is a non-blocking write straight from the buffer, and the writer task is woken only
//! for what the socket did not take (a full socket: back-pressure), for heartbeats and for the
//! close. TLS goes through the writer task (rustls keeps one state for both directions), which
//! swaps the filled buffer with a spare and writes it while the session keeps appending.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::codec;
use crate::io::stream::WriteHalf;

/// Capacity a buffer keeps after a large write; anything bigger is released so one 10 MiB message
/// does not pin 10 MiB per connection forever.
const KEEP_CAPACITY: usize = 256 * 1024;
const INITIAL_CAPACITY: usize = 16 * 1024;

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when bytes are left for it or the outbox is closed.
    writer_wake: Notify,
    /// Wakes a producer waiting for room.
    room_wake: Notify,
    limit: usize,
    written_bytes: Option<Counter>,
}

#[derive(Debug)]
struct State {
    buf: BytesMut,
    /// TLS only: bytes handed to the writer and not yet written; they still count against the
    /// limit.
    in_flight: usize,
    /// Plain TCP: the socket, written under this lock by whoever flushes. `None` for TLS, and
    /// once the writer has finished.
    sock: Option<Arc<OwnedWriteHalf>>,
    /// Writes so far. The writer compares it between its wake-ups to tell a quiet socket
    /// (due a heartbeat) from a busy one: counting costs nothing on the write path, where
    /// reading the clock at every write did.
    writes: u64,
    closed: bool,
    failed: bool,
}

/// The writer task of an outbox; its result is the socket's fate.
pub type Writer = JoinHandle<io::Result<()>>;

impl Outbox {
    /// An outbox for `sink`, with its writer task running.
    ///
    /// `limit` is the number of buffered bytes above which [`has_room`](Self::has_room) is false.
    /// When `heartbeat` is set, a heartbeat frame is written whenever nothing else was written for
    /// that long, which is exactly the AMQP rule ("any frame counts"), so a busy socket never
    /// spends bytes on heartbeats and an idle one still proves it is alive.
    pub fn start(
        limit: usize,
        sink: WriteHalf,
        heartbeat: Option<Duration>,
        written_bytes: Option<Counter>,
    ) -> (Arc<Outbox>, Writer) {
        match sink {
            WriteHalf::Plain(w) => {
                let sock = Arc::new(w);
                let outbox = Outbox::new(limit, Some(sock.clone()), written_bytes);
                let writer = tokio::spawn(run_direct(outbox.clone(), sock, heartbeat));
                (outbox, writer)
            }
            tls @ WriteHalf::Tls(_) => {
                let outbox = Outbox::new(limit, None, written_bytes);
                let writer = tokio::spawn(run_swapping(outbox.clone(), tls, heartbeat));
                (outbox, writer)
            }
        }
    }

    fn new(
        limit: usize,
        sock: Option<Arc<OwnedWriteHalf>>,
        written_bytes: Option<Counter>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(State {
                buf: BytesMut::with_capacity(INITIAL_CAPACITY),
                in_flight: 0,
                sock,
                writes: 0,
                closed: false,
                failed: false,
            }),
            writer_wake: Notify::new(),
            room_wake: Notify::new(),
            limit: limit.max(codec::FRAME_MIN_SIZE as usize),
            written_bytes,
        })
    }

    /// Appends bytes with `f`. They go out at the next [`flush`](Self::flush). Bytes pushed
    /// after [`close`](Self::close) are dropped.
    pub fn push<R>(&self, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let mut st = self.state.lock();
        if st.closed {
            let mut scratch = BytesMut::new();
            return f(&mut scratch);
        }
        f(&mut st.buf)
    }

    /// Sends what was pushed: written right here when the socket takes it (plain TCP), else
    /// left to the writer task. Returns [`has_room`](Self::has_room) as of after the write (the
    /// session asks both once per turn: one lock instead of two).
    pub fn flush(&self) -> bool {
        let mut st = self.state.lock();
        let left = !st.buf.is_empty() && (st.closed || !self.write_direct(&mut st));
        let room = self.room_now(&st);
        drop(st);
        if left {
            self.writer_wake.notify_one();
        }
        room
    }

    fn room_now(&self, st: &State) -> bool {
        st.failed || st.buf.len() + st.in_flight < self.limit
    }

    /// Writes as much of the buffer as the socket takes without blocking; true when all of it
    /// went. Errors are left for the writer task to meet and report.
    fn write_direct(&self, st: &mut State) -> bool {
        if st.failed {
            return false;
        }
        let State { buf, sock, .. } = st;
        let Some(sock) = sock.as_deref() else {
            return false;
        };
        let (wrote, _) = write_nonblocking(buf, sock);
        self.wrote(st, wrote);
        st.buf.is_empty()
    }

    /// Accounts for `n` bytes just written from the buffer.
    fn wrote(&self, st: &mut State, n: usize) {
        if n == 0 {
            return;
        }
        st.writes += 1;
        if let Some(c) = &self.written_bytes {
            c.inc_by(n as u64);
        }
        if st.buf.is_empty() && st.buf.capacity() > KEEP_CAPACITY {
            st.buf = BytesMut::with_capacity(INITIAL_CAPACITY);
        }
    }

    /// True while buffered plus in-flight bytes are under the limit.
    pub fn has_room(&self) -> bool {
        self.room_now(&self.state.lock())
    }

    /// Waits until [`has_room`](Self::has_room) may have become true.
    pub async fn room(&self) {
        loop {
            let notified = self.room_wake.notified();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Writes that have put bytes on the socket so far: unchanged between two looks, with
    /// bytes pending, means the peer took nothing meanwhile.
    pub fn writes(&self) -> u64 {
        self.state.lock().writes
    }

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        let st = self.state.lock();
        st.buf.len() + st.in_flight
    }

    /// Asks the writer to write what is buffered and then shut the socket down.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.writer_wake.notify_one();
    }

    /// Closes the outbox for good and lets go of its socket: what is still buffered is
    /// dropped (the peer is being abandoned), and the socket closes once the writer task,
    /// aborted by the owner, drops its half too.
    pub fn abandon(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.buf.clear();
        st.sock = None;
        drop(st);
        self.writer_wake.notify_one();
    }

    /// Waits until everything pushed so far is written (or the writer failed). Flushes first.
    pub async fn flushed(&self) {
        self.flush();
        loop {
            let notified = self.room_wake.notified();
            {
                let st = self.state.lock();
                if st.failed || (st.buf.is_empty() && st.in_flight == 0) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// The writer is done (closed or failed): nothing more will be written.
    fn finish(&self, failed: bool) {
        {
            let mut st = self.state.lock();
            st.failed = failed;
            st.closed = true;
            st.buf = BytesMut::new();
            st.in_flight = 0;
            // The last reference to a plain socket's write half goes with the writer's: dropping
            // it shuts the write side down.
            st.sock = None;
        }
        self.room_wake.notify_waiters();
    }

    /// Appends a heartbeat frame when nothing was written since the writer saw `writes`
    /// writes and nothing waits.
    fn heartbeat_if_quiet(&self, writes: u64) {
        let mut st = self.state.lock();
        if st.writes == writes && st.buf.is_empty() {
            codec::write_heartbeat(&mut st.buf);
        }
    }
}

/// Writes from the front of `buf` what `sock` takes without blocking, and drops it from `buf`.
/// Returns the bytes written, and the error that stopped it (a full socket is not one).
fn write_nonblocking(buf: &mut BytesMut, sock: &OwnedWriteHalf) -> (usize, io::Result<()>) {
    let mut wrote = 0;
    while !buf.is_empty() {
        match sock.try_write(buf) {
            Ok(0) => return (wrote, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) if n == buf.len() => {
                // All of it went: the next frames are written from the start of the buffer
                // again, where the cache lines are still hot. (Advancing would move every
                // later write on through the whole allocation, each onto cold lines.)
                buf.clear();
                wrote += n;
            }
            Ok(n) => {
                buf.advance(n);
                wrote += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return (wrote, Err(e)),
        }
    }
    (wrote, Ok(()))
}

/// What the writer last saw of the socket's writes, to tell when it has been quiet.
struct Quiet {
    /// [`State::writes`] when the writer last saw it change.
    writes: u64,
    /// When that was.
    since: Instant,
}

impl Quiet {
    fn new() -> Self {
        Quiet {
            writes: 0,
            since: Instant::now(),
        }
    }
}

/// Waits for `notified` or until the next heartbeat is due, appending the heartbeat then. The
/// writer looks at the write count every half `period`; once it saw no write for a whole half
/// period it appends a heartbeat. The last write was at most half a period before the writer saw
/// it, so a heartbeat follows it at most one `period` later (half the negotiated interval), as
/// when the time of every write was read; a quiet socket sends one every half period.
async fn idle_wait(
    outbox: &Outbox,
    notified: tokio::sync::futures::Notified<'_>,
    heartbeat: Option<Duration>,
    quiet: &mut Quiet,
) {
    match heartbeat {
        Some(period) => {
            let writes = outbox.state.lock().writes;
            if writes != quiet.writes {
                *quiet = Quiet {
                    writes,
                    since: Instant::now(),
                };
            }
            if tokio::time::timeout_at(quiet.since + period / 2, notified)
                .await
                .is_err()
            {
                outbox.heartbeat_if_quiet(quiet.writes);
                // A new period starts, whether the heartbeat went out or other bytes wait.
                quiet.since = Instant::now();
            }
        }
        None => notified.await,
    }
}

/// The writer of a plain TCP socket: writes what [`Outbox::flush`] could not (the socket was
/// full), heartbeats, and the final flush and shutdown after [`Outbox::close`].
async fn run_direct(
    outbox: Arc<Outbox>,
    sock: Arc<OwnedWriteHalf>,
    heartbeat: Option<Duration>,
) -> io::Result<()> {
    let mut quiet = Quiet::new();
    let result = loop {
        let notified = outbox.writer_wake.notified();
        let (closed, empty, error) = {
            let mut st = outbox.state.lock();
            let (wrote, result) = write_nonblocking(&mut st.buf, &sock);
            outbox.wrote(&mut st, wrote);
            (st.closed, st.buf.is_empty(), result.err())
        };
        if let Some(e) = error {
            break Err(e);
        }
        // Room may have appeared, whether the bytes went here or in a flush.
        outbox.room_wake.notify_waiters();
        if !empty {
            if let Err(e) = sock.writable().await {
                break Err(e);
            }
            continue;
        }
        if closed {
            break Ok(());
        }
        idle_wait(&outbox, notified, heartbeat, &mut quiet).await;
    };
    outbox.finish(result.is_err());
    drop(sock);
    result
}

/// The writer of a TLS socket: swaps the filled buffer with a spare and writes it.
async fn run_swapping(
    outbox: Arc<Outbox>,
    mut sink: WriteHalf,
    heartbeat: Option<Duration>,
) -> io::Result<()> {
    let mut spare = BytesMut::with_capacity(INITIAL_CAPACITY);
    let mut quiet = Quiet::new();
    let result = loop {
        let notified = outbox.writer_wake.notified();
        let closed = {
            let mut st = outbox.state.lock();
            if !st.buf.is_empty() {
                std::mem::swap(&mut st.buf, &mut spare);
                st.in_flight = spare.len();
            }
            st.closed
        };
        if spare.is_empty() {
            if closed {
                break Ok(());
            }
            idle_wait(&outbox, notified, heartbeat, &mut quiet).await;
            continue;
        }
        // Written piece by piece, each counted in `writes`: a slow peer that still takes
        // bytes is making progress (see `Outbox::writes`), however long the whole buffer takes.
        let mut off = 0;
        let written = loop {
            if off == spare.len() {
                break Ok(());
            }
            match sink.write(&spare[off..]).await {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    off += n;
                    outbox.state.lock().writes += 1;
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(c) = &outbox.written_bytes {
            c.inc_by(spare.len() as u64);
        }
        spare.clear();
        if spare.capacity() > KEEP_CAPACITY {
            spare = BytesMut::with_capacity(INITIAL_CAPACITY);
        }
        {
            let mut st = outbox.state.lock();
            st.in_flight = 0;
            st.writes += 1;
        }
        outbox.room_wake.notify_waiters();
        if let Err(e) = written {
            break Err(e);
        }
    };
    outbox.finish(result.is_err());
    let _ = sink.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::stream::Stream;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, 0xCE];

    /// An outbox on one end of a loopback connection, and the other end.
    async fn pair(limit: usize, heartbeat: Option<Duration>) -> (Arc<Outbox>, Writer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_rd, wr) = Stream::Plain(ours.unwrap()).into_split();
        // The read half is dropped: only writing is under test (the socket stays open).
        let (outbox, writer) = Outbox::start(limit, wr, heartbeat, None);
        (outbox, writer, theirs.unwrap().0)
    }

    fn numbered(from: u32, n: u32) -> Vec<u8> {
        (from..from + n).flat_map(u32::to_be_bytes).collect()
    }

    #[tokio::test]
    async fn flush_sends_what_was_pushed_in_order() {
        let (outbox, _writer, mut peer) = pair(1 << 20, None).await;
        outbox.push(|b| b.extend_from_slice(b"one "));
        outbox.push(|b| b.extend_from_slice(b"two"));
        assert_eq!(outbox.pending(), 7, "nothing leaves before the flush");
        outbox.flush();
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
        assert_eq!(outbox.pending(), 0);
    }

    /// A peer that does not read: the socket fills, the rest waits in the outbox (counted
    /// against the limit, so the producer stops), and everything arrives in order once the
    /// peer reads, written by the writer task without another flush.
    #[tokio::test]
    async fn a_full_socket_leaves_the_rest_to_the_writer() {
        let limit = 256 * 1024;
        let (outbox, _writer, mut peer) = pair(limit, None).await;
        let mut sent = 0u32;
        let chunk = 16 * 1024;
        // Until the socket buffers are full and the limit is reached (capped in case the
        // kernel takes everything: then the test would prove nothing, and fails below).
        while outbox.has_room() && sent < 64 * 1024 * 1024 / 4 {
            let bytes = numbered(sent, chunk);
            outbox.push(|b| b.extend_from_slice(&bytes));
            outbox.flush();
            sent += chunk;
        }
        assert!(!outbox.has_room(), "the limit stops the producer");
        assert!(outbox.pending() >= limit);
        let mut got = vec![0u8; sent as usize * 4];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut got))
            .await
            .expect("the writer task writes the rest")
            .unwrap();
        assert_eq!(
            got,
            numbered(0, sent),
            "bytes in order, none lost or repeated"
        );
        tokio::time::timeout(Duration::from_secs(5), outbox.room())
            .await
            .expect("room once written");
        assert_eq!(outbox.pending(), 0);
    }

    #[tokio::test]
    async fn heartbeats_only_when_quiet() {
        let period = Duration::from_millis(300);
        let (outbox, _writer, mut peer) = pair(1 << 20, Some(period)).await;
        // Busy: a frame every 30 ms for 600 ms, written by the flushes themselves (the writer
        // looks every 150 ms).
        let data = [1u8, 0, 1, 0, 0, 0, 0, 0xCE];
        for _ in 0..20 {
            outbox.push(|b| b.extend_from_slice(&data));
            outbox.flush();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let mut got = vec![0u8; 20 * 8];
        peer.read_exact(&mut got).await.unwrap();
        assert!(
            got.chunks(8).all(|f| f == data),
            "no heartbeat while the socket is busy"
        );
        // Quiet: heartbeats every half period, the first at most a period after the last frame.
        let mut hb = [0u8; 8];
        let started = Instant::now();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(2), peer.read_exact(&mut hb))
                .await
                .expect("a heartbeat when quiet")
                .unwrap();
            assert_eq!(hb, HEARTBEAT);
        }
        assert!(started.elapsed() >= period, "{:?}", started.elapsed());
        assert!(started.elapsed() < period * 4, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn close_writes_the_rest_then_shuts_down() {
        let (outbox, writer, mut peer) = pair(1 << 20, None).await;
        outbox.push(|b| b.extend_from_slice(b"last words"));
        outbox.close();
        outbox.push(|b| b.extend_from_slice(b" (dropped)"));
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut got))
            .await
            .expect("EOF after the close")
            .unwrap();
        assert_eq!(got, b"last words");
        assert!(writer.await.unwrap().is_ok());
        assert!(
            outbox.has_room(),
            "a finished outbox never blocks its producer"
        );
    }
}
