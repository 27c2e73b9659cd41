//! Checks of the docker-compose deployment (`docker-compose.yml`, `Dockerfile`, `deploy/`) that
//! need no Docker engine: the compose file is read with a YAML parser (merge keys applied, as
//! compose does) and held against the warren configuration it mounts, the RabbitMQ files it
//! mounts and the image it builds. The compose warren config is also run through the real
//! `warren check`.
//!
//! What this cannot see: whether the images start. docs/celery.md and deploy/README.md say how
//! the stack was checked beyond this.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use warren::config::{Config, Role};
use yaml_serde::Value;

/// The RabbitMQ services: cluster name -> its two nodes.
const CLUSTERS: [(&str, [&str; 2]); 3] = [
    ("shard-a", ["shard-a-1", "shard-a-2"]),
    ("shard-b", ["shard-b-1", "shard-b-2"]),
    ("control", ["control-1", "control-2"]),
];
const CELERY_SERVICES: [&str; 2] = ["worker", "producer"];
/// Where the image's ENTRYPOINT reads the configuration.
const IMAGE_CONFIG: &str = "/etc/warren/warren.toml";
/// The compose warren configuration, relative to the repository.
const COMPOSE_CONFIG: &str = "deploy/compose/warren.toml";
/// warren gives up on a graceful shutdown at most this long after the configured grace
/// (`SHUTDOWN_SLACK` in src/main.rs); the container must be given more than grace + this.
const SHUTDOWN_BACKSTOP: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// docker-compose.yml, parsed, with `<<: *anchor` merge keys applied as compose applies them.
fn compose() -> &'static Value {
    static COMPOSE: OnceLock<Value> = OnceLock::new();
    COMPOSE.get_or_init(|| {
        let mut v: Value = yaml_serde::from_str(&read("docker-compose.yml"))
            .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
        v.apply_merge()
            .unwrap_or_else(|e| panic!("docker-compose.yml: bad merge key: {e}"));
        v
    })
}

fn services() -> &'static yaml_serde::Mapping {
    compose()
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no `services` mapping")
}

fn service(name: &str) -> &'static Value {
    services().get(name).unwrap_or_else(|| {
        panic!(
            "docker-compose.yml has no service {name:?} (services: {:?})",
            service_names()
        )
    })
}

fn service_names() -> BTreeSet<String> {
    services()
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect()
}

fn rabbit_services() -> impl Iterator<Item = (&'static str, &'static str)> {
    CLUSTERS
        .iter()
        .flat_map(|(cluster, nodes)| nodes.iter().map(move |n| (*cluster, *n)))
}

fn str_field<'a>(svc: &'a Value, key: &str) -> Option<&'a str> {
    svc.get(key).and_then(Value::as_str)
}

/// The compose warren configuration, through the real parser.
fn warren_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::load(&repo().join(COMPOSE_CONFIG))
            .unwrap_or_else(|e| panic!("{COMPOSE_CONFIG} is rejected: {e}"))
    })
}

/// A service's bind mounts and volumes as (source, target), from the short (`src:dst[:mode]`)
/// or the long (`{type, source, target}`) syntax.
fn mounts(svc: &Value) -> Vec<(String, String)> {
    let Some(list) = svc.get("volumes").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    list.iter()
        .map(|v| match v {
            Value::String(s) => {
                let mut parts = s.splitn(3, ':');
                let src = parts.next().unwrap_or_default().to_owned();
                let dst = parts
                    .next()
                    .unwrap_or_else(|| panic!("volume {s:?} has no target"));
                (src, dst.to_owned())
            }
            other => (
                str_field(other, "source").unwrap_or_default().to_owned(),
                str_field(other, "target")
                    .unwrap_or_else(|| panic!("volume {other:?} has no target"))
                    .to_owned(),
            ),
        })
        .collect()
}

