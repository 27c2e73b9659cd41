//! Configuration: the `proxy.toml` file, parsed and validated into an immutable [`Config`].
//!
//! A [`Config`] is a plain value (`Clone + Debug + PartialEq`): the proxy keeps it in an
//! `Arc` and a reload swaps in a whole new one, so nothing in here is mutable or shared.
//!
//! Parsing happens in two steps. The text is first deserialized into private `Raw*` structs
//! that keep the byte span of every value (`toml::Spanned`) and reject unknown keys
//! (`deny_unknown_fields`). Then [`Config::parse`] validates those values and builds the public
//! structs. Every error, whether from the TOML parser or from validation, is reported as
//! `file:line:column: reason` (see [`ConfigError`]).
//!
//! The file layout is documented key by key in the `proxy.toml` at the repository root.

pub use crate::addr::{NodeAddr, NodeAddrError};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Smallest `frame_max` AMQP 0-9-1 allows (`frame-min-size`).
pub const MIN_FRAME_MAX: u32 = 4096;

/// Largest message RabbitMQ accepts at all (its own `max_message_size` cannot go higher).
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 * 1024 * 1024;

/// `[runtime] worker_threads` ceiling: far above any useful count, low enough that a typo
/// (an extra zero or two) is caught instead of starting thousands of threads.
const MAX_WORKER_THREADS: usize = 1024;

/// `[runtime] busy_poll_us` ceiling: spinning longer than a second after the last frame is
/// burning a core, not lowering latency.
const MAX_BUSY_POLL_US: u64 = 1_000_000;

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
    /// The same bound over all connections. Default 1 GiB.
    pub max_held_bytes: usize,
    /// Hold every publish until its cluster confirms it (upstream channels in confirm mode), to
    /// publish it again elsewhere on a nack or a lost link. Default true. With false, only
    /// clients that ask for confirms get them, and a link lost mid-publish can lose what a
    /// non-confirm client published: cheaper for the brokers, no no-loss guarantee.
    pub hold_publishes: bool,
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
    /// Credentials for the admin queue-depth checks on this cluster (`GET /queues`); without
    /// them the checks log in as guest/guest. The health probes need none.
    pub probe: Option<ProbeCredentials>,
    /// `tls = { ca_file = ..., ... }`: every connection to the cluster's nodes (links, health
    /// probes, queue depths) uses amqps. `None`: plain AMQP.
    pub tls: Option<crate::tls::ClientTls>,
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

/// Where in the file an error is: 1-based line, 1-based column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// A configuration error, displayed as `origin:line:column: reason`, e.g.
/// `proxy.toml:12:9: duplicate cluster name "shard-a" (first defined at line 4)`.
///
/// The only errors without a location are those about the file as a whole (it cannot be
/// read); they display as `origin: reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    origin: String,
    location: Option<Location>,
    message: String,
}

impl ConfigError {
    /// File name (or other origin) the error is about.
    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn location(&self) -> Option<Location> {
        self.location
    }
    /// 1-based line, if the error points into the file.
    pub fn line(&self) -> Option<usize> {
        self.location.map(|l| l.line)
    }
    /// The reason alone, without `file:line:column: `.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(Location { line, column }) => {
                write!(f, "{}:{}:{}: {}", self.origin, line, column, self.message)
            }
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates the file at `path`. Error messages name the file as given.
    /// Relative TLS file paths are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            location: None,
            message: format!("cannot read configuration file: {e}"),
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            Problem {
                span: span.clone(),
                message: toml_message(e.message(), text.get(span).unwrap_or("")),
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

// ---------------------------------------------------------------------------------------------
// Raw, span-carrying form of the file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    admin: Option<Spanned<RawAdmin>>,
    timeouts: Option<Spanned<RawTimeouts>>,
    limits: Option<Spanned<RawLimits>>,
    runtime: Option<Spanned<RawRuntime>>,
    routing: Option<Spanned<RawRouting>>,
    clusters: Option<Spanned<Vec<Spanned<RawCluster>>>>,
    tls: Option<Spanned<RawServerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    control_exchanges: Option<Vec<Spanned<String>>>,
    control_queues: Option<Vec<Spanned<String>>>,
    uuid_queues_are_control: Option<bool>,
}

