//! The connected clients, as operators see them: who is connected (peer, user, vhost, the
//! client's name, product and version), what each connection holds (channels, links per
//! cluster, bytes, held publishes), and a way to close one.
//!
//! Each session registers itself once its connection is open and publishes what changes: byte
//! counters as it reads and writes, the rest on its one-second tick. The admin endpoint only
//! reads these entries and files close requests; the session acts on a request itself, so
//! nothing outside a session touches its state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use crate::codec::{FieldTable, FieldValue};

/// Every open client connection of this process.
#[derive(Debug, Default)]
pub struct Clients {
    entries: Mutex<BTreeMap<u64, Arc<Client>>>,
}

/// What a client said about itself in connection.start-ok, and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub peer: Option<SocketAddr>,
    pub user: String,
    pub vhost: String,
    /// `connection_name` from the client properties (pika, amqplib, Java and kombu set it when
    /// the application gives one).
    pub name: Option<String>,
    pub product: Option<String>,
    pub version: Option<String>,
    pub platform: Option<String>,
}

impl Identity {
    /// Reads name, product, version and platform from client properties.
    pub fn from_properties(props: &FieldTable) -> Self {
        let text = |key: &str| match props.get(key) {
            Some(FieldValue::LongStr(s)) => Some(s.as_str().into_owned()),
            _ => None,
        };
        Identity {
            name: text("connection_name"),
            product: text("product"),
            // py-amqp (Celery, kombu) says `product_version`.
            version: text("version").or_else(|| text("product_version")),
            platform: text("platform"),
            ..Identity::default()
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub struct Client {
    pub id: u64,
    pub identity: Identity,
    pub since: SystemTime,
    /// Bytes read from and written to the client's socket.
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    channels: AtomicU64,
    held_bytes: AtomicU64,
    /// "cluster@node" of each live link.
    links: Mutex<Vec<String>>,
    close: Mutex<Option<String>>,
    close_requested: CancellationToken,
}

/// A snapshot of what a session last published about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub channels: u64,
    pub held_bytes: u64,
    pub links: Vec<String>,
}

impl Client {
    /// Called by the session on its tick.
    pub fn publish_usage(&self, channels: usize, held_bytes: usize, links: Vec<String>) {
        self.channels.store(channels as u64, Ordering::Relaxed);
        self.held_bytes.store(held_bytes as u64, Ordering::Relaxed);
        *self.links.lock() = links;
    }

    pub fn usage(&self) -> Usage {
        Usage {
            channels: self.channels.load(Ordering::Relaxed),
            held_bytes: self.held_bytes.load(Ordering::Relaxed),
            links: self.links.lock().clone(),
        }
    }

    /// The token cancelled when an operator asks to close this connection (a session keeps one
    /// waiter on it for its whole life).
    pub fn close_token(&self) -> CancellationToken {
        self.close_requested.clone()
    }

    /// The reason given with the close request, once there is one.
    pub fn close_reason(&self) -> Option<String> {
        self.close.lock().clone()
    }
}

/// Removes its client from [`Clients`] when the session ends, however it ends.
#[derive(Debug)]
pub struct Registration {
    clients: Arc<Clients>,
    client: Arc<Client>,
}

impl Registration {
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.entries.lock().remove(&self.client.id);
    }
}

impl Clients {
    /// Adds connection `id`; it stays listed until the returned registration is dropped.
    pub fn register(self: &Arc<Self>, id: u64, identity: Identity) -> Registration {
        let client = Arc::new(Client {
            id,
            identity,
            since: SystemTime::now(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            channels: AtomicU64::new(0),
            held_bytes: AtomicU64::new(0),
            links: Mutex::new(Vec::new()),
            close: Mutex::new(None),
            close_requested: CancellationToken::new(),
        });
        self.entries.lock().insert(id, client.clone());
        Registration {
            clients: self.clone(),
            client,
        }
    }

    /// The connected clients, oldest first.
    pub fn list(&self) -> Vec<Arc<Client>> {
        self.entries.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks connection `id` to close with `reason`. False when no such connection is open. The
    /// first reason given stands.
    pub fn close(&self, id: u64, reason: &str) -> bool {
        let Some(client) = self.entries.lock().get(&id).cloned() else {
            return false;
        };
        client.close.lock().get_or_insert_with(|| reason.to_owned());
        client.close_requested.cancel();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{LongStr, ShortStr};

    #[test]
    fn a_client_is_listed_until_its_registration_drops() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(1, Identity::default());
        let b = clients.register(2, Identity::default());
        assert_eq!(
            clients.list().iter().map(|c| c.id).collect::<Vec<_>>(),
            [1, 2]
        );
        drop(a);
        assert_eq!(clients.list().iter().map(|c| c.id).collect::<Vec<_>>(), [2]);
        drop(b);
        assert!(clients.is_empty());
    }

    #[test]
    fn close_reaches_the_client_with_the_first_reason() {
        let clients = Arc::new(Clients::default());
        let reg = clients.register(7, Identity::default());
        assert!(!clients.close(8, "nobody"));
        assert_eq!(reg.client().close_reason(), None);
        assert!(clients.close(7, "moving to shard-c"));
        assert!(clients.close(7, "second reason"));
        assert_eq!(
            reg.client().close_reason().as_deref(),
            Some("moving to shard-c")
        );
        // Already requested: the future resolves at once.
        let fut = reg.client().close_token().cancelled_owned();
        futures_lite_ready(fut);
    }

    fn futures_lite_ready(fut: tokio_util::sync::WaitForCancellationFutureOwned) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(1), fut).await })
            .expect("close request seen");
    }

    #[test]
    fn identity_comes_from_client_properties() {
        let mut props = FieldTable::default();
        props.insert(
            ShortStr::from_static("connection_name"),
            FieldValue::LongStr(LongStr::from(bytes::Bytes::from_static(b"worker-1"))),
        );
        props.insert(
            ShortStr::from_static("product"),
            FieldValue::LongStr(LongStr::from(bytes::Bytes::from_static(b"py-amqp"))),
        );
        let id = Identity::from_properties(&props);
        assert_eq!(id.name.as_deref(), Some("worker-1"));
        assert_eq!(id.product.as_deref(), Some("py-amqp"));
        assert_eq!(id.version, None);
    }

    #[test]
    fn usage_is_what_the_session_published_last() {
        let clients = Arc::new(Clients::default());
        let reg = clients.register(3, Identity::default());
        reg.client()
            .publish_usage(2, 100, vec!["shard-a@127.0.0.1:5701".into()]);
        let u = reg.client().usage();
        assert_eq!((u.channels, u.held_bytes, u.links.len()), (2, 100, 1));
    }
}
