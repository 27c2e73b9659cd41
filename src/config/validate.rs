//! Validation: from the raw, span-carrying file (`raw.rs`) to the public [`Config`].
//!
//! Each `Raw*` table has a `validate` method that checks its values and builds its public
//! counterpart; the rules that span several clusters (unique names and nodes, at most one
//! control cluster, at least one shard that is not draining, at most [`MAX_CLUSTERS`]) are in
//! `validate_clusters`. TLS certificates and keys are read here too, so a file that validates
//! can be served.
//!
//! The first error stops validation and is returned as a [`Problem`]: a byte span and a reason.
//! Spans are what the raw values carry; the caller, which has the text and the file name, turns
//! the problem into a [`ConfigError`] with a line and column.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::error::{ConfigError, locate};
use super::raw::{
    RawAdmin, RawClientTls, RawCluster, RawConfig, RawLimits, RawManagement, RawRouting, RawRule,
    RawRuntime, RawServerTls, RawTimeouts,
};
use super::{
    AdminConfig, ClusterConfig, Config, Limits, MAX_CLUSTERS, MAX_MESSAGE_SIZE_LIMIT,
    MIN_FRAME_MAX, ManagementConfig, ManagementTls, ManagementUrl, NodeAddr, NodeAddrError,
    ProbeCredentials, Role, Runtime, Timeouts,
};

/// `[runtime] worker_threads` ceiling: far above any useful count, low enough that a typo
/// (an extra zero or two) is caught instead of starting thousands of threads.
const MAX_WORKER_THREADS: usize = 1024;

/// `[runtime] busy_poll_us` ceiling: spinning longer than a second after the last frame is
/// burning a core, not lowering latency.
const MAX_BUSY_POLL_US: u64 = 1_000_000;

/// An error before it knows its file: a byte span and a reason.
pub(super) struct Problem {
    pub(super) span: Range<usize>,
    pub(super) message: String,
}

impl Problem {
    pub(super) fn into_error(self, text: &str, origin: &str) -> ConfigError {
        ConfigError::at(origin, text, self.span.start, self.message)
    }
}

fn problem<T>(span: Range<usize>, message: impl Into<String>) -> Result<T, Problem> {
    Err(Problem {
        span,
        message: message.into(),
    })
}

fn parse_socket_addr(value: &Spanned<String>, key: &str) -> Result<SocketAddr, Problem> {
    // An IP with an all-digit port that does not fit: say so, not "host names are not allowed".
    if let Some((host, port)) = value.get_ref().rsplit_once(':')
        && host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok()
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_err()
    {
        return problem(
            value.span(),
            format!(
                "invalid {key} address \"{}\": port {port} is out of range (1-65535, or 0 for \
                 any free port)",
                value.get_ref()
            ),
        );
    }
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
    pub(super) fn validate(self, text: &str, base: Option<&Path>) -> Result<Config, Problem> {
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
        if let Some(r) = &self.routing {
            check_rule_clusters(r.get_ref(), &clusters)?;
        }
        let tls = match &self.tls {
            None => None,
            Some(t) => Some(t.get_ref().validate(t.span(), listen, &admin, base)?),
        };

        let state_dir = match &self.state_dir {
            None => None,
            Some(d) if d.get_ref().trim().is_empty() => {
                return problem(
                    d.span(),
                    "state_dir is empty: leave it out to use the configuration file's directory",
                );
            }
            Some(d) => {
                let path = std::path::PathBuf::from(d.get_ref());
                Some(match base {
                    Some(base) if path.is_relative() => base.join(path),
                    _ => path,
                })
            }
        };

        Ok(Config {
            listen,
            state_dir,
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
            client_write_timeout_secs: value_or(
                &self.client_write_timeout_secs,
                d.client_write_timeout_secs,
            ),
        })
    }
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

impl RawRouting {
    fn validate(&self) -> Result<crate::route::Rules, Problem> {
        use crate::route::Rules;
        let defaults = Rules::default();
        let patterns = route_patterns;
        let mut rules = Vec::new();
        for raw in self.rules.iter().flatten() {
            rules.push(raw.get_ref().validate(raw.span())?);
        }
        Ok(Rules {
            control_exchanges: patterns(&self.control_exchanges, defaults.control_exchanges)?,
            control_queues: patterns(&self.control_queues, defaults.control_queues)?,
            uuid_queues_are_control: self
                .uuid_queues_are_control
                .unwrap_or(defaults.uuid_queues_are_control),
            rules,
        })
    }
}

impl RawRule {
    fn validate(&self, span: Range<usize>) -> Result<crate::route::Rule, Problem> {
        use crate::route::{Rule, Spread};
        let matched = route_patterns(&self.patterns, Vec::new())?;
        if matched.is_empty() {
            return problem(
                span,
                "a [[routing.rules]] entry needs `match`: one or more exchange or queue name patterns",
            );
        }
        let clusters = match &self.clusters {
            None => None,
            Some(list) if list.get_ref().is_empty() => {
                return problem(
                    list.span(),
                    "`clusters` of a routing rule must name at least one shard cluster \
                     (leave it out for all of them)",
                );
            }
            Some(list) => Some(list.get_ref().iter().map(|c| c.get_ref().clone()).collect()),
        };
        let spread = match &self.spread {
            None => Spread::default(),
            Some(s) => Spread::parse(s.get_ref()).map_or_else(
                || {
                    problem(
                        s.span(),
                        format!(
                            "spread = {:?} is not one of \"message\", \"channel\", \"key\"",
                            s.get_ref()
                        ),
                    )
                },
                Ok,
            )?,
        };
        Ok(Rule {
            patterns: matched,
            clusters,
            spread,
        })
    }
}

/// A list of routing patterns, or `default` when the key is absent.
fn route_patterns(
    list: &Option<Vec<Spanned<String>>>,
    default: Vec<crate::route::Pattern>,
) -> Result<Vec<crate::route::Pattern>, Problem> {
    let Some(list) = list else { return Ok(default) };
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        if p.get_ref().is_empty() || p.get_ref().len() > 255 {
            return problem(p.span(), "a routing pattern must be 1 to 255 bytes long");
        }
        out.push(crate::route::Pattern::new(p.get_ref().clone()));
    }
    Ok(out)
}

