//! `GET /metrics` as Prometheus reads it, and the alert rules and dashboard built on it.
//!
//! No RabbitMQ needed: the proxy starts with its clusters on closed ports (it serves, probes them
//! and reports them down), which is all these tests look at.
//!
//! * The text exposition passes `promtool check metrics` (Prometheus' own parser and linter),
//!   and every counter is there at 0 from the start; the OpenMetrics one is served when asked.
//! * `deploy/prometheus/warren-alerts.yml` passes `promtool check rules`, and every series it,
//!   the Grafana dashboard and docs/operations.md name exists on a live warren.
//! * Bare TCP connects (a load balancer's health check) count as probes, not refusals.
//!
//! promtool comes with Debian's `prometheus` package (`apt-get install prometheus`, installed by
//! scripts/test.sh and .ci/run). Without it the promtool steps are skipped with a message, unless
//! `WARREN_REQUIRE_TOOLS=1` (set by scripts/test.sh) or `CI` is set: then they fail
//! (`support::external_tool`).

mod support;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren::ProxyHandle;
use warren::config::Config;

use support::{STEP, within};

const RULES: &str = "deploy/prometheus/warren-alerts.yml";
const DASHBOARD: &str = "deploy/grafana/warren-dashboard.json";
const OPERATIONS: &str = "docs/operations.md";

// ---------------------------------------------------------------------------------------------
// A proxy in front of clusters that are not there

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn config_text() -> String {
    let node = || format!("\"127.0.0.1:{}\"", closed_port());
    format!(
        "listen = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 1000\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}, {}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        node(),
        node(),
        node(),
        node()
    )
}

struct TestProxy {
    handle: ProxyHandle,
    admin: SocketAddr,
    path: PathBuf,
}

impl TestProxy {
    async fn start(name: &str) -> TestProxy {
        support::init_tracing();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-metrics-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", support::unique(name)));
        std::fs::write(&path, config_text()).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config rejected: {e}"));
        let handle = warren::start(Arc::new(config))
            .await
            .expect("start the proxy");
        handle.shared().set_config_path(&path);
        let admin = handle.admin_addr().expect("the admin endpoint");
        TestProxy {
            handle,
            admin,
            path,
        }
    }

    /// `GET /metrics` with an optional `Accept`: (content type, body).
    async fn metrics(&self, accept: Option<&str>) -> (String, String) {
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        let (status, head, body) = http(
            self.admin,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 200, "GET /metrics: {head}\n{body}");
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .unwrap_or_default();
        (content_type, body)
    }

    async fn text(&self) -> String {
        self.metrics(None).await.1
    }

    /// Polls the text exposition until `check` holds for it.
    async fn metrics_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let text = self.text().await;
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "/metrics never showed {what}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the first health probes: every node has its `warren_cluster_node_up` sample.
    async fn probed(&self) -> String {
        self.metrics_until(
            "a warren_cluster_node_up sample for each of the 4 nodes",
            |t| {
                t.lines()
                    .filter(|l| l.starts_with("warren_cluster_node_up{"))
                    .count()
                    == 4
            },
        )
        .await
    }

    async fn stop(self) {
        within("proxy shutdown", self.handle.shutdown()).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends a raw request and reads the whole answer: (status, head, body).
async fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    within(&format!("HTTP answer from {addr}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect to admin");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).expect("UTF-8 answer");
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status");
        (status, head.to_owned(), body.to_owned())
    })
    .await
}

/// The value of one series (`name{labels}` exactly as exposed).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn value(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Names of the samples, and of the families (`# TYPE`), of a text exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split_whitespace().next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect()
}

/// The `warren_*` and `process_*` metric names a text (rules, dashboard, docs) uses.
fn names_in(text: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut out = BTreeSet::new();
    for prefix in ["warren_", "process_"] {
        for (at, _) in text.match_indices(prefix) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[at..].chars().take_while(|&c| ident(c)).collect();
            if !name.ends_with('_') {
                out.insert(name);
            }
        }
    }
    out
}

fn repo_file(path: &str) -> String {
    let p = support::repo_dir().join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// promtool

/// The promtool binary; `None` (after saying why) when it is not installed and not required.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    support::external_tool(
        "promtool",
        found,
        "`apt-get install prometheus` (Debian's package has promtool); scripts/test.sh does",
    )
}

