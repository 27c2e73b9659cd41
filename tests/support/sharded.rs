//! A proxy in front of all three test clusters (shard-a and shard-b as shards, control as the
//! control cluster, the default Celery preset), as `tests/sharding.rs` starts it, for tests that
//! compare it with RabbitMQ alone; and a guard that deletes a test's queues and exchanges on every
//! cluster.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{ExchangeDeleteArguments, QueueDeleteArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use warren::ProxyHandle;
use warren::config::Config;

use super::{Cluster, clusters, init_tracing, within};

/// The clusters behind the sharded proxy, with their roles.
pub const SHARDED_CLUSTERS: [(&str, &str); 3] = [
    ("shard-a", "shard"),
    ("shard-b", "shard"),
    ("control", "control"),
];

/// The cluster called `name`, failing with a message saying how to provide the three clusters.
pub fn sharded_cluster(name: &str) -> &'static Cluster {
    clusters()
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| {
            panic!(
                "these tests need three RabbitMQ clusters (shard-a, shard-b, control); \
                 WARREN_TEST_CLUSTERS lacks {name:?}. Run them through scripts/test.sh, or \
                 export WARREN_TEST_CLUSTERS=\"shard-a=H:P,H:P;shard-b=H:P,H:P;control=H:P,H:P\""
            )
        })
}

/// A proxy on a runtime of its own (two threads), as it would run in its own process.
pub struct ShardedProxy {
    handle: Option<ProxyHandle>,
    /// The clusters it was started with, for [`ShardedProxy::reload_with`].
    clusters: Vec<Cluster>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ShardedProxy {
    /// Starts a proxy on 127.0.0.1:0 in front of shard-a, shard-b (shards) and control.
    pub async fn start() -> ShardedProxy {
        let clusters: Vec<Cluster> = SHARDED_CLUSTERS
            .iter()
            .map(|(name, _)| sharded_cluster(name).clone())
            .collect();
        ShardedProxy::start_on(&clusters, "").await
    }

    /// Starts a proxy on 127.0.0.1:0 in front of `clusters` (the one named `control` as the
    /// control cluster, the others as shards; the default Celery routing rules), with
    /// `timeouts` added to its `[timeouts]` section (lines of `key = value`).
    pub async fn start_on(clusters: &[Cluster], timeouts: &str) -> ShardedProxy {
        init_tracing();
        let config = config_of(clusters, timeouts);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sharded-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let started = runtime.spawn(warren::start(Arc::new(config)));
        let mut proxy = ShardedProxy {
            handle: None,
            clusters: clusters.to_vec(),
            runtime: Some(runtime),
        };
        let handle = within("the proxy to start", started)
            .await
            .expect("proxy start task")
            .expect("start the proxy");
        proxy.handle = Some(handle);
        proxy
    }

    /// Applies a new configuration as a reload does: the same clusters, `timeouts` in place of
    /// the extra text given at start (rules included). Panics if the reload is refused.
    pub fn reload_with(&self, timeouts: &str) -> warren::state::ReloadStatus {
        self.reload_on(&self.clusters, timeouts)
    }

    /// Applies a new configuration as a reload does, with `clusters` (some removed, say) and
    /// `timeouts`. Panics if the reload is refused.
    pub fn reload_on(&self, clusters: &[Cluster], timeouts: &str) -> warren::state::ReloadStatus {
        let config = config_of(clusters, timeouts);
        let status = self
            .handle
            .as_ref()
            .expect("proxy running")
            .shared()
            .apply(config);
        assert!(status.ok, "reload refused: {}", status.message);
        status
    }

    /// The proxy's counters, for tests that check what it republished or dropped.
    pub fn metrics(&self) -> &warren::metrics::Metrics {
        &self
            .handle
            .as_ref()
            .expect("proxy running")
            .shared()
            .metrics
    }

    pub fn amqp_addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("proxy running").amqp_addr()
    }

