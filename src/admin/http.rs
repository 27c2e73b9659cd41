//! The admin routes on hyper (HTTP/1.1).
//!
//! Every answer is JSON except `GET /` (HTML) and `GET /metrics` (Prometheus text 0.0.4, or
//! OpenMetrics when the scraper asks for it). Request heads are bounded by hyper
//! (`max_buf_size`, header read timeout), request bodies by [`MAX_BODY`]; nothing a client sends
//! can make a handler panic (no indexing, no unwrap on request data).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::management_api::{self, ApiPath};
use super::queues;
use super::{AdminState, page, rfc3339, unix_ms};
use crate::config::{Config, Role};
use crate::health::NodeState;
use crate::metrics::{Format, Metrics};
use crate::state::ReloadStatus;

/// Largest request body accepted (POST bodies are not used; this only bounds what is read).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line + headers).
const MAX_HEAD: usize = 32 * 1024;
/// hyper's read buffer bound (at least its minimum of 8 KiB, and room for a whole head).
const MAX_BUF: usize = 64 * 1024;
/// Time a client has to send a request head, and a POST body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `/queues` answer is reused.
pub const QUEUES_CACHE: Duration = Duration::from_secs(1);
/// Longest `?queue=` pattern.
const MAX_PATTERN: usize = 1024;

/// A `/queues` answer kept for [`QUEUES_CACHE`].
pub(crate) struct CachedQueues {
    at: Instant,
    filter: Option<String>,
    body: Bytes,
}

type Resp = Response<Full<Bytes>>;

pub(crate) async fn accept_loop(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: CancellationToken,
    connections: TaskTracker,
    max_connections: usize,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            state.clone(),
            stop.clone(),
            permit,
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AdminState>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "admin: connection ended with an error");
    }
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Page,
    Health,
    Ready,
    Clusters,
    Queues,
    Metrics,
    Reload,
    Drain(String),
    Undrain(String),
    /// `POST /clusters/NAME/evacuate`
    Evacuate(String),
    /// `POST /clusters/NAME/unevacuate`
    Unevacuate(String),
    /// `POST /clusters/NAME/weight?weight=N`
    Weight(String),
    Clients,
    CloseClient(u64),
    /// `GET /api/queues[/VHOST[/NAME]]`
    ManagementApi(ApiPath),
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let trimmed = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        Some(match trimmed {
            "/" | "" | "/index.html" => Route::Page,
            "/health" => Route::Health,
            "/ready" => Route::Ready,
            "/clusters" => Route::Clusters,
            "/queues" => Route::Queues,
            "/metrics" => Route::Metrics,
            "/reload" => Route::Reload,
            "/clients" => Route::Clients,
            p if p.starts_with("/api/") => Route::ManagementApi(ApiPath::parse(p, percent_decode)?),
            p if p.starts_with("/clients/") => {
                let id = p.strip_prefix("/clients/")?.strip_suffix("/close")?;
                Route::CloseClient(id.parse().ok()?)
            }
            p => {
                let rest = p.strip_prefix("/clusters/")?;
                let (name, action): (&str, fn(String) -> Route) =
                    if let Some(name) = rest.strip_suffix("/undrain") {
                        (name, Route::Undrain)
                    } else if let Some(name) = rest.strip_suffix("/unevacuate") {
                        (name, Route::Unevacuate)
                    } else if let Some(name) = rest.strip_suffix("/evacuate") {
                        (name, Route::Evacuate)
                    } else if let Some(name) = rest.strip_suffix("/drain") {
                        (name, Route::Drain)
                    } else {
                        (rest.strip_suffix("/weight")?, Route::Weight)
                    };
                let name = percent_decode(name)?;
                if name.is_empty() || name.contains('/') {
                    return None;
                }
                action(name)
            }
        })
    }

    fn is_post(&self) -> bool {
        matches!(
            self,
            Route::Reload
                | Route::Drain(_)
                | Route::Undrain(_)
                | Route::Evacuate(_)
                | Route::Unevacuate(_)
                | Route::Weight(_)
                | Route::CloseClient(_)
        )
    }
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Resp {
    let Some(route) = Route::parse(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no route {}", req.uri().path()),
        );
    };
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_owned);
    let allowed = if route.is_post() { "POST" } else { "GET, HEAD" };
    let method_ok = if route.is_post() {
        method == Method::POST
    } else {
        method == Method::GET || method == Method::HEAD
    };
    if !method_ok {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here (allowed: {allowed})"),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        return r;
    }
    if route.is_post() {
        let config = state.shared.config();
        if let Some(token) = &config.admin.token
            && let Some(r) = unauthorized(&req, token)
        {
            return r;
        }
        // The body is not used, but it is read (bounded) so that the connection stays usable.
        let body = Limited::new(req.into_body(), MAX_BODY);
        match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY} bytes"),
                );
            }
            Ok(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                );
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                );
            }
        }
        return match route {
            Route::Reload => reload(state).await,
            Route::Drain(name) => change_cluster(state, name, ClusterChange::Drain).await,
            Route::Undrain(name) => change_cluster(state, name, ClusterChange::Undrain).await,
            Route::Evacuate(name) => change_cluster(state, name, ClusterChange::Evacuate).await,
            Route::Unevacuate(name) => change_cluster(state, name, ClusterChange::Unevacuate).await,
            Route::Weight(name) => set_weight(state, name, query.as_deref()),
            Route::CloseClient(id) => close_client(state, id, query.as_deref()),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "unreachable route"),
        };
    }
    match route {
        Route::Page => page::response(),
        Route::Health => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Route::Ready => {
            let (ok, reasons) = readiness(state);
            if ok {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready", "reason": reasons.join("; "), "reasons": reasons}),
                )
            }
        }
        Route::Clusters => json_response(StatusCode::OK, &clusters(state)),
        Route::Queues => {
            let filter = query_param(req.uri().query(), "queue");
            if filter.as_ref().is_some_and(|f| f.len() > MAX_PATTERN) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("queue pattern longer than {MAX_PATTERN} bytes"),
                );
            }
            queues_response(state, filter).await
        }
        Route::Metrics => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok());
            metrics(state, Format::from_accept(accept))
        }
        Route::Clients => json_response(StatusCode::OK, &clients(state)),
        Route::ManagementApi(path) => management_api_response(state, path).await,
        Route::Reload
        | Route::Drain(_)
        | Route::Undrain(_)
        | Route::Evacuate(_)
        | Route::Unevacuate(_)
        | Route::Weight(_)
        | Route::CloseClient(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "unreachable route"),
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

