//! Metrics, kept as Prometheus counters, gauges and histograms (prometheus-client).
//!
//! The hot path never looks a metric up by label: each link resolves its per-cluster handles once
//! ([`Metrics::cluster`]) and then only does atomic adds. The admin endpoint encodes the registry
//! for `GET /metrics` and reads the same handles for `GET /clusters`.
//!
//! Every series exists from the start: the per-cluster ones once the cluster is configured
//! ([`crate::state::Shared`] resolves them), the reload results at 0 for `ok` and `error`, so
//! that `increase()` and `rate()` see the first event. Besides the `warren_*` series there are
//! `warren_build_info` and the usual `process_*` series (from `/proc/self`, Linux only).

use parking_lot::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// warren's version, as in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit warren was built from (`git rev-parse --short HEAD` by build.rs, or the
/// `WARREN_GIT_REVISION` environment variable at build time), `unknown` without either.
pub const REVISION: &str = match option_env!("WARREN_GIT_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// The two text expositions `GET /metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: what curl and plain scrapers get. A counter's `# HELP` and
    /// `# TYPE` name its samples' name, `_total` included.
    Prometheus,
    /// OpenMetrics 1.0.0, for scrapers that ask for it: a counter family is named without
    /// `_total` (its samples have it), and the exposition ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics when it accepts
    /// `application/openmetrics-text` (q > 0) at least as much as `text/plain`, else
    /// Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut openmetrics: f32 = 0.0;
        let mut text: f32 = 0.0;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

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
    pub probes: Counter,
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
    pub prefetch_below_shards: Counter,
    pub held_bytes: Gauge,
    pub last_reload_ok: Gauge,
    pub evacuate_moved: Family<ClusterLabel, Counter>,
    pub evacuate_left: Family<ClusterLabel, Gauge>,
    pub evacuate_errors: Family<ClusterLabel, Counter>,
    pub evacuate_duplicates: Family<ClusterLabel, Counter>,
}