/// Every cluster a routing rule names must be a shard cluster of the file.
fn check_rule_clusters(raw: &RawRouting, clusters: &[ClusterConfig]) -> Result<(), Problem> {
    for rule in raw.rules.iter().flatten() {
        for name in rule.get_ref().clusters.iter().flat_map(|l| l.get_ref()) {
            match clusters.iter().find(|c| c.name == *name.get_ref()) {
                Some(c) if c.role == Role::Shard => {}
                Some(_) => {
                    return problem(
                        name.span(),
                        format!(
                            "routing rule names cluster {:?}, which is the control cluster; rules place sharded publishes on shard clusters",
                            name.get_ref()
                        ),
                    );
                }
                None => {
                    return problem(
                        name.span(),
                        format!(
                            "routing rule names cluster {:?}, which is not defined",
                            name.get_ref()
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

impl RawLimits {
    fn validate(&self, table_span: Range<usize>) -> Result<Limits, Problem> {
        at_least(&self.max_connections, "max_connections", 1, "use 1 or more")?;
        at_least(
            &self.evacuate_rate,
            "evacuate_rate",
            1,
            "messages per second, 1 or more (to pause an evacuation, undo it)",
        )?;
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
            lazy_links: value_or(&self.lazy_links, d.lazy_links),
            idle_link_secs: value_or(&self.idle_link_secs, d.idle_link_secs),
            evacuate_rate: value_or(&self.evacuate_rate, d.evacuate_rate),
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

impl RawManagement {
    fn validate(
        &self,
        table: Range<usize>,
        which: &str,
        base: Option<&Path>,
    ) -> Result<ManagementConfig, Problem> {
        let required = |key: &Option<Spanned<String>>, name: &str, what: &str| match key {
            Some(v) => Ok(v.clone()),
            None => problem(
                table.clone(),
                format!("{which}: management is missing required key `{name}` ({what})"),
            ),
        };
        let url_raw = required(
            &self.url,
            "url",
            "the management API's base URL, e.g. \"http://rabbit-1:15672\"",
        )?;
        let url = management_url(&url_raw, which)?;
        let user = required(
            &self.user,
            "user",
            "a management user allowed to list queues",
        )?;
        if user.get_ref().is_empty() {
            return problem(user.span(), format!("{which}: management.user is empty"));
        }
        let password = required(&self.password, "password", "the user's password")?;
        let vhosts = match &self.vhosts {
            None => vec!["/".to_owned()],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return problem(
                        list.span(),
                        format!(
                            "{which}: management.vhosts is empty: list at least one vhost \
                             (leave the key out for [\"/\"])"
                        ),
                    );
                }
                let mut out: Vec<String> = Vec::with_capacity(list.get_ref().len());
                for v in list.get_ref() {
                    if v.get_ref().is_empty() {
                        return problem(
                            v.span(),
                            format!(
                                "{which}: an empty vhost name in management.vhosts (the default \
                                 vhost is \"/\")"
                            ),
                        );
                    }
                    if out.contains(v.get_ref()) {
                        return problem(
                            v.span(),
                            format!(
                                "{which}: vhost {:?} is listed twice in management.vhosts",
                                v.get_ref()
                            ),
                        );
                    }
                    out.push(v.get_ref().clone());
                }
                out
            }
        };
        let insecure = self.insecure_skip_verify.as_ref().filter(|v| *v.get_ref());
        let tls = match (url.https, &self.ca_file, insecure) {
            (false, Some(ca), _) => {
                return problem(
                    ca.span(),
                    format!(
                        "{which}: management.ca_file only applies to an https url (the url is \
                         {url})"
                    ),
                );
            }
            (false, None, Some(v)) => {
                return problem(
                    v.span(),
                    format!(
                        "{which}: management.insecure_skip_verify only applies to an https url \
                         (the url is {url})"
                    ),
                );
            }
            (false, None, None) => None,
            (true, Some(_), Some(v)) => {
                return problem(
                    v.span(),
                    format!(
                        "{which}: management.ca_file and insecure_skip_verify = true contradict \
                         each other: keep one"
                    ),
                );
            }
            (true, Some(ca), None) => {
                let path = tls_path(ca, "management.ca_file", base)?;
                let tls = crate::tls::ClientTls::load(path, None, None).or_else(|e| {
                    tls_problem(
                        e,
                        &format!("{which}: management."),
                        [None, None, Some(ca.span()), None],
                        ca.span(),
                    )
                })?;
                Some(ManagementTls::Verify(tls))
            }
            (true, None, Some(_)) => Some(ManagementTls::InsecureSkipVerify),
            (true, None, None) => {
                return problem(
                    url_raw.span(),
                    format!(
                        "{which}: management.url is https: give management.ca_file (PEM CA \
                         certificates that sign the API's certificate), or set \
                         insecure_skip_verify = true to accept any certificate"
                    ),
                );
            }
        };
        Ok(ManagementConfig {
            url,
            user: user.get_ref().clone(),
            password: password.get_ref().clone(),
            vhosts,
            tls,
        })
    }
}

/// `http[s]://host[:port][/prefix]`, without credentials, query or fragment.
fn management_url(raw: &Spanned<String>, which: &str) -> Result<ManagementUrl, Problem> {
    let text = raw.get_ref().as_str();
    let bad = |why: &str| -> Result<ManagementUrl, Problem> {
        problem(
            raw.span(),
            format!("{which}: invalid management.url {text:?}: {why}"),
        )
    };
    let Ok(uri) = text.parse::<hyper::Uri>() else {
        return bad("expected a URL such as \"http://rabbit-1:15672\"");
    };
    let https = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => false,
        Some(s) if s.eq_ignore_ascii_case("https") => true,
        Some(_) => return bad("the scheme must be http or https"),
        None => return bad("it needs http:// or https:// in front"),
    };
    let Some(authority) = uri.authority() else {
        return bad("no host");
    };
    if authority.as_str().contains('@') {
        return bad("no credentials in the URL: use management.user and management.password");
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return bad("no host");
    }
    // The text after the host's last ':' (an IPv6 host is in brackets).
    let after_host = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, p)| p);
    let port = match after_host.rsplit_once(':').map(|(_, p)| p) {
        None if https => 443,
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(0) => return bad("port 0"),
            Ok(p) => p,
            Err(_) => return bad("the port must be a number from 1 to 65535"),
        },
    };
    if uri.query().is_some() || text.contains('#') {
        return bad("no query string or fragment: the base URL of the API only");
    }
    Ok(ManagementUrl {
        https,
        host,
        port,
        prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

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
            if let Some(e) = &c.evacuate {
                return problem(
                    e.span(),
                    format!(
                        "{which}: evacuate only applies to shard clusters (the control cluster's \
                         messages have nowhere else to go), remove it"
                    ),
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
        let management = match &c.management {
            None => None,
            Some(m) => Some(m.get_ref().validate(m.span(), &which, base)?),
        };

        clusters.push(ClusterConfig {
            name: name.get_ref().clone(),
            role,
            nodes,
            weight: value_or(&c.weight, 1),
            // Evacuating implies draining: no new publishes go where messages are moved from.
            drain: value_or(&c.drain, false) || value_or(&c.evacuate, false),
            evacuate: value_or(&c.evacuate, false),
            spread_links: value_or(&c.spread_links, false),
            probe,
            tls,
            management,
        });
    }

    let mut shards = clusters.iter().filter(|c| c.role == Role::Shard).peekable();
    if shards.peek().is_none() {
        return problem(
            clusters_span,
            "no shard cluster: at least one [[clusters]] entry needs role = \"shard\"",
        );
    }
    if clusters
        .iter()
        .filter(|c| c.role == Role::Shard)
        .all(|c| c.evacuate)
    {
        let first = raw
            .iter()
            .filter_map(|c| c.get_ref().evacuate.as_ref())
            .find(|e| *e.get_ref())
            .map(|e| e.span())
            .unwrap_or(clusters_span);
        return problem(
            first,
            "every shard cluster has evacuate = true: their messages would have nowhere to go; \
             keep at least one shard cluster to move them to",
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