/// The host path (relative to the repository) that appears at `target` inside the service's
/// container, through a file mount or a mount of one of its parent directories.
fn host_path_of(svc: &Value, target: &str) -> Option<PathBuf> {
    mounts(svc).into_iter().find_map(|(src, dst)| {
        let src = src.strip_prefix("./")?;
        if dst == target {
            Some(PathBuf::from(src))
        } else {
            let rest = target.strip_prefix(&format!("{}/", dst.trim_end_matches('/')))?;
            Some(Path::new(src).join(rest))
        }
    })
}

/// `depends_on` as service -> condition (`service_started` for the list syntax).
fn depends_on(svc: &Value) -> BTreeMap<String, String> {
    match svc.get("depends_on") {
        None => BTreeMap::new(),
        Some(Value::Sequence(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|s| (s.to_owned(), "service_started".to_owned()))
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let name = k.as_str().expect("depends_on key").to_owned();
                let cond = str_field(v, "condition")
                    .unwrap_or("service_started")
                    .to_owned();
                (name, cond)
            })
            .collect(),
        Some(other) => panic!("depends_on is neither a list nor a mapping: {other:?}"),
    }
}

/// `environment` as a map, from the mapping or the `KEY=value` list syntax.
fn environment(svc: &Value) -> BTreeMap<String, String> {
    match svc.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                (k.as_str().expect("environment key").to_owned(), value)
            })
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment is neither a list nor a mapping: {other:?}"),
    }
}

/// One published port: host address (empty = all), host port, container port.
#[derive(Debug, PartialEq)]
struct Published {
    host_ip: String,
    host_port: u16,
    container_port: u16,
}

fn published_ports(svc: &Value) -> Vec<Published> {
    let Some(list) = svc.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    list.iter()
        .map(|p| match p {
            Value::String(s) => {
                let spec = s.split('/').next().unwrap_or_default();
                let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                let port = |s: &str| -> u16 {
                    s.parse()
                        .unwrap_or_else(|_| panic!("port {s:?} in {p:?} is not a single port"))
                };
                match parts.as_slice() {
                    [container, host] => Published {
                        host_ip: String::new(),
                        host_port: port(host),
                        container_port: port(container),
                    },
                    [container, host, ip] => Published {
                        host_ip: ip.to_string(),
                        host_port: port(host),
                        container_port: port(container),
                    },
                    _ => panic!("port {s:?}: expected [IP:]HOST:CONTAINER"),
                }
            }
            other => Published {
                host_ip: str_field(other, "host_ip").unwrap_or_default().to_owned(),
                host_port: other
                    .get("published")
                    .and_then(|v| {
                        v.as_u64()
                            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    })
                    .and_then(|n| u16::try_from(n).ok())
                    .unwrap_or_else(|| panic!("port {other:?} has no published port")),
                container_port: other
                    .get("target")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                    .unwrap_or_else(|| panic!("port {other:?} has no target port")),
            },
        })
        .collect()
}

/// A compose duration such as `30s`, `1m30s`, `500ms`.
fn compose_duration(s: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {s:?}"));
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            _ => panic!("bad unit {unit:?} in duration {s:?}"),
        };
    }
    total
}

/// `amqp://user:pass@host:port/vhost` -> (host, port).
fn amqp_host_port(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("amqp://")
        .or_else(|| url.strip_prefix("pyamqp://"))
        .unwrap_or_else(|| panic!("broker URL {url:?} is not amqp://"));
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5672"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("broker URL {url:?}: bad port"));
    (host.to_owned(), port)
}

/// `cluster_formation.classic_config.nodes.N = NAME` values of a rabbitmq.conf file.
fn classic_config_nodes(conf: &str) -> Vec<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cluster_formation.classic_config.nodes."))
        .filter_map(|l| l.split_once('=').map(|(_, v)| v.trim().to_owned()))
        .collect()
}

fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
}

/// The `check-jsonschema` command of the test venv (tests/python/requirements.txt), or the one
/// `WARREN_CHECK_JSONSCHEMA` names; `None` (after saying why) when it is missing and not
/// required (`support::external_tool`).
fn check_jsonschema() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WARREN_CHECK_JSONSCHEMA") {
        return Some(PathBuf::from(p));
    }
    let venv = repo().join(".venv/bin/check-jsonschema");
    let found = venv.exists().then(|| venv.clone());
    support::external_tool(
        &venv.display().to_string(),
        found,
        "scripts/test.sh installs tests/python/requirements.txt into .venv; \
         or set WARREN_CHECK_JSONSCHEMA",
    )
}