/// The evacuation series of one shard cluster ([`Metrics::evacuation`]).
#[derive(Clone, Debug)]
pub struct EvacuationMetrics {
    pub moved: Counter,
    pub left: Gauge,
    pub errors: Counter,
    pub duplicates: Counter,
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
            registry: Mutex::new(Registry::default()),
            connections: Gauge::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            probes: Counter::default(),
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
            prefetch_below_shards: Counter::default(),
            held_bytes: Gauge::default(),
            last_reload_ok: Gauge::default(),
            evacuate_moved: Family::default(),
            evacuate_left: Family::default(),
            evacuate_errors: Family::default(),
            evacuate_duplicates: Family::default(),
        };
        m.last_reload_ok.set(1);
        for result in ["ok", "error"] {
            let _ = m.reloads.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        {
            let mut root = m.registry.lock();
            root.register_collector(Box::new(ProcessCollector));
            let r = root.sub_registry_with_prefix("warren");
            r.register(
                "build",
                "warren's version and the git commit it was built from",
                Info::new(vec![("version", VERSION), ("revision", REVISION)]),
            );
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
                "Client connections refused (limits, failed handshakes, broker refusal); bare TCP connects are counted in warren_client_probes_total",
                m.connections_refused.clone(),
            );
            r.register(
                "client_probes",
                "TCP connections closed without sending a byte (load balancer TCP health checks)",
                m.probes.clone(),
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
                "Publishes sent again to another cluster after their link was lost before the confirm (possible duplicates)",
                m.republished.clone(),
            );
            r.register(
                "dropped",
                "Publishes that could not be delivered to any cluster",
                m.dropped.clone(),
            );
            r.register(
                "prefetch_below_shards",
                "basic.qos settings with a prefetch count below the number of shard clusters: such a consumer may hold one message per shard cluster",
                m.prefetch_below_shards.clone(),
            );
            r.register(
                "held_bytes",
                "Bytes of publishes held until their cluster confirms them, and of message bodies still arriving",
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
            r.register(
                "evacuate_moved",
                "Messages moved off an evacuating shard cluster: confirmed by another cluster, then acknowledged on this one",
                m.evacuate_moved.clone(),
            );
            r.register(
                "evacuate_messages_left",
                "Messages still in the sharded queues of an evacuating shard cluster (0 when it is not evacuating)",
                m.evacuate_left.clone(),
            );
            r.register(
                "evacuate_errors",
                "Evacuation errors per shard cluster: nacks and returns from the target, links lost, queues that could not be read",
                m.evacuate_errors.clone(),
            );
            r.register(
                "evacuate_duplicates",
                "Messages an evacuation published again that the target may already have had (possible duplicates)",
                m.evacuate_duplicates.clone(),
            );
        }
        m
    }

    /// The evacuation series of one shard cluster (created at 0 for every shard cluster, so
    /// they exist before any evacuation).
    pub fn evacuation(&self, name: &str) -> EvacuationMetrics {
        let l = ClusterLabel {
            cluster: name.to_owned(),
        };
        let moved = self.evacuate_moved.get_or_create(&l).clone();
        let left = self.evacuate_left.get_or_create(&l).clone();
        let errors = self.evacuate_errors.get_or_create(&l).clone();
        let duplicates = self.evacuate_duplicates.get_or_create(&l).clone();
        EvacuationMetrics {
            moved,
            left,
            errors,
            duplicates,
        }
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

    /// The exposition of every metric in `format`, without OpenMetrics' closing `# EOF` (the
    /// admin endpoint adds its own series after these, then [`Metrics::finish`]).
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        let r = self.registry.lock();
        let _ = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &r)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode_registry(&mut out, &r),
        };
        out
    }

    /// Ends an exposition: `# EOF` for OpenMetrics, nothing for the Prometheus text format.
    pub fn finish(format: Format, out: &mut String) {
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// process_* series

/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on every Linux architecture; the
/// Prometheus Go client's procfs assumes the same).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about the process at one scrape; `None` where it cannot be read (not
/// Linux, no procfs).
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> ProcessStats {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let stat = read("/proc/self/stat");
        let mut s = ProcessStats {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            max_fds: read("/proc/self/limits").and_then(|l| parse_max_fds(&l)),
            resident_bytes: read("/proc/self/status").and_then(|s| parse_vm_rss(&s)),
            ..ProcessStats::default()
        };
        if let Some(stat) = stat.as_deref().and_then(parse_stat) {
            s.cpu_seconds = Some(stat.cpu_ticks / USER_HZ);
            s.virtual_bytes = Some(stat.vsize);
            s.start_time_seconds = read("/proc/stat")
                .and_then(|t| parse_boot_time(&t))
                .map(|boot| boot + stat.start_ticks / USER_HZ);
        }
        s
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: f64,
    /// Start time after boot, in clock ticks.
    start_ticks: f64,
    /// Virtual memory size, in bytes.
    vsize: f64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are counted
    // from the last ')'. After it, index 0 is field 3 (state).
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_ticks: num(14)? + num(15)?,
        start_ticks: num(22)?,
        vsize: num(23)?,
    })
}