impl RawRouting {
    fn validate(&self) -> Result<crate::route::Rules, Problem> {
        use crate::route::{Pattern, Rules};
        let defaults = Rules::default();
        let patterns = |list: &Option<Vec<Spanned<String>>>,
                        default: Vec<Pattern>|
         -> Result<Vec<Pattern>, Problem> {
            let Some(list) = list else { return Ok(default) };
            let mut out = Vec::with_capacity(list.len());
            for p in list {
                if p.get_ref().is_empty() || p.get_ref().len() > 255 {
                    return problem(p.span(), "a routing pattern must be 1 to 255 bytes long");
                }
                out.push(Pattern::new(p.get_ref().clone()));
            }
            Ok(out)
        };
        Ok(Rules {
            control_exchanges: patterns(&self.control_exchanges, defaults.control_exchanges)?,
            control_queues: patterns(&self.control_queues, defaults.control_queues)?,
            uuid_queues_are_control: self
                .uuid_queues_are_control
                .unwrap_or(defaults.uuid_queues_are_control),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    heartbeat_secs: Option<Spanned<u16>>,
    upstream_heartbeat_secs: Option<Spanned<u16>>,
    connect_ms: Option<Spanned<u64>>,
    handshake_ms: Option<Spanned<u64>>,
    shutdown_grace_ms: Option<Spanned<u64>>,
    drain_deadline_secs: Option<Spanned<u64>>,
    failover_wait_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<Spanned<usize>>,
    busy_poll_us: Option<Spanned<u64>>,
}

impl RawRuntime {
    fn validate(&self) -> Result<Runtime, Problem> {
        at_most(
            &self.worker_threads,
            "worker_threads",
            MAX_WORKER_THREADS,
            "use 0 (one per core) to 1024",
        )?;
        at_most(
            &self.busy_poll_us,
            "busy_poll_us",
            MAX_BUSY_POLL_US,
            "use 0 (off) to 1000000 (1 s)",
        )?;
        let d = Runtime::default();
        Ok(Runtime {
            worker_threads: value_or(&self.worker_threads, d.worker_threads),
            busy_poll_us: value_or(&self.busy_poll_us, d.busy_poll_us),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<usize>>,
    max_connections_per_ip: Option<Spanned<usize>>,
    max_channels: Option<Spanned<u16>>,
    frame_max: Option<Spanned<u32>>,
    max_message_size: Option<Spanned<u64>>,
    client_buffer_bytes: Option<Spanned<usize>>,
    max_held_bytes_per_connection: Option<Spanned<usize>>,
    max_held_bytes: Option<Spanned<usize>>,
    hold_publishes: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    nodes: Option<Spanned<Vec<Spanned<String>>>>,
    weight: Option<Spanned<u32>>,
    drain: Option<Spanned<bool>>,
    probe: Option<Spanned<RawProbe>>,
    tls: Option<Spanned<RawClientTls>>,
}

/// `[tls]`: the amqps listener.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    listen: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    client_ca_file: Option<Spanned<String>>,
}

/// A cluster's `tls = { ... }`: amqps to its nodes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientTls {
    ca_file: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    user: Spanned<String>,
    password: String,
    vhost: Option<Spanned<String>>,
}

/// An error before it knows its file: a byte span and a reason.
struct Problem {
    span: Range<usize>,
    message: String,
}

impl Problem {
    fn into_error(self, text: &str, origin: &str) -> ConfigError {
        ConfigError {
            origin: origin.to_owned(),
            location: Some(locate(text, self.span.start)),
            message: self.message,
        }
    }
}

fn problem<T>(span: Range<usize>, message: impl Into<String>) -> Result<T, Problem> {
    Err(Problem {
        span,
        message: message.into(),
    })
}

/// 1-based line and column (counted in characters) of byte `offset` in `text`.
fn locate(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Rewords the TOML/serde messages in the file's own terms ("key", ranges instead of Rust types).
fn toml_message(message: &str, spanned_text: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing required key {rest}");
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if message == "duplicate key" && !spanned_text.is_empty() {
        return format!("duplicate key `{}`", spanned_text.trim());
    }
    for (rust, plain) in [
        ("u16", "an integer from 0 to 65535"),
        ("u32", "an integer from 0 to 4294967295"),
        ("u64", "a non-negative integer"),
        ("usize", "a non-negative integer"),
    ] {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {plain}");
        }
    }
    message.to_owned()
}

fn parse_socket_addr(value: &Spanned<String>, key: &str) -> Result<SocketAddr, Problem> {
    value.get_ref().parse().or_else(|_| {
        problem(
            value.span(),
            format!(
                "invalid {key} address \"{}\": expected IP:port such as \"127.0.0.1:5673\" or \
                 \"[::]:5673\" (host names are not allowed here)",
                value.get_ref()
            ),
        )
    })
}

/// Value of an optional key, or its default.
fn value_or<T: Copy>(key: &Option<Spanned<T>>, default: T) -> T {
    key.as_ref().map_or(default, |v| *v.get_ref())
}

/// Span of an optional key if present, else `fallback`.
fn span_or<T>(key: &Option<Spanned<T>>, fallback: Range<usize>) -> Range<usize> {
    key.as_ref().map_or(fallback, |v| v.span())
}

/// Rejects a present key whose value is below `min`.
fn at_least<T>(key: &Option<Spanned<T>>, name: &str, min: T, why: &str) -> Result<(), Problem>
where
    T: PartialOrd + fmt::Display,
{
    match key {
        Some(v) if *v.get_ref() < min => problem(
            v.span(),
            format!("{name} = {} is too small: {why}", v.get_ref()),
        ),
        _ => Ok(()),
    }
}

fn at_most<T>(key: &Option<Spanned<T>>, name: &str, max: T, why: &str) -> Result<(), Problem>
where
    T: PartialOrd + fmt::Display,
{
    match key {
        Some(v) if *v.get_ref() > max => problem(
            v.span(),
            format!("{name} = {} is too large: {why}", v.get_ref()),
        ),
        _ => Ok(()),
    }
}

impl RawConfig {
    fn validate(self, text: &str, base: Option<&Path>) -> Result<Config, Problem> {
        let Some(listen) = &self.listen else {
            return problem(
                0..0,
                "missing required key `listen` (the AMQP listen address, e.g. \
                 listen = \"127.0.0.1:5673\"); it must come before the first [table]",
            );
        };
        let listen = parse_socket_addr(listen, "listen")?;

        let admin = match &self.admin {
            None => AdminConfig::default(),
            Some(admin) => admin.get_ref().validate(listen)?,
        };
        let timeouts = match &self.timeouts {
            None => Timeouts::default(),
            Some(t) => t.get_ref().validate()?,
        };
        let limits = match &self.limits {
            None => Limits::default(),
            Some(l) => l.get_ref().validate(l.span())?,
        };
        let runtime = match &self.runtime {
            None => Runtime::default(),
            Some(r) => r.get_ref().validate()?,
        };
        let routing = match &self.routing {
            None => crate::route::Rules::default(),
            Some(r) => r.get_ref().validate()?,
        };

        let Some(clusters) = &self.clusters else {
            return problem(
                0..0,
                "no clusters defined: add at least one [[clusters]] table with role = \"shard\"",
            );
        };
        let clusters_span = clusters.span();
        let clusters = validate_clusters(clusters.get_ref(), clusters_span, text, base)?;
        let tls = match &self.tls {
            None => None,
            Some(t) => Some(t.get_ref().validate(t.span(), listen, &admin, base)?),
        };

        Ok(Config {
            listen,
            admin,
            timeouts,
            limits,
            runtime,
            routing,
            clusters,
            tls,
        })
    }
}

impl RawAdmin {
    fn validate(&self, amqp_listen: SocketAddr) -> Result<AdminConfig, Problem> {
        let listen = match &self.listen {
            None => None,
            Some(raw) => {
                let addr = parse_socket_addr(raw, "admin.listen")?;
                if addr == amqp_listen && addr.port() != 0 {
                    return problem(
                        raw.span(),
                        format!("admin.listen {addr} is the same address as listen"),
                    );
                }
                Some(addr)
            }
        };
        let token = match &self.token {
            None => None,
            Some(t) if t.get_ref().is_empty() => {
                return problem(
                    t.span(),
                    "admin.token is empty: remove the key to disable authentication",
                );
            }
            Some(t) => Some(t.get_ref().clone()),
        };
        Ok(AdminConfig { listen, token })
    }
}

impl RawTimeouts {
    fn validate(&self) -> Result<Timeouts, Problem> {
        let heartbeat_why = "heartbeats cannot be disabled, warren needs them to detect dead \
                             peers; use 1 or more seconds";
        at_least(&self.heartbeat_secs, "heartbeat_secs", 1, heartbeat_why)?;
        at_least(
            &self.upstream_heartbeat_secs,
            "upstream_heartbeat_secs",
            1,
            heartbeat_why,
        )?;
        at_least(
            &self.connect_ms,
            "connect_ms",
            1,
            "use 1 or more milliseconds",
        )?;
        at_least(
            &self.handshake_ms,
            "handshake_ms",
            1,
            "use 1 or more milliseconds",
        )?;
        let d = Timeouts::default();
        Ok(Timeouts {
            heartbeat_secs: value_or(&self.heartbeat_secs, d.heartbeat_secs),
            upstream_heartbeat_secs: value_or(
                &self.upstream_heartbeat_secs,
                d.upstream_heartbeat_secs,
            ),
            connect_ms: value_or(&self.connect_ms, d.connect_ms),
            handshake_ms: value_or(&self.handshake_ms, d.handshake_ms),
            shutdown_grace_ms: value_or(&self.shutdown_grace_ms, d.shutdown_grace_ms),
            drain_deadline_secs: value_or(&self.drain_deadline_secs, d.drain_deadline_secs),
            failover_wait_secs: value_or(&self.failover_wait_secs, d.failover_wait_secs),
        })
    }
}

impl RawLimits {
    fn validate(&self, table_span: Range<usize>) -> Result<Limits, Problem> {
        at_least(&self.max_connections, "max_connections", 1, "use 1 or more")?;
        at_least(
            &self.max_channels,
            "max_channels",
            1,
            "use 1 to 65535 (0 would mean \"no limit\" in AMQP)",
        )?;
        at_least(
            &self.frame_max,
            "frame_max",
            MIN_FRAME_MAX,
            "AMQP 0-9-1 requires at least 4096 bytes",
        )?;
        at_least(
            &self.max_message_size,
            "max_message_size",
            1,
            "use 1 or more bytes",
        )?;
        let held_why = "warren stops reading a client at this bound, so 0 would never read one; \
                        use 1 or more bytes";
        at_least(
            &self.max_held_bytes_per_connection,
            "max_held_bytes_per_connection",
            1,
            held_why,
        )?;
        at_least(&self.max_held_bytes, "max_held_bytes", 1, held_why)?;
        if let Some(v) = &self.max_message_size
            && *v.get_ref() > MAX_MESSAGE_SIZE_LIMIT
        {
            return problem(
                v.span(),
                format!(
                    "max_message_size = {} is too large: RabbitMQ accepts at most \
                     {MAX_MESSAGE_SIZE_LIMIT} bytes (512 MiB)",
                    v.get_ref()
                ),
            );
        }
        let d = Limits::default();
        let limits = Limits {
            max_connections: value_or(&self.max_connections, d.max_connections),
            max_connections_per_ip: value_or(
                &self.max_connections_per_ip,
                d.max_connections_per_ip,
            ),
            max_channels: value_or(&self.max_channels, d.max_channels),
            frame_max: value_or(&self.frame_max, d.frame_max),
            max_message_size: value_or(&self.max_message_size, d.max_message_size),
            client_buffer_bytes: value_or(&self.client_buffer_bytes, d.client_buffer_bytes),
            max_held_bytes_per_connection: value_or(
                &self.max_held_bytes_per_connection,
                d.max_held_bytes_per_connection,
            ),
            max_held_bytes: value_or(&self.max_held_bytes, d.max_held_bytes),
            hold_publishes: value_or(&self.hold_publishes, d.hold_publishes),
        };
        if (limits.client_buffer_bytes as u64) < u64::from(limits.frame_max) {
            let span = span_or(
                &self.client_buffer_bytes,
                span_or(&self.frame_max, table_span),
            );
            return problem(
                span,
                format!(
                    "client_buffer_bytes ({}) is smaller than frame_max ({}): the write buffer \
                     must hold at least one full frame",
                    limits.client_buffer_bytes, limits.frame_max
                ),
            );
        }
        Ok(limits)
    }
}

/// A TLS file path: relative paths are taken from `base` (the configuration file's directory).
fn tls_path(value: &Spanned<String>, key: &str, base: Option<&Path>) -> Result<PathBuf, Problem> {
    if value.get_ref().is_empty() {
        return problem(
            value.span(),
            format!("{key} is empty: give the path of a PEM file"),
        );
    }
    let path = Path::new(value.get_ref());
    Ok(match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    })
}

/// The span of the key a TLS load error is about.
fn tls_problem<T>(
    e: crate::tls::LoadError,
    prefix: &str,
    spans: [Option<Range<usize>>; 4],
    fallback: Range<usize>,
) -> Result<T, Problem> {
    use crate::tls::Setting;
    let [cert, key, ca, name] = spans;
    let (span, key_name) = match e.setting {
        Setting::Cert => (cert, "cert_file"),
        Setting::Key => (key, "key_file"),
        Setting::Ca => (
            ca,
            if prefix == "tls." {
                "client_ca_file"
            } else {
                "ca_file"
            },
        ),
        Setting::ServerName => (name, "server_name"),
    };
    problem(
        span.unwrap_or(fallback),
        format!("{prefix}{key_name}: {}", e.message),
    )
}

impl RawServerTls {
    fn validate(
        &self,
        table: Range<usize>,
        amqp_listen: SocketAddr,
        admin: &AdminConfig,
        base: Option<&Path>,
    ) -> Result<crate::tls::ServerTls, Problem> {
        fn required<'a>(
            key: &'a Option<Spanned<String>>,
            table: &Range<usize>,
            name: &str,
            what: &str,
        ) -> Result<&'a Spanned<String>, Problem> {
            match key {
                Some(v) => Ok(v),
                None => problem(
                    table.clone(),
                    format!("[tls] is missing required key `{name}` ({what})"),
                ),
            }
        }
        let listen_raw = required(
            &self.listen,
            &table,
            "listen",
            "the amqps listen address, e.g. \"127.0.0.1:5671\"",
        )?;
        let cert_raw = required(
            &self.cert_file,
            &table,
            "cert_file",
            "PEM certificate chain",
        )?;
        let key_raw = required(&self.key_file, &table, "key_file", "PEM private key")?;
        let listen = parse_socket_addr(listen_raw, "tls.listen")?;
        if listen.port() != 0 {
            if listen == amqp_listen {
                return problem(
                    listen_raw.span(),
                    format!("tls.listen {listen} is the same address as listen"),
                );
            }
            if admin.listen == Some(listen) {
                return problem(
                    listen_raw.span(),
                    format!("tls.listen {listen} is the same address as admin.listen"),
                );
            }
        }
        let cert_file = tls_path(cert_raw, "tls.cert_file", base)?;
        let key_file = tls_path(key_raw, "tls.key_file", base)?;
        let client_ca_file = match &self.client_ca_file {
            None => None,
            Some(v) => Some(tls_path(v, "tls.client_ca_file", base)?),
        };
        crate::tls::ServerTls::load(listen, cert_file, key_file, client_ca_file).or_else(|e| {
            tls_problem(
                e,
                "tls.",
                [
                    Some(cert_raw.span()),
                    Some(key_raw.span()),
                    self.client_ca_file.as_ref().map(|v| v.span()),
                    None,
                ],
                table.clone(),
            )
        })
    }
}

impl RawClientTls {
    fn validate(
        &self,
        table: Range<usize>,
        which: &str,
        nodes: &[NodeAddr],
        base: Option<&Path>,
    ) -> Result<crate::tls::ClientTls, Problem> {
        let Some(ca_raw) = &self.ca_file else {
            return problem(
                table,
                format!(
                    "{which}: tls is missing required key `ca_file` (PEM CA certificates that \
                     sign the nodes' certificates)"
                ),
            );
        };
        let ca_file = tls_path(ca_raw, "tls.ca_file", base)?;
        let client_cert = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((
                tls_path(c, "tls.cert_file", base)?,
                tls_path(k, "tls.key_file", base)?,
            )),
            (Some(c), None) => {
                return problem(
                    c.span(),
                    format!(
                        "{which}: tls.cert_file needs tls.key_file (the client certificate's key)"
                    ),
                );
            }
            (None, Some(k)) => {
                return problem(
                    k.span(),
                    format!("{which}: tls.key_file needs tls.cert_file (the client certificate)"),
                );
            }
        };
        let server_name = match &self.server_name {
            Some(n) if n.get_ref().is_empty() => {
                return problem(
                    n.span(),
                    format!(
                        "{which}: tls.server_name is empty: remove it to check each node's host"
                    ),
                );
            }
            Some(n) => Some(n.get_ref().clone()),
            None => {
                if let Some(node) = nodes
                    .iter()
                    .find(|n| !crate::tls::valid_server_name(&n.host))
                {
                    return problem(
                        table,
                        format!(
                            "{which}: node host \"{}\" cannot be checked against a certificate: \
                             set tls.server_name",
                            node.host
                        ),
                    );
                }
                None
            }
        };
        crate::tls::ClientTls::load(ca_file, server_name, client_cert).or_else(|e| {
            tls_problem(
                e,
                &format!("{which}: tls."),
                [
                    self.cert_file.as_ref().map(|v| v.span()),
                    self.key_file.as_ref().map(|v| v.span()),
                    Some(ca_raw.span()),
                    self.server_name.as_ref().map(|v| v.span()),
                ],
                table.clone(),
            )
        })
    }
}

fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The most clusters a configuration may list: a client connection holds one link per cluster,
/// and the session tracks them in 64-bit sets.
pub const MAX_CLUSTERS: usize = 64;

fn validate_clusters(
    raw: &[Spanned<RawCluster>],
    clusters_span: Range<usize>,
    text: &str,
    base: Option<&Path>,
) -> Result<Vec<ClusterConfig>, Problem> {
    let line_of = |span: &Range<usize>| locate(text, span.start).line;
    // name -> span of its first definition
    let mut names: HashMap<&str, Range<usize>> = HashMap::new();
    // node -> (cluster name, span of its first mention)
    let mut seen_nodes: HashMap<NodeAddr, (String, Range<usize>)> = HashMap::new();
    let mut control: Option<(&str, Range<usize>)> = None;
    let mut clusters = Vec::with_capacity(raw.len());
    if raw.len() > MAX_CLUSTERS {
        return problem(
            clusters_span,
            format!(
                "{} clusters configured: a client connection holds one link per cluster, at most {MAX_CLUSTERS}",
                raw.len()
            ),
        );
    }

    for (index, entry) in raw.iter().enumerate() {
        let c = entry.get_ref();
        let header = entry.span();
        let which = format!("cluster #{}", index + 1);

        let Some(name) = &c.name else {
            return problem(header, format!("{which} is missing required key `name`"));
        };
        if !valid_cluster_name(name.get_ref()) {
            return problem(
                name.span(),
                format!(
                    "invalid cluster name \"{}\": use only ASCII letters, digits, '-', '_' and '.'",
                    name.get_ref()
                ),
            );
        }
        if let Some(first) = names.get(name.get_ref().as_str()) {
            return problem(
                name.span(),
                format!(
                    "duplicate cluster name \"{}\" (first defined at line {})",
                    name.get_ref(),
                    line_of(first)
                ),
            );
        }
        names.insert(name.get_ref(), name.span());
        let which = format!("cluster \"{}\"", name.get_ref());

        let Some(role_raw) = &c.role else {
            return problem(
                header,
                format!("{which} is missing required key `role` (\"shard\" or \"control\")"),
            );
        };
        let role: Role = role_raw
            .get_ref()
            .parse()
            .or_else(|why: String| problem(role_raw.span(), why))?;
        if role == Role::Control {
            if let Some((first, first_span)) = &control {
                return problem(
                    role_raw.span(),
                    format!(
                        "more than one control cluster: \"{}\" and \"{first}\" (line {}); \
                         only one cluster may have role = \"control\"",
                        name.get_ref(),
                        line_of(first_span)
                    ),
                );
            }
            control = Some((name.get_ref(), role_raw.span()));
            if let Some(w) = &c.weight {
                return problem(
                    w.span(),
                    format!("{which}: weight only applies to shard clusters, remove it"),
                );
            }
            if let Some(d) = &c.drain {
                return problem(
                    d.span(),
                    format!("{which}: drain only applies to shard clusters, remove it"),
                );
            }
        }

        let Some(nodes_raw) = &c.nodes else {
            return problem(
                header,
                format!("{which} is missing required key `nodes` (a list of \"host:port\")"),
            );
        };
        if nodes_raw.get_ref().is_empty() {
            return problem(
                nodes_raw.span(),
                format!("{which} has no nodes: list at least one \"host:port\""),
            );
        }
        let mut nodes = Vec::with_capacity(nodes_raw.get_ref().len());
        for node_raw in nodes_raw.get_ref() {
            let node: NodeAddr = node_raw
                .get_ref()
                .parse()
                .or_else(|e: NodeAddrError| problem(node_raw.span(), e.to_string()))?;
            if let Some((other, first)) = seen_nodes.get(&node) {
                let place = if other == name.get_ref() {
                    "earlier in the same cluster".to_owned()
                } else {
                    format!("in cluster \"{other}\"")
                };
                return problem(
                    node_raw.span(),
                    format!(
                        "node {node} is listed twice: already {place} at line {}",
                        line_of(first)
                    ),
                );
            }
            seen_nodes.insert(node.clone(), (name.get_ref().clone(), node_raw.span()));
            nodes.push(node);
        }

        if let Some(w) = &c.weight
            && *w.get_ref() == 0
        {
            return problem(
                w.span(),
                format!("{which}: weight must be at least 1 (use drain = true to stop publishing)"),
            );
        }

        let probe = match &c.probe {
            None => None,
            Some(p) => {
                let p = p.get_ref();
                if p.user.get_ref().is_empty() {
                    return problem(p.user.span(), format!("{which}: probe user is empty"));
                }
                let vhost = match &p.vhost {
                    None => "/".to_owned(),
                    Some(v) if v.get_ref().is_empty() => {
                        return problem(
                            v.span(),
                            format!("{which}: probe vhost is empty (the default vhost is \"/\")"),
                        );
                    }
                    Some(v) => v.get_ref().clone(),
                };
                Some(ProbeCredentials {
                    user: p.user.get_ref().clone(),
                    password: p.password.clone(),
                    vhost,
                })
            }
        };

        let tls = match &c.tls {
            None => None,
            Some(t) => Some(t.get_ref().validate(t.span(), &which, &nodes, base)?),
        };

        clusters.push(ClusterConfig {
            name: name.get_ref().clone(),
            role,
            nodes,
            weight: value_or(&c.weight, 1),
            drain: value_or(&c.drain, false),
            probe,
            tls,
        });
    }

    let mut shards = clusters.iter().filter(|c| c.role == Role::Shard).peekable();
    if shards.peek().is_none() {
        return problem(
            clusters_span,
            "no shard cluster: at least one [[clusters]] entry needs role = \"shard\"",
        );
    }
    if shards.all(|c| c.drain) {
        let first_drain = raw
            .iter()
            .filter_map(|c| c.get_ref().drain.as_ref())
            .find(|d| *d.get_ref())
            .map(|d| d.span())
            .unwrap_or(clusters_span);
        return problem(
            first_drain,
            "every shard cluster has drain = true: published messages would have nowhere to go",
        );
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../proxy.toml");

    /// Smallest valid file; tests append to it or swap pieces of it.
    const MINIMAL: &str = "listen = \"127.0.0.1:5673\"

[[clusters]]
name = \"shard-a\"
role = \"shard\"
nodes = [\"127.0.0.1:5701\", \"127.0.0.1:5702\"]
";

    fn fails(text: &str) -> ConfigError {
        match Config::parse(text, "t.toml") {
            Ok(c) => panic!("expected an error, got {c:?}\n--- input ---\n{text}"),
            Err(e) => e,
        }
    }

    /// Asserts that `text` is rejected at `line` (and `column`, if given) with a message
    /// containing `reason`.
    #[track_caller]
    fn rejects(text: &str, line: usize, column: Option<usize>, reason: &str) {
        let e = fails(text);
        let shown = e.to_string();
        let prefix = match column {
            Some(c) => format!("t.toml:{line}:{c}: "),
            None => format!("t.toml:{line}:"),
        };
        assert!(
            shown.starts_with(&prefix),
            "want prefix {prefix:?}, got {shown:?}"
        );
        assert!(shown.contains(reason), "want {reason:?} in {shown:?}");
        assert_eq!(e.line(), Some(line));
    }

    fn with_cluster(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    #[test]
    fn example_file_is_accepted() {
        let c = Config::parse(EXAMPLE, "proxy.toml").unwrap();
        assert_eq!(c.listen, "127.0.0.1:5673".parse().unwrap());
        assert_eq!(c.admin.listen, Some("127.0.0.1:15673".parse().unwrap()));
        assert_eq!(c.admin.token, None);
        assert_eq!(c.timeouts, Timeouts::default());
        assert_eq!(c.limits, Limits::default());
        let names: Vec<_> = c.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["shard-a", "shard-b", "control"]);
        let shards: Vec<_> = c.shard_clusters().map(|c| c.name.as_str()).collect();
        assert_eq!(shards, ["shard-a", "shard-b"]);
        let control = c.control_cluster().unwrap();
        assert_eq!(control.name, "control");
        assert_eq!(control.role, Role::Control);
        let nodes: Vec<_> = control.nodes.iter().map(ToString::to_string).collect();
        assert_eq!(nodes, ["127.0.0.1:5721", "127.0.0.1:5722"]);
        let a = c.cluster("shard-a").unwrap();
        assert_eq!(
            a.nodes[1],
            NodeAddr {
                host: "127.0.0.1".into(),
                port: 5702
            }
        );
        assert_eq!((a.weight, a.drain, a.probe.is_none()), (1, false, true));
    }

    #[test]
    fn example_file_commented_defaults_match_code_defaults() {
        // Uncommenting the example's optional cluster keys must not change anything.
        let uncommented = EXAMPLE
            .replace("# weight = 1", "weight = 1")
            .replace("# drain = false", "drain = false");
        assert_ne!(uncommented, EXAMPLE);
        assert_eq!(
            Config::parse(&uncommented, "proxy.toml").unwrap(),
            Config::parse(EXAMPLE, "proxy.toml").unwrap()
        );
        // Same for the sections: the example spells out every default.
        let bare = "listen = \"127.0.0.1:5673\"\n[admin]\nlisten = \"127.0.0.1:15673\"\n";
        let clusters = &EXAMPLE[EXAMPLE.find("\n[[clusters]]").unwrap()..];
        assert_eq!(
            Config::parse(&format!("{bare}{clusters}"), "t.toml").unwrap(),
            Config::parse(EXAMPLE, "proxy.toml").unwrap()
        );
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.admin, AdminConfig::default());
        assert_eq!(c.timeouts.heartbeat_secs, 60);
        assert_eq!(c.timeouts.upstream_heartbeat_secs, 30);
        assert_eq!(c.timeouts.connect_ms, 5000);
        assert_eq!(c.timeouts.handshake_ms, 10_000);
        assert_eq!(c.timeouts.shutdown_grace_ms, 5000);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.max_connections_per_ip, 0);
        assert_eq!(c.limits.max_channels, 2047);
        assert_eq!(c.limits.frame_max, 131_072);
        assert_eq!(c.limits.max_message_size, 134_217_728);
        assert_eq!(c.limits.client_buffer_bytes, 4 * 1024 * 1024);
        assert!(c.control_cluster().is_none());
        assert_eq!(c.shard_clusters().count(), 1);
    }

    #[test]
    fn full_file_values_are_read() {
        let text = "listen = \"[::1]:0\"
[admin]
listen = \"0.0.0.0:9000\"
token = \"s3cret\"
[timeouts]
heartbeat_secs = 10
upstream_heartbeat_secs = 5
connect_ms = 100
handshake_ms = 200
shutdown_grace_ms = 0
[limits]
max_connections = 5
max_connections_per_ip = 2
max_channels = 16
frame_max = 4096
max_message_size = 1000
client_buffer_bytes = 4096
[[clusters]]
name = \"s1\"
role = \"shard\"
nodes = [\"rabbit-a1:5672\", \"[fe80::1]:5672\"]
weight = 3
probe = { user = \"u\", password = \"p\" }
[[clusters]]
name = \"s2\"
role = \"shard\"
nodes = [\"rabbit-b1:5672\"]
drain = true
probe = { user = \"u\", password = \"\", vhost = \"prod\" }
";
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(c.listen, "[::1]:0".parse().unwrap());
        assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(
            c.timeouts,
            Timeouts {
                heartbeat_secs: 10,
                upstream_heartbeat_secs: 5,
                connect_ms: 100,
                handshake_ms: 200,
                shutdown_grace_ms: 0,
                drain_deadline_secs: 300,
                failover_wait_secs: 30,
            }
        );
        assert_eq!(c.timeouts.connect(), Duration::from_millis(100));
        assert_eq!(
            c.limits,
            Limits {
                max_connections: 5,
                max_connections_per_ip: 2,
                max_channels: 16,
                frame_max: 4096,
                max_message_size: 1000,
                client_buffer_bytes: 4096,
                max_held_bytes_per_connection: 64 * 1024 * 1024,
                max_held_bytes: 1024 * 1024 * 1024,
                hold_publishes: true,
            }
        );
        let s1 = &c.clusters[0];
        assert_eq!(s1.weight, 3);
        assert_eq!(s1.nodes[0].to_string(), "rabbit-a1:5672");
        assert_eq!(s1.nodes[1].host, "fe80::1");
        assert_eq!(s1.nodes[1].to_string(), "[fe80::1]:5672");
        assert_eq!(s1.probe.as_ref().unwrap().vhost, "/");
        let s2 = &c.clusters[1];
        assert!(s2.drain);
        assert_eq!(s2.probe.as_ref().unwrap().vhost, "prod");
        // Secrets do not leak through Debug.
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn clusters_as_inline_array_are_accepted() {
        let text = "listen = \"127.0.0.1:5673\"
clusters = [{ name = \"a\", role = \"shard\", nodes = [\"h:1\"] }]
";
        assert_eq!(Config::parse(text, "t.toml").unwrap().clusters[0].name, "a");
    }

    // --- syntax, unknown keys, types -----------------------------------------------------

    #[test]
    fn rejects_more_clusters_than_a_connection_holds_links_for() {
        let mut text = String::from("listen = \"127.0.0.1:5673\"\n");
        for i in 0..=MAX_CLUSTERS {
            text.push_str(&format!(
                "[[clusters]]\nname = \"s{i}\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:{}\"]\n",
                6000 + i
            ));
        }
        let err = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains("65 clusters configured"), "{err}");
        let at_most: String = text
            .split("[[clusters]]")
            .take(MAX_CLUSTERS + 1)
            .collect::<Vec<_>>()
            .join("[[clusters]]");
        Config::parse(&at_most, "t.toml").expect("64 clusters are fine");
    }

    #[test]
    fn rejects_syntax_error() {
        rejects(
            "listen = \"127.0.0.1:5673\"\nfoo = bar\n",
            2,
            Some(7),
            "must be quoted",
        );
        rejects("listen = \"127.0.0.1:5673\n", 1, None, "t.toml:1:");
    }

    #[test]
    fn rejects_duplicate_key() {
        rejects(
            "listen = \"127.0.0.1:5673\"\nlisten = \"127.0.0.1:5674\"\n",
            2,
            Some(1),
            "duplicate key `listen`",
        );
    }

    #[test]
    fn rejects_unknown_top_level_key() {
        rejects(
            &format!("lisen = \"x\"\n{MINIMAL}"),
            1,
            Some(1),
            "unknown key `lisen`",
        );
    }

    #[test]
    fn rejects_unknown_keys_in_every_table() {
        rejects(
            &with_cluster("\n[admin]\nport = 1\n"),
            9,
            Some(1),
            "unknown key `port`",
        );
        rejects(
            &with_cluster("\n[timeouts]\nconnect = 1\n"),
            9,
            Some(1),
            "unknown key `connect`",
        );
        rejects(
            &with_cluster("\n[limits]\nmax_conn = 1\n"),
            9,
            Some(1),
            "unknown key `max_conn`",
        );
        rejects(
            &with_cluster("wieght = 2\n"),
            7,
            Some(1),
            "unknown key `wieght`",
        );
        rejects(
            &with_cluster("probe = { user = \"u\", password = \"p\", vhsot = \"/\" }\n"),
            7,
            Some(39),
            "unknown key `vhsot`",
        );
        rejects(
            &with_cluster("\n[log]\nlevel = \"info\"\n"),
            8,
            Some(2),
            "unknown key `log`",
        );
    }

    #[test]
    fn rejects_wrong_types() {
        rejects("listen = 5673\n", 1, Some(10), "expected a string");
        rejects(
            &with_cluster("\n[timeouts]\nconnect_ms = \"5s\"\n"),
            9,
            Some(14),
            "invalid type: string \"5s\", expected a non-negative integer",
        );
        rejects(
            &with_cluster("drain = \"yes\"\n"),
            7,
            Some(9),
            "expected a boolean",
        );
        rejects(
            "listen = \"127.0.0.1:5673\"\nclusters = 3\n",
            2,
            Some(12),
            "expected a sequence",
        );
    }

    #[test]
    fn rejects_out_of_range_integers() {
        rejects(
            &with_cluster("\n[timeouts]\nheartbeat_secs = 70000\n"),
            9,
            Some(18),
            "expected an integer from 0 to 65535",
        );
        rejects(
            &with_cluster("\n[limits]\nmax_connections = -1\n"),
            9,
            Some(19),
            "expected a non-negative integer",
        );
    }

    // --- required keys ------------------------------------------------------------------------

    #[test]
    fn rejects_missing_listen() {
        rejects(
            &MINIMAL.replace("listen = \"127.0.0.1:5673\"", ""),
            1,
            Some(1),
            "`listen`",
        );
    }

    #[test]
    fn rejects_missing_clusters() {
        rejects(
            "listen = \"127.0.0.1:5673\"\n",
            1,
            Some(1),
            "no clusters defined",
        );
    }

    #[test]
    fn rejects_missing_cluster_keys() {
        let body = "listen = \"127.0.0.1:5673\"\n\n[[clusters]]\n";
        rejects(
            &format!("{body}role = \"shard\"\nnodes = [\"h:1\"]\n"),
            3,
            Some(1),
            "cluster #1 is missing required key `name`",
        );
        rejects(
            &format!("{body}name = \"a\"\nnodes = [\"h:1\"]\n"),
            3,
            Some(1),
            "cluster \"a\" is missing required key `role`",
        );
        rejects(
            &format!("{body}name = \"a\"\nrole = \"shard\"\n"),
            3,
            Some(1),
            "cluster \"a\" is missing required key `nodes`",
        );
        rejects(
            &with_cluster("probe = { user = \"u\" }\n"),
            7,
            Some(9),
            "missing required key `password`",
        );
    }

    // --- addresses -------------------------------------------------------------------------

    #[test]
    fn rejects_bad_listen_addresses() {
        let bad = |addr: &str| MINIMAL.replace("127.0.0.1:5673", addr);
        rejects(
            &bad("localhost:5673"),
            1,
            Some(10),
            "invalid listen address \"localhost:5673\"",
        );
        rejects(&bad("127.0.0.1"), 1, Some(10), "expected IP:port");
        rejects(
            &with_cluster("\n[admin]\nlisten = \"127.0.0.1\"\n"),
            9,
            Some(10),
            "invalid admin.listen address",
        );
        rejects(
            &with_cluster("\n[admin]\nlisten = \"127.0.0.1:5673\"\n"),
            9,
            Some(10),
            "same address as listen",
        );
    }

    #[test]
    fn rejects_bad_node_addresses() {
        let bad = |node: &str| MINIMAL.replace("127.0.0.1:5702", node);
        rejects(&bad("127.0.0.1"), 6, Some(28), "missing port");
        rejects(&bad("rabbit:0"), 6, Some(28), "port 0 is not allowed");
        rejects(&bad("rabbit:99999"), 6, Some(28), "bad port \"99999\"");
        rejects(&bad("rabbit:"), 6, Some(28), "bad port \"\"");
        rejects(&bad(":5672"), 6, Some(28), "empty host");
        rejects(
            &bad("::1:5672"),
            6,
            Some(28),
            "IPv6 addresses must be in brackets",
        );
        rejects(
            &bad("[nope]:5672"),
            6,
            Some(28),
            "\"nope\" is not an IPv6 address",
        );
        rejects(
            &bad("rab bit:5672"),
            6,
            Some(28),
            "not allowed in a host name",
        );
        rejects(&bad(""), 6, Some(28), "expected \"host:port\"");
    }

    #[test]
    fn node_addr_round_trips() {
        for s in [
            "rabbit-a1:5672",
            "10.0.0.1:1",
            "[::1]:5672",
            "a_b.example.com:65535",
        ] {
            assert_eq!(s.parse::<NodeAddr>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_no_nodes() {
        rejects(
            &MINIMAL.replace("[\"127.0.0.1:5701\", \"127.0.0.1:5702\"]", "[]"),
            6,
            Some(9),
            "cluster \"shard-a\" has no nodes",
        );
    }

    #[test]
    fn rejects_duplicate_nodes() {
        rejects(
            &MINIMAL.replace("127.0.0.1:5702", "127.0.0.1:5701"),
            6,
            Some(28),
            "node 127.0.0.1:5701 is listed twice: already earlier in the same cluster at line 6",
        );
        rejects(
            &with_cluster(
                "\n[[clusters]]\nname = \"b\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:5702\"]\n",
            ),
            11,
            Some(10),
            "already in cluster \"shard-a\" at line 6",
        );
    }

    // --- clusters ---------------------------------------------------------------------------

    #[test]
    fn rejects_duplicate_cluster_name() {
        rejects(
            &with_cluster(
                "\n[[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [\"h:1\"]\n",
            ),
            9,
            Some(8),
            "duplicate cluster name \"shard-a\" (first defined at line 4)",
        );
    }

    #[test]
    fn rejects_bad_cluster_names() {
        rejects(
            &MINIMAL.replace("\"shard-a\"", "\"\""),
            4,
            Some(8),
            "invalid cluster name \"\"",
        );
        rejects(
            &MINIMAL.replace("\"shard-a\"", "\"shard a\""),
            4,
            Some(8),
            "invalid cluster name \"shard a\"",
        );
    }

    #[test]
    fn rejects_unknown_role() {
        rejects(
            &MINIMAL.replace("\"shard\"", "\"primary\""),
            5,
            Some(8),
            "invalid role \"primary\": expected \"shard\" or \"control\"",
        );
    }

    #[test]
    fn rejects_two_control_clusters() {
        let text = with_cluster(
            "
[[clusters]]
name = \"c1\"
role = \"control\"
nodes = [\"h:1\"]

[[clusters]]
name = \"c2\"
role = \"control\"
nodes = [\"h:2\"]
",
        );
        rejects(
            &text,
            15,
            Some(8),
            "more than one control cluster: \"c2\" and \"c1\" (line 10)",
        );
    }

    #[test]
    fn rejects_no_shard_cluster() {
        rejects(
            &MINIMAL.replace("\"shard\"", "\"control\""),
            3,
            Some(1),
            "no shard cluster",
        );
        rejects(
            "listen = \"127.0.0.1:5673\"\nclusters = []\n",
            2,
            Some(12),
            "no shard cluster",
        );
    }

    #[test]
    fn accepts_no_control_cluster() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert!(c.control_cluster().is_none());
    }

    #[test]
    fn rejects_zero_weight() {
        rejects(
            &with_cluster("weight = 0\n"),
            7,
            Some(10),
            "weight must be at least 1",
        );
    }

    #[test]
    fn rejects_shard_only_keys_on_control() {
        let control = "\n[[clusters]]\nname = \"c\"\nrole = \"control\"\nnodes = [\"h:1\"]\n";
        rejects(
            &with_cluster(&format!("{control}weight = 2\n")),
            12,
            Some(10),
            "weight only applies to shard clusters",
        );
        rejects(
            &with_cluster(&format!("{control}drain = true\n")),
            12,
            Some(9),
            "drain only applies to shard clusters",
        );
    }

    #[test]
    fn rejects_all_shards_draining() {
        rejects(
            &with_cluster("drain = true\n"),
            7,
            Some(9),
            "every shard cluster has drain = true",
        );
        let two = with_cluster(
            "drain = true\n\n[[clusters]]\nname = \"b\"\nrole = \"shard\"\nnodes = [\"h:1\"]\n",
        );
        assert!(Config::parse(&two, "t.toml").is_ok());
    }

    #[test]
    fn rejects_bad_probe() {
        rejects(
            &with_cluster("probe = { user = \"\", password = \"p\" }\n"),
            7,
            Some(18),
            "probe user is empty",
        );
        rejects(
            &with_cluster("probe = { user = \"u\", password = \"p\", vhost = \"\" }\n"),
            7,
            Some(47),
            "probe vhost is empty",
        );
    }

    // --- sections with limits -------------------------------------------------------------

    #[test]
    fn rejects_zero_heartbeats() {
        rejects(
            &with_cluster("\n[timeouts]\nheartbeat_secs = 0\n"),
            9,
            Some(18),
            "heartbeat_secs = 0 is too small: heartbeats cannot be disabled",
        );
        rejects(
            &with_cluster("\n[timeouts]\nupstream_heartbeat_secs = 0\n"),
            9,
            Some(27),
            "upstream_heartbeat_secs = 0 is too small",
        );
    }

    #[test]
    fn rejects_zero_timeouts() {
        rejects(
            &with_cluster("\n[timeouts]\nconnect_ms = 0\n"),
            9,
            Some(14),
            "connect_ms = 0",
        );
        rejects(
            &with_cluster("\n[timeouts]\nhandshake_ms = 0\n"),
            9,
            Some(16),
            "handshake_ms = 0",
        );
    }

    #[test]
    fn rejects_bad_limits() {
        let limits = |body: &str| with_cluster(&format!("\n[limits]\n{body}\n"));
        rejects(
            &limits("frame_max = 1024"),
            9,
            Some(13),
            "frame_max = 1024 is too small: AMQP 0-9-1 requires at least 4096 bytes",
        );
        rejects(
            &limits("max_connections = 0"),
            9,
            Some(19),
            "max_connections = 0 is too small",
        );
        rejects(
            &limits("max_channels = 0"),
            9,
            Some(16),
            "max_channels = 0 is too small",
        );
        rejects(
            &limits("max_message_size = 0"),
            9,
            Some(20),
            "max_message_size = 0",
        );
        rejects(
            &limits("max_message_size = 1000000000"),
            9,
            Some(20),
            "max_message_size = 1000000000 is too large",
        );
        rejects(
            &limits("client_buffer_bytes = 65536"),
            9,
            Some(23),
            "client_buffer_bytes (65536) is smaller than frame_max (131072)",
        );
        rejects(
            &limits("frame_max = 8388608"),
            9,
            Some(13),
            "client_buffer_bytes (4194304) is smaller than frame_max (8388608)",
        );
    }

    #[test]
    fn runtime_section() {
        let c = Config::parse(&with_cluster(""), "t.toml").unwrap();
        assert_eq!(c.runtime, Runtime::default());
        assert!(c.runtime.busy_poll().is_zero());
        let c = Config::parse(
            &with_cluster("\n[runtime]\nworker_threads = 3\nbusy_poll_us = 2500\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.runtime.worker_threads, 3);
        assert_eq!(c.runtime.busy_poll(), Duration::from_micros(2500));
        rejects(
            &with_cluster("\n[runtime]\nworker_threads = 100000\n"),
            9,
            Some(18),
            "worker_threads = 100000 is too large",
        );
        rejects(
            &with_cluster("\n[runtime]\nbusy_poll_us = 5000000\n"),
            9,
            Some(16),
            "busy_poll_us = 5000000 is too large",
        );
    }

    #[test]
    fn rejects_empty_admin_token() {
        rejects(
            &with_cluster("\n[admin]\ntoken = \"\"\n"),
            9,
            Some(9),
            "admin.token is empty",
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        rejects(
            &MINIMAL.replace("\"shard-a\"", "\"shärd\"\n# ünïcode\nfoo = 1"),
            6,
            Some(1),
            "unknown key `foo`",
        );
        assert_eq!(locate("é = x", 4), Location { line: 1, column: 4 });
    }

    #[test]
    fn load_reports_missing_file() {
        let e = Config::load(Path::new("/nonexistent/warren.toml")).unwrap_err();
        assert_eq!(e.location(), None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/warren.toml: cannot read"),
            "{e}"
        );
    }

    // --- tls ------------------------------------------------------------------------------

    #[test]
    fn rejects_incomplete_or_misplaced_tls_settings() {
        let tls = |body: &str| with_cluster(&format!("\n[tls]\n{body}\n"));
        rejects(
            &tls("cert_file = \"c.pem\"\nkey_file = \"k.pem\""),
            8,
            Some(1),
            "[tls] is missing required key `listen`",
        );
        rejects(
            &tls("listen = \"127.0.0.1:5671\"\nkey_file = \"k.pem\""),
            8,
            Some(1),
            "[tls] is missing required key `cert_file`",
        );
        rejects(
            &tls("listen = \"127.0.0.1:5671\"\ncert_file = \"c.pem\""),
            8,
            Some(1),
            "[tls] is missing required key `key_file`",
        );
        rejects(
            &tls("listen = \"127.0.0.1:5673\"\ncert_file = \"c\"\nkey_file = \"k\""),
            9,
            Some(10),
            "tls.listen 127.0.0.1:5673 is the same address as listen",
        );
        rejects(
            &tls("listen = \"127.0.0.1:5671\"\ncert_file = \"\"\nkey_file = \"k\""),
            10,
            Some(13),
            "tls.cert_file is empty",
        );
        rejects(
            &tls("listen = \"127.0.0.1:5671\"\ncertfile = \"c\""),
            10,
            Some(1),
            "unknown key `certfile`",
        );
        rejects(
            &with_cluster("tls = { server_name = \"rabbit\" }\n"),
            7,
            Some(7),
            "cluster \"shard-a\": tls is missing required key `ca_file`",
        );
        rejects(
            &with_cluster("tls = { ca_file = \"ca.pem\", key_file = \"k.pem\" }\n"),
            7,
            Some(40),
            "tls.key_file needs tls.cert_file",
        );
        // A node host that is no DNS name cannot be checked against a certificate.
        rejects(
            &with_cluster("tls = { ca_file = \"ca.pem\" }\n")
                .replace("127.0.0.1:5702", "a..b:5702"),
            7,
            Some(7),
            "node host \"a..b\" cannot be checked against a certificate: set tls.server_name",
        );
    }

    /// A self-signed certificate and its key, PEM.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_files_are_read_relative_to_the_config_file_and_compared_by_content() {
        let dir = std::env::temp_dir().join(format!("warren-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let (cert, key) = self_signed();
        std::fs::write(dir.join("certs/server.pem"), &cert).unwrap();
        std::fs::write(dir.join("certs/server.key"), &key).unwrap();
        let text = format!(
            "{MINIMAL}tls = {{ ca_file = \"certs/server.pem\", server_name = \"localhost\" }}\n\
             \n[tls]\nlisten = \"127.0.0.1:5671\"\ncert_file = \"certs/server.pem\"\n\
             key_file = \"certs/server.key\"\nclient_ca_file = \"certs/server.pem\"\n"
        );
        let path = dir.join("proxy.toml");
        std::fs::write(&path, &text).unwrap();

        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.listen, "127.0.0.1:5671".parse().unwrap());
        assert_eq!(tls.cert_file, dir.join("certs/server.pem"));
        assert!(tls.verifies_clients());
        let up = c.clusters[0].tls.as_ref().unwrap();
        assert_eq!(up.ca_file, dir.join("certs/server.pem"));
        assert_eq!(up.server_name.as_deref(), Some("localhost"));
        assert_eq!((up.cert_file.as_ref(), up.key_file.as_ref()), (None, None));
        // Paths only in Debug, never the key.
        let debug = format!("{c:?}");
        assert!(
            debug.contains("server.key") && !debug.contains("PRIVATE KEY"),
            "{debug}"
        );

        // Config::parse reads relative paths from the working directory instead.
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("cannot read certs/server.pem"), "{e}");

        // Same files: equal. A renewed certificate at the same path: a change to reload.
        assert_eq!(Config::load(&path).unwrap(), c);
        let (cert2, key2) = self_signed();
        std::fs::write(dir.join("certs/server.pem"), &cert2).unwrap();
        std::fs::write(dir.join("certs/server.key"), &key2).unwrap();
        let renewed = Config::load(&path).unwrap();
        assert_ne!(renewed.tls, c.tls);
        assert_ne!(renewed.clusters[0], c.clusters[0]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
#[path = "config_doc_drift.rs"]
mod doc_drift;
