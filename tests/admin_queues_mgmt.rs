//! `GET /queues?queue=PATTERN` and `warren check-queues -q PATTERN` with the clusters' management
//! HTTP API (`management = { url = ... }`): a warren that never saw a queue declared still finds
//! it, with its depth on each shard cluster and its unacknowledged messages.
//!
//! * Without RabbitMQ: fake management APIs answer canned queue lists (the clusters' AMQP ports
//!   are closed), for the merge, the errors (401), a reload and `check-queues`.
//! * Live: queues declared and filled directly on `shard-a` and `shard-b` of
//!   `WARREN_TEST_CLUSTERS`, listed through their APIs from `WARREN_TEST_MANAGEMENT`
//!   (`shard-a=http://127.0.0.1:M,...;shard-b=...`, exported by scripts/test.sh; the test is
//!   skipped without it).

mod support;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::channel::{BasicQosArguments, Channel, QueueDeclareArguments};
use amqprs::connection::Connection;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren::ProxyHandle;
use warren::config::Config;

use support::{STEP, within};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");
const TOKEN: &str = "t0ken-for-admin-queues-mgmt";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-queues-mgmt-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", support::unique(name)));
    std::fs::write(&path, text).unwrap();
    path
}

/// A fake RabbitMQ management API: answers every request with the current status and body, and
/// keeps the request heads it got.
#[derive(Clone)]
struct FakeApi {
    addr: SocketAddr,
    answer: Arc<Mutex<(u16, String)>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    async fn start(body: &str) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = FakeApi {
            addr: listener.local_addr().unwrap(),
            answer: Arc::new(Mutex::new((200, body.to_owned()))),
            requests: Arc::new(Mutex::new(Vec::new())),
        };
        let served = api.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let api = served.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    api.requests
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let (status, body) = api.answer.lock().unwrap().clone();
                    let reason = if status == 200 { "OK" } else { "Unauthorized" };
                    let response = format!(
                        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        api
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn answer(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned());
    }
}

/// GET `path` on an admin endpoint: (status, body).
async fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: warren\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut buf = Vec::new();
    within("the admin's answer", s.read_to_end(&mut buf))
        .await
        .expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

async fn queues(admin: SocketAddr, pattern: &str) -> Value {
    let (status, body) = http_get(admin, &format!("/queues?queue={pattern}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/queues JSON")
}

async fn post_reload(admin: SocketAddr) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!(
        "POST /reload HTTP/1.1\r\nHost: warren\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    within("the reload's answer", s.read_to_end(&mut buf))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// Runs `warren check-queues ARGS`: (exit code, its one line).
async fn check_queues(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(WARREN)
            .arg("check-queues")
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run warren check-queues");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            stdout.lines().count(),
            1,
            "exactly one line for {args:?}: {stdout:?} (stderr {:?})",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code().expect("exit code"),
            stdout.trim_end().to_owned(),
        )
    })
    .await
    .unwrap()
}

/// The entry of queue `name` in a `/queues` answer.
fn entry<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["queues"]
        .as_array()?
        .iter()
        .find(|q| q["name"].as_str() == Some(name))
}

