//! The admin status page (`GET /`), rendered by headless Chromium: after the page's JavaScript
//! ran, the DOM shows every cluster with its state, its nodes' last checks, the header (version,
//! uptime, configuration file), rate charts drawn from samples the page polled itself, and
//! client-controlled names (queues, connection names) as text, never as markup. The second test
//! renders a realistic page (three live clusters, traffic, queues, clients) into
//! `docs/img/status-page.png` and checks that rows of a cluster removed by a reload and of
//! deleted queues disappear from a page left open (`docs/img/status-page-changes.png`). The
//! third clicks the page's action buttons with scripted answers to its prompts: the token is
//! asked for when a POST answers 401, and refusals end in the banner.
//!
//! Chromium's `--virtual-time-budget` runs the page's 2 s timers without waiting, so it polls
//! several times in one run. Virtual time stands still while a fetch is pending, so
//! [`SlowRelay`] (a TCP relay that holds each request for a while) spaces the polls in real
//! time too, as the counters the rates come from see it.
//!
//! Needs `/usr/bin/chromium` (Debian: `apt-get install -y chromium`); without it the rendering
//! checks are skipped with a message, unless `WARREN_REQUIRE_TOOLS=1` or `CI` is set (as
//! scripts/test.sh does): then a missing Chromium fails the test.

mod support;

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amqprs::BasicProperties;
use amqprs::channel::{BasicAckArguments, BasicPublishArguments, Channel};
use amqprs::connection::Connection;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use warren::config::Config;

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "page-test-token";

/// `METHOD path` on the admin endpoint; the status and the body.
async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the admin endpoint");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = request(addr, "GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// Polls `/clusters` until `check` holds.
async fn clusters_until(admin: SocketAddr, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + support::STEP;
    loop {
        let v = get_json(admin, "/clusters").await;
        if check(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "/clusters never showed {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn states(v: &Value) -> Vec<&str> {
    v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect()
}

fn closed_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-page");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{}.toml", support::unique(name)));
    std::fs::write(&path, text).unwrap();
    path
}

/// Whether Chromium is there to render the page. Without it the page's checks are skipped with
/// a message, unless `WARREN_REQUIRE_TOOLS=1` (scripts/test.sh installs Chromium and sets it) or
/// `CI` asks for every tool: then the test fails and says how to get it.
fn have_chromium() -> bool {
    let found = Path::new(CHROMIUM)
        .exists()
        .then(|| PathBuf::from(CHROMIUM));
    support::external_tool(
        "Chromium (the status page's rendering checks)",
        found,
        "apt-get install -y chromium, Debian's package",
    )
    .is_some()
}

/// Renders `url` in headless Chromium for `budget_ms` of virtual time and returns the DOM;
/// with `screenshot`, also saves a 1280x1600 PNG of the page there.
async fn chromium(url: String, budget_ms: u64, screenshot: Option<PathBuf>) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the status page test renders the page in headless Chromium. \
         Install it with `apt-get install -y chromium` (Debian's package)."
    );
    let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(support::unique("chromium-profile"));
    std::fs::create_dir_all(&profile).unwrap();
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        "--window-size=1280,1600",
        "--lang=en-GB",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--user-data-dir={}", profile.display()));
    args.push(format!("--virtual-time-budget={budget_ms}"));
    if let Some(path) = &screenshot {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(path);
        args.push(format!("--screenshot={}", path.display()));
    }
    args.extend(["--dump-dom".to_owned(), url]);
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
    if let Some(path) = &screenshot {
        let png = std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot {path:?}: {e}"));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{path:?} is not a real screenshot"
        );
    }
    dom
}

/// The text of the element with `id` (up to its first child element).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    &rest[start..end]
}

/// The markup from `marker` to the end of the element it starts (up to `end`).
fn part<'a>(dom: &'a str, marker: &str, end: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let rest = &dom[at..];
    let after = marker.len();
    &rest[..rest[after..]
        .find(end)
        .map_or(rest.len(), |e| after + e + end.len())]
}

