//! The listener: accepts client sockets, spawns one session each, and shuts down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::codec::FieldTable;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::probe;

/// State shared by every connection of one proxy.
#[derive(Debug)]
pub struct Shared {
    config: ArcSwap<Config>,
    /// What the clusters said about themselves in connection.start (product, version...).
    server_properties: ArcSwapOption<FieldTable>,
    next_id: AtomicU64,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Self {
        Shared {
            config: ArcSwap::new(config),
            server_properties: ArcSwapOption::empty(),
            next_id: AtomicU64::new(1),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The clusters' server properties, probing a node the first time they are needed.
    pub async fn server_properties(&self, config: &Config) -> Option<FieldTable> {
        if let Some(p) = self.server_properties.load_full() {
            return Some((*p).clone());
        }
        let timeout = Duration::from_millis(config.timeouts.connect_ms);
        for cluster in config.shard_clusters().chain(config.control_cluster()) {
            if let Some(props) = probe::server_properties(&cluster.nodes, timeout).await {
                self.server_properties.store(Some(Arc::new(props.clone())));
                return Some(props);
            }
        }
        None
    }

    /// Refreshes the cached server properties from a link's handshake.
    pub fn learn_server_properties(&self, props: &FieldTable) {
        let current = self.server_properties.load();
        if current.as_deref() != Some(props) {
            self.server_properties.store(Some(Arc::new(props.clone())));
        }
    }
}

/// A running proxy.
pub struct ProxyHandle {
    amqp_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    sessions: TaskTracker,
    acceptor: JoinHandle<()>,
}

impl ProxyHandle {
    /// The address clients connect to (useful when the config asked for port 0).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, gives connected clients the configured grace period, then closes the
    /// remaining ones with 320 CONNECTION_FORCED and waits for their sessions to end.
    pub async fn shutdown(self) {
        let grace = Duration::from_millis(self.shared.config().timeouts.shutdown_grace_ms);
        self.stop_accepting.cancel();
        let _ = self.acceptor.await;
        self.sessions.close();
        if !self.sessions.is_empty() {
            info!(connections = self.sessions.len(), grace_ms = grace.as_millis() as u64, "waiting for clients before closing them");
            if tokio::time::timeout(grace, self.sessions.wait()).await.is_err() {
                info!(connections = self.sessions.len(), "closing remaining clients with 320 CONNECTION_FORCED");
                self.force_close.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), self.sessions.wait()).await;
            }
        }
        info!("proxy stopped");
    }
}

/// Binds the listeners and starts serving.
pub async fn start(config: Arc<Config>) -> std::io::Result<ProxyHandle> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen)))?;
    let amqp_addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(config.clone()));
    let stop_accepting = CancellationToken::new();
    let force_close = CancellationToken::new();
    let sessions = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.limits.max_connections));
    info!(listen = %amqp_addr, clusters = config.clusters.len(), "warren listening");
    let acceptor = tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        stop_accepting.clone(),
        force_close.clone(),
        sessions.clone(),
        limit,
    ));
    Ok(ProxyHandle { amqp_addr, shared, stop_accepting, force_close, sessions, acceptor })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    force_close: CancellationToken,
    sessions: TaskTracker,
    limit: Arc<Semaphore>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%peer, "connection refused: max_connections reached");
            shared.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let force_close = force_close.clone();
        sessions.spawn(async move {
            crate::client::serve(stream, peer, shared, force_close).await;
            drop(permit);
        });
    }
}