// ---------------------------------------------------------------------------------------------

/// The whole file against the Compose Specification's own JSON schema (the copy check-jsonschema
/// vendors): a misspelt or misplaced key anywhere, which the checks below would not look at, is
/// what `docker compose up` would reject first.
#[test]
fn compose_file_validates_against_the_compose_specification_schema() {
    let Some(check) = check_jsonschema() else {
        return;
    };
    let out = Command::new(check)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(repo().join("docker-compose.yml"))
        .output()
        .expect("run check-jsonschema");
    assert!(
        out.status.success(),
        "docker-compose.yml does not validate against the compose-spec schema:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_service_exists_with_a_healthcheck() {
    let mut expected: Vec<&str> = rabbit_services().map(|(_, node)| node).collect();
    expected.push("warren");
    expected.extend(CELERY_SERVICES);
    for name in expected {
        let hc = service(name)
            .get("healthcheck")
            .unwrap_or_else(|| panic!("service {name} has no healthcheck"));
        assert_ne!(
            hc.get("disable").and_then(Value::as_bool),
            Some(true),
            "service {name}: healthcheck disabled"
        );
        let test = hc
            .get("test")
            .unwrap_or_else(|| panic!("service {name}: healthcheck without `test`"));
        let words: Vec<&str> = match test {
            Value::String(s) => vec![s.as_str()],
            Value::Sequence(seq) => seq.iter().filter_map(Value::as_str).collect(),
            other => panic!("service {name}: healthcheck test {other:?}"),
        };
        assert!(
            words.len() >= 2 && matches!(words[0], "CMD" | "CMD-SHELL"),
            "service {name}: healthcheck test must be [CMD, ...] or [CMD-SHELL, ...], got {words:?}"
        );
    }
}

#[test]
fn rabbitmq_nodes_have_stable_names_and_their_clusters_peer_list() {
    for (cluster, node) in rabbit_services() {
        let svc = service(node);
        let image = str_field(svc, "image").unwrap_or_default();
        // Classic queue mirroring (the ha-all policy) was removed in RabbitMQ 4.0.
        assert!(
            image.starts_with("rabbitmq:3.13"),
            "{node}: image {image:?}: the ha-all policy needs RabbitMQ 3.13 (mirroring is gone in 4.x)"
        );
        // rabbit@<hostname> is the node name the peer lists use.
        assert_eq!(
            str_field(svc, "hostname"),
            Some(node),
            "{node}: hostname must be the service name, so the node is rabbit@{node}"
        );
        let conf = host_path_of(svc, "/etc/rabbitmq/conf.d/30-cluster.conf")
            .unwrap_or_else(|| panic!("{node}: no peer list mounted at conf.d/30-cluster.conf"));
        assert_eq!(
            conf,
            PathBuf::from(format!("deploy/rabbitmq/cluster-{cluster}.conf")),
            "{node}: wrong cluster peer list"
        );
        let peers = classic_config_nodes(&read(conf.to_str().unwrap()));
        let want: Vec<String> = CLUSTERS
            .iter()
            .find(|(c, _)| *c == cluster)
            .unwrap()
            .1
            .iter()
            .map(|n| format!("rabbit@{n}"))
            .collect();
        assert_eq!(peers, want, "{}: peers of {cluster}", conf.display());
        assert_eq!(
            host_path_of(svc, "/etc/rabbitmq/conf.d/20-warren.conf"),
            Some(PathBuf::from("deploy/rabbitmq/rabbitmq.conf")),
            "{node}: the shared rabbitmq.conf is not mounted"
        );
        let entrypoint: Vec<&str> = svc
            .get("entrypoint")
            .and_then(Value::as_sequence)
            .map(|s| s.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let script = entrypoint
            .last()
            .unwrap_or_else(|| panic!("{node}: no entrypoint"));
        assert_eq!(
            host_path_of(svc, script),
            Some(PathBuf::from("deploy/rabbitmq/entrypoint.sh")),
            "{node}: entrypoint {script} is not deploy/rabbitmq/entrypoint.sh"
        );
        let secrets: Vec<&str> = svc
            .get("secrets")
            .and_then(Value::as_sequence)
            .map(|s| s.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(
            secrets.contains(&"erlang_cookie"),
            "{node}: no erlang_cookie secret, the nodes could not authenticate to each other"
        );
        assert!(
            mounts(svc)
                .iter()
                .any(|(src, dst)| dst == "/var/lib/rabbitmq" && !src.starts_with('.')),
            "{node}: /var/lib/rabbitmq should be a named volume"
        );
    }
    let conf = read("deploy/rabbitmq/rabbitmq.conf");
    assert_eq!(
        conf_value(&conf, "cluster_formation.peer_discovery_backend").as_deref(),
        Some("classic_config")
    );
    assert_eq!(
        conf_value(&conf, "loopback_users.guest").as_deref(),
        Some("false"),
        "warren connects from another container: guest must not be limited to localhost"
    );
}

#[test]
fn rabbitmq_definitions_declare_the_user_vhost_and_ha_all_policy() {
    let conf = read("deploy/rabbitmq/rabbitmq.conf");
    let path = conf_value(&conf, "definitions.local.path")
        .expect("rabbitmq.conf imports no definitions (definitions.local.path)");
    for (_, node) in rabbit_services() {
        assert_eq!(
            host_path_of(service(node), &path),
            Some(PathBuf::from("deploy/rabbitmq/definitions.json")),
            "{node}: definitions.json is not mounted at {path}"
        );
    }
    let defs: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json"))
        .expect("definitions.json is not JSON");
    let list = |key: &str| defs[key].as_array().cloned().unwrap_or_default();
    // A blank node that imports definitions does not create guest and "/" itself.
    assert!(
        list("users").iter().any(|u| u["name"] == "guest"),
        "no guest user"
    );
    assert!(
        list("vhosts").iter().any(|v| v["name"] == "/"),
        "no vhost /"
    );
    assert!(
        list("permissions")
            .iter()
            .any(|p| p["user"] == "guest" && p["vhost"] == "/" && p["configure"] == ".*"),
        "guest has no permissions on /"
    );
    let policies = list("policies");
    let ha = policies
        .iter()
        .find(|p| p["name"] == "ha-all")
        .expect("no ha-all policy");
    assert_eq!(ha["pattern"], ".*");
    assert_eq!(ha["definition"]["ha-mode"], "all");
}

#[test]
fn warren_waits_until_every_node_is_healthy() {
    let deps = depends_on(service("warren"));
    for (_, node) in rabbit_services() {
        assert_eq!(
            deps.get(node).map(String::as_str),
            Some("service_healthy"),
            "warren must depend on {node} with condition: service_healthy (has {deps:?})"
        );
    }
}

#[test]
fn warren_config_nodes_are_the_compose_rabbitmq_services_on_5672() {
    let config = warren_config();
    let names = service_names();
    let mut seen = BTreeSet::new();
    for cluster in &config.clusters {
        let (_, expected_nodes) = CLUSTERS
            .iter()
            .find(|(c, _)| *c == cluster.name)
            .unwrap_or_else(|| panic!("{COMPOSE_CONFIG}: unexpected cluster {}", cluster.name));
        let want_role = if cluster.name == "control" {
            Role::Control
        } else {
            Role::Shard
        };
        assert_eq!(cluster.role, want_role, "cluster {}", cluster.name);
        let hosts: Vec<&str> = cluster.nodes.iter().map(|n| n.host.as_str()).collect();
        assert_eq!(
            hosts,
            expected_nodes.to_vec(),
            "cluster {}: nodes must be its two compose services",
            cluster.name
        );
        for node in &cluster.nodes {
            assert!(
                names.contains(&node.host),
                "{COMPOSE_CONFIG}: node {node} is not a compose service"
            );
            assert_eq!(node.port, 5672, "{COMPOSE_CONFIG}: node {node}");
        }
        seen.insert(cluster.name.as_str());
    }
    assert_eq!(
        seen,
        CLUSTERS.iter().map(|(c, _)| *c).collect(),
        "{COMPOSE_CONFIG} must name every cluster of the compose file"
    );
}

#[test]
fn compose_warren_config_passes_warren_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "--config", COMPOSE_CONFIG])
        .current_dir(repo())
        .output()
        .expect("run warren check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "warren check --config {COMPOSE_CONFIG} failed ({}): {stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.contains("2 shard clusters, control: control"),
        "unexpected summary: {stdout}"
    );
}

#[test]
fn warren_publishes_the_ports_its_config_listens_on() {
    let config = warren_config();
    let admin = config
        .admin
        .listen
        .expect("the compose config must enable the admin endpoint");
    let svc = service("warren");
    let ports = published_ports(svc);
    for (what, addr) in [("listen", config.listen), ("[admin] listen", admin)] {
        assert!(
            addr.ip().is_unspecified(),
            "{COMPOSE_CONFIG}: {what} = {addr} must bind all interfaces inside the container"
        );
        let published = ports
            .iter()
            .find(|p| p.container_port == addr.port())
            .unwrap_or_else(|| {
                panic!(
                    "warren: {what} port {} is not published ({ports:?})",
                    addr.port()
                )
            });
        assert_eq!(
            published.host_ip,
            "127.0.0.1",
            "warren: port {} should be published on the loopback only",
            addr.port()
        );
    }
    assert_eq!(ports.len(), 2, "warren publishes exactly AMQP and admin");
    // The healthcheck asks the admin endpoint where the config puts it.
    assert_eq!(
        environment(svc)
            .get("WARREN_ADMIN_ADDR")
            .map(String::as_str),
        Some(format!("127.0.0.1:{}", admin.port()).as_str()),
        "warren: WARREN_ADMIN_ADDR must point the healthcheck at the admin port"
    );
    // And the image says the same.
    let dockerfile = read("Dockerfile");
    let expose = dockerfile
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("Dockerfile has no EXPOSE");
    for port in [config.listen.port(), admin.port()] {
        assert!(
            expose.split_whitespace().any(|w| w == port.to_string()),
            "Dockerfile {expose:?} does not expose {port}"
        );
    }
}

#[test]
fn warren_reads_the_compose_config_where_the_image_looks() {
    let dockerfile = read("Dockerfile");
    let entrypoint = dockerfile
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT "))
        .expect("Dockerfile has no ENTRYPOINT");
    assert!(
        entrypoint.contains(&format!("\"--config\", \"{IMAGE_CONFIG}\"")),
        "Dockerfile {entrypoint:?} does not read {IMAGE_CONFIG}"
    );
    let svc = service("warren");
    assert_eq!(
        host_path_of(svc, IMAGE_CONFIG),
        Some(PathBuf::from(COMPOSE_CONFIG)),
        "warren: {COMPOSE_CONFIG} is not mounted at {IMAGE_CONFIG}"
    );
    let build = match svc.get("build") {
        Some(Value::String(s)) => s.clone(),
        Some(b) => str_field(b, "context").unwrap_or(".").to_owned(),
        None => panic!("warren: no build section"),
    };
    assert!(
        matches!(build.as_str(), "." | "./"),
        "warren must be built from the repository's Dockerfile, got {build:?}"
    );
}

#[test]
fn warren_gets_more_time_to_stop_than_its_shutdown_grace() {
    let grace = warren_config().timeouts.shutdown_grace();
    let stop = str_field(service("warren"), "stop_grace_period")
        .map(compose_duration)
        .unwrap_or(Duration::from_secs(10));
    assert!(
        stop > grace + SHUTDOWN_BACKSTOP,
        "warren: stop_grace_period {stop:?} must exceed shutdown_grace ({grace:?}) + {SHUTDOWN_BACKSTOP:?}, \
         or docker kills warren in the middle of its graceful shutdown"
    );
}

#[test]
fn celery_services_use_warren_as_their_broker() {
    let listen_port = warren_config().listen.port();
    for name in CELERY_SERVICES {
        let svc = service(name);
        let env = environment(svc);
        let url = env
            .get("WARREN_BROKER_URL")
            .unwrap_or_else(|| panic!("{name}: no WARREN_BROKER_URL"));
        let (host, port) = amqp_host_port(url);
        assert_eq!(
            host, "warren",
            "{name}: broker URL {url} must point at the warren service"
        );
        assert_eq!(
            port, listen_port,
            "{name}: broker URL {url} must use warren's listen port"
        );
        assert_eq!(
            depends_on(svc).get("warren").map(String::as_str),
            Some("service_healthy"),
            "{name}: must wait for warren to be healthy (ready)"
        );
    }
    let app = read("deploy/compose/celery/app.py");
    assert!(
        app.contains("broker_url=os.environ.get(\"WARREN_BROKER_URL\""),
        "deploy/compose/celery/app.py must take broker_url from WARREN_BROKER_URL"
    );
}

#[test]
fn files_the_compose_file_refers_to_exist() {
    for (name, svc) in services() {
        let name = name.as_str().unwrap_or("?");
        for (src, dst) in mounts(svc) {
            if let Some(rel) = src.strip_prefix("./") {
                assert!(
                    repo().join(rel).exists(),
                    "{name}: mounts {src} at {dst}, but {rel} does not exist"
                );
            }
        }
        let context = match svc.get("build") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(b) => Some(str_field(b, "context").unwrap_or(".").to_owned()),
            None => None,
        };
        if let Some(context) = context {
            assert!(
                repo().join(&context).join("Dockerfile").is_file(),
                "{name}: build context {context} has no Dockerfile"
            );
        }
    }
    let secrets = compose()
        .get("secrets")
        .and_then(Value::as_mapping)
        .expect("no top-level secrets");
    for (name, secret) in secrets {
        let file = str_field(secret, "file").expect("secret without file");
        let rel = file.strip_prefix("./").unwrap_or(file);
        let text = read(rel);
        assert!(
            !text.trim().is_empty() && text.trim().chars().all(|c| c.is_ascii_alphanumeric()),
            "secret {name:?} ({rel}) must be one word of letters and digits (an Erlang cookie)"
        );
    }
    // Named volumes used by the services are declared.
    let declared: BTreeSet<&str> = compose()
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, svc) in services() {
        for (src, _) in mounts(svc) {
            if !src.is_empty() && !src.starts_with(['.', '/', '~']) {
                assert!(
                    declared.contains(src.as_str()),
                    "{name:?}: volume {src} is not declared under top-level volumes"
                );
            }
        }
    }
}

