//! Reachability of every node of every cluster, probed in the background.
//!
//! A probe opens a TCP connection, sends the AMQP protocol header and reads `connection.start`
//! (no credentials are needed for that). A node that answers is `up`; one that refuses, times out
//! or does not speak AMQP 0-9-1 is `down`, with the reason kept as its `last_error`. Up nodes are
//! probed every [`UP_INTERVAL`]; down nodes with exponential backoff ([`DOWN_FIRST`] doubling up to
//! [`DOWN_MAX`]), both with ±20 % jitter so that many proxies do not probe in lockstep
//! ([`crate::backoff`], the schedule sessions reconnect links with).
//!
//! The set of nodes follows the running configuration: a reload that adds or removes a node adds
//! or forgets its state on the next tick.
//!
//! The prober runs whether or not the admin endpoint is enabled: the admin endpoint reads
//! [`Health`] (`/clusters`, `/ready`, the page), and sessions waiting to reconnect a cluster learn
//! through [`Shared::node_came_up`] that one of its nodes is back, and retry at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, jitter};
use crate::codec::{FieldTable, FieldValue};
use crate::config::{ClusterConfig, Config, NodeAddr};
use crate::state::Shared;

/// Time between two probes of a node that is up.
pub const UP_INTERVAL: Duration = Duration::from_secs(5);
/// First retry of a node that went down.
pub const DOWN_FIRST: Duration = Duration::from_secs(1);
/// Longest time between two probes of a node that stays down. Short, because a node seen up
/// again wakes the sessions waiting to reconnect to its cluster (they back off much longer).
pub const DOWN_MAX: Duration = Duration::from_secs(5);
/// Longest a probe may take (the configured `timeouts.connect_ms` if shorter).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the task sleeps when no node is due (none configured, or all being probed).
const IDLE_WAKE: Duration = Duration::from_secs(5);

/// What the last probe of a node said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Not probed yet.
    Unknown,
    Up,
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Unknown => "unknown",
            NodeState::Up => "up",
            NodeState::Down => "down",
        }
    }
}

/// The probe state of one node.
#[derive(Debug, Clone)]
pub struct NodeHealth {
    pub state: NodeState,
    /// Why the last failed probe failed (kept after the node comes back, see `last_change`).
    pub last_error: Option<String>,
    /// When `state` last changed (`None` while unknown).
    pub last_change: Option<SystemTime>,
    /// When the node was last probed.
    pub last_check: Option<SystemTime>,
    /// Consecutive failed probes.
    pub failures: u32,
    /// `product` and `version` from the node's connection.start.
    pub product: Option<String>,
    pub version: Option<String>,
    next_due: Instant,
    in_flight: bool,
}

impl NodeHealth {
    /// When the node went down, while it is down: the first failed probe after it was up (or
    /// after the proxy started, for a node never seen up).
    pub fn down_since(&self) -> Option<SystemTime> {
        match self.state {
            NodeState::Down => self.last_change,
            _ => None,
        }
    }

    fn new(now: Instant) -> Self {
        NodeHealth {
            state: NodeState::Unknown,
            last_error: None,
            last_change: None,
            last_check: None,
            failures: 0,
            product: None,
            version: None,
            next_due: now,
            in_flight: false,
        }
    }
}

/// The probe state of every configured node, keyed by (cluster name, node address).
#[derive(Debug, Default)]
pub struct Health {
    nodes: Mutex<BTreeMap<(String, String), NodeHealth>>,
    /// Completed probe rounds (for tests and `/ready` before the first answer).
    probes: AtomicU64,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of one node (`Unknown` if it was never probed).
    pub fn node(&self, cluster: &str, node: &NodeAddr) -> NodeHealth {
        self.nodes
            .lock()
            .get(&(cluster.to_owned(), node.to_string()))
            .cloned()
            .unwrap_or_else(|| NodeHealth::new(Instant::now()))
    }

    /// Whether at least one node of the cluster answered its last probe; `None` while no node of
    /// it has been probed yet.
    pub fn cluster_reachable(&self, cluster: &ClusterConfig) -> Option<bool> {
        let nodes = self.nodes.lock();
        let mut known = false;
        for n in &cluster.nodes {
            match nodes
                .get(&(cluster.name.clone(), n.to_string()))
                .map(|h| h.state)
            {
                Some(NodeState::Up) => return Some(true),
                Some(NodeState::Down) => known = true,
                _ => {}
            }
        }
        known.then_some(false)
    }