/// The points of the chart of `name`: publish and deliver series.
fn chart_points(dom: &str, name: &str) -> (usize, usize) {
    let svg = part(dom, &format!("data-chart=\"{name}\""), "</svg>");
    let count = |series: &str| {
        let line = part(svg, &format!("data-series=\"{series}\""), ">");
        let points = part(line, "points=\"", "\"");
        points
            .trim_start_matches("points=\"")
            .trim_end_matches('"')
            .split_whitespace()
            .count()
    };
    assert_eq!(
        svg.matches("<polyline").count(),
        2,
        "two series in the chart of {name}: {svg}"
    );
    (count("publish"), count("deliver"))
}

/// A rate as the page shows it ("1,234", "12.5", "0"); fails on a placeholder.
fn rate(text: &str) -> f64 {
    text.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a rate: {text:?}"))
}

/// Every rate cell of the clusters table shows a number.
fn assert_rates_shown(dom: &str) {
    for class in ["num rate-pub\">", "num rate-del\">"] {
        let mut n = 0;
        for (at, _) in dom.match_indices(class) {
            let text = &dom[at + class.len()..];
            rate(&text[..text.find('<').unwrap()]);
            n += 1;
        }
        assert!(n >= 2, "rate cells {class}: {n}\n{dom}");
    }
    rate(text_of(dom, "total-pub"));
    rate(text_of(dom, "total-del"));
}