#[test]
fn helpers_parse_the_compose_syntax() {
    assert_eq!(compose_duration("30s"), Duration::from_secs(30));
    assert_eq!(compose_duration("1m30s"), Duration::from_secs(90));
    assert_eq!(compose_duration("500ms"), Duration::from_millis(500));
    assert_eq!(
        amqp_host_port("amqp://guest:guest@warren:5672//"),
        ("warren".to_owned(), 5672)
    );
    assert_eq!(
        amqp_host_port("amqp://warren/"),
        ("warren".to_owned(), 5672)
    );
    let svc: Value = yaml_serde::from_str(
        "ports: [\"127.0.0.1:1:2\", \"3:4/tcp\", {target: 5, published: \"6\", host_ip: 0.0.0.0}]",
    )
    .unwrap();
    assert_eq!(
        published_ports(&svc),
        vec![
            Published {
                host_ip: "127.0.0.1".into(),
                host_port: 1,
                container_port: 2
            },
            Published {
                host_ip: String::new(),
                host_port: 3,
                container_port: 4
            },
            Published {
                host_ip: "0.0.0.0".into(),
                host_port: 6,
                container_port: 5
            },
        ]
    );
    let svc: Value =
        yaml_serde::from_str("volumes: [\"./deploy/compose:/etc/warren:ro\", \"data:/var/lib/x\"]")
            .unwrap();
    assert_eq!(
        host_path_of(&svc, "/etc/warren/warren.toml"),
        Some(PathBuf::from("deploy/compose/warren.toml"))
    );
    assert_eq!(host_path_of(&svc, "/etc/warrenx/a"), None);
    assert_eq!(
        host_path_of(&svc, "/var/lib/x"),
        None,
        "a named volume is no host path"
    );
}

