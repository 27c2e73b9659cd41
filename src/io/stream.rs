//! A socket of either leg: plain TCP, or TLS over TCP.
//!
//! The plain path stays what it was: [`Stream::into_split`] gives tokio's own owned halves of the
//! `TcpStream` inside a two-variant enum, so a read or write costs one `match` more and nothing
//! else (no boxing, no lock). A TLS stream is split with `tokio::io::split` (a short lock per
//! poll: rustls keeps one state for both directions).
//!
//! TLS writes go through [`Flushed`]: a write is reported done only once its ciphertext is on the
//! socket. tokio-rustls may accept plaintext while part of the ciphertext is still buffered
//! (socket full); the outbox writer does not flush (a no-op on TCP), so without this the tail of
//! a batch could wait for the next write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;
use tokio_rustls::TlsStream;

use crate::addr::NodeAddr;
use crate::tls::{ClientTls, ServerTls};

/// One connected socket.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

/// A TLS connection and how long its handshake took.
#[derive(Debug)]
pub struct TlsConn {
    io: Flushed<TlsStream<TcpStream>>,
    handshake: Duration,
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Flushed<TlsStream<TcpStream>>>),
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Flushed<TlsStream<TcpStream>>>),
}

impl Stream {
    /// Connects to a node, with TLS when `tls` is set (the TLS handshake included).
    pub async fn connect(node: &NodeAddr, tls: Option<&ClientTls>) -> io::Result<Stream> {
        let tcp = TcpStream::connect((node.host.as_str(), node.port)).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = tls.server_name(&node.host).map_err(io::Error::other)?;
        let started = Instant::now();
        let io = tls
            .connector()
            .connect(name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        Ok(Stream::tls(TlsStream::Client(io), started.elapsed()))
    }

    /// Runs the server side of the TLS handshake on an accepted socket, within `timeout`.
    pub async fn accept(tcp: TcpStream, tls: &ServerTls, timeout: Duration) -> io::Result<Stream> {
        let started = Instant::now();
        let io = match tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("TLS handshake failed: {e}"),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no TLS handshake within the handshake timeout ({} ms)",
                        timeout.as_millis()
                    ),
                ));
            }
        };
        Ok(Stream::tls(TlsStream::Server(io), started.elapsed()))
    }

    fn tls(io: TlsStream<TcpStream>, handshake: Duration) -> Stream {
        Stream::Tls(Box::new(TlsConn {
            io: Flushed::new(io),
            handshake,
        }))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Time the TLS handshake took (zero for plain TCP): it counts against the AMQP handshake
    /// timeout of a client.
    pub fn tls_handshake_time(&self) -> Duration {
        match self {
            Stream::Plain(_) => Duration::ZERO,
            Stream::Tls(t) => t.handshake,
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.io.inner.get_ref().0,
        }
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().peer_addr()
    }

    /// Splits into a read half (for the task that understands the protocol) and a write half
    /// (for the outbox's writer task).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(t) => {
                let (r, w) = tokio::io::split(t.io);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(t) => Pin::new(&mut t.io).poll_shutdown(cx),
        }
    }
}

impl ReadHalf {
    /// Sets the socket's receive low-water mark (see [`super::rcvlowat`]). Returns whether it
    /// was set: not on a TLS stream, whose socket sits inside the TLS layer, nor off Linux.
    pub fn set_recv_lowat(&self, bytes: u32) -> io::Result<bool> {
        match self {
            ReadHalf::Plain(r) => super::rcvlowat::set(r.as_ref(), bytes),
            ReadHalf::Tls(_) => Ok(false),
        }
    }
}

impl AsyncRead for ReadHalf {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A writer whose writes complete only once flushed (see the module documentation).
#[derive(Debug)]
pub struct Flushed<S> {
    inner: S,
    /// Bytes the inner writer took whose flush is still pending.
    taken: usize,
}

impl<S> Flushed<S> {
    fn new(inner: S) -> Self {
        Flushed { inner, taken: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Flushed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Flushed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.taken == 0 {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            this.taken = n;
        }
        // The caller polls again with the same bytes until this reports them written.
        let flushed = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        let n = std::mem::take(&mut this.taken);
        Poll::Ready(flushed.map(|()| n.min(buf.len())))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn plain_split_round_trip() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let node = NodeAddr {
            host: "127.0.0.1".into(),
            port: addr.port(),
        };
        let (client, accepted) = tokio::join!(Stream::connect(&node, None), listener.accept());
        let client = client.unwrap();
        assert!(!client.is_tls());
        assert_eq!(client.tls_handshake_time(), Duration::ZERO);
        let mut server = Stream::Plain(accepted.unwrap().0);
        let (mut rd, mut wr) = client.into_split();
        wr.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        rd.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
