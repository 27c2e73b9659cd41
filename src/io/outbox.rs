//! A bounded, batching write buffer for one socket.
//!
//! Why not an mpsc of frames: the session encodes frames straight into the outbox's `BytesMut`, so a
//! batch of deliveries becomes one `write` syscall and no per-frame allocation happens. The writer
//! task swaps the filled buffer with an empty spare (two buffers, reused forever) and writes it while
//! producers keep appending to the other one.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::codec;

/// Capacity a buffer keeps after a large write; anything bigger is released so one 10 MiB message
/// does not pin 10 MiB per connection forever.
const KEEP_CAPACITY: usize = 256 * 1024;

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer when bytes arrive or the outbox is closed.
    writer_wake: Notify,
    /// Wakes a producer waiting for room.
    room_wake: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    buf: BytesMut,
    /// Bytes handed to the writer and not yet written: they still count against the limit.
    in_flight: usize,
    closed: bool,
    failed: bool,
}

impl Outbox {
    /// `limit` is the number of buffered bytes above which [`has_room`](Self::has_room) is false.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Outbox {
            state: Mutex::new(State {
                buf: BytesMut::with_capacity(16 * 1024),
                ..State::default()
            }),
            writer_wake: Notify::new(),
            room_wake: Notify::new(),
            limit: limit.max(codec::FRAME_MIN_SIZE as usize),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a producer panicked mid-append; the bytes are still a valid
        // prefix of frames or the connection is being torn down anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends bytes with `f` and wakes the writer. Bytes pushed after [`close`](Self::close) are
    /// dropped.
    pub fn push<R>(&self, f: impl FnOnce(&mut BytesMut) -> R) -> R {
        let r;
        {
            let mut st = self.lock();
            if st.closed {
                let mut scratch = BytesMut::new();
                return f(&mut scratch);
            }
            r = f(&mut st.buf);
        }
        self.writer_wake.notify_one();
        r
    }

    /// True while buffered plus in-flight bytes are under the limit.
    pub fn has_room(&self) -> bool {
        let st = self.lock();
        st.failed || st.buf.len() + st.in_flight < self.limit
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

    /// Bytes waiting to be written.
    pub fn pending(&self) -> usize {
        let st = self.lock();
        st.buf.len() + st.in_flight
    }

    /// Asks the writer to flush what is buffered and then shut the socket down.
    pub fn close(&self) {
        self.lock().closed = true;
        self.writer_wake.notify_one();
    }

    /// Waits until everything pushed so far is written (or the writer failed).
    pub async fn flushed(&self) {
        loop {
            let notified = self.room_wake.notified();
            {
                let st = self.lock();
                if st.failed || (st.buf.is_empty() && st.in_flight == 0) {
                    return;
                }
            }
            notified.await;
        }
    }
}

/// Drains `outbox` into `sink` until the outbox is closed or a write fails.
///
/// When `heartbeat` is set, a heartbeat frame is written whenever nothing else was written for that
/// long, which is exactly the AMQP rule ("any frame counts"), so a busy link never spends bytes on
/// heartbeats and an idle one still proves it is alive.
pub async fn run_writer<W>(
    outbox: Arc<Outbox>,
    mut sink: W,
    heartbeat: Option<Duration>,
    written_bytes: Option<prometheus_client::metrics::counter::Counter>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut spare = BytesMut::with_capacity(16 * 1024);
    let result = loop {
        let notified = outbox.writer_wake.notified();
        let closed = {
            let mut st = outbox.lock();
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
            match heartbeat {
                Some(period) => {
                    if tokio::time::timeout(period, notified).await.is_err() {
                        codec::write_heartbeat(&mut outbox.lock().buf);
                    }
                }
                None => notified.await,
            }
            continue;
        }
        let written = sink.write_all(&spare).await;
        if let Some(c) = &written_bytes {
            c.inc_by(spare.len() as u64);
        }
        spare.clear();
        if spare.capacity() > KEEP_CAPACITY {
            spare = BytesMut::with_capacity(16 * 1024);
        }
        outbox.lock().in_flight = 0;
        outbox.room_wake.notify_waiters();
        if let Err(e) = written {
            break Err(e);
        }
    };
    {
        let mut st = outbox.lock();
        st.failed = result.is_err();
        st.closed = true;
        st.buf = BytesMut::new();
        st.in_flight = 0;
    }
    outbox.room_wake.notify_waiters();
    let _ = sink.shutdown().await;
    result
}
