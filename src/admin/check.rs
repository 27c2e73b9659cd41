//! `warren check-queues`: one Nagios/Sensu plugin line about queue depths.
//!
//! ```text
//! QUEUES CRITICAL - celery=1200 (>= 1000) | 'celery'=1200;500;1000;0; 'celery@shard-a'=610;;;0; 'celery@shard-b'=590;;;0;
//! ```
//!
//! A queue named with `--queue NAME` is asked on every shard cluster of the configuration with a
//! passive `queue.declare` (no matter which warren declared it, or whether one runs). A pattern
//! is matched against every queue of the shard clusters when each of them has a `management`
//! API in the configuration (the check lists them itself); otherwise patterns, like the default
//! set, come from the admin endpoint's `/queues`, which lists the queues declared through that
//! warren since it started, and those the clusters with `management` list (the OK line says
//! which set it is).
//!
//! Exit codes follow the plugin convention: 0 OK, 1 WARNING, 2 CRITICAL (a queue at or above
//! `--critical`, or a named queue that no shard cluster has), 3 UNKNOWN (the admin endpoint or
//! the clusters cannot be asked, a depth could not be read on every shard cluster, bad
//! arguments, a `--queue` pattern that matches nothing).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::queues;
use crate::config::Config;

/// Plugin status, in the order of its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }

    pub fn exit_code(self) -> u8 {
        self as u8
    }
}

/// The plugin's verdict: its status and the one line to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    pub line: String,
}

impl Outcome {
    pub fn unknown(reason: impl AsRef<str>) -> Outcome {
        Outcome {
            status: Status::Unknown,
            line: format!("QUEUES UNKNOWN - {}", one_line(reason.as_ref())),
        }
    }
}

/// Depth thresholds: a queue at or above `warning` messages is WARNING, at or above `critical`
/// CRITICAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub warning: u64,
    pub critical: u64,
}

/// Where the admin endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (usually empty).
    pub prefix: String,
}