fn json_response(status: StatusCode, value: &Value) -> Resp {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_bytes(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    json_response(
        status,
        &json!({"error": message.into(), "status": status.as_u16()}),
    )
}

/// Checks `Authorization: Bearer TOKEN` (scheme case-insensitive, constant-time comparison);
/// the 401 answer when it does not match.
fn unauthorized(req: &Request<Incoming>, token: &str) -> Option<Resp> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let (message, challenge) = match given {
        Some(t) if bool::from(t.as_bytes().ct_eq(token.as_bytes())) => return None,
        Some(_) => (
            "invalid bearer token",
            "Bearer realm=\"warren\", error=\"invalid_token\"",
        ),
        None => (
            "this route needs an Authorization: Bearer <token> header",
            "Bearer realm=\"warren\"",
        ),
    };
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Some(r)
}

// ---------------------------------------------------------------------------------------------
// Health and readiness

/// The state a cluster is shown in: `draining`, `up`, `down` or (before its first probe)
/// `unknown`.
fn cluster_state(state: &AdminState, cluster: &crate::config::ClusterConfig) -> &'static str {
    if cluster.evacuate {
        return "evacuating";
    }
    if cluster.drain {
        return "draining";
    }
    match state.health.cluster_reachable(cluster) {
        Some(true) => "up",
        Some(false) => "down",
        None => "unknown",
    }
}

/// Why a cluster is not reachable: each node's last error.
fn unreachable_because(state: &AdminState, cluster: &crate::config::ClusterConfig) -> String {
    let errors: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| {
            let h = state.health.node(&cluster.name, n);
            match (h.state, h.last_error) {
                (NodeState::Unknown, _) => format!("{n}: not probed yet"),
                (_, Some(e)) => format!("{n}: {e}"),
                (_, None) => format!("{n}: down"),
            }
        })
        .collect();
    errors.join(", ")
}

