//! The listeners (plain `listen` and the optional amqps `[tls] listen`): accept client sockets,
//! spawn one session each, and shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::io::{Stream, Workers};
pub use crate::state::{ReloadStatus, Shared};

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
    prober: crate::health::Prober,
    evacuator: crate::evacuate::Evacuator,
    workers: Arc<Workers>,
    /// Ends the task that gives memory freed after bursts back to the OS.
    trimmer: CancellationToken,
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
        self.evacuator.stop().await;
        self.prober.stop().await;
        self.trimmer.cancel();
        self.workers.stop();
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
    let prober = crate::health::Prober::start(shared.clone());
    let evacuator = crate::evacuate::Evacuator::start(shared.clone());
    let admin = match config.admin.listen {
        Some(listen) => Some(
            crate::admin::AdminServer::start(listen, shared.clone(), prober.health().clone())
                .await?,
        ),
        None => None,
    };
    let workers = Arc::new(Workers::start(
        config.runtime.worker_threads,
        config.runtime.busy_poll(),
    )?);
    // The connections live as long as the runtime that started the proxy, as they did when
    // they were its tasks: its shutdown drops this task and the guard ends the threads.
    let guard = workers.stop_on_drop();
    tokio::spawn(async move {
        let _guard = guard;
        std::future::pending::<()>().await
    });
    if !config.runtime.busy_poll().is_zero() {
        info!(
            window_us = config.runtime.busy_poll().as_micros() as u64,
            workers = workers.len(),
            "busy polling on: connection threads spin after traffic instead of sleeping"
        );
    }
    let trimmer = CancellationToken::new();
    crate::memory::spawn_trimmer(trimmer.clone());
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
        (listener, tls_listener),
        shared.clone(),
        stop_accepting.clone(),
        force_close.clone(),
        sessions.clone(),
        slots,
        workers.clone(),
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
        prober,
        evacuator,
        workers,
        trimmer,
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
    (listener, tls_listener): (TcpListener, Option<TcpListener>),
    shared: Arc<Shared>,
    stop: CancellationToken,
    force_close: CancellationToken,
    sessions: TaskTracker,
    mut slots: ConnectionSlots,
    workers: Arc<Workers>,
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
            let mut map = per_ip.lock();
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
        // The socket moves to a connection thread's runtime: it leaves this one's poller here
        // and joins that one's there.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "accepted socket lost before it was served");
                release_ip(&per_ip, peer.ip());
                continue;
            }
        };
        workers.spawn(sessions.track_future(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    if let Some(stream) = open_stream(stream, tls, &shared, peer).await {
                        crate::client::serve(stream, peer, shared, force_close).await;
                    }
                }
                Err(e) => warn!(%peer, error = %e, "cannot serve an accepted socket"),
            }
            release_ip(&per_ip, peer.ip());
            drop(permit);
        }));
    }
}

fn release_ip(
    map: &Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    ip: std::net::IpAddr,
) {
    let mut map = map.lock();
    if let Some(n) = map.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&ip);
        }
    }
}
