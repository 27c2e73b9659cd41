//! Reading a broker's connection-level methods before a link runs: the handshake of a link, the
//! capability probe and the admin's health probes all read "the next method on channel 0" from
//! a freshly connected node, and must fail the same way on the same inputs (not AMQP 0-9-1, a
//! content frame, a closed socket, more than a handshake's worth of bytes).

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::NodeAddr;
use crate::codec::{self, FieldTable, FrameKind, Method};
use crate::io::stream::Stream;
use crate::tls::ClientTls;

/// Bytes a handshake method may take before the node is judged broken: connection.start with
/// its server properties is a few KiB; a node streaming garbage must not grow the buffer.
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// Why no method could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed during the handshake")]
    Closed,
    #[error("the server does not speak AMQP 0-9-1")]
    NotAmqp091,
    #[error("not an AMQP server: {0}")]
    Malformed(codec::CodecError),
    #[error("content frame during the handshake")]
    ContentFrame,
    #[error("handshake method larger than {MAX_HANDSHAKE_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads channel-0 methods from a node, keeping what follows them (the bytes after open-ok
/// belong to the running link).
#[derive(Debug)]
pub struct MethodReader {
    buf: BytesMut,
}

impl Default for MethodReader {
    fn default() -> Self {
        MethodReader {
            buf: BytesMut::with_capacity(4096),
        }
    }
}

impl MethodReader {
    /// The next method, skipping heartbeats.
    pub async fn next(&mut self, stream: &mut Stream) -> Result<Method, ReadError> {
        loop {
            match codec::decode_frame(&mut self.buf, 0) {
                Ok(Some(frame)) => match frame.kind {
                    FrameKind::Heartbeat => continue,
                    FrameKind::Method => {
                        return Method::decode(frame.payload).map_err(ReadError::Malformed);
                    }
                    _ => return Err(ReadError::ContentFrame),
                },
                Ok(None) => {}
                // A server that answers the header with its own protocol header speaks
                // another AMQP version.
                Err(_) if self.buf.starts_with(b"AMQP") => return Err(ReadError::NotAmqp091),
                Err(e) => return Err(ReadError::Malformed(e)),
            }
            if self.buf.len() > MAX_HANDSHAKE_BYTES {
                return Err(ReadError::TooLarge);
            }
            self.buf.reserve(4096);
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// What was read beyond the last method.
    pub fn into_leftover(self) -> BytesMut {
        self.buf
    }
}

/// Connects to `node` (amqps when `tls` is set), sends the protocol header and returns the
/// server properties of its connection.start: what a node says about itself without
/// credentials.
pub async fn read_start(node: &NodeAddr, tls: Option<&ClientTls>) -> Result<FieldTable, String> {
    let mut stream = Stream::connect(node, tls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(codec::PROTOCOL_HEADER)
        .await
        .map_err(|e| format!("write: {e}"))?;
    match MethodReader::default().next(&mut stream).await {
        Ok(Method::ConnectionStart(start)) => Ok(start.server_properties),
        Ok(other) => Err(format!("expected connection.start, got {}", other.name())),
        Err(ReadError::Closed) => Err("connection closed before connection.start".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A node that answers the protocol header with `reply` and then closes.
    async fn node(reply: Vec<u8>) -> NodeAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut header = [0u8; 8];
            let _ = s.read_exact(&mut header).await;
            let _ = s.write_all(&reply).await;
        });
        addr.to_string().parse().unwrap()
    }

    fn start_frame() -> Vec<u8> {
        let mut out = BytesMut::new();
        // A heartbeat first: skipped.
        out.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        codec::write_method(
            &mut out,
            0,
            &Method::ConnectionStart(codec::ConnectionStart {
                version_major: 0,
                version_minor: 9,
                ..Default::default()
            }),
        );
        out.to_vec()
    }

    #[tokio::test]
    async fn reads_connection_start_after_a_heartbeat() {
        let n = node(start_frame()).await;
        assert!(read_start(&n, None).await.is_ok());
    }

    #[tokio::test]
    async fn another_protocol_header_is_not_amqp_0_9_1() {
        let n = node(b"AMQP\x01\x01\x00\x0a".to_vec()).await;
        let e = read_start(&n, None).await.unwrap_err();
        assert!(e.contains("does not speak AMQP 0-9-1"), "{e}");
    }

    #[tokio::test]
    async fn a_closed_socket_and_garbage_are_errors_not_hangs() {
        let n = node(Vec::new()).await;
        let e = read_start(&n, None).await.unwrap_err();
        assert!(e.contains("closed before connection.start"), "{e}");
        let n = node(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        let e = read_start(&n, None).await.unwrap_err();
        assert!(e.contains("not an AMQP server"), "{e}");
    }
}