/// Ready when not shutting down, at least one shard cluster that takes publishes (not draining)
/// is reachable, and the control cluster (if any) is reachable.
fn readiness(state: &AdminState) -> (bool, Vec<String>) {
    let config = state.shared.config();
    let mut reasons = Vec::new();
    if state.shutting_down.load(Ordering::Relaxed) {
        reasons.push("shutting down".to_owned());
    }
    if let Some(control) = config.control_cluster()
        && state.health.cluster_reachable(control) != Some(true)
    {
        reasons.push(format!(
            "control cluster {} is not reachable ({})",
            control.name,
            unreachable_because(state, control)
        ));
    }
    let publishable: Vec<_> = config.shard_clusters().filter(|c| !c.drain).collect();
    if !publishable
        .iter()
        .any(|c| state.health.cluster_reachable(c) == Some(true))
    {
        let detail: Vec<String> = publishable
            .iter()
            .map(|c| format!("{}: {}", c.name, unreachable_because(state, c)))
            .collect();
        reasons.push(format!(
            "no shard cluster that takes publishes is reachable ({})",
            detail.join("; ")
        ));
    }
    (reasons.is_empty(), reasons)
}

// ---------------------------------------------------------------------------------------------
// /clusters

fn reload_json(s: &ReloadStatus) -> Value {
    json!({
        "ok": s.ok,
        "at": rfc3339(s.at),
        "at_unix_ms": unix_ms(s.at),
        "message": s.message,
        "generation": s.generation,
    })
}

/// Open links per (cluster, node address), from each connection's entry in `/clients` (updated
/// every second).
fn links_per_node(state: &AdminState) -> HashMap<(String, String), u64> {
    let mut links = HashMap::new();
    for client in state.shared.clients.list() {
        for link in client.usage().links {
            // "cluster@node": cluster names have no '@'.
            if let Some((cluster, node)) = link.split_once('@') {
                *links
                    .entry((cluster.to_owned(), node.to_owned()))
                    .or_insert(0) += 1;
            }
        }
    }
    links
}

