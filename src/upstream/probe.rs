//! Learns what the clusters behind the proxy are, without credentials.
//!
//! Clients change behaviour on the broker's `product` and `version` (kombu picks Celery's qos
//! `global` flag from them), so the proxy must advertise what its clusters run. A broker sends its
//! server properties in connection.start, before any login, so a probe only opens a socket, sends
//! the protocol header and reads one frame.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::NodeAddr;
use crate::codec::{self, FieldTable, FrameKind, Method};
use crate::io::Stream;
use crate::tls::ClientTls;

/// Reads the server properties of the first node that answers (over amqps when `tls` is set).
pub async fn server_properties(
    nodes: &[NodeAddr],
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Option<FieldTable> {
    for node in nodes {
        if let Ok(Ok(props)) = tokio::time::timeout(timeout, read_start(node, tls)).await {
            return Some(props);
        }
    }
    None
}

async fn read_start(node: &NodeAddr, tls: Option<&ClientTls>) -> std::io::Result<FieldTable> {
    let mut stream = Stream::connect(node, tls).await?;
    stream.write_all(codec::PROTOCOL_HEADER).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Ok(Some(frame)) = codec::decode_frame(&mut buf, 0)
            && frame.kind == FrameKind::Method
            && let Ok(Method::ConnectionStart(start)) = Method::decode(frame.payload)
        {
            return Ok(start.server_properties);
        }
        if buf.len() > 64 * 1024 || stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("no connection.start"));
        }
    }
}
