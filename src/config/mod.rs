//! Configuration: the `proxy.toml` file, parsed and validated into an immutable [`Config`].
//!
//! A [`Config`] is a plain value (`Clone + Debug + PartialEq`): the proxy keeps it in an
//! `Arc` and a reload swaps in a whole new one, so nothing in here is mutable or shared.
//!
//! Parsing happens in two steps, one file each. The text is first deserialized into the
//! private `Raw*` structs of `raw.rs`, which keep the byte span of every value
//! (`toml::Spanned`) and reject unknown keys (`deny_unknown_fields`). Then `validate.rs` checks
//! those values and builds the public structs defined here. Every error, whether from the TOML
//! parser or from validation, is reported as `file:line:column: reason` (see [`ConfigError`],
//! in `error.rs`).
//!
//! This file holds what the rest of the crate uses: the types, their defaults, and the entry
//! points [`Config::load`] and [`Config::parse`]. The file layout is documented key by key in
//! the `proxy.toml` at the repository root and in docs/configuration.md (kept in step with the
//! code by the tests in `doc_drift.rs`).

mod error;
mod raw;
mod validate;

#[cfg(test)]
mod doc_drift;
#[cfg(test)]
mod tests;

pub use crate::addr::{NodeAddr, NodeAddrError};
pub use error::{ConfigError, Location};

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use validate::Problem;

/// Smallest `frame_max` AMQP 0-9-1 allows (`frame-min-size`).
pub const MIN_FRAME_MAX: u32 = 4096;

/// Largest message RabbitMQ accepts at all (its own `max_message_size` cannot go higher).
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 * 1024 * 1024;

/// The most clusters a configuration may list: a client connection holds one link per cluster,
/// and the session tracks them in 64-bit sets.
pub const MAX_CLUSTERS: usize = 64;

/// The whole, validated configuration.
///
/// Invariants established by [`Config::parse`]: at least one `shard` cluster, at most one
/// `control` cluster, unique cluster names, every cluster has at least one node, no node appears
/// twice, and not every shard cluster is draining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Address the AMQP listener binds to. Port 0 picks a free port (useful in tests; the
    /// actual address is `ProxyHandle::amqp_addr`).
    pub listen: SocketAddr,
    /// `state_dir`: where warren keeps what must outlast a restart (the evacuation markers and
    /// journals, see `crate::evacuate`). `None`: the configuration file's directory.
    pub state_dir: Option<std::path::PathBuf>,
    pub admin: AdminConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// `[runtime]`: threads and busy polling. Read at start; a reload cannot change them.
    pub runtime: Runtime,
    /// `[routing]`: which exchanges and queues are control traffic. Defaults to the Celery preset.
    pub routing: crate::route::Rules,
    /// In file order.
    pub clusters: Vec<ClusterConfig>,
    /// `[tls]`: the amqps listener, beside the plain `listen`. `None` when the section is absent.
    /// Its certificate and key are loaded (and checked) when the file is parsed.
    pub tls: Option<crate::tls::ServerTls>,
}

/// `[admin]`: the HTTP admin endpoint.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct AdminConfig {
    /// `None` (the default, also when `[admin]` is absent) disables the admin endpoint.
    pub listen: Option<SocketAddr>,
    /// When set, admin requests must carry this token. Never empty.
    pub token: Option<String>,
}

/// `[timeouts]`. All optional, see [`Timeouts::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Heartbeat interval proposed to clients in `Connection.Tune` (seconds, >= 1). Default 60.
    pub heartbeat_secs: u16,
    /// Heartbeat interval the proxy asks for on its own broker connections (seconds, >= 1).
    /// Default 30.
    pub upstream_heartbeat_secs: u16,
    /// Budget for TCP connect plus AMQP handshake to one broker node (ms, >= 1). Default 5000.
    pub connect_ms: u64,
    /// Time a client has to finish the AMQP handshake before it is dropped (ms, >= 1).
    /// Default 10000.
    pub handshake_ms: u64,
    /// On shutdown, time clients get before they are closed with 320 CONNECTION_FORCED (ms).
    /// Default 5000; 0 closes them at once.
    pub shutdown_grace_ms: u64,
    /// A shard cluster removed from the file keeps serving its consumers until its queues are
    /// drained, at most this long (seconds). Default 300.
    pub drain_deadline_secs: u64,
    /// When no shard cluster is reachable (a node failover inside the only live one, or every
    /// cluster down), publishes wait this long for one to come back before confirm-mode clients
    /// get nacks and connections close with 320 (seconds). Default 30.
    pub failover_wait_secs: u64,
    /// A client that takes nothing of what warren has to send it (its buffer full, no write
    /// going through) for this long is disconnected, as RabbitMQ disconnects a client whose
    /// writes time out (seconds; 0: never). Default 25, under RabbitMQ's 30 s send timeout.
    pub client_write_timeout_secs: u64,
}