/// The soft "Max open files" limit of `/proc/self/limits` (`None` when unlimited).
fn parse_max_fds(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn parse_vm_rss(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Encodes the `process_*` series at each scrape (registered without the `warren` prefix, under
/// the names every exporter uses).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = ProcessStats::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                s.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
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
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = m.encode(format);
            assert!(
                text.contains("warren_publishes_total{cluster=\"shard-a\"} 2"),
                "{text}"
            );
            assert!(
                text.contains("warren_config_last_reload_success 0"),
                "{text}"
            );
            assert!(
                text.contains("warren_config_reloads_total{result=\"error\"} 1"),
                "{text}"
            );
            assert!(!text.contains("# EOF"), "{text}");
        }
    }

    /// The metric family a sample line belongs to in the Prometheus text format: its name, less
    /// a histogram's `_bucket`/`_sum`/`_count` when the family is a histogram.
    fn family_of<'a>(sample: &'a str, types: &std::collections::HashMap<&str, &str>) -> &'a str {
        let name = sample.split(['{', ' ']).next().unwrap();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && types.get(base) == Some(&"histogram")
            {
                return base;
            }
        }
        name
    }

    #[test]
    fn prometheus_text_names_help_and_type_as_the_samples() {
        let m = Metrics::new();
        m.cluster("shard-a").confirm_latency.observe(0.01);
        let text = m.encode(Format::Prometheus);
        let mut help = std::collections::HashMap::new();
        let mut types = std::collections::HashMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# HELP ") {
                let (name, h) = rest.split_once(' ').unwrap();
                help.insert(name, h);
            } else if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, t) = rest.split_once(' ').unwrap();
                types.insert(name, t);
            }
        }
        let mut samples = 0;
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let family = family_of(l, &types);
            assert!(help.contains_key(family), "no HELP for {l:?}:\n{text}");
            let t = types
                .get(family)
                .unwrap_or_else(|| panic!("no TYPE for {l:?}:\n{text}"));
            if *t == "counter" {
                assert!(family.ends_with("_total"), "{l:?}");
            }
            samples += 1;
        }
        assert!(samples > 30, "{text}");
        // Every counter is there from the start, at 0.
        for series in [
            "warren_client_probes_total 0",
            "warren_client_connections_refused_total 0",
            "warren_config_reloads_total{result=\"ok\"} 0",
            "warren_config_reloads_total{result=\"error\"} 0",
            "warren_cluster_link_failures_total{cluster=\"shard-a\"} 0",
            "warren_confirms_total{cluster=\"shard-a\",outcome=\"nack\"} 0",
            "warren_dropped_total 0",
        ] {
            assert!(text.lines().any(|l| l == series), "{series}:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "warren_build_info{{version=\"{VERSION}\",revision=\"{REVISION}\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE warren_build_info gauge"), "{text}");
    }

    #[test]
    fn openmetrics_names_counter_families_without_total() {
        let m = Metrics::new();
        let text = m.encode(Format::OpenMetrics);
        assert!(
            text.contains("# TYPE warren_client_probes counter"),
            "{text}"
        );
        assert!(text.contains("warren_client_probes_total 0"), "{text}");
        assert!(text.contains("# TYPE warren_build info"), "{text}");
        let mut done = text.clone();
        Metrics::finish(Format::OpenMetrics, &mut done);
        assert!(done.ends_with("# EOF\n"));
        let mut plain = String::new();
        Metrics::finish(Format::Prometheus, &mut plain);
        assert!(plain.is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_series_from_proc() {
        let s = ProcessStats::read();
        assert!(s.cpu_seconds.is_some_and(|c| c >= 0.0), "{s:?}");
        assert!(s.resident_bytes.is_some_and(|r| r > 1e5), "{s:?}");
        assert!(s.virtual_bytes.is_some_and(|v| v > 1e5), "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3.0), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            s.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86400.0 * 365.0),
            "{s:?}"
        );
        let text = Metrics::new().encode(Format::Prometheus);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name}:\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
    }

    #[test]
    fn proc_parsers() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 9 0 4200 123456789 900 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_ticks: 300.0,
                start_ticks: 4200.0,
                vsize: 123456789.0
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024.0));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(
            parse_vm_rss("Name:\twarren\nVmRSS:\t   10240 kB\n"),
            Some(10240.0 * 1024.0)
        );
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1.7e9)
        );
    }

    #[test]
    fn accept_negotiation() {
        use Format::*;
        assert_eq!(Format::from_accept(None), Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Prometheus);
        // What Prometheus 2.x and 3.x send.
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            )),
            OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("Application/OpenMetrics-Text")),
            OpenMetrics
        );
    }
}