/// The names in a `/queues` answer.
fn names(v: &Value) -> Vec<String> {
    v["queues"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|q| q["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A proxy started from a configuration file (so that `POST /reload` re-reads it).
struct Instance {
    handle: ProxyHandle,
    admin: SocketAddr,
    path: PathBuf,
}

impl Instance {
    async fn start(name: &str, text: &str) -> Instance {
        support::init_tracing();
        let path = temp_file(name, text);
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config rejected: {e}"));
        let handle = warren::start(Arc::new(config)).await.expect("start");
        handle.shared().set_config_path(&path);
        let admin = handle.admin_addr().expect("admin endpoint");
        Instance {
            handle,
            admin,
            path,
        }
    }

    fn config(&self) -> &str {
        self.path.to_str().unwrap()
    }

    async fn stop(self) {
        within("proxy shutdown", self.handle.shutdown()).await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A configuration with shard-a, shard-b and control at `nodes`, each shard cluster with the
/// management API at the given URL (none: no `management`).
fn config_text(nodes: [&[String]; 3], management: [Option<&str>; 2]) -> String {
    let quoted = |nodes: &[String]| {
        nodes
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = |url: Option<&str>| match url {
        Some(url) => {
            format!("management = {{ url = \"{url}\", user = \"guest\", password = \"guest\" }}\n")
        }
        None => String::new(),
    };
    format!(
        "listen = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 2000\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n{}\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n{}\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        quoted(nodes[0]),
        entry(management[0]),
        quoted(nodes[1]),
        entry(management[1]),
        quoted(nodes[2]),
    )
}

/// An answer of `GET /queues` is reused for 1 s: wait that long before asking again.
async fn past_the_cache() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

// ---------------------------------------------------------------------------------------------
// Without RabbitMQ: fake management APIs

const LIST_A: &str = r#"[
  {"name":"celery","messages":12,"messages_ready":10,"messages_unacknowledged":2,"consumers":2},
  {"name":"celery.only-a","messages":1,"messages_ready":1,"messages_unacknowledged":0,"consumers":0},
  {"name":"worker1@host.celery.pidbox","messages":0,"messages_ready":0,"messages_unacknowledged":0,"consumers":1},
  {"name":"unrelated","messages":50,"messages_ready":50,"messages_unacknowledged":0,"consumers":0}
]"#;
const LIST_B: &str = r#"[
  {"name":"celery","messages":7,"messages_ready":7,"messages_unacknowledged":0,"consumers":2}
]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_are_listed_by_the_management_apis() {
    let (a, b) = (FakeApi::start(LIST_A).await, FakeApi::start(LIST_B).await);
    let dead = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| format!("127.0.0.1:{}", closed_port()))
            .collect()
    };
    let nodes = [dead(1), dead(1), dead(1)];
    let text = config_text(
        [&nodes[0], &nodes[1], &nodes[2]],
        [Some(&a.url()), Some(&b.url())],
    );
    let warren = Instance::start("fake-apis", &text).await;

    let v = queues(warren.admin, "celery*").await;
    assert_eq!(names(&v), ["celery", "celery.only-a"], "{v:#}");
    assert_eq!(v["listing_complete"], true, "{v:#}");
    assert_eq!(v["total_messages"], 18, "{v:#}");
    let celery = entry(&v, "celery").unwrap();
    assert_eq!(celery["messages"], 17, "{celery:#}");
    assert_eq!(celery["unacked"], 2, "{celery:#}");
    assert_eq!(celery["consumers"], 2, "{celery:#}");
    assert_eq!(celery["complete"], true, "{celery:#}");
    for (i, cluster, messages, unacked) in [(0, "shard-a", 10, 2), (1, "shard-b", 7, 0)] {
        let c = &celery["clusters"][i];
        assert_eq!(c["cluster"], cluster, "{c:#}");
        assert_eq!(c["source"], "management", "{c:#}");
        assert_eq!(
            (c["messages"].as_u64(), c["unacked"].as_u64()),
            (Some(messages), Some(unacked))
        );
    }
    assert!(celery["age_ms"].as_u64().is_some(), "{celery:#}");
    let only_a = entry(&v, "celery.only-a").unwrap();
    assert_eq!(only_a["clusters"][1]["status"], "missing", "{only_a:#}");
    // Both APIs were asked for vhost "/" with the columns, as guest.
    for api in [&a, &b] {
        let requests = api.requests.lock().unwrap().clone();
        assert!(!requests.is_empty());
        assert!(
            requests[0].starts_with("GET /api/queues/%2F?columns=name,messages,messages_ready,"),
            "{}",
            requests[0]
        );
        assert!(
            requests[0].contains("Basic Z3Vlc3Q6Z3Vlc3Q="),
            "{}",
            requests[0]
        );
    }

    // check-queues answers from the configuration's APIs alone: no warren involved, and the
    // line does not speak of queues declared through a warren.
    let (code, line) = check_queues(&[
        "--config",
        warren.config(),
        "-q",
        "celery*",
        "-w",
        "15",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 1, "{line}");
    assert_eq!(
        line,
        "QUEUES WARNING - celery=17 (>= 15) | 'celery'=17;15;100;0; 'celery@shard-a'=10;;;0; \
         'celery@shard-b'=7;;;0; 'celery.only-a'=1;15;100;0; 'celery.only-a@shard-a'=1;;;0; \
         'celery.only-a@shard-b'=0;;;0;"
    );
    let (code, line) = check_queues(&[
        "--config",
        warren.config(),
        "-q",
        "nothing*",
        "-w",
        "15",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 3, "{line}");
    assert_eq!(
        line,
        "QUEUES UNKNOWN - no sharded queue matches \"nothing*\" on the shard clusters"
    );

    // One API refuses the login: that cluster is an error, the other one still answers.
    b.answer(401, r#"{"error":"not_authorized","reason":"Login failed"}"#);
    past_the_cache().await;
    let v = queues(warren.admin, "celery*").await;
    assert_eq!(v["listing_complete"], false, "{v:#}");
    let celery = entry(&v, "celery").expect("still listed by shard-a");
    assert_eq!(celery["complete"], false, "{celery:#}");
    assert_eq!(celery["clusters"][0]["messages"], 10, "{celery:#}");
    let err = celery["clusters"][1]["error"].as_str().unwrap_or_default();
    assert!(
        celery["clusters"][1]["status"] == "error" && err.contains("HTTP 401"),
        "{celery:#}"
    );
    let m = v["management"].as_array().unwrap();
    let b_entry = m.iter().find(|m| m["cluster"] == "shard-b").unwrap();
    assert_eq!(b_entry["status"], "error", "{b_entry:#}");
    // Already over the warning on shard-a alone: WARNING, marked partial.
    let (code, line) = check_queues(&[
        "--config",
        warren.config(),
        "-q",
        "celery*",
        "-w",
        "5",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("QUEUES WARNING - celery=10 (>= 5, partial) |"),
        "{line}"
    );
    let (code, line) = check_queues(&[
        "--config",
        warren.config(),
        "-q",
        "celery*",
        "-w",
        "500",
        "-c",
        "1000",
    ])
    .await;
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("HTTP 401"), "{line}");
    b.answer(200, LIST_B);

    // A reload takes management away from shard-b: its depths come from passive declares (its
    // AMQP port is closed here: an error of another kind).
    let text = config_text([&nodes[0], &nodes[1], &nodes[2]], [Some(&a.url()), None]);
    std::fs::write(&warren.path, text).unwrap();
    let (status, body) = post_reload(warren.admin).await;
    assert_eq!(status, 200, "{body}");
    past_the_cache().await;
    let v = queues(warren.admin, "celery*").await;
    assert_eq!(v["listing_complete"], false, "{v:#}");
    let celery = entry(&v, "celery").unwrap();
    assert_eq!(celery["clusters"][0]["source"], "management", "{celery:#}");
    assert_eq!(celery["clusters"][1]["source"], "amqp", "{celery:#}");
    assert_eq!(celery["clusters"][1]["status"], "error", "{celery:#}");
    assert_eq!(v["management"].as_array().unwrap().len(), 1, "{v:#}");

    warren.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Live: RabbitMQ with the management plugin

/// The management API URL of each test cluster, from `WARREN_TEST_MANAGEMENT`; `None` (and the
/// test is skipped) without it.
fn management_urls() -> Option<Vec<support::Cluster>> {
    match std::env::var("WARREN_TEST_MANAGEMENT") {
        Ok(spec) if !spec.trim().is_empty() => Some(support::parse_clusters(&spec)),
        _ => {
            eprintln!(
                "skipping: WARREN_TEST_MANAGEMENT is not set (scripts/test.sh exports the test \
                 clusters' management APIs, e.g. \"shard-a=http://127.0.0.1:M,...;shard-b=...\")"
            );
            None
        }
    }
}

fn management_url(urls: &[support::Cluster], cluster: &str) -> String {
    urls.iter()
        .find(|c| c.name == cluster)
        .unwrap_or_else(|| panic!("no {cluster} in WARREN_TEST_MANAGEMENT"))
        .nodes[0]
        .clone()
}

/// A connection and channel straight to a test cluster.
async fn direct(cluster: &str) -> (Connection, Channel) {
    let conn = support::connect(support::cluster(cluster).first_node()).await;
    let (ch, _events) = support::open_channel(&conn).await;
    (conn, ch)
}

/// Declares `queue` (durable, like warren's) on `cluster` and publishes `n` messages to it,
/// confirmed.
async fn fill(cluster: &str, queue: &str, n: usize) {
    let (conn, ch) = direct(cluster).await;
    support::declare_queue(&ch, queue).await;
    support::confirm_select(&ch).await;
    for i in 0..n {
        support::publish(&ch, "", queue, format!("m{i}").as_bytes()).await;
    }
    support::eventually(&format!("{n} messages in {queue} on {cluster}"), || async {
        (support::queue_counts(&ch, queue).await.0 as usize == n).then_some(())
    })
    .await;
    support::close_connection(conn).await;
}

async fn delete_on(cluster: &str, queue: &str) {
    let (conn, ch) = direct(cluster).await;
    support::delete_queue(&ch, queue).await;
    let _ = tokio::time::timeout(STEP, conn.close()).await;
}

/// Whether `queue` exists on `cluster` (a passive declare).
async fn exists_on(cluster: &str, queue: &str) -> bool {
    let (conn, ch) = direct(cluster).await;
    let passive = QueueDeclareArguments::new(queue).passive(true).finish();
    let exists = ch.queue_declare(passive).await.is_ok();
    let _ = tokio::time::timeout(STEP, conn.close()).await;
    exists
}

/// (ready, unacked) of a queue on each of shard-a and shard-b in a `/queues` entry.
fn split(q: &Value) -> Vec<(Option<u64>, Option<u64>)> {
    q["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["messages"].as_u64(), c["unacked"].as_u64()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_warren_lists_queues_declared_directly_on_the_clusters() {
    if support::skip_live() {
        return;
    }
    let Some(urls) = management_urls() else {
        return;
    };
    let base = support::unique("mgmt");
    let (one, two, gone) = (
        format!("{base}.one"),
        format!("{base}.two"),
        format!("{base}.gone"),
    );
    // Declared and filled directly on the clusters, as warren would have spread them: this
    // warren (not even started yet) never sees a declare.
    fill("shard-a", &one, 3).await;
    fill("shard-b", &one, 2).await;
    fill("shard-a", &two, 0).await;
    fill("shard-b", &two, 4).await;
    fill("shard-a", &gone, 1).await;
    fill("shard-b", &gone, 0).await;
    // One delivery of `one` on shard-a is held unacknowledged (prefetch 1).
    let (consumer_conn, consumer_ch) = direct("shard-a").await;
    within(
        "basic.qos",
        consumer_ch.basic_qos(BasicQosArguments::new(0, 1, false)),
    )
    .await
    .expect("basic.qos");
    let (_tag, mut deliveries) = support::consume(&consumer_ch, &one, true).await;
    let held = support::next_delivery(&mut deliveries).await;
    assert_eq!(held.body, b"m0");

    let nodes = |c: &str| support::cluster(c).nodes.clone();
    let (na, nb, nc) = (nodes("shard-a"), nodes("shard-b"), nodes("control"));
    let (ua, ub) = (
        management_url(&urls, "shard-a"),
        management_url(&urls, "shard-b"),
    );
    let text = config_text([&na, &nb, &nc], [Some(&ua), Some(&ub)]);
    let warren = Instance::start("live-mgmt", &text).await;
    let pattern = format!("{base}.*");

    // The management API's numbers follow the broker within its statistics interval.
    let v = support::eventually("the depths of the three queues through the APIs", || {
        let pattern = pattern.clone();
        let (one, two, gone) = (one.clone(), two.clone(), gone.clone());
        async move {
            let v = queues(warren.admin, &pattern).await;
            let ok = entry(&v, &one).is_some_and(|q| {
                split(q) == [(Some(2), Some(1)), (Some(2), Some(0))]
                    && q["messages"] == 4
                    && q["unacked"] == 1
                    && q["consumers"] == 1
            }) && entry(&v, &two).is_some_and(|q| {
                split(q) == [(Some(0), Some(0)), (Some(4), Some(0))] && q["messages"] == 4
            }) && entry(&v, &gone).is_some_and(|q| q["messages"] == 1);
            if !ok {
                past_the_cache().await;
            }
            ok.then_some(v)
        }
    })
    .await;
    assert_eq!(v["listing_complete"], true, "{v:#}");
    assert_eq!(names(&v), [gone.clone(), one.clone(), two.clone()], "{v:#}");
    for q in v["queues"].as_array().unwrap() {
        assert_eq!(q["complete"], true, "{q:#}");
        for c in q["clusters"].as_array().unwrap() {
            assert_eq!(c["source"], "management", "{c:#}");
        }
    }
    assert_eq!(v["total_messages"], 9, "{v:#}");

    // The same numbers in the management API's shape, where Flower and KEDA read them: one
    // queue (ready, unacknowledged, their sum) and the vhost's listing.
    let (status, body) = http_get(warren.admin, &format!("/api/queues/%2F/{one}")).await;
    assert_eq!(status, 200, "{body}");
    let q: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (
            &q["messages_ready"],
            &q["messages_unacknowledged"],
            &q["messages"],
            &q["consumers"]
        ),
        (&4.into(), &1.into(), &5.into(), &1.into()),
        "{q:#}"
    );
    let (status, body) = http_get(warren.admin, "/api/queues/%2F").await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).expect("json");
    for (name, ready) in [(&one, 4), (&two, 4), (&gone, 1)] {
        let q = listed
            .as_array()
            .and_then(|l| l.iter().find(|q| q["name"] == name.as_str()));
        assert_eq!(
            q.map(|q| &q["messages_ready"]),
            Some(&ready.into()),
            "{listed:#}"
        );
    }
    let (status, body) = http_get(warren.admin, &format!("/api/queues/%2F/{base}.none")).await;
    assert_eq!(status, 404, "{body}");

    // check-queues with the same configuration, no warren needed: every queue, with its split.
    let (code, line) = check_queues(&[
        "--config",
        warren.config(),
        "-q",
        &pattern,
        "-w",
        "4",
        "-c",
        "100",
    ])
    .await;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("QUEUES WARNING - ")
            && line.contains(&format!(
                "'{one}'=4;4;100;0; '{one}@shard-a'=2;;;0; '{one}@shard-b'=2;;;0;"
            ))
            && line.contains(&format!("'{two}@shard-b'=4;;;0;")),
        "{line}"
    );

    // Deleted directly on both clusters: gone from the answer.
    delete_on("shard-a", &gone).await;
    delete_on("shard-b", &gone).await;
    assert!(!exists_on("shard-a", &gone).await && !exists_on("shard-b", &gone).await);
    past_the_cache().await;
    let v = queues(warren.admin, &pattern).await;
    assert_eq!(names(&v), [one.clone(), two.clone()], "{v:#}");

    support::close_connection(consumer_conn).await;
    for q in [&one, &two] {
        delete_on("shard-a", q).await;
        delete_on("shard-b", q).await;
    }
    warren.stop().await;
}
