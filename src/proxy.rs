//! The listeners (plain `listen` and the optional amqps `[tls] listen`): accept client sockets,
//! spawn one session each, and shut down gracefully.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::codec::FieldTable;
use crate::config::Config;
use crate::io::Stream;
use crate::metrics::Metrics;
use crate::upstream::probe;

/// The outcome of the last configuration reload, for the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    pub at: SystemTime,
    pub ok: bool,
    /// What changed, or why the new file was rejected (file:line:col: reason).
    pub message: String,
    /// Number of configurations applied so far (1 = the one the proxy started with).
    pub generation: u64,
}

/// State shared by every connection of one proxy.
#[derive(Debug)]
pub struct Shared {
    config: ArcSwap<Config>,
    /// Sessions watch this to apply a reloaded configuration to their links.
    config_tx: watch::Sender<Arc<Config>>,
    config_path: Mutex<Option<PathBuf>>,
    last_reload: Mutex<Option<ReloadStatus>>,
    generation: AtomicU64,
    /// Clusters drained at run time (`POST /clusters/NAME/drain`), kept across reloads.
    drained: Mutex<HashSet<String>>,
    /// (vhost, queue) of the sharded queues clients declared, for the admin's queue depths.
    queues: Mutex<BTreeSet<(String, String)>>,
    /// Per vhost, the sharded topology clients declared, replayed on clusters added later.
    topology: Mutex<std::collections::HashMap<String, crate::client::topology::Topology>>,
    /// (vhost, cluster) pairs that missed a shared topology change: some client declared while
    /// that cluster was unreachable. The next link any session opens there replays the shared
    /// topology, so a queue declared by a client gone since still exists there before a
    /// publish is routed to it.
    stale: Mutex<std::collections::HashSet<(String, String)>>,
    /// What the clusters said about themselves in connection.start (product, version...).
    server_properties: ArcSwapOption<FieldTable>,
    /// Per cluster, how many times the admin health probes saw one of its nodes come back.
    /// Sessions waiting to reconnect to the cluster retry at once when it changes, instead of
    /// waiting out their backoff.
    nodes_back: Mutex<std::collections::HashMap<String, u64>>,
    next_id: AtomicU64,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(config: Arc<Config>) -> Self {
        let (config_tx, _) = watch::channel(config.clone());
        Shared {
            config_tx,
            config_path: Mutex::new(None),
            last_reload: Mutex::new(None),
            generation: AtomicU64::new(1),
            drained: Mutex::new(HashSet::new()),
            queues: Mutex::new(BTreeSet::new()),
            topology: Mutex::default(),
            stale: Mutex::default(),
            config: ArcSwap::new(config),
            server_properties: ArcSwapOption::empty(),
            nodes_back: Mutex::default(),
            next_id: AtomicU64::new(1),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// A health probe saw a node of `cluster` come back.
    pub fn node_came_up(&self, cluster: &str) {
        let mut back = self.nodes_back.lock().unwrap_or_else(|e| e.into_inner());
        *back.entry(cluster.to_owned()).or_default() += 1;
    }

    /// How many times a node of `cluster` was seen coming back (see [`Shared::node_came_up`]).
    pub fn nodes_back(&self, cluster: &str) -> u64 {
        let back = self.nodes_back.lock().unwrap_or_else(|e| e.into_inner());
        back.get(cluster).copied().unwrap_or(0)
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Sessions subscribe to configuration changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.config_tx.subscribe()
    }

    /// The file `reload` reads (set by the binary; tests may leave it unset).
    pub fn set_config_path(&self, path: &Path) {
        *lock(&self.config_path) = Some(path.to_path_buf());
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        lock(&self.config_path).clone()
    }

    pub fn last_reload(&self) -> Option<ReloadStatus> {
        lock(&self.last_reload).clone()
    }

    /// Re-reads the configuration file. An invalid file changes nothing; either way the outcome
    /// is logged, counted in the metrics and kept for the admin endpoint.
    pub fn reload(&self) -> Result<ReloadStatus, ReloadStatus> {
        let Some(path) = self.config_path() else {
            return Err(self.record(false, "no configuration file to reload from".into()));
        };
        match Config::load(&path) {
            Ok(config) => Ok(self.apply(config)),
            Err(e) => {
                warn!(error = %e, "configuration reload rejected; keeping the running configuration");
                Err(self.record(false, e.to_string()))
            }
        }
    }

    /// Applies a validated configuration (runtime drains stay in force).
    pub fn apply(&self, mut config: Config) -> ReloadStatus {
        let old = self.config();
        if config.listen != old.listen {
            warn!(old = %old.listen, new = %config.listen, "listen address changes need a restart; keeping the old one");
            config.listen = old.listen;
        }
        if config.admin.listen != old.admin.listen {
            warn!("admin listen address changes need a restart; keeping the old one");
            config.admin.listen = old.admin.listen;
        }
        if config.runtime != old.runtime {
            warn!("[runtime] changes need a restart; keeping the running values");
            config.runtime = old.runtime.clone();
        }
        // New certificates apply to the next TLS handshake; the listener itself stays as started.
        match (&old.tls, &mut config.tls) {
            (Some(old_tls), Some(new_tls)) if new_tls.listen != old_tls.listen => {
                warn!(old = %old_tls.listen, new = %new_tls.listen,
                    "tls.listen changes need a restart; keeping the old address");
                new_tls.listen = old_tls.listen;
            }
            (None, Some(new_tls)) => {
                warn!(listen = %new_tls.listen, "a new [tls] section needs a restart; not listening for amqps");
                config.tls = None;
            }
            (Some(old_tls), None) => {
                warn!(listen = %old_tls.listen,
                    "removing [tls] needs a restart; the amqps listener keeps its certificates");
                config.tls = old.tls.clone();
            }
            _ => {}
        }
        let drained = lock(&self.drained).clone();
        for c in &mut config.clusters {
            c.drain |= drained.contains(&c.name);
        }
        let old_control = old.control_cluster().map(|c| c.name.clone());
        let new_control = config.control_cluster().map(|c| c.name.clone());
        if old_control != new_control {
            warn!(old = ?old_control, new = ?new_control,
                "the control cluster changed: connected clients keep their control link until they reconnect; \
                 new connections use the new control cluster");
        }
        let message = describe_change(&old, &config);
        if config == *old {
            return self.record(true, "no change".into());
        }
        let config = Arc::new(config);
        self.config.store(config.clone());
        self.config_tx.send_replace(config);
        self.generation.fetch_add(1, Ordering::Relaxed);
        info!(change = %message, "configuration reloaded");
        self.record(true, message)
    }

    /// Drains a shard cluster at run time: no new publishes go there.
    pub fn drain(&self, cluster: &str) -> Result<ReloadStatus, String> {
        let mut config = (*self.config()).clone();
        let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) else {
            return Err(format!("no cluster named {cluster:?}"));
        };
        if c.role != crate::config::Role::Shard {
            return Err(format!("{cluster:?} is not a shard cluster"));
        }
        c.drain = true;
        if config.shard_clusters().all(|c| c.drain) {
            return Err("refusing to drain the last shard cluster that takes publishes".into());
        }
        lock(&self.drained).insert(cluster.to_owned());
        Ok(self.apply(config))
    }

    /// Undoes a run-time drain ([`Shared::drain`]): the cluster takes publishes again, unless
    /// the file itself marks it `drain = true` (the file is read again when there is one).
    pub fn undrain(&self, cluster: &str) -> Result<ReloadStatus, String> {
        if !lock(&self.drained).remove(cluster) {
            return Err(format!(
                "{cluster:?} was not drained at run time (POST /clusters/NAME/drain); \
                 a drain set in the file is undone by editing the file"
            ));
        }
        if self.config_path().is_some() {
            return self.reload().map_err(|s| s.message);
        }
        let mut config = (*self.config()).clone();
        if let Some(c) = config.clusters.iter_mut().find(|c| c.name == cluster) {
            c.drain = false;
        }
        Ok(self.apply(config))
    }

    fn record(&self, ok: bool, message: String) -> ReloadStatus {
        self.metrics.reloaded(ok);
        let status = ReloadStatus {
            at: SystemTime::now(),
            ok,
            message,
            generation: self.generation.load(Ordering::Relaxed),
        };
        *lock(&self.last_reload) = Some(status.clone());
        status
    }

    /// Remembers a sharded queue a client declared (for the admin's queue depths).
    pub fn note_queue(&self, vhost: &str, queue: &str) {
        let mut q = lock(&self.queues);
        if q.len() < 100_000 {
            q.insert((vhost.to_owned(), queue.to_owned()));
        }
    }

    /// Records a sharded topology change (see [`crate::client::topology`]).
    pub fn record_topology(&self, vhost: &str, method: crate::codec::Method) {
        lock(&self.topology)
            .entry(vhost.to_owned())
            .or_default()
            .record(crate::route::Class::Sharded, method);
    }

    /// The shared sharded topology of a vhost.
    pub fn topology_of(&self, vhost: &str) -> crate::client::topology::Topology {
        lock(&self.topology).get(vhost).cloned().unwrap_or_default()
    }

    /// Notes that `cluster` missed a shared topology change of `vhost` (see `stale`).
    pub fn mark_stale(&self, vhost: &str, cluster: &str) {
        let mut stale = lock(&self.stale);
        if stale.len() < 10_000 {
            stale.insert((vhost.to_owned(), cluster.to_owned()));
        }
    }

    /// Whether `cluster` missed a shared topology change of `vhost`.
    pub fn is_stale(&self, vhost: &str, cluster: &str) -> bool {
        lock(&self.stale).contains(&(vhost.to_owned(), cluster.to_owned()))
    }

    /// Clears the flag: the caller is replaying the shared topology there.
    pub fn take_stale(&self, vhost: &str, cluster: &str) -> bool {
        lock(&self.stale).remove(&(vhost.to_owned(), cluster.to_owned()))
    }

    pub fn forget_queue(&self, vhost: &str, queue: &str) {
        lock(&self.queues).remove(&(vhost.to_owned(), queue.to_owned()));
    }

    /// The sharded queues clients declared, as (vhost, name).
    pub fn known_queues(&self) -> Vec<(String, String)> {
        lock(&self.queues).iter().cloned().collect()
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
            if let Some(props) =
                probe::server_properties(&cluster.nodes, cluster.tls.as_ref(), timeout).await
            {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One line saying what a reload changes.
fn describe_change(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    for c in &new.clusters {
        match old.cluster(&c.name) {
            None => parts.push(format!("added {} ({})", c.name, c.role.as_str())),
            Some(o) if o != c => parts.push(format!("changed {}", c.name)),
            Some(_) => {}
        }
    }
    for c in &old.clusters {
        if new.cluster(&c.name).is_none() {
            parts.push(format!("removed {}", c.name));
        }
    }
    if old.timeouts != new.timeouts || old.limits != new.limits || old.routing != new.routing {
        parts.push("changed settings".into());
    }
    if old.tls != new.tls {
        parts.push("changed tls".into());
    }
    if parts.is_empty() {
        "no change".into()
    } else {
        parts.join(", ")
    }
}

/// A running proxy.
pub struct ProxyHandle {
    amqp_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    sessions: TaskTracker,
    acceptor: JoinHandle<()>,
    admin: Option<crate::admin::AdminServer>,
}

impl ProxyHandle {
    /// The address clients connect to (useful when the config asked for port 0).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
    }

    /// The address of the amqps listener, when `[tls]` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The admin endpoint's address, when `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// Stops accepting, gives connected clients the configured grace period, then closes the
    /// remaining ones with 320 CONNECTION_FORCED and waits for their sessions to end.
    pub async fn shutdown(self) {
        let grace = Duration::from_millis(self.shared.config().timeouts.shutdown_grace_ms);
        if let Some(admin) = &self.admin {
            admin.set_shutting_down();
        }
        self.stop_accepting.cancel();
        let _ = self.acceptor.await;
        self.sessions.close();
        if !self.sessions.is_empty() {
            info!(
                connections = self.sessions.len(),
                grace_ms = grace.as_millis() as u64,
                "waiting for clients before closing them"
            );
            if tokio::time::timeout(grace, self.sessions.wait())
                .await
                .is_err()
            {
                info!(
                    connections = self.sessions.len(),
                    "closing remaining clients with 320 CONNECTION_FORCED"
                );
                self.force_close.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), self.sessions.wait()).await;
            }
        }
        if let Some(admin) = self.admin {
            admin.shutdown().await;
        }
        info!("proxy stopped");
    }
}

/// Binds the listeners and starts serving.
pub async fn start(config: Arc<Config>) -> std::io::Result<ProxyHandle> {
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
    })?;
    let amqp_addr = listener.local_addr()?;
    let tls_listener = match &config.tls {
        None => None,
        Some(tls) => Some(TcpListener::bind(tls.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} (tls.listen): {e}", tls.listen),
            )
        })?),
    };
    let tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let shared = Arc::new(Shared::new(config.clone()));
    let admin = match config.admin.listen {
        Some(listen) => Some(crate::admin::AdminServer::start(listen, shared.clone()).await?),
        None => None,
    };
    let stop_accepting = CancellationToken::new();
    let force_close = CancellationToken::new();
    let sessions = TaskTracker::new();
    let slots = ConnectionSlots::new(config.limits.max_connections);
    match tls_addr {
        Some(tls) => {
            info!(listen = %amqp_addr, tls_listen = %tls, clusters = config.clusters.len(), "warren listening")
        }
        None => info!(listen = %amqp_addr, clusters = config.clusters.len(), "warren listening"),
    }
    let acceptor = tokio::spawn(accept_loop(
        listener,
        tls_listener,
        shared.clone(),
        stop_accepting.clone(),
        force_close.clone(),
        sessions.clone(),
        slots,
    ));
    Ok(ProxyHandle {
        amqp_addr,
        tls_addr,
        shared,
        stop_accepting,
        force_close,
        sessions,
        acceptor,
        admin,
    })
}