/// Runs promtool with `args` (and `stdin`): (success, stdout + stderr).
fn run_promtool(promtool: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(support::repo_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------------
// The exposition

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_every_counter_starts_at_zero() {
    let p = TestProxy::start("promtool").await;

    // Before anything happened: every counter is there, at 0, so increase() sees the first event.
    let fresh = p.text().await;
    for series in [
        "warren_client_connections_opened_total",
        "warren_client_connections_refused_total",
        "warren_client_probes_total",
        "warren_republished_total",
        "warren_dropped_total",
        "warren_config_reloads_total{result=\"ok\"}",
        "warren_config_reloads_total{result=\"error\"}",
        "warren_client_connections",
        "warren_client_channels",
        "warren_held_bytes",
    ] {
        assert_eq!(value(&fresh, series), 0.0, "{series}:\n{fresh}");
    }
    for cluster in ["shard-a", "shard-b", "control"] {
        for name in [
            "warren_publishes_total",
            "warren_deliveries_total",
            "warren_acks_total",
            "warren_cluster_link_failures_total",
            "warren_cluster_sent_bytes_total",
            "warren_cluster_received_bytes_total",
            "warren_confirm_latency_seconds_count",
        ] {
            let series = format!("{name}{{cluster=\"{cluster}\"}}");
            assert_eq!(value(&fresh, &series), 0.0, "{series}:\n{fresh}");
        }
        for outcome in ["ack", "nack"] {
            let series =
                format!("warren_confirms_total{{cluster=\"{cluster}\",outcome=\"{outcome}\"}}");
            assert_eq!(value(&fresh, &series), 0.0, "{series}:\n{fresh}");
        }
    }
    // The evacuation series, for every shard cluster (never the control cluster), before any
    // evacuation.
    for cluster in ["shard-a", "shard-b"] {
        for name in [
            "warren_evacuate_moved_total",
            "warren_evacuate_messages_left",
            "warren_evacuate_errors_total",
            "warren_evacuate_duplicates_total",
        ] {
            let series = format!("{name}{{cluster=\"{cluster}\"}}");
            assert_eq!(value(&fresh, &series), 0.0, "{series}:\n{fresh}");
        }
    }
    assert_eq!(
        metric(&fresh, "warren_evacuate_moved_total{cluster=\"control\"}"),
        None,
        "{fresh}"
    );
    assert_eq!(value(&fresh, "warren_config_last_reload_success"), 1.0);
    let build = format!(
        "warren_build_info{{version=\"{}\",revision=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        warren::metrics::REVISION
    );
    assert_eq!(value(&fresh, &build), 1.0, "{fresh}");
    assert!(!warren::metrics::REVISION.is_empty());

    // process_* from /proc/self.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(value(&fresh, "process_cpu_seconds_total") >= 0.0, "{fresh}");
    assert!(
        value(&fresh, "process_resident_memory_bytes") > 1e6,
        "{fresh}"
    );
    let open = value(&fresh, "process_open_fds");
    assert!(open >= 5.0, "listeners, admin, stdio: {fresh}");
    assert!(value(&fresh, "process_max_fds") > open, "{fresh}");
    let start = value(&fresh, "process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "start {start}, now {now}"
    );

    // Some of everything: health probes answered (down), a rejected reload, a TCP probe.
    p.probed().await;
    std::fs::write(&p.path, "this is = = not toml").unwrap();
    let (status, _, body) = http(
        p.admin,
        "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    drop(TcpStream::connect(p.handle.amqp_addr()).await.unwrap());
    let text = p
        .metrics_until("the reload error and the probe", |t| {
            metric(t, "warren_config_reloads_total{result=\"error\"}") == Some(1.0)
                && metric(t, "warren_client_probes_total") == Some(1.0)
        })
        .await;
    assert_eq!(value(&text, "warren_config_last_reload_success"), 0.0);
    assert_eq!(value(&text, "warren_cluster_up{cluster=\"shard-a\"}"), 0.0);
    assert_eq!(value(&text, "warren_ready"), 0.0);

    // What curl and plain scrapers get: Prometheus text 0.0.4, HELP and TYPE of a counter named
    // as its samples (`_total`), no OpenMetrics `# EOF`.
    let (content_type, plain) = p.metrics(None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        plain.contains("# HELP warren_publishes_total ")
            && plain.contains("# TYPE warren_publishes_total counter"),
        "{plain}"
    );
    assert!(!plain.contains("# EOF"), "{plain}");
    let (content_type, _) = p
        .metrics(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"))
        .await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");

    // Prometheus' own parser and linter.
    if let Some(promtool) = promtool() {
        let (ok, out) = run_promtool(&promtool, &["check", "metrics"], &plain);
        assert!(
            ok,
            "promtool check metrics failed on /metrics:\n{out}\n---\n{plain}"
        );
        eprintln!("promtool check metrics: {out}");
    }

    // OpenMetrics when the scraper asks for it (what Prometheus sends): a counter family is
    // named without `_total`, its samples with it, and the exposition ends with `# EOF`.
    let (content_type, om) = p
        .metrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        ))
        .await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("\n# EOF\n"), "{om}");
    assert_eq!(om.matches("# EOF").count(), 1, "{om}");
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some(family) = rest.strip_suffix(" counter")
        {
            assert!(!family.ends_with("_total"), "{l}");
            let sample = format!("{family}_total");
            assert!(
                om.lines().any(|s| s.starts_with(&sample)),
                "no {sample} sample in:\n{om}"
            );
        }
    }
    assert!(om.contains("# TYPE warren_build info"), "{om}");
    assert!(om.contains("# TYPE warren_cluster_up gauge"), "{om}");
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Alert rules, dashboard, docs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_dashboard_and_docs_name_real_series() {
    let p = TestProxy::start("rules").await;
    let text = p.probed().await;
    p.stop().await;
    let exposed = exposed_names(&text);

    let rules = repo_file(RULES);
    let dashboard = repo_file(DASHBOARD);
    let operations = repo_file(OPERATIONS);
    for (file, body) in [
        (RULES, &rules),
        (DASHBOARD, &dashboard),
        (OPERATIONS, &operations),
    ] {
        let used = names_in(body);
        assert!(used.len() > 10, "{file} names only {used:?}");
        let unknown: Vec<_> = used.difference(&exposed).collect();
        assert!(
            unknown.is_empty(),
            "{file} names series warren does not expose: {unknown:?}\nexposed: {exposed:?}"
        );
    }
    // The docs' table lists every series (histograms by their family name).
    let documented = names_in(&operations);
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let undocumented: Vec<_> = families.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "{OPERATIONS} does not list {undocumented:?}"
    );

    // The rules file: every rule has an alert name, an expression and a severity; the
    // dashboard: valid JSON whose panels query something.
    let yaml: yaml_serde::Value = yaml_serde::from_str(&rules).expect("the rules file is YAML");
    let mut alerts = 0;
    for group in yaml["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            assert!(rule["expr"].as_str().is_some(), "{name}: no expr");
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: no severity"
            );
            alerts += 1;
        }
    }
    assert!(alerts >= 10, "{alerts} alerts");
    // Bare TCP health checks are probes: no rule may alert on them.
    assert!(
        !rules.contains("warren_client_probes_total ")
            && !rules.contains("warren_client_probes_total[")
    );
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let exprs = panels
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .filter(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty()))
        .count();
    assert!(exprs >= 20, "{exprs} queries in the dashboard");
    assert!(operations.contains(RULES) && operations.contains(DASHBOARD));

    if let Some(promtool) = promtool() {
        let (ok, out) = run_promtool(&promtool, &["check", "rules", RULES], "");
        assert!(ok, "promtool check rules {RULES}:\n{out}");
        assert!(out.contains("SUCCESS"), "{out}");
        eprintln!("promtool check rules: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// TCP probes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_tcp_connects_are_probes_not_refusals() {
    let p = TestProxy::start("probes").await;
    let amqp = p.handle.amqp_addr();
    let before = p.text().await;
    let refused = value(&before, "warren_client_connections_refused_total");
    let probes = value(&before, "warren_client_probes_total");

    // 100 load-balancer TCP checks: connect, close (FIN) without a byte.
    for _ in 0..100 {
        let s = within("TCP connect", TcpStream::connect(amqp))
            .await
            .unwrap();
        drop(s);
    }
    let text = p
        .metrics_until("100 probes", |t| {
            metric(t, "warren_client_probes_total") == Some(probes + 100.0)
        })
        .await;
    assert_eq!(
        value(&text, "warren_client_connections_refused_total"),
        refused,
        "bare connects are not refusals:\n{text}"
    );

    // Checks that close with a reset (SO_LINGER 0) are probes too.
    for _ in 0..5 {
        let s = within("TCP connect", TcpStream::connect(amqp))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.set_zero_linger().unwrap();
        drop(s);
    }
    p.metrics_until("105 probes", |t| {
        metric(t, "warren_client_probes_total") == Some(probes + 105.0)
    })
    .await;

    // Real refusals still count as refusals: a wrong protocol (answered with AMQP's header, as
    // RabbitMQ does) and a client that sends part of the header and goes away.
    let mut s = TcpStream::connect(amqp).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    within("the protocol header back", s.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"AMQP\x00\x00\x09\x01");
    let mut s = TcpStream::connect(amqp).await.unwrap();
    s.write_all(b"AMQ").await.unwrap();
    drop(s);
    let text = p
        .metrics_until("2 refusals", |t| {
            metric(t, "warren_client_connections_refused_total") == Some(refused + 2.0)
        })
        .await;
    assert_eq!(value(&text, "warren_client_probes_total"), probes + 105.0);
    assert_eq!(value(&text, "warren_client_connections"), 0.0);
    assert_eq!(value(&text, "warren_client_connections_opened_total"), 0.0);
    p.stop().await;
}