/// `deploy/systemd/warren.service`: the settings docs/operations.md promises.
#[test]
fn systemd_unit_runs_warren_as_documented() {
    let unit = read("deploy/systemd/warren.service");
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let one = |key: &str| -> String {
        let v = values(key);
        assert_eq!(v.len(), 1, "warren.service: expected one {key}=, got {v:?}");
        v[0].clone()
    };
    // No sd_notify in warren: a notify unit would never finish starting.
    assert_eq!(one("Type"), "simple");
    assert_eq!(
        one("ExecStart"),
        format!("/usr/local/bin/warren --config {IMAGE_CONFIG} --log-format json")
    );
    assert!(
        values("ExecReload").contains(&"/bin/kill -HUP $MAINPID".to_owned()),
        "warren.service: SIGHUP is how systemctl reload reaches warren"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    // Against the default grace of the example configuration.
    let example = Config::load(&repo().join("proxy.toml")).expect("proxy.toml");
    let stop = compose_duration(&one("TimeoutStopSec"));
    assert!(
        stop > example.timeouts.shutdown_grace() + SHUTDOWN_BACKSTOP,
        "warren.service: TimeoutStopSec {stop:?} must exceed the shutdown grace + {SHUTDOWN_BACKSTOP:?}"
    );
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    let fds_needed = example.limits.max_connections as u64 * (1 + example.clusters.len() as u64);
    assert!(
        nofile >= fds_needed,
        "warren.service: LimitNOFILE={nofile} is below max_connections x (1 + clusters) = {fds_needed}"
    );
    for hardening in [
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
    ] {
        assert_eq!(one(hardening), "yes", "warren.service: {hardening}");
    }
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("StandardOutput"), "journal");
}