/// A TCP relay in front of the admin endpoint that holds what the browser sends for `delay`
/// before passing it on, and counts the `GET /clusters` requests.
struct SlowRelay {
    addr: SocketAddr,
    polls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SlowRelay {
    async fn start(target: SocketAddr, delay: Duration) -> SlowRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let polls = Arc::new(AtomicUsize::new(0));
        let counter = polls.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((browser, _)) = listener.accept().await {
                let counter = counter.clone();
                connections.spawn(async move {
                    let Ok(admin) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_browser, mut to_browser) = browser.into_split();
                    let (mut from_admin, mut to_admin) = admin.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_browser.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if buf[..n].starts_with(b"GET /clusters ") {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            tokio::time::sleep(delay).await;
                            if to_admin.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to_admin.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut from_admin, &mut to_browser).await;
                        let _ = to_browser.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        SlowRelay { addr, polls, task }
    }

    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }
}

impl Drop for SlowRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect_named(addr: SocketAddr, name: &str) -> Connection {
    support::try_connect(addr, |a| {
        a.connection_name(name);
    })
    .await
    .unwrap_or_else(|e| panic!("connect {name}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_clusters_nodes_header_and_charts_in_chromium() {
    if support::skip_live() || !have_chromium() {
        return;
    }
    support::init_tracing();

    // shard-a is a live cluster; the control cluster points at a closed port, so it is "down".
    let dead_port = closed_port();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[timeouts]\nshutdown_grace_ms = 100\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"ctl.down\"\nrole = \"control\"\nnodes = [\"127.0.0.1:{dead_port}\"]\n",
        support::quoted(&support::shard_a().nodes)
    );
    let path = temp_file("page", &text);
    let config = Config::load(&path).expect("test config");
    let proxy = warren::start(Arc::new(config))
        .await
        .expect("start the proxy");
    proxy.shared().set_config_path(&path);
    let admin = proxy.admin_addr().expect("admin endpoint");
    // A queue named by a client: the page must show it as text.
    let evil = format!("<b id=\"evil\">q</b>&amp;{}", support::unique("page"));
    let conn = connect_named(proxy.amqp_addr(), "page-test").await;
    let (ch, _events) = support::open_channel(&conn).await;
    support::declare_queue(&ch, &evil).await;
    support::publish(&ch, "", &evil, b"one").await;
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
    clusters_until(admin, "shard-a up, ctl.down down", |v| {
        states(v) == ["up", "down"]
    })
    .await;

    // 12 s of virtual time: the page polls /clusters six times or so.
    let dom = chromium(format!("http://{admin}/"), 12_000, None).await;

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

    // The header: version, uptime, configuration file, clients.
    assert!(
        text_of(&dom, "version").starts_with(&format!("v{}", env!("CARGO_PKG_VERSION"))),
        "{dom}"
    );
    let uptime = text_of(&dom, "uptime");
    assert!(
        uptime.ends_with(" s") || uptime.contains("min"),
        "uptime {uptime:?}"
    );
    assert_eq!(text_of(&dom, "config-path"), path.display().to_string());
    assert!(
        rate(text_of(&dom, "conns")) >= 1.0,
        "the AMQP client:\n{dom}"
    );

    // Each node: its last check; the dead one: since when it is down, and why.
    for node in &support::shard_a().nodes {
        let n = part(&dom, &format!("data-node=\"{node}\""), "</div></div>");
        assert!(n.contains("class=\"badge s-up\">up</span>"), "{n}");
        assert!(
            n.contains("class=\"last-check\"") && n.contains(">checked ") && n.contains(" ago<"),
            "last check of {node}: {n}"
        );
        assert!(!n.contains("down since"), "{n}");
    }
    let dead = part(
        &dom,
        &format!("data-node=\"127.0.0.1:{dead_port}\""),
        "</tr>",
    );
    assert!(dead.contains(">checked "), "{dead}");
    assert!(
        dead.contains("class=\"down-since\"") && dead.contains(">down since "),
        "down since:\n{dead}"
    );
    assert!(dead.contains("class=\"err\">connect: "), "{dead}");

    // Charts: the total and one per cluster, each with its publish and deliver lines drawn
    // through the samples the page took.
    for name in ["total", "shard-a", "ctl.down"] {
        let (publish, deliver) = chart_points(&dom, name);
        assert!(
            publish >= 3 && publish == deliver,
            "{name}: {publish} publish points, {deliver} deliver points:\n{dom}"
        );
    }
    assert!(
        text_of(&dom, "window").contains(" samples"),
        "{}",
        text_of(&dom, "window")
    );
    // Rates: numbers everywhere, once samples are in; and the totals.
    assert_rates_shown(&dom);
    assert!(dom.contains("data-total=\"\""), "a total row:\n{dom}");
    let unacked = text_of(&dom, "unacked-total");
    assert_eq!(unacked, "0", "{dom}");

    // Actions on the shard cluster, none on the control cluster.
    assert!(dom.contains("data-drain=\"shard-a\""), "{dom}");
    assert!(dom.contains("data-weight=\"shard-a\""), "{dom}");
    assert!(!dom.contains("data-drain=\"ctl.down\""), "{dom}");
    assert!(!dom.contains("data-weight=\"ctl.down\""), "{dom}");
    assert!(dom.contains(">weight 1</div>"), "{dom}");

    // The queue from /queues, escaped; its message counted.
    let escaped = evil
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    assert_eq!(text_of(&dom, "queues-gone"), "", "the queue exists:\n{dom}");
    assert!(
        dom.contains(&escaped),
        "queue name shown as text ({escaped}):\n{dom}"
    );
    assert!(
        !dom.contains("<b id=\"evil\">"),
        "queue name must not become markup:\n{dom}"
    );

    // The clients from /clients, with their close actions, their names escaped.
    assert!(dom.contains("data-client=\"4242\""), "client row:\n{dom}");
    assert!(dom.contains("data-close=\"4242\""), "close button:\n{dom}");
    assert!(dom.contains(">page-test</td>"), "the AMQP client:\n{dom}");
    assert!(
        dom.contains("&lt;i id=\"evil2\"&gt;w&lt;/i&gt;") && !dom.contains("<i id=\"evil2\">"),
        "client name shown as text:\n{dom}"
    );

    support::delete_queue(&ch, &evil).await;
    support::close_connection(conn).await;
    proxy.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

/// Serves the status page with `script` added at its end (what a user does, scripted), with the
/// admin endpoint's own headers; passes every other connection through to the endpoint.
struct PageRelay {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl PageRelay {
    async fn start(admin: SocketAddr, script: &str) -> PageRelay {
        let (status, page) = request(admin, "GET", "/", None).await;
        assert_eq!(status, 200);
        let csp = {
            let mut s = TcpStream::connect(admin).await.unwrap();
            s.write_all(
                format!("HEAD / HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut head = String::new();
            s.read_to_string(&mut head).await.unwrap();
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-security-policy")
                        .then(|| v.trim().to_owned())
                })
                .expect("the page has a Content-Security-Policy")
        };
        let body = page.replacen(
            "</body>",
            &format!("<script>\n{script}\n</script>\n</body>"),
            1,
        );
        assert!(body.contains(script), "the page has a </body>");
        let answer = Arc::new(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Security-Policy: {csp}\r\nCache-Control: no-store\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut browser, _)) = listener.accept().await {
                let answer = answer.clone();
                connections.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let n = match browser.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if buf[..n].starts_with(b"GET / ") {
                        let _ = browser.write_all(&answer).await;
                        let _ = browser.shutdown().await;
                        return;
                    }
                    let Ok(mut admin) = TcpStream::connect(admin).await else {
                        return;
                    };
                    if admin.write_all(&buf[..n]).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut browser, &mut admin).await;
                    }
                });
            }
        });
        PageRelay { addr, task }
    }
}