fn clusters(state: &AdminState) -> Value {
    let config = state.shared.config();
    let metrics = &state.shared.metrics;
    let now = SystemTime::now();
    let mut links = links_per_node(state);
    let clusters: Vec<Value> = config
        .clusters
        .iter()
        .map(|c| {
            let mut nodes: Vec<Value> = c
                .nodes
                .iter()
                .map(|n| {
                    let h = state.health.node(&c.name, n);
                    let address = n.to_string();
                    let open = links.remove(&(c.name.to_string(), address.clone()));
                    json!({
                        "address": address,
                        "in_file": true,
                        "links": open.unwrap_or(0),
                        "state": h.state.as_str(),
                        "last_error": h.last_error,
                        "last_change": h.last_change.map(rfc3339),
                        "last_check": h.last_check.map(rfc3339),
                        "down_since": h.down_since().map(rfc3339),
                        "failures": h.failures,
                        "product": h.product,
                        "version": h.version,
                    })
                })
                .collect();
            // A node taken out of the file keeps the links open on it until they close or
            // fail over: listed while it has any, not probed.
            let mut removed: Vec<(String, u64)> = Vec::new();
            links.retain(|(cluster, node), n| {
                let this = *cluster == *c.name;
                if this {
                    removed.push((node.clone(), *n));
                }
                !this
            });
            removed.sort();
            for (address, open) in removed {
                nodes.push(json!({
                    "address": address,
                    "in_file": false,
                    "links": open,
                    "state": "removed",
                    "last_error": format!(
                        "not in the configuration any more; {open} open link(s) stay on it until they close or fail over"
                    ),
                    "last_change": Value::Null,
                    "last_check": Value::Null,
                    "down_since": Value::Null,
                    "failures": 0,
                    "product": Value::Null,
                    "version": Value::Null,
                }));
            }
            let m = metrics.cluster(&c.name);
            let st = cluster_state(state, c);
            let shard = c.role == Role::Shard;
            let run_time_weight = state.shared.weight_override(&c.name);
            json!({
                "name": c.name,
                "role": c.role.as_str(),
                "weight": shard.then_some(c.weight),
                "file_weight": shard.then(|| run_time_weight.map_or(c.weight, |w| w.file_weight)),
                "weight_set_at_run_time": run_time_weight.is_some(),
                "drain": c.drain,
                "drained_at_run_time": state.shared.drained_at_run_time(&c.name),
                "evacuate": c.evacuate,
                "evacuation": shard.then(|| evacuation_json(state, c)),
                "spread_links": c.spread_links,
                "state": st,
                "reachable": state.health.cluster_reachable(c),
                "nodes": nodes,
                "metrics": {
                    "links": m.links.get(),
                    "publishes": m.publishes.get(),
                    "deliveries": m.deliveries.get(),
                    "acks": m.acks.get(),
                    "confirms_acked": m.confirm_acks.get(),
                    "confirms_nacked": m.confirm_nacks.get(),
                    "confirms_pending": m.confirms_pending.get(),
                    "unacked": m.unacked.get(),
                    "link_failures": m.link_failures.get(),
                    "bytes_sent": m.bytes_to.get(),
                    "bytes_received": m.bytes_from.get(),
                },
            })
        })
        .collect();
    let (ready, reasons) = readiness(state);
    let started = state.shared.started_at();
    json!({
        "time": rfc3339(now),
        "time_unix_ms": unix_ms(now),
        "version": crate::metrics::VERSION,
        "revision": crate::metrics::REVISION,
        "started_at": rfc3339(started),
        "started_at_unix_ms": unix_ms(started),
        "uptime_secs": now.duration_since(started).unwrap_or_default().as_secs(),
        "ready": ready,
        "not_ready_reasons": reasons,
        "client_connections": metrics.connections.get(),
        "client_channels": metrics.channels.get(),
        "republished": metrics.republished.get(),
        "dropped": metrics.dropped.get(),
        "held_bytes": metrics.held_bytes.get(),
        "config_path": state.shared.config_path().map(|p| p.display().to_string()),
        "reload": state.shared.last_reload().as_ref().map(reload_json),
        "clusters": clusters,
    })
}

// ---------------------------------------------------------------------------------------------
// /queues

async fn queues_response(state: &AdminState, filter: Option<String>) -> Resp {
    json_bytes(StatusCode::OK, cached_queues(state, filter).await)
}