    /// The admin endpoint's address, when the configuration has an `[admin]` listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().expect("proxy running").admin_addr()
    }

    pub async fn shutdown(mut self) {
        let handle = self.handle.take().expect("proxy running");
        let done = self
            .runtime
            .as_ref()
            .expect("proxy runtime")
            .spawn(handle.shutdown());
        within("proxy shutdown", done)
            .await
            .expect("proxy shutdown task");
    }
}

/// The test proxy's configuration: `clusters` (the one named `control` as the control cluster,
/// the others shards) and `timeouts` appended to its `[timeouts]` section.
fn config_of(clusters: &[Cluster], timeouts: &str) -> Config {
    let mut text =
        format!("listen = \"127.0.0.1:0\"\n\n[timeouts]\nshutdown_grace_ms = 100\n{timeouts}");
    for c in clusters {
        let role = if c.name == "control" {
            "control"
        } else {
            "shard"
        };
        let nodes = c
            .nodes
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        text.push_str(&format!(
            "\n[[clusters]]\nname = \"{}\"\nrole = \"{role}\"\nnodes = [{nodes}]\n",
            c.name
        ));
    }
    Config::parse(&text, "sharded-test.toml")
        .unwrap_or_else(|e| panic!("test proxy config rejected: {e}"))
}

impl Drop for ShardedProxy {
    fn drop(&mut self) {
        self.handle = None;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Deletes the listed queues and exchanges on the first node of every cluster (those of
/// [`SHARDED_CLUSTERS`] that are configured) when dropped, pass or fail; best effort, bounded.
#[derive(Default)]
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// A guard for one queue of a unique name (returned with it), to which more may be added.
    pub fn with_queue(prefix: &str) -> (Cleanup, String) {
        let mut cleanup = Cleanup::default();
        let queue = cleanup.queue(&super::unique(prefix));
        (cleanup, queue)
    }

    /// Adds a queue; returns its name.
    pub fn queue(&mut self, name: &str) -> String {
        self.queues.push(name.to_owned());
        name.to_owned()
    }

    /// Adds an exchange; returns its name.
    pub fn exchange(&mut self, name: &str) -> String {
        self.exchanges.push(name.to_owned());
        name.to_owned()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let addrs: Vec<SocketAddr> = SHARDED_CLUSTERS
            .iter()
            .filter_map(|(name, _)| clusters().iter().find(|c| c.name == *name))
            .map(Cluster::first_node)
            .collect();
        const LIMIT: Duration = Duration::from_secs(30);
        // Drop cannot await: a thread with a runtime of its own does the work.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let op = Duration::from_secs(5);
            let work = async move {
                for addr in addrs {
                    let args = OpenConnectionArguments::new(
                        &addr.ip().to_string(),
                        addr.port(),
                        "guest",
                        "guest",
                    );
                    let Ok(Ok(conn)) = tokio::time::timeout(op, Connection::open(&args)).await
                    else {
                        continue;
                    };
                    // A fresh channel per deletion: a failure closes the channel.
                    for q in &queues {
                        if let Ok(Ok(ch)) = tokio::time::timeout(op, conn.open_channel(None)).await
                        {
                            let delete = ch.queue_delete(QueueDeleteArguments::new(q));
                            let _ = tokio::time::timeout(op, delete).await;
                            let _ = tokio::time::timeout(op, ch.close()).await;
                        }
                    }
                    for x in &exchanges {
                        if let Ok(Ok(ch)) = tokio::time::timeout(op, conn.open_channel(None)).await
                        {
                            let delete = ch.exchange_delete(ExchangeDeleteArguments::new(x));
                            let _ = tokio::time::timeout(op, delete).await;
                            let _ = tokio::time::timeout(op, ch.close()).await;
                        }
                    }
                    let _ = tokio::time::timeout(op, conn.close()).await;
                }
            };
            let _ = rt.block_on(async move { tokio::time::timeout(LIMIT, work).await });
            rt.shutdown_background();
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(LIMIT + Duration::from_secs(5));
    }
}
