//! The admin status page (`GET /`), rendered by headless Chromium: after the page's JavaScript
//! ran, the DOM shows every cluster with its state, and client-controlled names (queues) are
//! shown as text, never as markup.
//!
//! Needs `/usr/bin/chromium` (Debian: `apt-get install -y chromium`); without it the test fails
//! and says so.

mod support;

use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren::config::Config;

const CHROMIUM: &str = "/usr/bin/chromium";

/// `GET path` on the admin endpoint; the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the admin endpoint");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_clusters_and_states_in_chromium() {
    if support::skip_live() {
        return;
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the status page test renders the page in headless Chromium. \
         Install it with `apt-get install -y chromium` (Debian's package)."
    );
    support::init_tracing();

    // shard-a is a live cluster; the control cluster points at a closed port, so it is "down".
    let dead_port = StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nodes = support::shard_a()
        .nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[timeouts]\nshutdown_grace_ms = 100\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{nodes}]\n\n\
         [[clusters]]\nname = \"ctl.down\"\nrole = \"control\"\nnodes = [\"127.0.0.1:{dead_port}\"]\n"
    );
    let config = Config::parse(&text, "page-test.toml").expect("test config");
    let proxy = warren::start(Arc::new(config))
        .await
        .expect("start the proxy");
    let admin = proxy.admin_addr().expect("admin endpoint");
    // A queue name a client chose: the page must show it as text.
    let evil = "<b id=\"evil\">q</b>&amp;";
    proxy.shared().note_queue("/", evil);
    // A client connection, named by the client: listed with a close button, its name as text.
    let identity = warren::clients::Identity {
        name: Some("<i id=\"evil2\">w</i>".to_owned()),
        user: "guest".to_owned(),
        vhost: "/".to_owned(),
        product: Some("pika".to_owned()),
        ..Default::default()
    };
    let _client = proxy.shared().clients.register(4242, identity);

    // Wait for the health probes, so that the page shows settled states.
    let deadline = Instant::now() + support::STEP;
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&get(admin, "/clusters").await).expect("JSON");
        let states: Vec<&str> = v["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].as_str().unwrap())
            .collect();
        if states == ["up", "down"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "clusters never settled to up/down: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(support::unique("chromium-profile"));
    std::fs::create_dir_all(&profile).unwrap();
    let url = format!("http://{admin}/");
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.extend([
        "--virtual-time-budget=5000".to_owned(),
        "--dump-dom".to_owned(),
        url,
    ]);
    // Chromium is blocking and slow to start on a small machine: run it off the runtime.
    let out = tokio::task::spawn_blocking(move || Command::new(CHROMIUM).args(args).output())
        .await
        .unwrap()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("<html"),
        "chromium failed ({}): stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The rows the script built from /clusters: each cluster's name and state.
    for (name, state) in [("shard-a", "up"), ("ctl.down", "down")] {
        assert!(
            dom.contains(&format!("data-cluster=\"{name}\" data-state=\"{state}\"")),
            "no row for {name} ({state}) in the rendered page:\n{dom}"
        );
        assert!(
            dom.contains(&format!("<strong>{name}</strong>")),
            "{name} not shown:\n{dom}"
        );
    }
    assert!(dom.contains("class=\"badge s-up\">up</span>"), "{dom}");
    assert!(dom.contains("class=\"badge s-down\">down</span>"), "{dom}");
    assert!(
        !dom.contains("loading…</td>"),
        "the tables were filled in:\n{dom}"
    );
    // The queue from /queues, escaped.
    assert!(
        dom.contains("&lt;b id=\"evil\"&gt;q&lt;/b&gt;&amp;amp;"),
        "queue name shown as text:\n{dom}"
    );
    assert!(
        !dom.contains("<b id=\"evil\">"),
        "queue name must not become markup:\n{dom}"
    );

    // The client from /clients, with its close action, its name escaped.
    assert!(dom.contains("data-client=\"4242\""), "client row:\n{dom}");
    assert!(dom.contains("data-close=\"4242\""), "close button:\n{dom}");
    assert!(
        dom.contains("&lt;i id=\"evil2\"&gt;w&lt;/i&gt;") && !dom.contains("<i id=\"evil2\">"),
        "client name shown as text:\n{dom}"
    );

    proxy.shutdown().await;
}
