//! Links from the proxy to RabbitMQ clusters.
//!
//! A [`Link`] is one AMQP connection, opened on behalf of one client connection with that client's
//! credentials and vhost, so RabbitMQ's own authorisation, per-connection exclusive queues and
//! "requeue on disconnect" keep their meaning. The link is a dumb, bounded pipe: the client session
//! owns all protocol state and decides what is written; the link owns the socket, the handshake, the
//! heartbeats of its leg and the choice of node.

pub mod link;
pub mod own;
pub mod probe;
pub mod reader;

pub use link::{ConnectError, Link, LinkDown, LinkId, LinkReader, LinkSpec};
