//! `warren check-queues`: one Nagios/Sensu plugin line from the admin endpoint's `/queues`.
//!
//! ```text
//! QUEUES CRITICAL - celery=1200 (>= 1000) | celery=1200;500;1000
//! ```
//!
//! Exit codes follow the plugin convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the admin
//! endpoint cannot be reached or answers something else than depths, a depth could not be read on
//! every shard cluster, bad arguments, a `--queue` pattern that matches nothing).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Asks `GET /queues[?queue=PATTERN]` and evaluates the answer.
pub async fn check_queues(
    admin: &AdminUrl,
    pattern: Option<&str>,
    t: Thresholds,
    timeout: Duration,
) -> Outcome {
    if t.warning > t.critical {
        return Outcome::unknown(format!(
            "--warning ({}) must not be above --critical ({})",
            t.warning, t.critical
        ));
    }
    let mut path = format!("{}/queues", admin.prefix);
    if let Some(p) = pattern {
        path.push_str("?queue=");
        path.push_str(&percent_encode(p));
    }
    let (status, body) = match tokio::time::timeout(timeout, http_get(admin, &path)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Outcome::unknown(format!("admin endpoint {}: {e}", admin.host_header()));
        }
        Err(_) => {
            return Outcome::unknown(format!(
                "admin endpoint {} did not answer within {} s",
                admin.host_header(),
                timeout.as_secs_f64()
            ));
        }
    };
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        return Outcome::unknown(format!(
            "admin endpoint answered HTTP {status}: {}",
            text.trim()
        ));
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => evaluate(&v, pattern, t),
        Err(e) => Outcome::unknown(format!(
            "admin endpoint answered something that is not JSON: {e}"
        )),
    }
}

/// How many offending queues the summary names before "and N more".
const SUMMARY_QUEUES: usize = 10;
/// How many queues get performance data.
const PERFDATA_QUEUES: usize = 200;

