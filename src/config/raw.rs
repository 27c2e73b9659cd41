//! The file as serde reads it: one `Raw*` struct per table, every value in a `toml::Spanned`.
//!
//! Why a second set of types beside the public ones in `mod.rs`: validation needs the byte
//! span of each value to say where a bad one is, and most required keys are `Option` here so
//! that `validate.rs` can say what a missing one is for instead of serde's bare "missing
//! field". `deny_unknown_fields` on every table makes a misspelt key an error rather than a
//! setting silently ignored.
//!
//! Nothing here checks values; that is `validate.rs`. `doc_drift.rs` walks these types to list
//! the keys the code accepts, so a key added here must also be documented in
//! docs/configuration.md.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    pub(super) timeouts: Option<Spanned<RawTimeouts>>,
    pub(super) limits: Option<Spanned<RawLimits>>,
    pub(super) runtime: Option<Spanned<RawRuntime>>,
    pub(super) routing: Option<Spanned<RawRouting>>,
    pub(super) clusters: Option<Spanned<Vec<Spanned<RawCluster>>>>,
    pub(super) tls: Option<Spanned<RawServerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) control_exchanges: Option<Vec<Spanned<String>>>,
    pub(super) control_queues: Option<Vec<Spanned<String>>>,
    pub(super) uuid_queues_are_control: Option<bool>,
    pub(super) rules: Option<Vec<Spanned<RawRule>>>,
}

/// One `[[routing.rules]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    pub(super) patterns: Option<Vec<Spanned<String>>>,
    pub(super) clusters: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) spread: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) heartbeat_secs: Option<Spanned<u16>>,
    pub(super) upstream_heartbeat_secs: Option<Spanned<u16>>,
    pub(super) connect_ms: Option<Spanned<u64>>,
    pub(super) handshake_ms: Option<Spanned<u64>>,
    pub(super) shutdown_grace_ms: Option<Spanned<u64>>,
    pub(super) drain_deadline_secs: Option<Spanned<u64>>,
    pub(super) failover_wait_secs: Option<Spanned<u64>>,
    pub(super) client_write_timeout_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<Spanned<usize>>,
    pub(super) busy_poll_us: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) max_connections_per_ip: Option<Spanned<usize>>,
    pub(super) max_channels: Option<Spanned<u16>>,
    pub(super) frame_max: Option<Spanned<u32>>,
    pub(super) max_message_size: Option<Spanned<u64>>,
    pub(super) client_buffer_bytes: Option<Spanned<usize>>,
    pub(super) max_held_bytes_per_connection: Option<Spanned<usize>>,
    pub(super) max_held_bytes: Option<Spanned<usize>>,
    pub(super) hold_publishes: Option<Spanned<bool>>,
    pub(super) lazy_links: Option<Spanned<bool>>,
    pub(super) idle_link_secs: Option<Spanned<u64>>,
    pub(super) evacuate_rate: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: Option<Spanned<String>>,
    pub(super) role: Option<Spanned<String>>,
    pub(super) nodes: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) weight: Option<Spanned<u32>>,
    pub(super) drain: Option<Spanned<bool>>,
    pub(super) evacuate: Option<Spanned<bool>>,
    pub(super) spread_links: Option<Spanned<bool>>,
    pub(super) probe: Option<Spanned<RawProbe>>,
    pub(super) tls: Option<Spanned<RawClientTls>>,
    pub(super) management: Option<Spanned<RawManagement>>,
}

/// A cluster's `management = { url = ..., ... }`: its RabbitMQ management HTTP API, which
/// `GET /queues?queue=PATTERN` lists queues with.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManagement {
    pub(super) url: Option<Spanned<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) password: Option<Spanned<String>>,
    pub(super) vhosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) insecure_skip_verify: Option<Spanned<bool>>,
}

/// `[tls]`: the amqps listener.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServerTls {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    pub(super) client_ca_file: Option<Spanned<String>>,
}

/// A cluster's `tls = { ... }`: amqps to its nodes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientTls {
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    pub(super) user: Spanned<String>,
    pub(super) password: String,
    pub(super) vhost: Option<Spanned<String>>,
}