/// The `/queues` answer for `filter`, reused for [`QUEUES_CACHE`].
async fn cached_queues(state: &AdminState, filter: Option<String>) -> Bytes {
    let mut cache = state.queues_cache.lock().await;
    if let Some(c) = cache.as_ref()
        && c.filter == filter
        && c.at.elapsed() < QUEUES_CACHE
    {
        return c.body.clone();
    }
    let config = state.shared.config();
    let value = queues_json(&config, state.shared.known_queues(), filter.as_deref()).await;
    let mut body = serde_json::to_vec(&value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let body = Bytes::from(body);
    *cache = Some(CachedQueues {
        at: Instant::now(),
        filter,
        body: body.clone(),
    });
    body
}

/// `GET /api/queues[/VHOST[/NAME]]` (see [`management_api`]): from the answer of
/// `GET /queues?queue=*`; a queue that is not in it (clusters without `management`, a queue
/// this process never saw declared) is asked of every shard cluster by name.
async fn management_api_response(state: &AdminState, path: ApiPath) -> Resp {
    let body = cached_queues(state, Some("*".to_owned())).await;
    let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let vhost = match path {
        ApiPath::Queue { vhost, name } => {
            let listed = management_api::find(&answer, &vhost, &name).cloned();
            let entry = match listed {
                Some(entry) => Some(entry),
                None => {
                    let config = state.shared.config();
                    queues::report(&config, &[(vhost, name)])
                        .await
                        .into_iter()
                        .next()
                }
            };
            return match entry.as_ref().and_then(management_api::found) {
                Some(queue) => json_response(StatusCode::OK, &queue),
                None => json_response(StatusCode::NOT_FOUND, &management_api::not_found()),
            };
        }
        ApiPath::Vhost(vhost) => Some(vhost),
        ApiPath::Queues => None,
    };
    json_response(
        StatusCode::OK,
        &management_api::listing(&answer, vhost.as_deref()),
    )
}

async fn queues_json(config: &Config, known: Vec<(String, String)>, filter: Option<&str>) -> Value {
    queues::listing(config, known, filter).await
}

// ---------------------------------------------------------------------------------------------
// /metrics

/// `GET /metrics` in the format the scraper asked for ([`Format::from_accept`]): the registry's
/// series, then the health gauges the admin endpoint owns.
fn metrics(state: &AdminState, format: Format) -> Resp {
    let mut text = state.shared.metrics.encode(format);
    text.push_str(&health_metrics(state));
    Metrics::finish(format, &mut text);
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The answer depends on Accept.
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    r
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Gauges of the health checks, which the admin endpoint owns.
fn health_metrics(state: &AdminState) -> String {
    use std::fmt::Write;
    let config = state.shared.config();
    let mut out = String::new();
    out.push_str(
        "# HELP warren_cluster_node_up 1 if the node answered its last health probe, 0 if not.\n",
    );
    out.push_str("# TYPE warren_cluster_node_up gauge\n");
    for c in &config.clusters {
        for n in &c.nodes {
            let up = match state.health.node(&c.name, n).state {
                NodeState::Up => 1,
                NodeState::Down => 0,
                NodeState::Unknown => continue,
            };
            let _ = writeln!(
                out,
                "warren_cluster_node_up{{cluster=\"{}\",node=\"{}\"}} {up}",
                label(&c.name),
                label(&n.to_string())
            );
        }
    }
    out.push_str("# HELP warren_cluster_up 1 if at least one node of the cluster answered its last health probe.\n");
    out.push_str("# TYPE warren_cluster_up gauge\n");
    for c in &config.clusters {
        if let Some(up) = state.health.cluster_reachable(c) {
            let _ = writeln!(
                out,
                "warren_cluster_up{{cluster=\"{}\"}} {}",
                label(&c.name),
                u8::from(up)
            );
        }
    }
    out.push_str("# HELP warren_cluster_draining 1 if the shard cluster is draining (takes no new publishes).\n");
    out.push_str("# TYPE warren_cluster_draining gauge\n");
    for c in config.shard_clusters() {
        let _ = writeln!(
            out,
            "warren_cluster_draining{{cluster=\"{}\"}} {}",
            label(&c.name),
            u8::from(c.drain)
        );
    }
    out.push_str("# HELP warren_ready 1 if GET /ready answers 200.\n");
    out.push_str("# TYPE warren_ready gauge\n");
    let _ = writeln!(out, "warren_ready {}", u8::from(readiness(state).0));
    out
}

// ---------------------------------------------------------------------------------------------
// POST routes

async fn reload(state: &AdminState) -> Resp {
    let shared = state.shared.clone();
    // Reading and parsing the file is blocking work.
    let result = match tokio::task::spawn_blocking(move || shared.reload()).await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reload task failed: {e}"),
            );
        }
    };
    match result {
        Ok(s) => {
            if s.message == "no change" {
                debug!("admin: configuration reloaded: no change");
            } else {
                info!(change = %s.message, "admin: configuration reloaded");
            }
            json_response(StatusCode::OK, &reload_json(&s))
        }
        Err(s) => {
            warn!(error = %s.message, "admin: configuration reload rejected");
            let mut v = reload_json(&s);
            v["error"] = Value::String(s.message.clone());
            json_response(StatusCode::UNPROCESSABLE_ENTITY, &v)
        }
    }
}