impl AdminUrl {
    /// Parses `http://host:port[/prefix]` (`http://` may be left out; the port defaults to 80).
    pub fn parse(s: &str) -> Result<AdminUrl, String> {
        let s = s.trim();
        if s.starts_with("https://") {
            return Err("https is not supported: the admin endpoint speaks plain HTTP".into());
        }
        let rest = s.strip_prefix("http://").unwrap_or(s);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(after) = authority.strip_prefix('[') {
            let (h, p) = after
                .split_once(']')
                .ok_or_else(|| format!("bad admin URL {s:?}: unclosed '['"))?;
            (h.to_owned(), p.strip_prefix(':').unwrap_or(""))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p),
                None => (authority.to_owned(), ""),
            }
        };
        if host.is_empty() {
            return Err(format!("bad admin URL {s:?}: no host"));
        }
        let port = if port.is_empty() {
            80
        } else {
            port.parse::<u16>()
                .map_err(|_| format!("bad admin URL {s:?}: bad port {port:?}"))?
        };
        Ok(AdminUrl {
            host,
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    /// The admin endpoint of a configuration's `[admin] listen` (a wildcard address is asked on
    /// the loopback address).
    pub fn from_listen(addr: std::net::SocketAddr) -> AdminUrl {
        let ip = match addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        AdminUrl {
            host: ip.to_string(),
            port: addr.port(),
            prefix: String::new(),
        }
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What `warren check-queues` is asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub thresholds: Thresholds,
    /// The `--queue` values. One without `*` is a queue name, asked on the shard clusters
    /// themselves; one with `*` is a pattern over the queues the clusters' management APIs list
    /// (or those declared through the warren of the admin endpoint). None: every queue declared
    /// through that warren since it started.
    pub queues: Vec<String>,
    /// The vhost of the named queues.
    pub vhost: String,
    /// The whole check's time limit.
    pub timeout: Duration,
}

/// Where the answers come from.
#[derive(Debug)]
pub struct Sources {
    /// The admin endpoint (patterns, the default set, and named queues when no configuration
    /// was given), or why there is none.
    pub admin: Result<AdminUrl, String>,
    /// The configuration whose shard clusters are asked about named queues (and about
    /// patterns, when every shard cluster has `management`): `None` when no `--config` was
    /// given, the reason when it cannot be loaded.
    pub clusters: Option<Result<Config, String>>,
}

/// What was asked, for the verdict's wording.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Queues asked by name, as (vhost, name): one that no shard cluster has is CRITICAL.
    pub named: Vec<(String, String)>,
    /// `--queue` patterns (matched against the listed or declared queues).
    pub patterns: Vec<String>,
    /// Whether the set includes the queues declared through the warren (no `--queue`, or a
    /// pattern not answered from complete management lists): the OK line says so, so that
    /// nobody reads it as "all queues".
    pub declared: bool,
    /// Whether a pattern's queues were (also) listed by the clusters' management APIs.
    pub listed: bool,
    /// Management API lists that failed (`cluster/vhost: reason`): queues on those clusters
    /// may be missing from the set.
    pub listing_errors: Vec<String>,
    /// The admin endpoint the named queues were looked up on, when no clusters were asked.
    pub via_admin: Option<String>,
}

/// Words of the OK line when the set is the declared queues.
pub const DECLARED: &str = "queues declared through this warren since it started";
/// Words of the OK line when the set is the management APIs' lists and the declared queues.
pub const LISTED_AND_DECLARED: &str = "queues the clusters' management APIs list and those declared through this warren since it started";

/// Asks for the depths and evaluates them against the thresholds.
///
/// Named queues are asked on every shard cluster of `sources.clusters` with a passive
/// `queue.declare` ([`queues::report`]), so any warren instance, even one started a second ago,
/// answers the same; without a configuration they are looked up on the admin endpoint, which
/// knows only the queues declared through it. A pattern is answered with the configuration's
/// clusters ([`queues::listing`]) when every shard cluster has `management`; otherwise patterns
/// and the default set come from the admin endpoint's `GET /queues[?queue=PATTERN]`.
pub async fn check_queues(req: &Request, sources: &Sources) -> Outcome {
    let t = req.thresholds;
    if t.warning > t.critical {
        return Outcome::unknown(format!(
            "--warning ({}) must not be above --critical ({})",
            t.warning, t.critical
        ));
    }
    let deadline = Instant::now() + req.timeout;
    let mut scope = Scope::default();
    for q in &req.queues {
        if q.contains('*') {
            if !scope.patterns.contains(q) {
                scope.patterns.push(q.clone());
            }
        } else {
            let key = (req.vhost.clone(), q.clone());
            if !scope.named.contains(&key) {
                scope.named.push(key);
            }
        }
    }
    // The default set is the declared queues; a pattern's set is said once it is answered.
    scope.declared = scope.named.is_empty() && scope.patterns.is_empty();
    if scope.named.len() > queues::MAX_QUEUES {
        return Outcome::unknown(format!(
            "at most {} queues can be named",
            queues::MAX_QUEUES
        ));
    }

    let mut entries: Vec<Value> = Vec::new();
    if !scope.named.is_empty() {
        match &sources.clusters {
            Some(Ok(config)) => {
                match tokio::time::timeout_at(deadline, queues::report(config, &scope.named)).await
                {
                    Ok(list) => entries.extend(list),
                    Err(_) => {
                        return Outcome::unknown(format!(
                            "the shard clusters did not answer within {} s",
                            req.timeout.as_secs_f64()
                        ));
                    }
                }
            }
            Some(Err(e)) => return Outcome::unknown(e),
            None => {
                let admin = match &sources.admin {
                    Ok(a) => a,
                    Err(e) => return Outcome::unknown(e),
                };
                for (vhost, name) in &scope.named {
                    let listed = match fetch(admin, Some(name), deadline, req.timeout).await {
                        Ok(v) => queue_list(&v),
                        Err(o) => return o,
                    };
                    let found = listed.into_iter().find(|q| {
                        q.get("name").and_then(Value::as_str) == Some(name.as_str())
                            && q.get("vhost").and_then(Value::as_str) == Some(vhost.as_str())
                    });
                    entries.push(found.unwrap_or_else(
                        || json!({"vhost": vhost, "name": name, "messages": null, "unlisted": true}),
                    ));
                }
                scope.via_admin = Some(admin.host_header());
            }
        }
    }
    // With every shard cluster's management API in the configuration, the check lists the
    // queues itself: the same answer whichever warren runs, or whether one does.
    let lists_all = match &sources.clusters {
        Some(Ok(config)) if config.shard_clusters().all(|c| c.management.is_some()) => Some(config),
        _ => None,
    };
    let patterns: Vec<Option<&str>> = if scope.patterns.is_empty() {
        if scope.declared {
            vec![None]
        } else {
            Vec::new()
        }
    } else {
        scope.patterns.iter().map(|p| Some(p.as_str())).collect()
    };
    for p in patterns {
        let answer = match (p, lists_all) {
            (Some(p), Some(config)) => {
                match tokio::time::timeout_at(
                    deadline,
                    queues::listing(config, Vec::new(), Some(p)),
                )
                .await
                {
                    Ok(v) => v,
                    Err(_) => {
                        return Outcome::unknown(format!(
                            "the shard clusters did not answer within {} s",
                            req.timeout.as_secs_f64()
                        ));
                    }
                }
            }
            _ => {
                let admin = match &sources.admin {
                    Ok(a) => a,
                    Err(e) => return Outcome::unknown(e),
                };
                match fetch(admin, p, deadline, req.timeout).await {
                    Ok(v) => v,
                    Err(o) => return o,
                }
            }
        };
        let management = answer
            .get("management")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        if !management.is_empty() {
            scope.listed = true;
        }
        if answer.get("listing_complete").and_then(Value::as_bool) != Some(true) {
            scope.declared = true;
        }
        for m in management.iter().filter(|m| status_of(m) == "error") {
            let at = format!(
                "{}/{}",
                m.get("cluster").and_then(Value::as_str).unwrap_or("?"),
                m.get("vhost").and_then(Value::as_str).unwrap_or("?")
            );
            let error = m.get("error").and_then(Value::as_str).unwrap_or("error");
            let line = format!("{at}: {error}");
            if !scope.listing_errors.contains(&line) {
                scope.listing_errors.push(line);
            }
        }
        entries.extend(queue_list(&answer));
    }
    // A queue both named and matched by a pattern is reported once (the named answer first).
    let mut seen = std::collections::HashSet::new();
    entries.retain(|q| {
        seen.insert((
            q.get("vhost")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned(),
            q.get("name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
        ))
    });
    evaluate(&entries, &scope, t)
}

/// The `queues` list of a `/queues` answer.
fn queue_list(answer: &Value) -> Vec<Value> {
    answer
        .get("queues")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `GET /queues[?queue=PATTERN]` of the admin endpoint: the whole answer, which has a `queues`
/// list.
async fn fetch(
    admin: &AdminUrl,
    pattern: Option<&str>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Value, Outcome> {
    let mut path = format!("{}/queues", admin.prefix);
    if let Some(p) = pattern {
        path.push_str("?queue=");
        path.push_str(&percent_encode(p));
    }
    let (status, body) = match tokio::time::timeout_at(deadline, http_get(admin, &path)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(Outcome::unknown(format!(
                "admin endpoint {}: {e}",
                admin.host_header()
            )));
        }
        Err(_) => {
            return Err(Outcome::unknown(format!(
                "admin endpoint {} did not answer within {} s",
                admin.host_header(),
                timeout.as_secs_f64()
            )));
        }
    };
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        return Err(Outcome::unknown(format!(
            "admin endpoint answered HTTP {status}: {}",
            text.trim()
        )));
    }
    let v = serde_json::from_slice::<Value>(&body).map_err(|e| {
        Outcome::unknown(format!(
            "admin endpoint answered something that is not JSON: {e}"
        ))
    })?;
    if v.get("queues").and_then(Value::as_array).is_none() {
        return Err(Outcome::unknown(
            "the admin endpoint's /queues answer has no \"queues\" list",
        ));
    }
    Ok(v)
}

/// The `status` of a `/queues` cluster entry (`ok`, `missing`, `error`).
fn status_of(c: &Value) -> &str {
    c.get("status").and_then(Value::as_str).unwrap_or("?")
}

/// How many offending queues the summary names before "and N more".
const SUMMARY_QUEUES: usize = 10;
/// How many queues get performance data.
const PERFDATA_QUEUES: usize = 200;

/// Evaluates `/queues` entries (see [`queues::report`]) against the thresholds.
///
/// A queue at or above a threshold makes the check WARNING or CRITICAL, and so does (CRITICAL)
/// a queue asked by name that no shard cluster has. Otherwise a depth that could not be read on
/// every cluster makes it UNKNOWN. A declared (not named) queue that no shard cluster has any
/// more (deleted through another instance or directly) is left out and counted in the OK line.
pub fn evaluate(queues: &[Value], scope: &Scope, t: Thresholds) -> Outcome {
    struct Q {
        label: String,
        /// The total, `None` when it could not be read at all.
        messages: Option<u64>,
        status: Status,
        /// No shard cluster has this named queue.
        missing: bool,
        /// Why the depth is not (fully) known.
        problem: Option<String>,
        /// (cluster, messages) of the clusters that answered.
        split: Vec<(String, u64)>,
    }
    let level = |messages: u64| {
        if messages >= t.critical {
            Status::Critical
        } else if messages >= t.warning {
            Status::Warning
        } else {
            Status::Ok
        }
    };
    let mut list = Vec::with_capacity(queues.len());
    let mut gone: Vec<String> = Vec::new();
    for q in queues {
        let name = q.get("name").and_then(Value::as_str).unwrap_or("?");
        let vhost = q.get("vhost").and_then(Value::as_str).unwrap_or("/");
        let label = sanitize(&if vhost == "/" {
            name.to_owned()
        } else {
            format!("{vhost}/{name}")
        });
        let named = scope.named.iter().any(|(v, n)| v == vhost && n == name);
        if q.get("unlisted").and_then(Value::as_bool) == Some(true) {
            let via = scope.via_admin.as_deref().unwrap_or("the admin endpoint");
            list.push(Q {
                problem: Some(format!(
                    "{label} is not among the queues declared through the warren at {via} since \
                     it started; pass --config FILE to ask the clusters"
                )),
                label,
                messages: None,
                status: Status::Unknown,
                missing: false,
                split: Vec::new(),
            });
            continue;
        }
        let clusters: &[Value] = q
            .get("clusters")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        if !clusters.is_empty() && clusters.iter().all(|c| status_of(c) == "missing") {
            if named {
                list.push(Q {
                    label,
                    messages: None,
                    status: Status::Critical,
                    missing: true,
                    problem: None,
                    split: Vec::new(),
                });
            } else {
                gone.push(label);
            }
            continue;
        }
        let Some(messages) = q.get("messages").and_then(Value::as_u64) else {
            return Outcome::unknown(format!("queue {name:?} has no message count"));
        };
        let cluster_name =
            |c: &Value| sanitize(c.get("cluster").and_then(Value::as_str).unwrap_or("?"));
        let split = clusters
            .iter()
            .filter(|c| matches!(status_of(c), "ok" | "missing"))
            .map(|c| {
                (
                    cluster_name(c),
                    c.get("messages").and_then(Value::as_u64).unwrap_or(0),
                )
            })
            .collect();
        let problem = (q.get("complete").and_then(Value::as_bool) == Some(false)).then(|| {
            let errors: Vec<String> = clusters
                .iter()
                .filter(|c| status_of(c) == "error")
                .map(|c| {
                    format!(
                        "{}: {}",
                        cluster_name(c),
                        c.get("error").and_then(Value::as_str).unwrap_or("error")
                    )
                })
                .collect();
            format!(
                "depth of {label} unknown on some clusters ({})",
                errors.join(", ")
            )
        });
        let status = match level(messages) {
            Status::Ok if problem.is_some() => Status::Unknown,
            s => s,
        };
        list.push(Q {
            label,
            messages: Some(messages),
            status,
            missing: false,
            problem,
            split,
        });
    }

    // Performance data: the total with the thresholds, then each cluster's share.
    let mut perf = String::new();
    for q in list.iter().take(PERFDATA_QUEUES) {
        if let (Some(m), None) = (q.messages, &q.problem) {
            let _ = write!(
                perf,
                " {}={m};{};{};0;",
                perf_label(&q.label),
                t.warning,
                t.critical
            );
        }
        for (cluster, n) in &q.split {
            let _ = write!(
                perf,
                " {}={n};;;0;",
                perf_label(&format!("{}@{cluster}", q.label))
            );
        }
    }
    let finish = |status: Status, summary: String| {
        let line = if perf.is_empty() {
            format!("QUEUES {} - {}", status.word(), one_line(&summary))
        } else {
            format!("QUEUES {} - {} |{perf}", status.word(), one_line(&summary))
        };
        Outcome { status, line }
    };

    let mut offending: Vec<&Q> = list
        .iter()
        .filter(|q| matches!(q.status, Status::Warning | Status::Critical))
        .collect();
    if let Some(worst) = offending.iter().map(|q| q.status).max() {
        // Missing first, then critical, then the deepest.
        offending.sort_by(|a, b| {
            b.missing
                .cmp(&a.missing)
                .then(b.status.cmp(&a.status))
                .then(b.messages.cmp(&a.messages))
        });
        let mut parts: Vec<String> = offending
            .iter()
            .take(SUMMARY_QUEUES)
            .map(|q| {
                if q.missing {
                    return format!("{} missing on every shard cluster", q.label);
                }
                let limit = if q.status == Status::Critical {
                    t.critical
                } else {
                    t.warning
                };
                let partial = if q.problem.is_some() { ", partial" } else { "" };
                format!(
                    "{}={} (>= {limit}{partial})",
                    q.label,
                    q.messages.unwrap_or_default()
                )
            })
            .collect();
        if offending.len() > SUMMARY_QUEUES {
            parts.push(format!("and {} more", offending.len() - SUMMARY_QUEUES));
        }
        return finish(worst, parts.join(", "));
    }
    let unknown: Vec<&Q> = list
        .iter()
        .filter(|q| q.status == Status::Unknown)
        .collect();
    if let Some(first) = unknown.first() {
        let more = if unknown.len() > 1 {
            format!(" (and {} more queues)", unknown.len() - 1)
        } else {
            String::new()
        };
        return finish(
            Status::Unknown,
            format!("{}{more}", first.problem.as_deref().unwrap_or("unknown")),
        );
    }
    let gone_note = if gone.is_empty() {
        String::new()
    } else {
        let n = gone.len();
        let mut names: Vec<&str> = gone
            .iter()
            .take(SUMMARY_QUEUES)
            .map(String::as_str)
            .collect();
        let more = format!("and {} more", n.saturating_sub(SUMMARY_QUEUES));
        if n > SUMMARY_QUEUES {
            names.push(&more);
        }
        let (queues, exist) = if n == 1 {
            ("queue", "exists")
        } else {
            ("queues", "exist")
        };
        format!(
            "; {n} declared {queues} no longer {exist} on any shard cluster: {}",
            names.join(", ")
        )
    };
    // A list that could not be read: queues on that cluster may be missing from the set.
    if !scope.listing_errors.is_empty() {
        return finish(
            Status::Unknown,
            format!(
                "a management API did not list its queues, so some may be missing: {}",
                scope.listing_errors.join(", ")
            ),
        );
    }
    if list.is_empty() {
        if scope.patterns.is_empty() {
            return finish(
                Status::Ok,
                format!(
                    "no sharded {DECLARED} (name queues with --queue to ask the clusters){gone_note}"
                ),
            );
        }
        let patterns: Vec<String> = scope.patterns.iter().map(|p| format!("{p:?}")).collect();
        let among = match (scope.declared, scope.listed) {
            (true, false) => {
                format!("among the {DECLARED} (name queues with --queue to ask the clusters)")
            }
            (true, true) => format!("among the {LISTED_AND_DECLARED}"),
            (false, _) => "on the shard clusters".to_owned(),
        };
        return finish(
            Status::Unknown,
            format!(
                "no sharded queue matches {} {among}{gone_note}",
                patterns.join(" or ")
            ),
        );
    }
    let deepest = list
        .iter()
        .max_by_key(|q| q.messages)
        .map(|q| format!("{}={}", q.label, q.messages.unwrap_or_default()))
        .unwrap_or_default();
    let n = list.len();
    let plural = if n == 1 { "" } else { "s" };
    let declared = match (scope.declared, scope.listed) {
        (true, false) => format!(" ({DECLARED})"),
        (true, true) => format!(" ({LISTED_AND_DECLARED})"),
        (false, _) => String::new(),
    };
    finish(
        Status::Ok,
        format!(
            "{n} queue{plural} below {}, deepest {deepest}{declared}{gone_note}",
            t.warning
        ),
    )
}

/// No newlines and no `|` (the perfdata separator) in plugin text.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c == '|' || c.is_control() { '_' } else { c })
        .collect()
}

fn one_line(s: &str) -> String {
    sanitize(&s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A perfdata label, in single quotes (a quote in it doubled), as the plugin guidelines allow
/// for any label.
fn perf_label(label: &str) -> String {
    format!("'{}'", label.replace('\'', "''"))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Most bytes read from the admin endpoint.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// One HTTP/1.1 GET of `path` on the admin endpoint: the status code and the body.
pub async fn http_get(admin: &AdminUrl, path: &str) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect((admin.host.as_str(), admin.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, admin.host_header())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "warren-check-queues")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("cannot make the request: {e}"))?;
    let (status, body) = super::http_client::send(tcp, request, MAX_RESPONSE).await?;
    Ok((status.as_u16(), body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Thresholds = Thresholds {
        warning: 500,
        critical: 1000,
    };

    fn q(name: &str, messages: u64) -> Value {
        json!({"vhost": "/", "name": name, "messages": messages, "complete": true, "clusters": []})
    }

    /// The default set: the queues declared through the warren.
    fn declared() -> Scope {
        Scope {
            declared: true,
            ..Scope::default()
        }
    }

    fn named(names: &[&str]) -> Scope {
        Scope {
            named: names.iter().map(|n| ("/".into(), (*n).into())).collect(),
            ..Scope::default()
        }
    }

    #[test]
    fn statuses_and_lines() {
        let o = evaluate(&[q("celery", 1200), q("other", 3)], &declared(), T);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.line,
            "QUEUES CRITICAL - celery=1200 (>= 1000) | 'celery'=1200;500;1000;0; 'other'=3;500;1000;0;"
        );

        let o = evaluate(&[q("a", 600), q("b", 1000)], &declared(), T);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.line
                .starts_with("QUEUES CRITICAL - b=1000 (>= 1000), a=600 (>= 500) |"),
            "{}",
            o.line
        );

        let o = evaluate(&[q("a", 500)], &named(&["a"]), T);
        assert_eq!(
            (o.status, o.line.as_str()),
            (
                Status::Warning,
                "QUEUES WARNING - a=500 (>= 500) | 'a'=500;500;1000;0;"
            )
        );

        let o = evaluate(&[q("a", 499), q("b", 7)], &declared(), T);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(
            o.line,
            "QUEUES OK - 2 queues below 500, deepest a=499 (queues declared through this warren \
             since it started) | 'a'=499;500;1000;0; 'b'=7;500;1000;0;"
        );
        let o = evaluate(&[q("a", 499)], &named(&["a"]), T);
        assert_eq!(
            o.line,
            "QUEUES OK - 1 queue below 500, deepest a=499 | 'a'=499;500;1000;0;"
        );

        let o = evaluate(&[], &declared(), T);
        assert_eq!(o.status, Status::Ok);
        assert!(
            o.line.starts_with(
                "QUEUES OK - no sharded queues declared through this warren since it started"
            ),
            "{}",
            o.line
        );
        let pattern = Scope {
            patterns: vec!["x*".into()],
            declared: true,
            ..Scope::default()
        };
        let o = evaluate(&[], &pattern, T);
        assert_eq!(o.status, Status::Unknown, "{}", o.line);
        assert!(o.line.contains("\"x*\""), "{}", o.line);
    }

    fn split(name: &str, clusters: &[(&str, Option<u64>)]) -> Value {
        let total: u64 = clusters.iter().filter_map(|c| c.1).sum();
        let cs: Vec<Value> = clusters
            .iter()
            .map(|(c, m)| match m {
                Some(m) => json!({"cluster": c, "status": "ok", "messages": m, "consumers": 1}),
                None => json!({"cluster": c, "status": "missing", "messages": 0, "consumers": 0}),
            })
            .collect();
        json!({"vhost": "/", "name": name, "messages": total, "consumers": 1, "complete": true, "clusters": cs})
    }

    #[test]
    fn perfdata_per_cluster() {
        let v = split("ux-w", &[("shard-a", Some(935)), ("shard-b", Some(934))]);
        let o = evaluate(&[v], &named(&["ux-w"]), T);
        assert_eq!(
            o.line,
            "QUEUES CRITICAL - ux-w=1869 (>= 1000) | 'ux-w'=1869;500;1000;0; \
             'ux-w@shard-a'=935;;;0; 'ux-w@shard-b'=934;;;0;"
        );
        // Missing on one cluster only: counts as empty there.
        let v = split("half", &[("shard-a", Some(3)), ("shard-b", None)]);
        let o = evaluate(&[v], &named(&["half"]), T);
        assert_eq!(o.status, Status::Ok);
        assert!(
            o.line
                .ends_with("| 'half'=3;500;1000;0; 'half@shard-a'=3;;;0; 'half@shard-b'=0;;;0;"),
            "{}",
            o.line
        );
    }

    #[test]
    fn missing_queues() {
        let gone = split("gone", &[("shard-a", None), ("shard-b", None)]);
        // Named: CRITICAL, whatever the thresholds.
        let o = evaluate(&[gone.clone(), q("fine", 1)], &named(&["gone", "fine"]), T);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.line,
            "QUEUES CRITICAL - gone missing on every shard cluster | 'fine'=1;500;1000;0;"
        );
        // Declared through the warren, deleted since: left out, and said.
        let o = evaluate(&[gone.clone(), q("fine", 1)], &declared(), T);
        assert_eq!(o.status, Status::Ok);
        assert!(
            o.line
                .contains("1 declared queue no longer exists on any shard cluster: gone"),
            "{}",
            o.line
        );
        assert!(!o.line.contains("'gone'"), "{}", o.line);
        // Not listed by the admin endpoint (no --config to ask the clusters).
        let unlisted = json!({"vhost": "/", "name": "ux-w", "messages": null, "unlisted": true});
        let mut scope = named(&["ux-w"]);
        scope.via_admin = Some("127.0.0.1:15673".into());
        let o = evaluate(&[unlisted], &scope, T);
        assert_eq!(o.status, Status::Unknown);
        assert!(o.line.contains("--config"), "{}", o.line);
    }

    #[test]
    fn incomplete_depths_are_unknown_unless_already_over() {
        let partial = json!({"vhost": "/", "name": "p", "messages": 10, "complete": false,
            "clusters": [{"cluster": "b", "status": "error", "error": "connection refused"}]});
        let o = evaluate(std::slice::from_ref(&partial), &declared(), T);
        assert_eq!(o.status, Status::Unknown);
        assert!(o.line.contains("b: connection refused"), "{}", o.line);
        let o = evaluate(&[partial, q("c", 2000)], &declared(), T);
        assert_eq!(o.status, Status::Critical);
    }

    #[test]
    fn listed_sets_are_worded_as_such() {
        // Every shard cluster listed its queues: not "declared through this warren".
        let listed = Scope {
            patterns: vec!["celery*".into()],
            listed: true,
            ..Scope::default()
        };
        let o = evaluate(&[q("celery", 3)], &listed, T);
        assert_eq!(
            o.line,
            "QUEUES OK - 1 queue below 500, deepest celery=3 | 'celery'=3;500;1000;0;"
        );
        let o = evaluate(&[], &listed, T);
        assert_eq!(o.status, Status::Unknown);
        assert_eq!(
            o.line,
            "QUEUES UNKNOWN - no sharded queue matches \"celery*\" on the shard clusters"
        );
        // Some clusters listed, the others only know the declared queues.
        let both = Scope {
            declared: true,
            ..listed.clone()
        };
        let o = evaluate(&[q("celery", 3)], &both, T);
        assert!(
            o.line
                .contains(&format!("deepest celery=3 ({LISTED_AND_DECLARED})")),
            "{}",
            o.line
        );
        // A list that failed: queues may be missing, so UNKNOWN unless a threshold is crossed.
        let failed = Scope {
            listing_errors: vec!["shard-b//: HTTP 401 Unauthorized".into()],
            ..listed.clone()
        };
        let o = evaluate(&[q("celery", 3)], &failed, T);
        assert_eq!(o.status, Status::Unknown);
        assert!(
            o.line.starts_with(
                "QUEUES UNKNOWN - a management API did not list its queues, so some may be \
                 missing: shard-b//: HTTP 401 Unauthorized |"
            ),
            "{}",
            o.line
        );
        let o = evaluate(&[q("celery", 3000)], &failed, T);
        assert_eq!(o.status, Status::Critical);
    }

    #[test]
    fn labels_are_safe() {
        let v = json!({"vhost": "v", "name": "a b|c\nd", "messages": 1, "complete": true});
        let o = evaluate(&[v], &declared(), T);
        assert_eq!(o.line.matches('|').count(), 1, "{}", o.line);
        assert!(!o.line.contains('\n'));
        assert!(
            o.line.ends_with("| 'v/a b_c_d'=1;500;1000;0;"),
            "{}",
            o.line
        );
        assert_eq!(perf_label("it's"), "'it''s'");
    }

    #[test]
    fn urls() {
        assert_eq!(
            AdminUrl::parse("http://127.0.0.1:15673").unwrap(),
            AdminUrl {
                host: "127.0.0.1".into(),
                port: 15673,
                prefix: String::new()
            }
        );
        assert_eq!(
            AdminUrl::parse("http://[::1]:9/warren/").unwrap(),
            AdminUrl {
                host: "::1".into(),
                port: 9,
                prefix: "/warren".into()
            }
        );
        assert_eq!(AdminUrl::parse("localhost").unwrap().port, 80);
        assert!(AdminUrl::parse("http://:80").is_err());
        assert!(AdminUrl::parse("https://x:1").is_err());
        assert!(AdminUrl::parse("http://x:99999").is_err());
        assert_eq!(
            AdminUrl::from_listen("0.0.0.0:5".parse().unwrap()).host,
            "127.0.0.1"
        );
        assert_eq!(
            AdminUrl::from_listen("[::]:5".parse().unwrap()).host_header(),
            "[::1]:5"
        );
        assert_eq!(percent_encode("a b*/é"), "a%20b*%2F%C3%A9");
    }

    /// The answer read by hyper: plain and chunked bodies, a status other than 200, and a peer
    /// that is not an HTTP server.
    #[tokio::test]
    async fn http_get_reads_plain_and_chunked_answers() {
        async fn serve(answer: &'static [u8]) -> AdminUrl {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                let _ = s.write_all(answer).await;
            });
            AdminUrl::from_listen(addr)
        }
        let plain = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
        assert_eq!(
            http_get(&plain, "/queues").await.unwrap(),
            (200, b"{}".to_vec())
        );
        let chunked =
            serve(b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
                .await;
        assert_eq!(
            http_get(&chunked, "/queues").await.unwrap(),
            (503, b"{}".to_vec())
        );
        let short = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}").await;
        assert!(http_get(&short, "/queues").await.is_err());
        let ssh = serve(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        assert!(http_get(&ssh, "/queues").await.is_err());
    }
}