impl Drop for PageRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The page's buttons, clicked in Chromium with `window.prompt` and `window.confirm` answered by
/// a script: an action answered 401 asks for the token and retries with it; a wrong token and a
/// refused weight end in the banner with the server's reason and change nothing; with the token,
/// drain, weight and undrain apply, and the page shows the run-time weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_actions_ask_for_the_token_and_show_refusals() {
    if support::skip_live() || !have_chromium() {
        return;
    }
    support::init_tracing();
    let find = |n: &str| {
        support::clusters()
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.nodes.clone())
            .unwrap_or_else(|| panic!("this test needs the clusters shard-a and shard-b"))
    };
    let text = format!(
        "listen = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [timeouts]\nshutdown_grace_ms = 100\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n",
        support::quoted(&find("shard-a")),
        support::quoted(&find("shard-b"))
    );
    let path = temp_file("actions", &text);
    let proxy = warren::start(Arc::new(Config::load(&path).expect("test config")))
        .await
        .expect("start the proxy");
    proxy.shared().set_config_path(&path);
    let admin = proxy.admin_addr().expect("admin endpoint");
    clusters_until(admin, "both clusters up", |v| states(v) == ["up", "up"]).await;

    // One step every 3 s of virtual time (a step's requests complete before the next: virtual
    // time stands still while a fetch is pending). After each, the banner's text and the
    // prompts seen so far are written on <body data-step-N>.
    let script = format!(
        r#"
"use strict";
const answers = ["wrong-token", "{TOKEN}", "0", "7", "{TOKEN}"];
const asked = [];
window.prompt = (question) => {{ asked.push(question); return answers.shift() ?? null; }};
window.confirm = () => true;
const click = (selector) => document.querySelector(selector).click();
const steps = [
  () => click("button[data-drain='shard-b']"),
  () => click("button[data-drain='shard-b']"),
  () => click("button[data-weight='shard-a']"),
  () => {{ sessionStorage.setItem("warren-token", "stale-token"); click("button[data-weight='shard-a']"); }},
  () => click("button[data-undrain='shard-b']"),
];
steps.forEach((step, i) => {{
  setTimeout(step, 3000 * (i + 1));
  setTimeout(() => document.body.setAttribute("data-step-" + (i + 1), JSON.stringify({{
    banner: document.getElementById("banner").style.display === "block" ? document.getElementById("banner-text").textContent : "",
    asked: asked.length,
  }})), 3000 * (i + 1) + 2500);
}});
"#
    );
    let relay = PageRelay::start(admin, &script).await;
    let dom = chromium(format!("http://{}/", relay.addr), 20_000, None).await;
    let step = |n: usize| -> Value {
        let marker = format!("data-step-{n}=\"");
        let at = dom
            .find(&marker)
            .unwrap_or_else(|| panic!("step {n} did not run:\n{dom}"));
        let rest = &dom[at + marker.len()..];
        let raw = &rest[..rest.find('"').unwrap()];
        serde_json::from_str(&raw.replace("&quot;", "\"").replace("&amp;", "&"))
            .unwrap_or_else(|e| panic!("step {n}: {e}: {raw}"))
    };
    // 1. No token yet: 401, the page asks, gets a wrong one: refused, said in the banner.
    let s1 = step(1);
    assert_eq!(s1["asked"], 1, "{s1}");
    let banner = s1["banner"].as_str().unwrap();
    assert!(
        banner.starts_with("Drain shard-b failed: HTTP 401")
            && banner.contains("invalid bearer token"),
        "{banner}"
    );
    // 2. The wrong token was forgotten: asked again, the right one: drained, banner cleared.
    let s2 = step(2);
    assert_eq!(
        (s2["asked"].as_u64(), s2["banner"].as_str()),
        (Some(2), Some("")),
        "{s2}"
    );
    // 3. Weight 0 (the token is kept: only the weight is asked): 400 with the reason.
    let s3 = step(3);
    assert_eq!(s3["asked"], 3, "{s3}");
    let banner = s3["banner"].as_str().unwrap();
    assert!(
        banner.starts_with("Weight of shard-a to 0 failed: HTTP 400")
            && banner.contains("at least 1"),
        "{banner}"
    );
    // 4. A stale token in the tab: 401, asked again, then weight 7 applied.
    let s4 = step(4);
    assert_eq!(
        (s4["asked"].as_u64(), s4["banner"].as_str()),
        (Some(5), Some("")),
        "{s4}"
    );
    // 5. Undrain with the kept token: nothing asked.
    let s5 = step(5);
    assert_eq!(
        (s5["asked"].as_u64(), s5["banner"].as_str()),
        (Some(5), Some("")),
        "{s5}"
    );

    let c = get_json(admin, "/clusters").await;
    let cluster = |name: &str| {
        c["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(cluster("shard-a")["weight"], 7, "{c:#}");
    assert_eq!(cluster("shard-a")["file_weight"], 1, "{c:#}");
    assert_eq!(cluster("shard-b")["drain"], false, "{c:#}");
    assert!(
        c["reload"]["message"]
            .as_str()
            .unwrap()
            .contains("undrained"),
        "{c:#}"
    );
    // The page shows the run-time weight.
    let weight = part(&dom, "data-weight-override=\"shard-a\"", "</div>");
    assert!(
        weight.contains(">weight 7 (set at run time; file says 1)</div>"),
        "{weight}"
    );
    assert!(
        dom.contains("data-drain=\"shard-b\""),
        "shard-b can be drained again:\n{dom}"
    );

    drop(relay);
    proxy.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

/// Publishes to `queues` at a rate that changes over time, until `stop`.
fn producer(ch: Channel, queues: Vec<String>, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let t = started.elapsed().as_secs_f64();
            // 30 to 130 messages a second, in waves.
            let per_sec = 80.0 + 50.0 * (t / 2.5).sin();
            let queue = match n % 7 {
                0..=3 => &queues[0],
                4 | 5 => &queues[1],
                _ => &queues[2],
            };
            let body = format!("{{\"task\": \"work\", \"n\": {n}}}").into_bytes();
            if ch
                .basic_publish(
                    BasicProperties::default(),
                    body,
                    BasicPublishArguments::new("", queue),
                )
                .await
                .is_err()
            {
                break;
            }
            n += 1;
            tokio::time::sleep(Duration::from_secs_f64(1.0 / per_sec)).await;
        }
        n
    })
}