/// `GET /clients`: every open client connection, oldest first.
fn clients(state: &AdminState) -> Value {
    let now = SystemTime::now();
    let list: Vec<Value> = state
        .shared
        .clients
        .list()
        .iter()
        .map(|c| {
            let id = &c.identity;
            let usage = c.usage();
            let mut per_cluster = serde_json::Map::new();
            for link in &usage.links {
                let (cluster, node) = link.split_once('@').unwrap_or((link.as_str(), ""));
                if let Value::Array(nodes) = per_cluster
                    .entry(cluster.to_owned())
                    .or_insert_with(|| Value::Array(Vec::new()))
                {
                    nodes.push(Value::String(node.to_owned()));
                }
            }
            json!({
                "id": c.id,
                "peer": id.peer.map(|p| p.to_string()),
                "user": id.user,
                "vhost": id.vhost,
                "connection_name": id.name,
                "client_product": id.product,
                "client_version": id.version,
                "client_platform": id.platform,
                "channels": usage.channels,
                "links": per_cluster,
                "upstream_connections": usage.links.len(),
                "bytes_in": c.bytes_in.get(),
                "bytes_out": c.bytes_out.get(),
                "held_publish_bytes": usage.held_bytes,
                "connected_since": rfc3339(c.since),
                "connected_secs": now.duration_since(c.since).unwrap_or_default().as_secs(),
            })
        })
        .collect();
    json!({
        "time": rfc3339(now),
        "time_unix_ms": unix_ms(now),
        "count": list.len(),
        "clients": list,
    })
}

/// `POST /clients/ID/close?reason=TEXT`: the client gets connection.close 320
/// CONNECTION_FORCED with the reason; its other traffic and every other client carry on.
fn close_client(state: &AdminState, id: u64, query: Option<&str>) -> Resp {
    let reason = query_param(query, "reason")
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "closed by an operator through warren's admin endpoint".to_owned());
    // The reason goes into a short string with the code's name in front.
    let reason: String = reason.chars().take(200).collect();
    if !state.shared.clients.close(id, &reason) {
        return error(StatusCode::NOT_FOUND, format!("no client connection {id}"));
    }
    info!(conn = id, %reason, "admin: client connection close requested");
    json_response(
        StatusCode::OK,
        &json!({"id": id, "state": "closing", "reason": reason}),
    )
}

/// A run-time change of one cluster's part (`POST /clusters/NAME/ACTION`). Each is kept until
/// the next restart, or until its opposite.
#[derive(Debug, Clone, Copy)]
enum ClusterChange {
    /// Take no new publishes; consumers keep draining what it holds.
    Drain,
    /// Undo a run-time drain.
    Undrain,
    /// Drain, and move its messages to the other shard clusters.
    Evacuate,
    /// Stop a run-time evacuation (and the drain it implied).
    Unevacuate,
}

impl ClusterChange {
    fn apply(self, shared: &crate::state::Shared, cluster: &str) -> Result<ReloadStatus, String> {
        match self {
            ClusterChange::Drain => shared.drain(cluster),
            ClusterChange::Undrain => shared.undrain(cluster),
            ClusterChange::Evacuate => shared.evacuate(cluster),
            ClusterChange::Unevacuate => shared.unevacuate(cluster),
        }
    }

    /// What the log line says once it is done.
    fn done(self) -> &'static str {
        match self {
            ClusterChange::Drain => "admin: cluster drained",
            ClusterChange::Undrain => "admin: run-time drain undone",
            ClusterChange::Evacuate => "admin: cluster evacuation started",
            ClusterChange::Unevacuate => "admin: run-time evacuation stopped",
        }
    }
}