/// `[limits]`. All optional, see [`Limits::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum simultaneous client connections (>= 1). Default 10000.
    pub max_connections: usize,
    /// Maximum simultaneous client connections from one IP address. Default 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// `channel_max` proposed to clients (>= 1). Default 2047.
    pub max_channels: u16,
    /// `frame_max` proposed to clients, in bytes (>= 4096). Default 131072.
    pub frame_max: u32,
    /// Largest message body accepted from a publisher, in bytes (1 ..= 512 MiB), and the bound
    /// on the bodies one connection has in progress at once over all its channels.
    /// Default 134217728 (128 MiB).
    pub max_message_size: u64,
    /// Bound of each per-connection write buffer, in bytes (>= `frame_max`, so one full frame
    /// always fits). Default 4 MiB.
    pub client_buffer_bytes: usize,
    /// Publishes one client connection may have waiting for their cluster's confirm, in bytes;
    /// at the bound the proxy stops reading that client (back-pressure). Default 64 MiB.
    pub max_held_bytes_per_connection: usize,
    /// The same bound over all connections, counting the bodies of messages still arriving
    /// (`held::Receiving`). Default 1 GiB.
    pub max_held_bytes: usize,
    /// Hold every publish until its cluster confirms it (upstream channels in confirm mode), to
    /// publish it again elsewhere if its link is lost first. Default true. With false, only
    /// clients that ask for confirms get them, and a link lost mid-publish can lose what a
    /// non-confirm client published: cheaper for the brokers, no no-loss guarantee.
    pub hold_publishes: bool,
    /// Open a client connection's shard-cluster links only when it first needs them; until
    /// then it has only its control-cluster link (a Celery event connection never needs more).
    /// Default true. With false every connection opens a link to every cluster at once.
    pub lazy_links: bool,
    /// With `lazy_links`: a connection's shard-cluster links are closed once they have carried
    /// nothing and held none of its state (consumers, unacknowledged deliveries, unconfirmed
    /// publishes, transactions, exclusive or auto-delete queues) for this long; its next request
    /// that needs them opens them again. 0: never. Default 300.
    pub idle_link_secs: u64,
    /// Messages per second the evacuator moves off each evacuating shard cluster (>= 1).
    /// Default 1000: well below what a cluster takes, so an evacuation never starves clients.
    pub evacuate_rate: u32,
}

/// `[runtime]`. All optional, see [`Runtime::default`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Runtime {
    /// Worker threads of the async runtime; 0 (the default) means one per CPU core, or
    /// `TOKIO_WORKER_THREADS` when that is set.
    pub worker_threads: usize,
    /// After traffic, keep the workers polling the sockets this long before they sleep
    /// (microseconds, at most 1 s). Default 0: off. Trades CPU for latency (see
    /// `crate::io::busy_poll`).
    pub busy_poll_us: u64,
}

impl Runtime {
    pub fn busy_poll(&self) -> Duration {
        Duration::from_micros(self.busy_poll_us)
    }
}

/// One `[[clusters]]` entry: a RabbitMQ cluster of one or more nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Unique, non-empty, made of ASCII letters, digits, `-`, `_` and `.`.
    pub name: String,
    pub role: Role,
    /// Never empty, in file order.
    pub nodes: Vec<NodeAddr>,
    /// Relative share of published messages (>= 1). Default 1. Only meaningful for shard
    /// clusters: validation rejects an explicit `weight` on the control cluster.
    pub weight: u32,
    /// A draining shard cluster gets no new publishes but keeps serving consumers.
    /// Default false. Rejected on the control cluster.
    pub drain: bool,
    /// `evacuate = true`: the evacuator moves every message of the cluster's sharded queues to
    /// the other shard clusters (`crate::evacuate`). Implies `drain` (validation sets it).
    /// Default false. Rejected on the control cluster and on every shard cluster at once.
    pub evacuate: bool,
    /// `spread_links = true`: each client connection's link starts at another of `nodes`
    /// (rotated by connection), so the clients' links are spread over the cluster's nodes
    /// instead of all going to the first that answers. Default false.
    pub spread_links: bool,
    /// Credentials for the admin queue-depth checks on this cluster (`GET /queues`); without
    /// them the checks log in as guest/guest. The health probes need none.
    pub probe: Option<ProbeCredentials>,
    /// `tls = { ca_file = ..., ... }`: every connection to the cluster's nodes (links, health
    /// probes, queue depths) uses amqps. `None`: plain AMQP.
    pub tls: Option<crate::tls::ClientTls>,
    /// `management = { url = ..., user = ..., password = ... }`: the cluster's RabbitMQ
    /// management HTTP API, which `GET /queues?queue=PATTERN` lists the cluster's queues with.
    /// `None`: patterns only match the queues declared through this process.
    pub management: Option<ManagementConfig>,
}