    /// Number of probes completed so far.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Adds the nodes of `config` that are new, forgets the ones it no longer has, and returns
    /// (marking them in flight) the nodes due for a probe.
    fn take_due(&self, config: &Config, now: Instant) -> Vec<(String, NodeAddr)> {
        let mut nodes = self.nodes.lock();
        let wanted: BTreeMap<(String, String), &NodeAddr> = config
            .clusters
            .iter()
            .flat_map(|c| {
                c.nodes
                    .iter()
                    .map(move |n| ((c.name.clone(), n.to_string()), n))
            })
            .collect();
        nodes.retain(|k, _| wanted.contains_key(k));
        let mut due = Vec::new();
        for (key, addr) in wanted {
            let h = nodes
                .entry(key.clone())
                .or_insert_with(|| NodeHealth::new(now));
            if !h.in_flight && h.next_due <= now {
                h.in_flight = true;
                due.push((key.0, addr.clone()));
            }
        }
        due
    }

    /// When the next node not being probed is due (`None` when every node is being probed or
    /// none is known).
    fn next_due(&self) -> Option<Instant> {
        self.nodes
            .lock()
            .values()
            .filter(|h| !h.in_flight)
            .map(|h| h.next_due)
            .min()
    }

    /// Records the outcome of one probe and schedules the next. True when the node was down
    /// and is up again.
    fn record(&self, cluster: &str, node: &NodeAddr, result: Result<FieldTable, String>) -> bool {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut nodes = self.nodes.lock();
        // The node may have been removed by a reload while it was probed.
        let Some(h) = nodes.get_mut(&(cluster.to_owned(), node.to_string())) else {
            return false;
        };
        h.in_flight = false;
        h.last_check = Some(wall);
        let new_state = match result {
            Ok(props) => {
                h.failures = 0;
                h.product = text_property(&props, "product");
                h.version = text_property(&props, "version");
                h.next_due = now + jitter(UP_INTERVAL);
                NodeState::Up
            }
            Err(e) => {
                h.failures = h.failures.saturating_add(1);
                h.last_error = Some(e.clone());
                h.next_due = now + Backoff::new(DOWN_FIRST, DOWN_MAX).after(h.failures);
                if h.state != NodeState::Down {
                    tracing::warn!(cluster, %node, error = %e, "health probe: node is down");
                }
                NodeState::Down
            }
        };
        let came_up = new_state == NodeState::Up && h.state == NodeState::Down;
        if came_up {
            tracing::info!(cluster, %node, "health probe: node is up again");
        }
        if h.state != new_state {
            h.state = new_state;
            h.last_change = Some(wall);
        }
        drop(nodes);
        self.probes.fetch_add(1, Ordering::Relaxed);
        came_up
    }
}

fn text_property(props: &FieldTable, key: &str) -> Option<String> {
    match props.get(key)? {
        FieldValue::LongStr(s) => Some(s.as_str().chars().take(200).collect()),
        _ => None,
    }
}

/// The running prober: the probe state it keeps, and its task.
pub struct Prober {
    health: Arc<Health>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Prober {
    /// Starts probing the nodes of `shared`'s running configuration.
    pub fn start(shared: Arc<Shared>) -> Prober {
        let health = Arc::new(Health::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(health.clone(), shared, stop.clone()));
        Prober {
            health,
            stop,
            task: Some(task),
        }
    }

    /// The probe state of the clusters' nodes.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Stops probing and waits for the task to end.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Probes the nodes of the running configuration until `stop` is cancelled.
async fn run(health: Arc<Health>, shared: Arc<Shared>, stop: CancellationToken) {
    let mut probes = JoinSet::new();
    let mut seen: Option<Arc<Config>> = None;
    let mut config_rx = shared.subscribe();
    loop {
        let config = shared.config();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &config)) {
            // Every configured cluster gets its series in /metrics (at 0) before any traffic,
            // so alerts on them have something to evaluate.
            for c in &config.clusters {
                shared.metrics.cluster(&c.name);
            }
            seen = Some(config.clone());
        }
        let timeout = config.timeouts.connect().min(PROBE_TIMEOUT);
        for (cluster, node) in health.take_due(&config, Instant::now()) {
            let health = health.clone();
            let shared = shared.clone();
            let tls = config.cluster(&cluster).and_then(|c| c.tls.clone());
            probes.spawn(async move {
                let result =
                    match tokio::time::timeout(timeout, read_start(&node, tls.as_ref())).await {
                        Ok(r) => r,
                        Err(_) => Err(format!(
                            "no connection.start within {} ms",
                            timeout.as_millis()
                        )),
                    };
                if health.record(&cluster, &node, result) {
                    shared.node_came_up(&cluster);
                }
            });
        }
        while probes.try_join_next().is_some() {}
        // Sleep until a node is due, a probe ends (it schedules its node's next probe) or the
        // configuration changes (new nodes are probed at once), not on a short fixed tick: an
        // idle proxy should not wake for nothing.
        let next = health
            .next_due()
            .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
            Some(_) = probes.join_next() => {}
            Ok(()) = config_rx.changed() => {}
        }
    }
    probes.abort_all();
}

