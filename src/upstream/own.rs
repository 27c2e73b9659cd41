//! warren's own connections to a cluster (not a client's link): the admin endpoint's queue
//! depth checks and the evacuator. Both log in with the cluster's `probe` credentials and
//! name themselves to the broker, so an operator can tell them apart in RabbitMQ's
//! connection list.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::codec::{FieldTable, FieldValue, LongStr, ShortStr};
use crate::config::ClusterConfig;
use crate::upstream::LinkSpec;

/// What differs between warren's own connections.
pub struct OwnLink {
    /// The `product` client property, e.g. "warren admin".
    pub product: &'static str,
    /// The `connection_name` client property.
    pub connection_name: String,
    /// Capabilities announced as true (authentication_failure_close is always among them).
    pub capabilities: &'static [&'static str],
    pub heartbeat_secs: u16,
    pub buffer_limit: usize,
    pub connect_timeout: Duration,
}

/// The spec of a connection of warren's own to `cluster`'s `vhost`, with the cluster's
/// `probe` credentials (guest/guest without them).
pub fn own_link_spec(
    cluster: &ClusterConfig,
    vhost: &str,
    own: OwnLink,
) -> Result<LinkSpec, String> {
    let (user, password) = match &cluster.probe {
        Some(p) => (p.user.clone(), p.password.clone()),
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let vhost =
        ShortStr::try_from(vhost).map_err(|_| "vhost name longer than 255 bytes".to_owned())?;
    let mut props = FieldTable::default();
    props.insert(
        ShortStr::from_static("product"),
        FieldValue::LongStr(LongStr::from_static(own.product)),
    );
    props.insert(
        ShortStr::from_static("connection_name"),
        FieldValue::LongStr(LongStr::from(own.connection_name)),
    );
    let mut caps = FieldTable::default();
    caps.insert(
        ShortStr::from_static("authentication_failure_close"),
        FieldValue::Bool(true),
    );
    for &cap in own.capabilities {
        caps.insert(ShortStr::from_static(cap), FieldValue::Bool(true));
    }
    props.insert(
        ShortStr::from_static("capabilities"),
        FieldValue::Table(caps),
    );
    Ok(LinkSpec {
        cluster: Arc::from(cluster.name.as_str()),
        nodes: cluster.nodes.clone(),
        user: Bytes::from(user),
        password: Bytes::from(password),
        fallback_password: None,
        vhost,
        client_properties: props,
        heartbeat_secs: own.heartbeat_secs,
        frame_max: 131_072,
        channel_max: 64,
        connect_timeout: own.connect_timeout,
        buffer_limit: own.buffer_limit,
        metrics: None,
        tls: cluster.tls.clone(),
    })
}