/// The image's build context is an allowlist (`.dockerignore`: `*`, then `!path` lines): every
/// path the Dockerfile copies from it must be let through, or `docker build` fails at that COPY,
/// and every workspace member must be copied before the first `cargo build`, or cargo cannot
/// load the manifest. Both broke once without a Docker engine to tell (`build.rs`, then the
/// codec crate).
#[test]
fn the_build_context_holds_what_the_dockerfile_copies() {
    let ignore = read(".dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix('!'))
        .map(|p| p.trim_end_matches('/'))
        .collect();
    let lets_through = |path: &str| {
        let path = path.trim_start_matches("./").trim_end_matches('/');
        allowed
            .iter()
            .any(|a| path == *a || path.starts_with(&format!("{a}/")))
    };
    // Sources of each `COPY` from the context, in order, with the line of the first `cargo build`.
    let dockerfile = read("Dockerfile");
    let mut copied: Vec<(usize, String)> = Vec::new();
    let mut first_build = None;
    for (n, line) in dockerfile.lines().map(str::trim).enumerate() {
        if first_build.is_none() && line.contains("cargo build") {
            first_build = Some(n);
        }
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (_, sources) = words.split_last().expect("COPY without arguments");
        copied.extend(
            sources
                .iter()
                .map(|s| (n, s.trim_end_matches('/').to_owned())),
        );
    }
    let first_build = first_build.expect("the Dockerfile runs no cargo build");
    assert!(
        copied.iter().any(|(_, s)| s == "src"),
        "the Dockerfile copies no src: {copied:?}"
    );
    for (_, source) in &copied {
        assert!(
            lets_through(source),
            ".dockerignore keeps {source} out of the build context, but the Dockerfile copies it"
        );
    }
    let manifest: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml parses");
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for member in members {
        let member = member.as_str().expect("a member is a path");
        assert!(
            copied
                .iter()
                .any(|(n, s)| *n < first_build
                    && (member == s || member.starts_with(&format!("{s}/")))),
            "workspace member {member} is not copied before the first cargo build of the Dockerfile"
        );
    }
}