/// Connects (over amqps when `tls` is set), sends the protocol header and reads the server
/// properties of connection.start (the same reader as links and the capability probe).
pub use crate::upstream::reader::read_start;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: &[&str]) -> Config {
        let nodes = nodes
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        Config::parse(
            &format!("listen = \"127.0.0.1:0\"\n[[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [{nodes}]\n"),
            "t.toml",
        )
        .unwrap()
    }

    #[test]
    fn the_task_sleeps_until_the_next_node_not_being_probed_is_due() {
        let h = Health::new();
        assert_eq!(h.next_due(), None, "no node known yet");
        let c = config(&["127.0.0.1:1", "127.0.0.1:2"]);
        let due = h.take_due(&c, Instant::now());
        assert_eq!(
            h.next_due(),
            None,
            "both being probed: a probe's end wakes the task"
        );
        h.record("a", &due[0].1, Ok(FieldTable::default()));
        let next = h.next_due().expect("one node idle");
        assert_eq!(next, h.node("a", &due[0].1).next_due);
        assert!(
            next > Instant::now() + UP_INTERVAL / 2,
            "an up node waits its interval"
        );
    }

    #[test]
    fn states_backoff_and_pruning() {
        let h = Health::new();
        let c = config(&["127.0.0.1:1", "127.0.0.1:2"]);
        let now = Instant::now();
        let due = h.take_due(&c, now);
        assert_eq!(due.len(), 2);
        // In flight: not handed out twice.
        assert!(h.take_due(&c, now).is_empty());
        assert_eq!(h.cluster_reachable(&c.clusters[0]), None);
        h.record("a", &due[0].1, Err("connect: refused".into()));
        assert_eq!(h.cluster_reachable(&c.clusters[0]), Some(false));
        h.record("a", &due[1].1, Ok(FieldTable::default()));
        assert_eq!(h.cluster_reachable(&c.clusters[0]), Some(true));
        let n = h.node("a", &due[0].1);
        assert_eq!(n.state, NodeState::Down);
        assert_eq!(n.last_error.as_deref(), Some("connect: refused"));
        assert!(n.next_due > now);
        let down_since = n.down_since().expect("down since its first failed probe");
        assert_eq!(Some(down_since), n.last_change);
        assert!(n.last_check.is_some_and(|t| t >= down_since));
        assert_eq!(h.node("a", &due[1].1).down_since(), None, "up");
        assert_eq!(NodeHealth::new(now).down_since(), None, "never probed");
        // Backoff grows and is capped.
        for _ in 0..40 {
            h.nodes
                .lock()
                .get_mut(&("a".into(), due[0].1.to_string()))
                .unwrap()
                .in_flight = true;
            h.record("a", &due[0].1, Err("x".into()));
        }
        let n = h.node("a", &due[0].1);
        assert!(n.next_due <= Instant::now() + DOWN_MAX.mul_f64(1.21));
        // Later failed probes move the last check, not the time it went down.
        assert_eq!(n.down_since(), Some(down_since));
        assert!(n.last_check >= Some(down_since));
        // Back up: no longer down; down again: a new down_since.
        h.nodes
            .lock()
            .get_mut(&("a".into(), due[0].1.to_string()))
            .unwrap()
            .in_flight = true;
        assert!(
            h.record("a", &due[0].1, Ok(FieldTable::default())),
            "came up"
        );
        assert_eq!(h.node("a", &due[0].1).down_since(), None);
        std::thread::sleep(Duration::from_millis(2));
        h.record("a", &due[0].1, Err("connect: refused".into()));
        let again = h.node("a", &due[0].1).down_since().expect("down again");
        assert!(again > down_since);
        // A reload that drops a node forgets it.
        let c2 = config(&["127.0.0.1:2"]);
        h.take_due(&c2, Instant::now());
        assert_eq!(h.nodes.lock().len(), 1);
    }
}