/// Accepts on one listener, or waits forever when there is none.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Turns an accepted socket into a [`Stream`]: TLS sockets go through the TLS handshake first,
/// bounded by the handshake timeout, with the certificates of the running configuration.
async fn open_stream(
    tcp: TcpStream,
    tls: bool,
    shared: &Shared,
    peer: SocketAddr,
) -> Option<Stream> {
    if !tls {
        return Some(Stream::Plain(tcp));
    }
    let config = shared.config();
    let Some(server_tls) = &config.tls else {
        return None;
    };
    let _ = tcp.set_nodelay(true);
    match Stream::accept(tcp, server_tls, config.timeouts.handshake()).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            info!(%peer, error = %e, "amqps connection refused");
            shared.metrics.connections_refused.inc();
            None
        }
    }
}

/// One slot per client connection, `limits.max_connections` of them; a reload changes the count
/// for the next accepted connection.
struct ConnectionSlots {
    slots: Arc<Semaphore>,
    /// The limit the slots enforce.
    max: usize,
    /// Slots still to take away after a reload lowered the limit while they were in use: taken
    /// as connections close, so the open ones are never cut.
    debt: usize,
}

impl ConnectionSlots {
    fn new(max: usize) -> Self {
        ConnectionSlots {
            slots: Arc::new(Semaphore::new(max)),
            max,
            debt: 0,
        }
    }