/// Consumes `queue` with manual acks, until the channel closes.
async fn worker(ch: &Channel, queue: &str) -> JoinHandle<()> {
    let (_tag, mut rx) = support::consume(ch, queue, true).await;
    let ch = ch.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Some(d) = m.deliver else { break };
            // A little work per task, so some deliveries are unacked at any time.
            tokio::time::sleep(Duration::from_millis(3)).await;
            if ch
                .basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
                .await
                .is_err()
            {
                break;
            }
        }
    })
}

/// A realistic page (three live clusters, traffic, queues, clients) saved as the screenshot of
/// docs/operations.md; then, with the page left open: a weight set at run time is shown as an
/// override, and the rows of a cluster removed by a reload and of deleted queues disappear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_screenshot_and_no_stale_rows() {
    if support::skip_live() || !have_chromium() {
        return;
    }
    support::init_tracing();
    let find = |n: &str| {
        support::clusters()
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.nodes.clone())
            .unwrap_or_else(|| {
                panic!("this test needs the clusters shard-a, shard-b and control (WARREN_TEST_CLUSTERS)")
            })
    };
    let (a, b, control) = (find("shard-a"), find("shard-b"), find("control"));
    let base = format!(
        "listen = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [timeouts]\nshutdown_grace_ms = 100\nconnect_ms = 2000\n\n\
         [[clusters]]\nname = \"shard-a\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"shard-b\"\nrole = \"shard\"\nnodes = [{}]\n\n\
         [[clusters]]\nname = \"control\"\nrole = \"control\"\nnodes = [{}]\n",
        support::quoted(&a),
        support::quoted(&b),
        support::quoted(&control)
    );
    let path = temp_file("screenshot", &base);
    let config = Config::load(&path).expect("test config");
    let proxy = warren::start(Arc::new(config))
        .await
        .expect("start the proxy");
    proxy.shared().set_config_path(&path);
    let admin = proxy.admin_addr().expect("admin endpoint");
    clusters_until(admin, "every cluster up", |v| {
        states(v) == ["up", "up", "up"]
    })
    .await;

    // A producer and a worker, as a Celery deployment would have them.
    let id = support::uuid();
    let tag = &id[id.len() - 6..];
    let queues: Vec<String> = ["tasks", "emails", "reports"]
        .iter()
        .map(|q| format!("{q}.{tag}"))
        .collect();
    let web = connect_named(proxy.amqp_addr(), "web-1").await;
    let (pub_ch, _pub_events) = support::open_channel(&web).await;
    for q in &queues {
        support::declare_queue(&pub_ch, q).await;
    }
    let worker_conn = connect_named(proxy.amqp_addr(), "worker-1").await;
    let (work_ch, _work_events) = support::open_channel(&worker_conn).await;
    let workers = [
        worker(&work_ch, &queues[0]).await,
        worker(&work_ch, &queues[1]).await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let producing = producer(pub_ch.clone(), queues.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The screenshot: polls about a second apart in real time, about 15 of them.
    let relay = SlowRelay::start(admin, Duration::from_millis(900)).await;
    let shot = support::repo_dir().join("docs/img/status-page.png");
    let dom = chromium(format!("http://{}/", relay.addr), 30_000, Some(shot)).await;
    assert!(relay.polls() >= 8, "{} polls of /clusters", relay.polls());
    for name in ["shard-a", "shard-b", "control"] {
        assert!(
            dom.contains(&format!("data-cluster=\"{name}\" data-state=\"up\"")),
            "{name} up:\n{dom}"
        );
    }
    for name in ["total", "shard-a", "shard-b", "control"] {
        let (publish, _) = chart_points(&dom, name);
        assert!(publish >= 6, "{name}: {publish} points:\n{dom}");
    }
    assert_rates_shown(&dom);
    assert!(
        rate(text_of(&dom, "total-pub")) > 0.0,
        "publishing: {}",
        text_of(&dom, "total-pub")
    );
    for q in &queues {
        assert!(dom.contains(&format!("data-queue=\"{q}\"")), "{q}:\n{dom}");
    }
    assert!(
        dom.contains(">web-1</td>") && dom.contains(">worker-1</td>"),
        "{dom}"
    );

    // A weight set at run time, token-protected.
    let (status, body) = request(admin, "POST", "/clusters/shard-b/weight?weight=3", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = request(
        admin,
        "POST",
        "/clusters/shard-b/weight?weight=3",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A cluster that a reload adds, then removes while the page is open, and queues deleted
    // meanwhile: through warren, and directly on the clusters (another instance, an operator).
    let retired = format!(
        "{base}\n[[clusters]]\nname = \"shard-retired\"\nrole = \"shard\"\ndrain = true\nnodes = [\"127.0.0.1:{}\"]\n",
        closed_port()
    );
    std::fs::write(&path, &retired).unwrap();
    let (status, body) = request(admin, "POST", "/reload", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let gone_elsewhere = format!("old.{tag}");
    support::declare_queue(&pub_ch, &gone_elsewhere).await;

    let relay = SlowRelay::start(admin, Duration::from_millis(700)).await;
    let shot = support::repo_dir().join("docs/img/status-page-changes.png");
    let page = tokio::spawn(chromium(
        format!("http://{}/", relay.addr),
        30_000,
        Some(shot),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.polls() < 4 {
        assert!(
            Instant::now() < deadline && !page.is_finished(),
            "the page polled /clusters {} times",
            relay.polls()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&path, &base).unwrap();
    let (status, body) = request(admin, "POST", "/reload", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    support::delete_queue(&pub_ch, &queues[2]).await;
    for nodes in [&a, &b] {
        let direct = support::connect(nodes[0].parse().unwrap()).await;
        let (ch, _events) = support::open_channel(&direct).await;
        support::delete_queue(&ch, &gone_elsewhere).await;
        support::close_connection(direct).await;
    }
    let changed_at = relay.polls();
    let dom = page.await.expect("chromium task");
    assert!(
        relay.polls() >= changed_at + 3,
        "the page polled {} times after the changes",
        relay.polls() - changed_at
    );
    for leftover in [
        "data-cluster=\"shard-retired\"",
        "data-chart=\"shard-retired\"",
        "data-chart-card=\"shard-retired\"",
        "<strong>shard-retired</strong>",
    ] {
        assert!(
            !dom.contains(leftover),
            "the removed cluster left no row nor chart ({leftover}):\n{dom}"
        );
    }
    assert!(
        dom.contains("removed shard-retired</code>"),
        "the last reload says so:\n{dom}"
    );
    assert!(
        !dom.contains(&format!("data-queue=\"{}\"", queues[2])),
        "a queue deleted through warren has no row:\n{dom}"
    );
    assert!(
        !dom.contains(&format!("data-queue=\"{gone_elsewhere}\"")),
        "a queue deleted on the clusters has no row:\n{dom}"
    );
    assert!(
        text_of(&dom, "queues-gone").contains("no longer exists"),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<code>{gone_elsewhere}</code>")),
        "{dom}"
    );
    let weight = part(&dom, "data-weight-override=\"shard-b\"", "</div>");
    assert!(
        weight.contains(">weight 3 (set at run time; file says 1)</div>"),
        "{weight}"
    );
    for name in ["total", "shard-a", "shard-b", "control"] {
        chart_points(&dom, name);
    }

    stop.store(true, Ordering::Relaxed);
    let sent = producing.await.unwrap();
    assert!(sent > 100, "{sent} messages published");
    for q in &queues[..2] {
        support::delete_queue(&pub_ch, q).await;
    }
    support::close_connection(web).await;
    support::close_connection(worker_conn).await;
    for w in workers {
        let _ = tokio::time::timeout(support::STEP, w).await;
    }
    proxy.shutdown().await;
    let _ = std::fs::remove_file(&path);
}

/// An evacuating cluster on the page: its evacuation line, and once nothing is left, that it can
/// be removed; the evacuation set in the file has no stop button. Refused evacuations (the last
/// shard cluster, the control cluster) answer 409. No broker needed: the cluster has no queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_an_evacuation_and_when_the_cluster_can_be_removed() {
    let state_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(support::unique("evac-state"));
    std::fs::create_dir_all(&state_dir).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[clusters]]\nname = \"shard-old\"\nrole = \"shard\"\nevacuate = true\nnodes = [\"127.0.0.1:{}\"]\n\n\
         [[clusters]]\nname = \"shard-new\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:{}\"]\n\n\
         [[clusters]]\nname = \"ctl\"\nrole = \"control\"\nnodes = [\"127.0.0.1:{}\"]\n",
        state_dir.display(),
        closed_port(),
        closed_port(),
        closed_port()
    );
    let path = temp_file("evacuation", &text);
    let config = Config::load(&path).expect("test config");
    let proxy = warren::start(Arc::new(config))
        .await
        .expect("start the proxy");
    proxy.shared().set_config_path(&path);
    let admin = proxy.admin_addr().expect("admin endpoint");

    let v = clusters_until(admin, "shard-old evacuated", |v| {
        v["clusters"][0]["evacuation"]["empty"] == true
    })
    .await;
    let old = &v["clusters"][0];
    assert_eq!(old["state"], "evacuating", "{old:#}");
    assert_eq!(old["drain"], true, "evacuating drains: {old:#}");
    assert_eq!(old["evacuation"]["evacuating"], true, "{old:#}");
    assert_eq!(old["evacuation"]["messages_left"], 0, "{old:#}");
    assert_eq!(old["evacuation"]["queues_from"], "declared", "{old:#}");
    assert!(v["clusters"][2]["evacuation"].is_null(), "control: {v:#}");

    for (name, why) in [
        ("shard-new", "every shard cluster"),
        ("ctl", "not a shard cluster"),
    ] {
        let (status, body) =
            request(admin, "POST", &format!("/clusters/{name}/evacuate"), None).await;
        assert_eq!(status, 409, "{name}: {body}");
        assert!(body.contains(why), "{name}: {body}");
    }
    let (status, body) = request(admin, "POST", "/clusters/shard-old/unevacuate", None).await;
    assert_eq!(status, 409, "set in the file: {body}");

    if !have_chromium() {
        proxy.shutdown().await;
        let _ = std::fs::remove_dir_all(&state_dir);
        return;
    }
    let dom = chromium(format!("http://{admin}/"), 4_000, None).await;
    let row = part(&dom, "data-evacuation=\"shard-old\"", "</td>");
    assert!(
        row.contains("evacuated: no message left, it can be removed from the configuration"),
        "{row}"
    );
    assert!(row.contains("moved 0") && row.contains("left 0"), "{row}");
    assert!(
        row.contains("only the queues declared through this warren"),
        "no management API: {row}"
    );
    assert!(
        dom.contains("class=\"badge s-evacuating\">evacuating</span>"),
        "{dom}"
    );
    assert!(dom.contains(">evacuated in the file </span>"), "{dom}");
    assert!(!dom.contains("data-unevacuate="), "{dom}");
    assert!(!dom.contains("data-drain=\"shard-old\""), "{dom}");
    assert!(dom.contains("data-evacuate=\"shard-new\""), "{dom}");
    assert!(!dom.contains("data-evacuate=\"ctl\""), "{dom}");
    proxy.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
}