/// Evaluates a `/queues` answer against the thresholds.
pub fn evaluate(v: &Value, pattern: Option<&str>, t: Thresholds) -> Outcome {
    let Some(queues) = v.get("queues").and_then(Value::as_array) else {
        return Outcome::unknown("the admin endpoint's /queues answer has no \"queues\" list");
    };
    struct Q {
        label: String,
        messages: u64,
        status: Status,
        incomplete: Option<String>,
    }
    let mut list = Vec::with_capacity(queues.len());
    for q in queues {
        let name = q.get("name").and_then(Value::as_str).unwrap_or("?");
        let vhost = q.get("vhost").and_then(Value::as_str).unwrap_or("/");
        let Some(messages) = q.get("messages").and_then(Value::as_u64) else {
            return Outcome::unknown(format!("queue {name:?} has no message count"));
        };
        let label = sanitize(&if vhost == "/" {
            name.to_owned()
        } else {
            format!("{vhost}/{name}")
        });
        let status = if messages >= t.critical {
            Status::Critical
        } else if messages >= t.warning {
            Status::Warning
        } else {
            Status::Ok
        };
        let incomplete = (q.get("complete").and_then(Value::as_bool) == Some(false)).then(|| {
            let errors: Vec<String> = q
                .get("clusters")
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .filter(|c| c.get("status").and_then(Value::as_str) == Some("error"))
                        .map(|c| {
                            format!(
                                "{}: {}",
                                c.get("cluster").and_then(Value::as_str).unwrap_or("?"),
                                c.get("error").and_then(Value::as_str).unwrap_or("error")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            errors.join(", ")
        });
        list.push(Q {
            label,
            messages,
            status,
            incomplete,
        });
    }

    let mut perf = String::new();
    for q in list.iter().take(PERFDATA_QUEUES) {
        let _ = write!(
            perf,
            " {}={};{};{}",
            perf_label(&q.label),
            q.messages,
            t.warning,
            t.critical
        );
    }
    let finish = |status: Status, summary: String| {
        let line = if perf.is_empty() {
            format!("QUEUES {} - {}", status.word(), one_line(&summary))
        } else {
            format!("QUEUES {} - {} |{perf}", status.word(), one_line(&summary))
        };
        Outcome { status, line }
    };

    let worst = list.iter().map(|q| q.status).max().unwrap_or(Status::Ok);
    if worst >= Status::Warning {
        let mut offending: Vec<&Q> = list
            .iter()
            .filter(|q| q.status >= Status::Warning)
            .collect();
        // Critical first, then the deepest.
        offending.sort_by(|a, b| b.status.cmp(&a.status).then(b.messages.cmp(&a.messages)));
        let mut parts: Vec<String> = offending
            .iter()
            .take(SUMMARY_QUEUES)
            .map(|q| {
                let limit = if q.status == Status::Critical {
                    t.critical
                } else {
                    t.warning
                };
                let partial = if q.incomplete.is_some() {
                    ", partial"
                } else {
                    ""
                };
                format!("{}={} (>= {limit}{partial})", q.label, q.messages)
            })
            .collect();
        if offending.len() > SUMMARY_QUEUES {
            parts.push(format!("and {} more", offending.len() - SUMMARY_QUEUES));
        }
        return finish(worst, parts.join(", "));
    }
    let incomplete: Vec<&Q> = list.iter().filter(|q| q.incomplete.is_some()).collect();
    if let Some(first) = incomplete.first() {
        let more = if incomplete.len() > 1 {
            format!(" (and {} more queues)", incomplete.len() - 1)
        } else {
            String::new()
        };
        return finish(
            Status::Unknown,
            format!(
                "depth of {} unknown on some clusters ({}){more}",
                first.label,
                first.incomplete.as_deref().unwrap_or_default()
            ),
        );
    }
    if list.is_empty() {
        return match pattern {
            Some(p) => finish(Status::Unknown, format!("no sharded queue matches {p:?}")),
            None => finish(Status::Ok, "no sharded queues".into()),
        };
    }
    let deepest = list
        .iter()
        .max_by_key(|q| q.messages)
        .map(|q| format!("{}={}", q.label, q.messages))
        .unwrap_or_default();
    let n = list.len();
    let plural = if n == 1 { "" } else { "s" };
    finish(
        Status::Ok,
        format!("{n} queue{plural} below {}, deepest {deepest}", t.warning),
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

/// A perfdata label: quoted with single quotes when it has spaces, `=` or quotes.
fn perf_label(label: &str) -> String {
    if label.chars().any(|c| c == ' ' || c == '=' || c == '\'') {
        format!("'{}'", label.replace('\'', "''"))
    } else {
        label.to_owned()
    }
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

/// A minimal HTTP/1.1 GET (`Connection: close`): returns the status code and the body.
pub async fn http_get(admin: &AdminUrl, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut stream = TcpStream::connect((admin.host.as_str(), admin.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: warren-check-queues\r\nConnection: close\r\n\r\n",
        admin.host_header()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err("answer larger than 64 MiB".into());
        }
    }
    parse_response(&buf)
}

/// Splits a whole HTTP/1.1 response into status code and (de-chunked) body.
pub fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP answer")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "HTTP head is not UTF-8")?;
    let body = &buf[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    if !words.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!(
            "not an HTTP answer: {:?}",
            status_line.chars().take(60).collect::<String>()
        ));
    }
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad HTTP status line")?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            }
        }
    }
    if chunked {
        return dechunk(body).map(|b| (status, b));
    }
    match length {
        Some(n) if body.len() < n => Err("HTTP answer cut short".into()),
        Some(n) => Ok((status, body[..n].to_vec())),
        None => Ok((status, body.to_vec())),
    }
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked body")?;
        let size_text = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: Thresholds = Thresholds {
        warning: 500,
        critical: 1000,
    };

    fn q(name: &str, messages: u64) -> Value {
        json!({"vhost": "/", "name": name, "messages": messages, "complete": true, "clusters": []})
    }

    #[test]
    fn statuses_and_lines() {
        let v = json!({"queues": [q("celery", 1200), q("other", 3)]});
        let o = evaluate(&v, None, T);
        assert_eq!(o.status, Status::Critical);
        assert_eq!(
            o.line,
            "QUEUES CRITICAL - celery=1200 (>= 1000) | celery=1200;500;1000 other=3;500;1000"
        );

        let o = evaluate(&json!({"queues": [q("a", 600), q("b", 1000)]}), None, T);
        assert_eq!(o.status, Status::Critical);
        assert!(
            o.line
                .starts_with("QUEUES CRITICAL - b=1000 (>= 1000), a=600 (>= 500) |"),
            "{}",
            o.line
        );

        let o = evaluate(&json!({"queues": [q("a", 500)]}), None, T);
        assert_eq!(
            (o.status, o.line.as_str()),
            (
                Status::Warning,
                "QUEUES WARNING - a=500 (>= 500) | a=500;500;1000"
            )
        );

        let o = evaluate(&json!({"queues": [q("a", 499), q("b", 7)]}), None, T);
        assert_eq!(o.status, Status::Ok);
        assert_eq!(
            o.line,
            "QUEUES OK - 2 queues below 500, deepest a=499 | a=499;500;1000 b=7;500;1000"
        );

        assert_eq!(evaluate(&json!({"queues": []}), None, T).status, Status::Ok);
        assert_eq!(
            evaluate(&json!({"queues": []}), Some("x*"), T).status,
            Status::Unknown
        );
        assert_eq!(
            evaluate(&json!({"nope": 1}), None, T).status,
            Status::Unknown
        );
    }

    #[test]
    fn incomplete_depths_are_unknown_unless_already_over() {
        let partial = json!({"vhost": "/", "name": "p", "messages": 10, "complete": false,
            "clusters": [{"cluster": "b", "status": "error", "error": "connection refused"}]});
        let o = evaluate(&json!({"queues": [partial.clone()]}), None, T);
        assert_eq!(o.status, Status::Unknown);
        assert!(o.line.contains("b: connection refused"), "{}", o.line);
        let o = evaluate(&json!({"queues": [partial, q("c", 2000)]}), None, T);
        assert_eq!(o.status, Status::Critical);
    }

    #[test]
    fn labels_are_safe() {
        let v = json!({"queues": [{"vhost": "v", "name": "a b|c\nd", "messages": 1, "complete": true}]});
        let o = evaluate(&v, None, T);
        assert_eq!(o.line.matches('|').count(), 1, "{}", o.line);
        assert!(!o.line.contains('\n'));
        assert!(o.line.ends_with("| 'v/a b_c_d'=1;500;1000"), "{}", o.line);
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

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap(),
            (200, b"{}".to_vec())
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            )
            .unwrap(),
            (503, b"{}".to_vec())
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"").is_err());
    }
}