/// `POST /clusters/NAME/{drain,undrain,evacuate,unevacuate}`: the change is made to the running
/// configuration (the evacuator, the router and the sessions follow it); the answer names the
/// cluster's part afterwards.
async fn change_cluster(state: &AdminState, name: String, change: ClusterChange) -> Resp {
    if state.shared.config().cluster(&name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no cluster named {name:?}"));
    }
    let shared = state.shared.clone();
    let who = name.clone();
    // Blocking work: an evacuation writes the marker file that makes a restarted warren go on.
    let result = match tokio::task::spawn_blocking(move || change.apply(&shared, &who)).await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{change:?} task failed: {e}"),
            );
        }
    };
    match result {
        Ok(s) => {
            info!(cluster = %name, change = %s.message, "{}", change.done());
            let st = match state.shared.config().cluster(&name) {
                Some(c) if c.evacuate => "evacuating",
                Some(c) if c.drain => "draining",
                _ => "taking publishes",
            };
            json_response(
                StatusCode::OK,
                &json!({"cluster": name, "state": st, "reload": reload_json(&s)}),
            )
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

/// The `evacuation` object of a shard cluster in `GET /clusters`.
fn evacuation_json(state: &AdminState, c: &crate::config::ClusterConfig) -> Value {
    let p = state.shared.evacuation(&c.name);
    json!({
        "evacuating": c.evacuate,
        "evacuated_at_run_time": state.shared.evacuated_at_run_time(&c.name),
        "running": p.running,
        "queues_total": p.queues_total,
        "queues_done": p.queues_done,
        "queues_left": p.queues_total.saturating_sub(p.queues_done),
        "current_queue": p.current_queue,
        "moved": p.moved,
        "messages_left": p.left,
        "rate": (p.rate * 10.0).round() / 10.0,
        "errors": p.errors,
        "possible_duplicates": p.possible_duplicates,
        "duplicates_avoided": p.duplicates_avoided,
        "last_error": p.last_error,
        "last_error_at": p.last_error_at.map(rfc3339),
        "empty": p.empty,
        "last_pass_at": p.last_pass_at.map(rfc3339),
        "queues_from": (!p.listing.is_empty()).then_some(p.listing),
    })
}

/// The weight of `POST /clusters/NAME/weight?weight=N`: a decimal integer the configuration
/// file would accept ([`crate::state::check_weight`]: 1 to 4294967295).
fn weight_param(query: Option<&str>) -> Result<u32, String> {
    let Some(text) = query_param(query, "weight") else {
        return Err("missing ?weight=N (N from 1 to 4294967295)".to_owned());
    };
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "weight {text:?} is not a whole number from 1 to 4294967295"
        ));
    }
    let weight: u32 = text
        .parse()
        .map_err(|_| format!("weight {text} is too large: at most {}", u32::MAX))?;
    crate::state::check_weight(weight)
}

/// `POST /clusters/NAME/weight?weight=N`: the shard cluster's weight from now on, kept across
/// reloads like a run-time drain (setting the file's weight again removes the override).
fn set_weight(state: &AdminState, name: String, query: Option<&str>) -> Resp {
    let Some(cluster) = state.shared.config().cluster(&name).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no cluster named {name:?}"));
    };
    let weight = match weight_param(query) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if cluster.role != Role::Shard {
        return error(
            StatusCode::CONFLICT,
            format!("{name:?} is not a shard cluster: weight only applies to shard clusters"),
        );
    }
    match state.shared.set_weight(&name, weight) {
        Ok(s) => {
            let o = state.shared.weight_override(&name);
            info!(cluster = %name, weight, file_weight = o.map(|o| o.file_weight),
                "admin: cluster weight set at run time");
            json_response(
                StatusCode::OK,
                &json!({
                    "cluster": name,
                    "weight": weight,
                    "file_weight": o.map_or(weight, |o| o.file_weight),
                    "weight_set_at_run_time": o.is_some(),
                    "reload": reload_json(&s),
                }),
            )
        }
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

// ---------------------------------------------------------------------------------------------
// URL helpers

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and, in query strings, `+` as a space); `None` for invalid UTF-8.
fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

