//! Unit tests of the whole path from text to [`Config`] or to a located [`ConfigError`]: the
//! example file, defaults, and one test per kind of mistake, each checking the line, column
//! and wording an operator would see.

use super::error::locate;
use super::*;

const EXAMPLE: &str = include_str!("../../proxy.toml");

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
        .replace("# drain = false", "drain = false")
        .replace("# evacuate = false", "evacuate = false");
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
            client_write_timeout_secs: 25,
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
            lazy_links: true,
            idle_link_secs: 300,
            evacuate_rate: 1000,
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
        &bad("127.0.0.1:99999"),
        1,
        Some(10),
        "port 99999 is out of range (1-65535",
    );
    rejects(
        &bad("[::1]:70000"),
        1,
        Some(10),
        "port 70000 is out of range",
    );
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
        &with_cluster("\n[[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [\"h:1\"]\n"),
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
    rejects(
        &with_cluster(&format!("{control}evacuate = true\n")),
        12,
        Some(12),
        "evacuate only applies to shard clusters",
    );
}

#[test]
fn evacuate_implies_drain_and_needs_another_shard_cluster() {
    let second = "\n[[clusters]]\nname = \"s2\"\nrole = \"shard\"\nnodes = [\"h:2\"]\n";
    let c = Config::parse(
        &with_cluster(&format!("evacuate = true\n{second}")),
        "t.toml",
    )
    .expect("one of two shard clusters may evacuate");
    assert!(
        c.clusters[0].evacuate && c.clusters[0].drain,
        "evacuating drains"
    );
    assert!(!c.clusters[1].evacuate && !c.clusters[1].drain);
    assert_eq!(c.limits.evacuate_rate, 1000, "the default rate");
    rejects(
        &with_cluster("evacuate = true\n"),
        7,
        Some(12),
        "every shard cluster has evacuate = true",
    );
    rejects(
        &with_cluster(&format!("evacuate = true\n{second}evacuate = true\n")),
        7,
        Some(12),
        "nowhere to go",
    );
    let rate = |r: &str| format!("{}[limits]\nevacuate_rate = {r}\n", with_cluster(second));
    assert_eq!(
        Config::parse(&rate("250"), "t.toml")
            .map(|c| c.limits.evacuate_rate)
            .ok(),
        Some(250)
    );
    let e = fails(&rate("0")).to_string();
    assert!(e.contains("evacuate_rate = 0 is too small"), "{e}");
    let text = format!("state_dir = \"evac\"\n{}", with_cluster(second));
    let at = Config::parse_at(&text, "t.toml", Some(std::path::Path::new("/etc/warren")));
    assert_eq!(
        at.ok().and_then(|c| c.state_dir),
        Some(std::path::PathBuf::from("/etc/warren/evac")),
        "relative to the file's directory"
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
        &with_cluster("tls = { ca_file = \"ca.pem\" }\n").replace("127.0.0.1:5702", "a..b:5702"),
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

const TWO_SHARDS: &str = "listen = \"127.0.0.1:5673\"

[[clusters]]
name = \"shard-a\"
role = \"shard\"
nodes = [\"127.0.0.1:5701\"]

[[clusters]]
name = \"shard-b\"
role = \"shard\"
nodes = [\"127.0.0.1:5711\"]

[[clusters]]
name = \"control\"
role = \"control\"
nodes = [\"127.0.0.1:5721\"]
";

#[test]
fn routing_rules_parse_in_order_with_their_groups_and_spread() {
    let text = format!(
        "{TWO_SHARDS}
[[routing.rules]]
match = [\"fast.*\", \"fast\"]
clusters = [\"shard-a\"]
spread = \"channel\"

[[routing.rules]]
match = [\"*\"]
spread = \"key\"
"
    );
    let c = Config::parse(&text, "t.toml").unwrap();
    let rules = &c.routing.rules;
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0].clusters.as_deref(),
        Some(&["shard-a".to_owned()][..])
    );
    assert_eq!(rules[0].spread, crate::route::Spread::Channel);
    assert_eq!(rules[1].clusters, None);
    assert_eq!(rules[1].spread, crate::route::Spread::Key);
    assert_eq!(c.routing.rule_for(b"fast", b"fast"), Some(0));
    // The Celery preset stays when only rules are given.
    assert_eq!(
        c.routing.control_exchanges,
        crate::route::Rules::default().control_exchanges
    );
}

#[test]
fn routing_rules_are_checked() {
    let rule = |body: &str| format!("{TWO_SHARDS}\n[[routing.rules]]\n{body}\n");
    let e = fails(&rule("clusters = [\"shard-a\"]"));
    assert!(e.to_string().contains("needs `match`"), "{e}");
    let e = fails(&rule("match = [\"x\"]\nspread = \"round-robin\""));
    assert!(
        e.to_string()
            .contains("not one of \"message\", \"channel\", \"key\""),
        "{e}"
    );
    let e = fails(&rule("match = [\"x\"]\nclusters = [\"shard-z\"]"));
    assert!(
        e.to_string().contains("\"shard-z\", which is not defined"),
        "{e}"
    );
    let e = fails(&rule("match = [\"x\"]\nclusters = [\"control\"]"));
    assert!(e.to_string().contains("control cluster"), "{e}");
    let e = fails(&rule("match = [\"x\"]\nclusters = []"));
    assert!(e.to_string().contains("at least one shard cluster"), "{e}");
    let e = fails(&rule("match = [\"x\"]\nweight = 3"));
    assert!(e.to_string().contains("weight"), "{e}");
}

// --- clusters.management -----------------------------------------------------------------

#[test]
fn management_is_read_with_its_defaults() {
    let c = Config::parse(
        &with_cluster(
            "management = { url = \"http://127.0.0.1:15701\", user = \"mon\", password = \"pw\" }\n",
        ),
        "t.toml",
    )
    .unwrap();
    let m = c.clusters[0].management.as_ref().unwrap();
    assert_eq!(
        m.url,
        ManagementUrl {
            https: false,
            host: "127.0.0.1".into(),
            port: 15701,
            prefix: String::new(),
        }
    );
    assert_eq!(m.url.to_string(), "http://127.0.0.1:15701");
    assert_eq!((m.user.as_str(), m.password.as_str()), ("mon", "pw"));
    assert_eq!(m.vhosts, ["/"]);
    assert_eq!(m.tls, None);
    // The password never shows in Debug (Config is logged).
    let debug = format!("{c:?}");
    assert!(
        debug.contains("ManagementConfig") && debug.contains("\"mon\""),
        "{debug}"
    );
    assert!(!debug.contains("pw\""), "{debug}");
    // Without the key: none.
    assert_eq!(
        Config::parse(MINIMAL, "t.toml").unwrap().clusters[0].management,
        None
    );

    // Every form of URL: default ports, IPv6, a path prefix behind a reverse proxy, more vhosts.
    for (url, https, host, port, prefix) in [
        ("http://rabbit-1", false, "rabbit-1", 80, ""),
        ("http://rabbit-1:15672/", false, "rabbit-1", 15672, ""),
        ("HTTP://[::1]:15672", false, "::1", 15672, ""),
        (
            "https://mq.example.com/rabbit/a/",
            true,
            "mq.example.com",
            443,
            "/rabbit/a",
        ),
    ] {
        let tls = if https {
            ", insecure_skip_verify = true"
        } else {
            ""
        };
        let text = with_cluster(&format!(
            "management = {{ url = \"{url}\", user = \"u\", password = \"\", vhosts = [\"/\", \"b\"]{tls} }}\n"
        ));
        let c = Config::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{url}: {e}"));
        let m = c.clusters[0].management.as_ref().unwrap();
        assert_eq!(
            (
                m.url.https,
                m.url.host.as_str(),
                m.url.port,
                m.url.prefix.as_str()
            ),
            (https, host, port, prefix),
            "{url}"
        );
        assert_eq!(m.vhosts, ["/", "b"]);
        assert_eq!(
            m.tls,
            https.then_some(ManagementTls::InsecureSkipVerify),
            "{url}"
        );
    }
    let c = Config::parse(
        &with_cluster(
            "management = { url = \"http://[::1]:9\", user = \"u\", password = \"p\" }\n",
        ),
        "t.toml",
    )
    .unwrap();
    let url = &c.clusters[0].management.as_ref().unwrap().url;
    assert_eq!(
        (url.authority(), url.to_string()),
        ("[::1]:9".to_owned(), "http://[::1]:9".to_owned())
    );
}

#[test]
fn rejects_bad_management() {
    let m = |body: &str| with_cluster(&format!("management = {{ {body} }}\n"));
    // Required keys, reported at the table.
    rejects(
        &m("user = \"u\", password = \"p\""),
        7,
        Some(14),
        "cluster \"shard-a\": management is missing required key `url`",
    );
    rejects(
        &m("url = \"http://h:1\", password = \"p\""),
        7,
        Some(14),
        "management is missing required key `user`",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\""),
        7,
        Some(14),
        "management is missing required key `password`",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", pasword = \"p\""),
        7,
        None,
        "unknown key `pasword`",
    );
    // The URL, reported at its value.
    for (url, why) in [
        ("ftp://h:21", "the scheme must be http or https"),
        ("h:15672", "it needs http:// or https:// in front"),
        ("/api", "it needs http:// or https:// in front"),
        ("http://guest:guest@h:15672", "no credentials in the URL"),
        ("http://h:15672/?x=1", "no query string or fragment"),
        ("http://h:15672/#top", "no query string or fragment"),
        ("http://h:0", "port 0"),
        (
            "http://h:99999",
            "the port must be a number from 1 to 65535",
        ),
        ("http://h:", "the port must be a number"),
        ("http://", "expected a URL"),
        ("", "expected a URL"),
    ] {
        rejects(
            &m(&format!("url = \"{url}\", user = \"u\", password = \"p\"")),
            7,
            Some(22),
            why,
        );
    }
    rejects(
        &m("url = \"http://h:1\", user = \"\", password = \"p\""),
        7,
        Some(43),
        "management.user is empty",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", vhosts = []"),
        7,
        Some(73),
        "management.vhosts is empty",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", vhosts = [\"/\", \"\"]"),
        7,
        Some(79),
        "an empty vhost name",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", vhosts = [\"/\", \"/\"]"),
        7,
        Some(79),
        "vhost \"/\" is listed twice",
    );
    // TLS settings that do not fit the scheme.
    rejects(
        &m("url = \"https://h:1\", user = \"u\", password = \"p\""),
        7,
        Some(22),
        "management.url is https: give management.ca_file",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", ca_file = \"ca.pem\""),
        7,
        Some(74),
        "management.ca_file only applies to an https url",
    );
    rejects(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", insecure_skip_verify = true"),
        7,
        Some(87),
        "insecure_skip_verify only applies to an https url",
    );
    rejects(
        &m(
            "url = \"https://h:1\", user = \"u\", password = \"p\", ca_file = \"ca.pem\", \
             insecure_skip_verify = true",
        ),
        7,
        None,
        "contradict each other",
    );
    rejects(
        &m(
            "url = \"https://h:1\", user = \"u\", password = \"p\", ca_file = \"/nonexistent/ca.pem\"",
        ),
        7,
        Some(75),
        "cluster \"shard-a\": management.ca_file: cannot read /nonexistent/ca.pem",
    );
    // insecure_skip_verify = false is the default, fine with http.
    Config::parse(
        &m("url = \"http://h:1\", user = \"u\", password = \"p\", insecure_skip_verify = false"),
        "t.toml",
    )
    .unwrap();
}

