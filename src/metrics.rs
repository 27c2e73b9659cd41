//! Metrics, kept as Prometheus counters, gauges and histograms (prometheus-client).
//!
//! The hot path never looks a metric up by label: each link resolves its per-cluster handles once
//! ([`Metrics::cluster`]) and then only does atomic adds. The admin endpoint encodes the registry
//! for `GET /metrics` and reads the same handles for `GET /clusters`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfirmLabel {
    pub cluster: String,
    /// `ack` or `nack`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

/// All of the proxy's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub connections: Gauge,
    pub connections_total: Counter,
    pub connections_refused: Counter,
    pub channels: Gauge,
    pub links: Family<ClusterLabel, Gauge>,
    pub link_failures: Family<ClusterLabel, Counter>,
    pub publishes: Family<ClusterLabel, Counter>,
    pub deliveries: Family<ClusterLabel, Counter>,
    pub acks: Family<ClusterLabel, Counter>,
    pub confirms: Family<ConfirmLabel, Counter>,
    pub confirms_pending: Family<ClusterLabel, Gauge>,
    pub unacked: Family<ClusterLabel, Gauge>,
    pub confirm_latency: Family<ClusterLabel, Histogram, fn() -> Histogram>,
    pub bytes_to_cluster: Family<ClusterLabel, Counter>,
    pub bytes_from_cluster: Family<ClusterLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub republished: Counter,
    pub dropped: Counter,
    pub held_bytes: Gauge,
    pub last_reload_ok: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The per-cluster handles one link updates.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    pub links: Gauge,
    pub publishes: Counter,
    pub deliveries: Counter,
    pub acks: Counter,
    pub confirm_acks: Counter,
    pub confirm_nacks: Counter,
    pub confirms_pending: Gauge,
    pub unacked: Gauge,
    pub confirm_latency: Histogram,
    pub bytes_to: Counter,
    pub bytes_from: Counter,
    pub link_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("warren")),
            connections: Gauge::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            channels: Gauge::default(),
            links: Family::default(),
            link_failures: Family::default(),
            publishes: Family::default(),
            deliveries: Family::default(),
            acks: Family::default(),
            confirms: Family::default(),
            confirms_pending: Family::default(),
            unacked: Family::default(),
            confirm_latency: Family::new_with_constructor(latency_histogram),
            bytes_to_cluster: Family::default(),
            bytes_from_cluster: Family::default(),
            reloads: Family::default(),
            republished: Counter::default(),
            dropped: Counter::default(),
            held_bytes: Gauge::default(),
            last_reload_ok: Gauge::default(),
        };
        m.last_reload_ok.set(1);
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "client_connections",
                "Open client connections",
                m.connections.clone(),
            );
            r.register(
                "client_connections_opened",
                "Client connections accepted and opened",
                m.connections_total.clone(),
            );
            r.register(
                "client_connections_refused",
                "Client connections refused (limits, handshake, broker refusal)",
                m.connections_refused.clone(),
            );
            r.register(
                "client_channels",
                "Open client channels",
                m.channels.clone(),
            );
            r.register(
                "cluster_links",
                "Open upstream connections per cluster",
                m.links.clone(),
            );
            r.register(
                "cluster_link_failures",
                "Upstream connections lost or refused per cluster",
                m.link_failures.clone(),
            );
            r.register(
                "publishes",
                "Messages published to each cluster",
                m.publishes.clone(),
            );
            r.register(
                "deliveries",
                "Messages delivered from each cluster",
                m.deliveries.clone(),
            );
            r.register(
                "acks",
                "Client acks, nacks and rejects sent to each cluster",
                m.acks.clone(),
            );
            r.register(
                "confirms",
                "Publisher confirms received from each cluster",
                m.confirms.clone(),
            );
            r.register(
                "confirms_pending",
                "Publishes waiting for a confirm per cluster",
                m.confirms_pending.clone(),
            );
            r.register(
                "deliveries_unacked",
                "Deliveries the clients have not acknowledged yet per cluster",
                m.unacked.clone(),
            );
            r.register(
                "confirm_latency_seconds",
                "Time from publish to the cluster's confirm",
                m.confirm_latency.clone(),
            );
            r.register(
                "cluster_sent_bytes",
                "Bytes written to each cluster",
                m.bytes_to_cluster.clone(),
            );
            r.register(
                "cluster_received_bytes",
                "Bytes read from each cluster",
                m.bytes_from_cluster.clone(),
            );
            r.register(
                "republished",
                "Publishes sent again to another cluster after a nack or a lost link (possible duplicates)",
                m.republished.clone(),
            );
            r.register(
                "dropped",
                "Publishes that could not be delivered to any cluster",
                m.dropped.clone(),
            );
            r.register(
                "held_bytes",
                "Bytes of publishes held until their cluster confirms them",
                m.held_bytes.clone(),
            );
            r.register(
                "config_reloads",
                "Configuration reloads by result",
                m.reloads.clone(),
            );
            r.register(
                "config_last_reload_success",
                "1 if the last reload succeeded",
                m.last_reload_ok.clone(),
            );
        }
        m
    }

    /// Resolves the handles of one cluster (once per link).
    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        // Each lookup in its own statement: `get_or_create` returns a read guard, and two guards
        // of one family alive in one expression deadlock when the second has to insert.
        fn get<
            M: Clone,
            L: Clone + std::hash::Hash + Eq,
            C: prometheus_client::metrics::family::MetricConstructor<M>,
        >(
            f: &Family<L, M, C>,
            l: &L,
        ) -> M {
            f.get_or_create(l).clone()
        }
        let l = ClusterLabel {
            cluster: name.to_owned(),
        };
        let c = |outcome: &str| ConfirmLabel {
            cluster: name.to_owned(),
            outcome: outcome.to_owned(),
        };
        let confirm_acks = get(&self.confirms, &c("ack"));
        let confirm_nacks = get(&self.confirms, &c("nack"));
        ClusterMetrics {
            links: get(&self.links, &l),
            publishes: get(&self.publishes, &l),
            deliveries: get(&self.deliveries, &l),
            acks: get(&self.acks, &l),
            confirm_acks,
            confirm_nacks,
            confirms_pending: get(&self.confirms_pending, &l),
            unacked: get(&self.unacked, &l),
            confirm_latency: get(&self.confirm_latency, &l),
            bytes_to: get(&self.bytes_to_cluster, &l),
            bytes_from: get(&self.bytes_from_cluster, &l),
            link_failures: get(&self.link_failures, &l),
        }
    }

    /// Records the outcome of a configuration reload.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        let counter = self
            .reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .clone();
        counter.inc();
        self.last_reload_ok.set(i64::from(ok));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_handles_resolve_without_deadlock_and_encode() {
        let m = Metrics::new();
        let a = m.cluster("shard-a");
        let again = m.cluster("shard-a");
        a.publishes.inc();
        again.publishes.inc();
        a.confirm_latency.observe(0.001);
        m.reloaded(false);
        let text = m.encode();
        assert!(
            text.contains("warren_publishes_total{cluster=\"shard-a\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("warren_config_last_reload_success 0"),
            "{text}"
        );
    }
}
