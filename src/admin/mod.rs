//! The HTTP admin endpoint (`[admin] listen`) and the client side of `warren check-queues`. It
//! reads the proxy's state (`crate::state`, the node probes of `crate::health`) and changes only
//! the running configuration (reload, drain, evacuate, weights); it never steers sessions.
//!
//! | Route | |
//! |---|---|
//! | `GET /` | self-contained HTML status page |
//! | `GET /health` | liveness |
//! | `GET /ready` | 200 when a shard cluster taking publishes and the control cluster are reachable |
//! | `GET /clusters` | version and uptime, clusters, node probe states, per-cluster counters, last reload |
//! | `GET /queues[?queue=GLOB]` | depths of the sharded queues, summed over the shard clusters |
//! | `GET /api/queues[/VHOST[/NAME]]` | the same depths in RabbitMQ's management API shape (Flower, KEDA) |
//! | `GET /metrics` | Prometheus exposition |
//! | `POST /reload` | re-read the configuration file |
//! | `GET /clients` | the open client connections |
//! | `POST /clients/ID/close` | close one client connection |
//! | `POST /clusters/NAME/drain` | stop publishing to a shard cluster |
//! | `POST /clusters/NAME/undrain` | undo a run-time drain |
//! | `POST /clusters/NAME/evacuate` | drain a shard cluster and move its messages away (`crate::evacuate` does the moving) |
//! | `POST /clusters/NAME/unevacuate` | stop a run-time evacuation |
//! | `POST /clusters/NAME/weight?weight=N` | set a shard cluster's weight at run time |
//!
//! See `docs/operations.md` for the JSON shapes and how to alert on them.

pub mod check;
mod http;
mod http_client;
mod management_api;
mod page;
pub mod queues;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::state::Shared;

pub use crate::health::{Health, NodeHealth, NodeState};

/// State the admin routes share.
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    pub health: Arc<Health>,
    /// Set when the proxy starts shutting down: `/ready` answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// The last `/queues` answer, reused for [`http::QUEUES_CACHE`] (and held while computing one,
    /// so concurrent requests do not each open links to every cluster).
    pub queues_cache: tokio::sync::Mutex<Option<http::CachedQueues>>,
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    state: Arc<AdminState>,
    stop: CancellationToken,
    connections: TaskTracker,
    acceptor: JoinHandle<()>,
}

/// Most simultaneous admin connections; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

impl AdminServer {
    /// Binds `listen` and starts serving the admin routes, showing `health`'s node probes.
    pub async fn start(
        listen: SocketAddr,
        shared: Arc<Shared>,
        health: Arc<Health>,
    ) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {listen} (admin): {e}"))
        })?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AdminState {
            shared: shared.clone(),
            health: health.clone(),
            shutting_down: AtomicBool::new(false),
            queues_cache: tokio::sync::Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let acceptor = tokio::spawn(http::accept_loop(
            listener,
            state.clone(),
            stop.clone(),
            connections.clone(),
            MAX_CONNECTIONS,
        ));
        info!(listen = %addr, "admin endpoint listening");
        Ok(AdminServer {
            addr,
            state,
            stop,
            connections,
            acceptor,
        })
    }

    /// The bound address (useful when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The probe state of the clusters' nodes.
    pub fn health(&self) -> &Arc<Health> {
        &self.state.health
    }

    /// From now on `/ready` answers 503 ("shutting down"), so load balancers stop sending new
    /// clients while the proxy drains the connected ones.
    pub fn set_shutting_down(&self) {
        self.state.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Stops accepting and lets requests in progress finish (1 s at most).
    pub async fn shutdown(mut self) {
        self.set_shutting_down();
        self.stop.cancel();
        let _ = (&mut self.acceptor).await;
        self.connections.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.connections.wait()).await;
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        // A handle dropped without shutdown (a test that panicked) must not leave tasks behind.
        self.stop.cancel();
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2024-05-01T12:00:00.250Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let ms = unix_ms(t);
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_714_564_800)),
            "2024-05-01T12:00:00.000Z"
        );
    }
}