/// The first value of `key` in a query string.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k, true).as_deref() == Some(key))
            .then(|| decode(v, true))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/"), Some(Route::Page));
        assert_eq!(Route::parse("/health/"), Some(Route::Health));
        assert_eq!(
            Route::parse("/clusters/shard-a/drain"),
            Some(Route::Drain("shard-a".into()))
        );
        assert_eq!(
            Route::parse("/clusters/a%2Db/drain"),
            Some(Route::Drain("a-b".into()))
        );
        assert_eq!(Route::parse("/clusters//drain"), None);
        assert_eq!(
            Route::parse("/clusters/shard-a/undrain"),
            Some(Route::Undrain("shard-a".into()))
        );
        assert_eq!(Route::parse("/clusters/a/b/drain"), None);
        assert_eq!(
            Route::parse("/clusters/shard-a/evacuate"),
            Some(Route::Evacuate("shard-a".into()))
        );
        assert_eq!(
            Route::parse("/clusters/shard-a/unevacuate/"),
            Some(Route::Unevacuate("shard-a".into()))
        );
        assert_eq!(Route::parse("/clusters//evacuate"), None);
        assert!(Route::Evacuate("a".into()).is_post() && Route::Unevacuate("a".into()).is_post());
        assert_eq!(Route::parse("/clusters/%2F/drain"), None);
        assert_eq!(Route::parse("/clusters/%ff/drain"), None);
        assert_eq!(Route::parse("/nope"), None);
        assert_eq!(Route::parse("/clients"), Some(Route::Clients));
        assert_eq!(
            Route::parse("/api/queues/%2F/celery/"),
            Some(Route::ManagementApi(ApiPath::Queue {
                vhost: "/".into(),
                name: "celery".into()
            }))
        );
        assert_eq!(
            Route::parse("/api/queues/"),
            Some(Route::ManagementApi(ApiPath::Queues))
        );
        assert_eq!(Route::parse("/api/overview"), None);
        assert_eq!(
            Route::parse("/clients/42/close"),
            Some(Route::CloseClient(42))
        );
        assert_eq!(Route::parse("/clients/x/close"), None);
        assert_eq!(Route::parse("/clients/42"), None);
        assert!(Route::CloseClient(1).is_post());
        assert_eq!(
            Route::parse("/clusters/shard-a/weight"),
            Some(Route::Weight("shard-a".into()))
        );
        assert_eq!(
            Route::parse("/clusters/shard%2Da/weight/"),
            Some(Route::Weight("shard-a".into()))
        );
        assert_eq!(Route::parse("/clusters//weight"), None);
        assert_eq!(Route::parse("/clusters/a/b/weight"), None);
        assert_eq!(Route::parse("/clusters/weight"), None);
        assert_eq!(Route::parse("/clusters/a/weights"), None);
        assert!(Route::Weight("a".into()).is_post());
    }

    #[test]
    fn weight_parameter() {
        for (query, weight) in [
            ("weight=1", 1),
            ("weight=3", 3),
            ("weight=1000", 1000),
            ("weight=%203%20", 3),
            ("x=1&weight=07", 7),
            ("weight=4294967295", u32::MAX),
            ("weight=2&weight=5", 2),
        ] {
            assert_eq!(weight_param(Some(query)), Ok(weight), "{query}");
        }
        for (query, why) in [
            ("weight=0", "at least 1"),
            ("weight=00", "at least 1"),
            ("weight=4294967296", "too large"),
            ("weight=99999999999999999999999", "too large"),
            ("weight=-1", "whole number"),
            ("weight=%2B1", "whole number"),
            ("weight=1.5", "whole number"),
            ("weight=1e3", "whole number"),
            ("weight=abc", "whole number"),
            ("weight=", "whole number"),
            ("weight", "whole number"),
            ("weight=%ff", "missing"),
            ("weights=3", "missing"),
            ("", "missing"),
        ] {
            let e = weight_param(Some(query)).expect_err(query);
            assert!(e.contains(why), "{query}: {e}");
        }
        assert!(weight_param(None).unwrap_err().contains("missing"));
    }

    #[test]
    fn query_strings() {
        assert_eq!(
            query_param(Some("queue=cel*"), "queue").as_deref(),
            Some("cel*")
        );
        assert_eq!(
            query_param(Some("a=1&queue=a%2Ab+c"), "queue").as_deref(),
            Some("a*b c")
        );
        assert_eq!(query_param(Some("queue"), "queue").as_deref(), Some(""));
        assert_eq!(query_param(Some("x=1"), "queue"), None);
        assert_eq!(query_param(None, "queue"), None);
        for s in ["%", "%4", "%zz", "a%", "%%%"] {
            let _ = decode(s, true);
        }
        assert_eq!(decode("%41%", false).as_deref(), Some("A%"));
        assert_eq!(decode("%4", false).as_deref(), Some("%4"));
    }
}
