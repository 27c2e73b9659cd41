//! Learns what the clusters behind the proxy are, without credentials.
//!
//! Clients change behaviour on the broker's `product` and `version` (kombu picks Celery's qos
//! `global` flag from them), so the proxy must advertise what its clusters run. A broker sends its
//! server properties in connection.start, before any login, so a probe only opens a socket, sends
//! the protocol header and reads one frame.

use std::time::Duration;

use crate::addr::NodeAddr;
use crate::codec::FieldTable;
use crate::tls::ClientTls;

/// Reads the server properties of the first node that answers (over amqps when `tls` is set).
pub async fn server_properties(
    nodes: &[NodeAddr],
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> Option<FieldTable> {
    for node in nodes {
        if let Ok(Ok(props)) =
            tokio::time::timeout(timeout, super::reader::read_start(node, tls)).await
        {
            return Some(props);
        }
    }
    None
}