#[test]
fn management_ca_file_is_read_relative_to_the_config_file() {
    let dir = std::env::temp_dir().join(format!("warren-config-mgmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, _key) = self_signed();
    std::fs::write(dir.join("mgmt-ca.pem"), &cert).unwrap();
    let text = format!(
        "{MINIMAL}management = {{ url = \"https://localhost:15671\", user = \"u\", password = \"p\", \
         ca_file = \"mgmt-ca.pem\" }}\n"
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let m = c.clusters[0].management.as_ref().unwrap();
    match &m.tls {
        Some(ManagementTls::Verify(tls)) => {
            assert_eq!(tls.ca_file, dir.join("mgmt-ca.pem"));
            assert_eq!(tls.server_name, None);
        }
        other => panic!("expected a verified TLS setting, got {other:?}"),
    }
    // A renewed CA at the same path is a change a reload picks up.
    let (cert2, _) = self_signed();
    std::fs::write(dir.join("mgmt-ca.pem"), &cert2).unwrap();
    assert_ne!(Config::load(&path).unwrap().clusters[0], c.clusters[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spread_links_is_off_unless_set() {
    let c = Config::parse(&with_cluster(""), "t.toml").unwrap();
    assert!(c.clusters.iter().all(|c| !c.spread_links));
    let c = Config::parse(&with_cluster("spread_links = true\n"), "t.toml").unwrap();
    assert!(c.clusters.last().unwrap().spread_links);
    rejects(
        &with_cluster("spread_links = \"yes\"\n"),
        MINIMAL.lines().count() + 1,
        None,
        "invalid type",
    );
}

fn three_nodes(spread: bool) -> ClusterConfig {
    let text = format!(
        "listen = \"127.0.0.1:1\"\n[[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"n1:1\", \"n2:1\", \"n3:1\"]\nspread_links = {spread}\n"
    );
    Config::parse(&text, "t.toml").unwrap().clusters[0].clone()
}

fn node_names(nodes: Vec<NodeAddr>) -> Vec<String> {
    nodes.iter().map(ToString::to_string).collect()
}

#[test]
fn links_go_to_the_nodes_in_file_order_by_default() {
    let c = three_nodes(false);
    for conn in 0..4 {
        assert_eq!(node_names(c.link_nodes(conn)), ["n1:1", "n2:1", "n3:1"]);
    }
}

#[test]
fn spread_links_start_each_connection_at_the_next_node_and_keep_the_others_behind() {
    let c = three_nodes(true);
    assert_eq!(node_names(c.link_nodes(0)), ["n1:1", "n2:1", "n3:1"]);
    assert_eq!(node_names(c.link_nodes(1)), ["n2:1", "n3:1", "n1:1"]);
    assert_eq!(node_names(c.link_nodes(2)), ["n3:1", "n1:1", "n2:1"]);
    assert_eq!(node_names(c.link_nodes(3)), ["n1:1", "n2:1", "n3:1"]);
}