impl ClusterConfig {
    /// The nodes a link of client connection `conn` tries, in order: the file's order, or with
    /// `spread_links` that order rotated by the connection's id, so consecutive connections
    /// start at consecutive nodes and each still falls back to every other node.
    pub fn link_nodes(&self, conn: u64) -> Vec<NodeAddr> {
        let mut nodes = self.nodes.clone();
        if self.spread_links && !nodes.is_empty() {
            let start = (conn % nodes.len() as u64) as usize;
            nodes.rotate_left(start);
        }
        nodes
    }
}

/// `management = { url = "http://host:15672", user = "...", password = "...", ... }`.
#[derive(Clone, PartialEq, Eq)]
pub struct ManagementConfig {
    /// Where the API is (`http` or `https`, host, port, path prefix).
    pub url: ManagementUrl,
    /// Never empty.
    pub user: String,
    pub password: String,
    /// The vhosts whose queues are listed (besides those of queues declared through this
    /// process). Default `["/"]`. Never empty, no empty name.
    pub vhosts: Vec<String>,
    /// `Some` exactly when the URL is https.
    pub tls: Option<ManagementTls>,
}

/// How an https management URL's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManagementTls {
    /// `ca_file`: the certificate must chain to these CAs and carry the URL's host.
    Verify(crate::tls::ClientTls),
    /// `insecure_skip_verify = true`: any certificate is accepted (the connection is encrypted,
    /// not authenticated).
    InsecureSkipVerify,
}

/// A management API base URL: `http[s]://host[:port][/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagementUrl {
    pub https: bool,
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// The URL's port, else 80 (http) or 443 (https).
    pub port: u16,
    /// Path prefix without a trailing slash (empty for the usual `http://host:15672`).
    pub prefix: String,
}

impl ManagementUrl {
    /// `host:port` as a `Host` header and in messages (`[v6]:port` for IPv6).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ManagementUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.prefix)
    }
}

/// What a cluster is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Gets published messages, spread over all shard clusters by weight.
    Shard,
    /// Gets management traffic (declarations, bindings...). At most one.
    Control,
}

/// `probe = { user = "...", password = "...", vhost = "/" }`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeCredentials {
    /// Never empty.
    pub user: String,
    pub password: String,
    /// Default `"/"`. Never empty.
    pub vhost: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat_secs: 60,
            upstream_heartbeat_secs: 30,
            connect_ms: 5000,
            handshake_ms: 10_000,
            shutdown_grace_ms: 5000,
            drain_deadline_secs: 300,
            failover_wait_secs: 30,
            client_write_timeout_secs: 25,
        }
    }
}

impl Timeouts {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.heartbeat_secs))
    }
    pub fn upstream_heartbeat(&self) -> Duration {
        Duration::from_secs(u64::from(self.upstream_heartbeat_secs))
    }
    pub fn connect(&self) -> Duration {
        Duration::from_millis(self.connect_ms)
    }
    pub fn handshake(&self) -> Duration {
        Duration::from_millis(self.handshake_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_channels: 2047,
            frame_max: 131_072,
            max_message_size: 134_217_728,
            client_buffer_bytes: 4 * 1024 * 1024,
            max_held_bytes_per_connection: 64 * 1024 * 1024,
            max_held_bytes: 1024 * 1024 * 1024,
            hold_publishes: true,
            lazy_links: true,
            idle_link_secs: 300,
            evacuate_rate: 1000,
        }
    }
}

// Secrets stay out of logs: `Config` is `Debug` and may well be logged.
impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for ProbeCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("vhost", &self.vhost)
            .finish()
    }
}

impl fmt::Debug for ManagementConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagementConfig")
            .field("url", &self.url.to_string())
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("vhosts", &self.vhosts)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Shard => "shard",
            Role::Control => "control",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "shard" => Ok(Role::Shard),
            "control" => Ok(Role::Control),
            other => Err(format!(
                "invalid role \"{other}\": expected \"shard\" or \"control\""
            )),
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`. Error messages name the file as given.
    /// Relative TLS file paths are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::whole_file(&origin, format!("cannot read configuration file: {e}"))
        })?;
        Config::parse_at(&text, &origin, path.parent())
    }

    /// Parses and validates `text`; `origin` names it in error messages (usually the file name).
    /// Relative TLS file paths are relative to the working directory. TLS certificates and keys
    /// are read here.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_at(text, origin, None)
    }

    fn parse_at(text: &str, origin: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            Problem {
                span: span.clone(),
                message: error::toml_message(e.message(), text.get(span).unwrap_or("")),
            }
            .into_error(text, origin)
        })?;
        raw.validate(text, base)
            .map_err(|p| p.into_error(text, origin))
    }

    /// The clusters that get published messages, in file order. Never empty for a validated
    /// config.
    pub fn shard_clusters(&self) -> impl Iterator<Item = &ClusterConfig> {
        self.clusters.iter().filter(|c| c.role == Role::Shard)
    }

    /// The cluster that gets management traffic. When there is none, control traffic is meant
    /// to go to the first shard cluster.
    pub fn control_cluster(&self) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.role == Role::Control)
    }

    /// Looks a cluster up by name.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}