    /// Makes the slots enforce `want`.
    fn follow(&mut self, want: usize) {
        if want > self.max {
            let more = want - self.max;
            let repaid = self.debt.min(more);
            self.debt -= repaid;
            self.slots.add_permits(more - repaid);
        } else {
            self.debt += self.max - want;
        }
        self.max = want;
        if self.debt > 0 {
            self.debt -= self.slots.forget_permits(self.debt);
        }
    }

    /// A slot for a new connection, held until the connection ends; `None` at the limit.
    fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls_listener: Option<TcpListener>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    force_close: CancellationToken,
    sessions: TaskTracker,
    mut slots: ConnectionSlots,
) {
    // Refusals still answer in AMQP (530 at connection.open, as RabbitMQ does for its own
    // connection limits), but only this many at once; beyond that the socket is just closed.
    let refusals = Arc::new(Semaphore::new(64));
    let per_ip: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    loop {
        let (accepted, tls) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => (r, false),
            r = accept_on(tls_listener.as_ref()) => (r, true),
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, tls, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = shared.config();
        slots.follow(config.limits.max_connections);
        let per_ip_max = config.limits.max_connections_per_ip;
        let ip_ok = {
            let mut map = lock(&per_ip);
            let n = map.entry(peer.ip()).or_insert(0);
            if per_ip_max == 0 || *n < per_ip_max {
                *n += 1;
                true
            } else {
                false
            }
        };
        let permit = if ip_ok { slots.take() } else { None };
        let Some(permit) = permit else {
            if ip_ok {
                // Counted above, refused on the total: give the slot back.
                release_ip(&per_ip, peer.ip());
            }
            let reason = if ip_ok {
                format!("connection limit ({}) reached", slots.max)
            } else {
                format!(
                    "connection limit per client address ({per_ip_max}) reached for {}",
                    peer.ip()
                )
            };
            warn!(%peer, %reason, "connection refused");
            shared.metrics.connections_refused.inc();
            if let Ok(p) = refusals.clone().try_acquire_owned() {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Some(stream) = open_stream(stream, tls, &shared, peer).await {
                        crate::client::session::refuse_at_open(
                            stream,
                            &shared,
                            crate::codec::ReplyCode::NotAllowed,
                            &reason,
                        )
                        .await;
                    }
                    drop(p);
                });
            }
            continue;
        };
        let shared = shared.clone();
        let force_close = force_close.clone();
        let per_ip = per_ip.clone();
        sessions.spawn(async move {
            if let Some(stream) = open_stream(stream, tls, &shared, peer).await {
                crate::client::serve(stream, peer, shared, force_close).await;
            }
            release_ip(&per_ip, peer.ip());
            drop(permit);
        });
    }
}

fn release_ip(
    map: &Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
) {
    let mut map = lock(map);
    if let Some(n) = map.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&ip);
        }
    }
}
