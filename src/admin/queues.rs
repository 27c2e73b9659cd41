//! Depths of the sharded queues, summed over the shard clusters: `GET /queues` and
//! `warren check-queues`.
//!
//! Two ways to ask a cluster:
//!
//! * **Passive `queue.declare`** over AMQP, with the cluster's `probe` credentials (default
//!   guest/guest), through [`crate::upstream::link::connect`]: one link per (cluster, vhost), the
//!   queues of that vhost declared one after the other on one channel. A queue the cluster does
//!   not have closes the channel with 404, which is answered with `channel.close-ok` before the
//!   channel is opened again for the next queue. It needs nothing but the AMQP port and answers
//!   the ready messages and the consumers of queues whose names are known. Exact names and the
//!   default set (the queues declared through this process) are always asked this way.
//! * **The management HTTP API** (`management = { url = ... }` in the cluster's entry):
//!   `GET /api/queues/VHOST?columns=...` lists every queue of the vhost with its ready and
//!   unacknowledged messages and consumers. Name patterns (`?queue=celery*`) are matched against
//!   these lists, so a warren that never saw a queue declared (restarted, or another instance)
//!   still finds it. The API's `name`/`use_regex` filter is not used: RabbitMQ applies it only to
//!   paginated requests (`page=`), it is a regular expression (a glob would need translating and
//!   the match is not anchored), and its paging would take several requests; the whole list is
//!   asked (a few columns, bounded to [`MAX_MANAGEMENT_RESPONSE`]) and matched here with the same
//!   [`Pattern`] as everywhere else.
//!
//! A pattern query merges both: the names are those listed by the clusters that have
//! `management`, plus the matching queues declared through this process; each cluster with
//! `management` answers from its list (a queue its list does not have is missing there), the
//! others with passive declares. A queue every cluster says is missing is left out. A queue the
//! API lists without numbers yet (the statistics of a new queue arrive within RabbitMQ's
//! `collect_statistics_interval`, 5 s by default) is asked with a passive declare instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::http_client;
use super::{rfc3339, unix_ms};
use crate::codec::{self, Method, ShortStr};
use crate::config::{ClusterConfig, Config, ManagementConfig, ManagementTls};
use crate::io::Command;
use crate::route::{Class, Pattern};
use crate::upstream::link::{self, Link};
use crate::upstream::own::{OwnLink, own_link_spec};

/// Longest time one cluster gets to answer all its queues (AMQP), or one vhost's list (HTTP),
/// after connecting.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(10);
/// At most this many queues are looked up per request (the rest are reported as truncated).
pub const MAX_QUEUES: usize = 10_000;
/// Largest management API answer read (about 300 000 queues with the columns asked).
pub const MAX_MANAGEMENT_RESPONSE: usize = 64 * 1024 * 1024;
/// The columns asked of `GET /api/queues/VHOST`.
pub const COLUMNS: &str = "name,messages,messages_ready,messages_unacknowledged,consumers";

/// What one cluster said about one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Depth {
    Found {
        /// Messages ready for delivery (what a passive declare answers).
        messages: u64,
        consumers: u64,
        /// Delivered, not yet acknowledged; only the management API tells.
        unacked: Option<u64>,
    },
    /// 404, or not in the cluster's list: the cluster has no such queue (counts as empty).
    Missing,
    /// The cluster could not be asked, or refused (403, 405 exclusive queue, 401, ...).
    Error(String),
}

/// How a [`Depth`] was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Passive `queue.declare`.
    Amqp,
    /// `GET /api/queues/VHOST`.
    Management,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Amqp => "amqp",
            Source::Management => "management",
        }
    }
}

/// One cluster's answer about one queue, and when it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub depth: Depth,
    pub source: Source,
    pub at: SystemTime,
}

impl Answer {
    fn error(e: impl Into<String>, source: Source) -> Answer {
        Answer {
            depth: Depth::Error(e.into()),
            source,
            at: SystemTime::now(),
        }
    }
}

/// The depths of `queues` (vhost, name) on every shard cluster of `config`, asked with passive
/// declares, by cluster name and then by queue, in the order of `queues`.
pub async fn depths(config: &Config, queues: &[(String, String)]) -> BTreeMap<String, Vec<Answer>> {
    let all: Vec<usize> = (0..queues.len()).collect();
    let asks = config
        .shard_clusters()
        .map(|c| (c.name.clone(), all.clone()))
        .collect();
    let mut answers = passive(config, queues, asks).await;
    config
        .shard_clusters()
        .map(|c| {
            let mut list = vec![Answer::error("not asked", Source::Amqp); queues.len()];
            for (i, a) in answers.remove(&c.name).unwrap_or_default() {
                if let Some(slot) = list.get_mut(i) {
                    *slot = a;
                }
            }
            (c.name.clone(), list)
        })
        .collect()
}

/// Passive declares of the queues at the indices `asks` gives for each shard cluster (by
/// name): one task per (cluster, vhost). Every index asked gets an answer.
async fn passive(
    config: &Config,
    queues: &[(String, String)],
    asks: BTreeMap<String, Vec<usize>>,
) -> BTreeMap<String, Vec<(usize, Answer)>> {
    let connect_timeout = config.timeouts.connect();
    let mut tasks = JoinSet::new();
    let mut out: BTreeMap<String, BTreeMap<usize, Answer>> = BTreeMap::new();
    for (cluster_name, idx) in asks {
        let Some(cluster) = config.shard_clusters().find(|c| c.name == cluster_name) else {
            continue;
        };
        let mut by_vhost: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for i in idx {
            if let Some((vhost, _)) = queues.get(i) {
                by_vhost.entry(vhost.as_str()).or_default().push(i);
            }
        }
        for (vhost, idx) in by_vhost {
            let cluster = cluster.clone();
            let vhost = vhost.to_owned();
            let names: Vec<String> = idx.iter().map(|&i| queues[i].1.clone()).collect();
            // Until the task reports, every queue of it is an error (a task that panicked).
            out.entry(cluster.name.clone()).or_default().extend(
                idx.iter()
                    .map(|&i| (i, Answer::error("not asked", Source::Amqp))),
            );
            tasks.spawn(async move {
                let deadline = Instant::now() + connect_timeout + CLUSTER_DEADLINE;
                let result = ask_cluster(&cluster, &vhost, &names, connect_timeout, deadline).await;
                let at = SystemTime::now();
                let answers: Vec<(usize, Answer)> = idx
                    .into_iter()
                    .zip(result)
                    .map(|(i, depth)| {
                        (
                            i,
                            Answer {
                                depth,
                                source: Source::Amqp,
                                at,
                            },
                        )
                    })
                    .collect();
                (cluster.name, answers)
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((cluster, answers)) = joined else {
            continue;
        };
        if let Some(slots) = out.get_mut(&cluster) {
            slots.extend(answers);
        }
    }
    out.into_iter()
        .map(|(cluster, answers)| (cluster, answers.into_iter().collect()))
        .collect()
}

/// One `/queues` entry per queue of `queues` (vhost, name), in their order, asked on every shard
/// cluster of `config` now with passive declares (whether or not a client declared them through
/// this process). See [`entries`] for the shape. `warren check-queues --queue NAME` builds its
/// answer with this, so every instance answers the same for a named queue.
pub async fn report(config: &Config, queues: &[(String, String)]) -> Vec<Value> {
    let answers = depths(config, queues).await;
    entries(config, queues, &answers, SystemTime::now())
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// The `/queues` entries of `queues` from each shard cluster's answers (`answers[cluster][i]` is
/// about `queues[i]`), with whether every cluster said the queue is missing:
///
/// ```json
/// {"vhost": "/", "name": "celery", "messages": 1200, "consumers": 4, "unacked": 8,
///  "complete": true, "as_of": "2024-05-01T12:00:00.250Z", "age_ms": 3,
///  "clusters": [{"cluster": "shard-a", "status": "ok", "source": "management",
///                "messages": 610, "consumers": 4, "unacked": 5, "as_of": "..."}, ...]}
/// ```
///
/// `messages` (ready for delivery) is the sum over the clusters, `consumers` the largest
/// per-cluster count (every client consumer consumes from every shard cluster), `unacked` the sum
/// when every cluster that has the queue told it (the management API does, a passive declare
/// does not), else `null`. A cluster without the queue is `"status": "missing"` (0 messages);
/// one that could not be asked `"status": "error"` with the reason, and makes the entry
/// `"complete": false`. `as_of` is the time of the oldest answer, `age_ms` its age at `now`.
pub fn entries(
    config: &Config,
    queues: &[(String, String)],
    answers: &BTreeMap<String, Vec<Answer>>,
    now: SystemTime,
) -> Vec<(bool, Value)> {
    let shard_names: Vec<&str> = config.shard_clusters().map(|c| c.name.as_str()).collect();
    queues
        .iter()
        .enumerate()
        .map(|(i, (vhost, name))| {
            let mut messages: u64 = 0;
            let mut consumers: u64 = 0;
            let mut unacked: Option<u64> = Some(0);
            let mut complete = true;
            let mut all_missing = !shard_names.is_empty();
            let mut oldest: Option<SystemTime> = None;
            let split: Vec<Value> = shard_names
                .iter()
                .map(|cluster| {
                    let Some(a) = answers.get(*cluster).and_then(|v| v.get(i)) else {
                        complete = false;
                        all_missing = false;
                        return json!({"cluster": cluster, "status": "error", "error": "not asked",
                            "messages": null, "consumers": null, "unacked": null});
                    };
                    let source = a.source.as_str();
                    let as_of = rfc3339(a.at);
                    match &a.depth {
                        Depth::Found {
                            messages: m,
                            consumers: c,
                            unacked: u,
                        } => {
                            all_missing = false;
                            oldest = Some(oldest.map_or(a.at, |o| o.min(a.at)));
                            messages += m;
                            consumers = consumers.max(*c);
                            unacked = unacked.zip(*u).map(|(x, y)| x + y);
                            json!({"cluster": cluster, "status": "ok", "source": source,
                                "messages": m, "consumers": c, "unacked": u, "as_of": as_of})
                        }
                        Depth::Missing => {
                            oldest = Some(oldest.map_or(a.at, |o| o.min(a.at)));
                            json!({"cluster": cluster, "status": "missing", "source": source,
                                "messages": 0, "consumers": 0, "unacked": 0, "as_of": as_of})
                        }
                        Depth::Error(e) => {
                            complete = false;
                            all_missing = false;
                            json!({"cluster": cluster, "status": "error", "source": source,
                                "error": e, "messages": null, "consumers": null, "unacked": null})
                        }
                    }
                })
                .collect();
            let age_ms = oldest.map(|o| {
                now.duration_since(o)
                    .unwrap_or_default()
                    .as_millis()
                    .min(u128::from(u64::MAX)) as u64
            });
            (
                all_missing,
                json!({
                    "vhost": vhost,
                    "name": name,
                    "messages": messages,
                    "consumers": consumers,
                    "unacked": unacked,
                    "complete": complete,
                    "as_of": oldest.map(rfc3339),
                    "age_ms": age_ms,
                    "rule": rule_json(config, name),
                    "clusters": split,
                }),
            )
        })
        .collect()
}

/// The `[[routing.rules]]` entry publishes to `queue` by name take (through the default
/// exchange, or an exchange named like the queue, as Celery publishes): its position, patterns,
/// group and spread; `null` when none matches (round-robin over every shard cluster).
fn rule_json(config: &Config, queue: &str) -> Value {
    let Some(i) = config.routing.rule_for(b"", queue.as_bytes()) else {
        return Value::Null;
    };
    let r = &config.routing.rules[i];
    json!({
        "index": i,
        "match": r.patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "clusters": r.clusters,
        "spread": r.spread.as_str(),
    })
}

/// The whole `GET /queues[?queue=FILTER]` answer.
///
/// * No filter: the queues clients declared through this process (`known`), asked with passive
///   declares.
/// * A name without `*`: that name (in each vhost this process saw it declared in, else in `/`),
///   asked with passive declares, listed even when no cluster has it.
/// * A pattern with `*`: see the module docs: the names come from the management API of the
///   clusters that have `management` and from `known`; queues that exist on no cluster are left
///   out when at least one shard cluster has `management`.
///
/// Beside the queues: `listing_complete` (every shard cluster listed its queues through its
/// management API and nothing was cut, so the set is every matching queue, not only those
/// declared through this process) and `management`, one entry per (cluster, vhost) listed.
pub async fn listing(
    config: &Config,
    mut known: Vec<(String, String)>,
    filter: Option<&str>,
) -> Value {
    let mut management: Vec<Value> = Vec::new();
    let mut listing_complete = false;
    let (queues, truncated) = match filter {
        Some(pattern) if pattern.contains('*') => {
            let found = pattern_query(config, known, pattern).await;
            management = found.management;
            listing_complete = found.complete;
            (found.queues, found.truncated)
        }
        _ => {
            if let Some(f) = filter {
                let p = Pattern::new(f);
                known.retain(|(_, name)| p.matches(name.as_bytes()));
                // An exact name is asked of the clusters even when no client declared it through
                // this process (a restarted warren, a second instance): every instance answers
                // the same.
                if known.is_empty() {
                    known.push(("/".to_owned(), f.to_owned()));
                }
            }
            let truncated = known.len() > MAX_QUEUES;
            known.truncate(MAX_QUEUES);
            (report(config, &known).await, truncated)
        }
    };
    let total_messages: u64 = queues.iter().filter_map(|q| q["messages"].as_u64()).sum();
    let shard_names: Vec<&str> = config.shard_clusters().map(|c| c.name.as_str()).collect();
    let now = SystemTime::now();
    json!({
        "time": rfc3339(now),
        "time_unix_ms": unix_ms(now),
        "clusters": shard_names,
        "filter": filter,
        "truncated": truncated,
        "listing_complete": listing_complete,
        "total_messages": total_messages,
        "management": management,
        "queues": queues,
    })
}

/// What [`pattern_query`] found.
struct PatternAnswer {
    queues: Vec<Value>,
    truncated: bool,
    complete: bool,
    management: Vec<Value>,
}

/// One management list: the queues of one vhost of one cluster, by name.
struct Listed {
    at: SystemTime,
    took: Duration,
    queues: Result<BTreeMap<String, ApiQueue>, String>,
}

async fn pattern_query(
    config: &Config,
    mut known: Vec<(String, String)>,
    pattern: &str,
) -> PatternAnswer {
    let p = Pattern::new(pattern);
    known.retain(|(_, name)| p.matches(name.as_bytes()));
    let known_vhosts: BTreeSet<&str> = known.iter().map(|(v, _)| v.as_str()).collect();

    // Every vhost of every cluster with `management`, listed at once.
    let connect_timeout = config.timeouts.connect();
    let mut tasks = JoinSet::new();
    let mut lists: BTreeMap<(String, String), Listed> = BTreeMap::new();
    for cluster in config.shard_clusters() {
        let Some(m) = &cluster.management else {
            continue;
        };
        let mut vhosts: BTreeSet<&str> = m.vhosts.iter().map(String::as_str).collect();
        vhosts.extend(known_vhosts.iter().copied());
        for vhost in vhosts {
            let m = m.clone();
            let name = cluster.name.clone();
            let vhost = vhost.to_owned();
            lists.insert(
                (name.clone(), vhost.clone()),
                Listed {
                    at: SystemTime::now(),
                    took: Duration::ZERO,
                    queues: Err("not asked".into()),
                },
            );
            tasks.spawn(async move {
                let started = Instant::now();
                let deadline = started + connect_timeout + CLUSTER_DEADLINE;
                let queues = list_queues(&m, &vhost, connect_timeout, deadline).await;
                let listed = Listed {
                    at: SystemTime::now(),
                    took: started.elapsed(),
                    queues,
                };
                ((name, vhost), listed)
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok((key, listed)) = joined {
            lists.insert(key, listed);
        }
    }

    // The queues: those declared through this process, and the sharded ones the lists have.
    let mut names: BTreeSet<(String, String)> = known.into_iter().collect();
    for ((_, vhost), listed) in &lists {
        if let Ok(queues) = &listed.queues {
            for name in queues.keys() {
                if p.matches(name.as_bytes())
                    && config.routing.queue(name.as_bytes()) == Class::Sharded
                {
                    names.insert((vhost.clone(), name.clone()));
                }
            }
        }
    }
    let truncated = names.len() > MAX_QUEUES;
    let queues: Vec<(String, String)> = names.into_iter().take(MAX_QUEUES).collect();

    // Each cluster's answers: from its lists, or (None) to be asked with a passive declare.
    let mut answers: BTreeMap<String, Vec<Answer>> = BTreeMap::new();
    let mut asks: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for cluster in config.shard_clusters() {
        let mut list: Vec<Option<Answer>> = Vec::with_capacity(queues.len());
        for (vhost, name) in &queues {
            let answer = match (
                &cluster.management,
                lists.get(&(cluster.name.clone(), vhost.clone())),
            ) {
                (None, _) => None,
                (Some(_), None) => Some(Answer::error("not asked", Source::Management)),
                (Some(_), Some(listed)) => match &listed.queues {
                    Err(e) => Some(Answer {
                        depth: Depth::Error(format!("management API: {e}")),
                        source: Source::Management,
                        at: listed.at,
                    }),
                    Ok(q) => match q.get(name) {
                        None => Some(Answer {
                            depth: Depth::Missing,
                            source: Source::Management,
                            at: listed.at,
                        }),
                        Some(api) => api.depth().map(|depth| Answer {
                            depth,
                            source: Source::Management,
                            at: listed.at,
                        }),
                    },
                },
            };
            list.push(answer);
        }
        let todo: Vec<usize> = (0..list.len()).filter(|&i| list[i].is_none()).collect();
        if !todo.is_empty() {
            asks.insert(cluster.name.clone(), todo);
        }
        answers.insert(
            cluster.name.clone(),
            list.into_iter()
                .map(|a| a.unwrap_or_else(|| Answer::error("not asked", Source::Amqp)))
                .collect(),
        );
    }
    for (cluster, got) in passive(config, &queues, asks).await {
        if let Some(slots) = answers.get_mut(&cluster) {
            for (i, a) in got {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = a;
                }
            }
        }
    }

    let any_management = config.shard_clusters().any(|c| c.management.is_some());
    let now = SystemTime::now();
    let queues: Vec<Value> = entries(config, &queues, &answers, now)
        .into_iter()
        .filter(|(all_missing, _)| !(any_management && *all_missing))
        .map(|(_, v)| v)
        .collect();
    let complete = !truncated
        && config.shard_clusters().all(|c| c.management.is_some())
        && lists.values().all(|l| l.queues.is_ok());
    let management = lists
        .iter()
        .map(|((cluster, vhost), l)| {
            let mut v = json!({
                "cluster": cluster,
                "vhost": vhost,
                "url": config.cluster(cluster).and_then(|c| c.management.as_ref()).map(|m| m.url.to_string()),
                "as_of": rfc3339(l.at),
                "ms": l.took.as_millis() as u64,
            });
            match &l.queues {
                Ok(q) => {
                    v["status"] = json!("ok");
                    v["queues"] = json!(q.len());
                }
                Err(e) => {
                    v["status"] = json!("error");
                    v["error"] = json!(e);
                }
            }
            v
        })
        .collect();
    PatternAnswer {
        queues,
        truncated,
        complete,
        management,
    }
}

// ---------------------------------------------------------------------------------------------
// The management HTTP API

/// One queue of a `GET /api/queues/VHOST` answer (the [`COLUMNS`] asked). A number is `None`
/// when the API has no statistics for the queue yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ApiQueue {
    #[serde(default)]
    pub messages: Option<u64>,
    #[serde(default)]
    pub messages_ready: Option<u64>,
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    #[serde(default)]
    pub consumers: Option<u64>,
}

impl ApiQueue {
    /// The depth, or `None` when the statistics are not there yet.
    pub fn depth(&self) -> Option<Depth> {
        let ready = self.messages_ready?;
        Some(Depth::Found {
            messages: ready,
            consumers: self.consumers.unwrap_or(0),
            unacked: self
                .messages_unacknowledged
                .or_else(|| self.messages.map(|m| m.saturating_sub(ready))),
        })
    }
}

#[derive(Deserialize)]
struct NamedApiQueue {
    name: String,
    #[serde(flatten)]
    numbers: ApiQueue,
}

/// Parses the JSON array `GET /api/queues/VHOST` answers, into the queues by name.
pub fn parse_queue_list(body: &[u8]) -> Result<BTreeMap<String, ApiQueue>, String> {
    let list: Vec<NamedApiQueue> = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the answer is not a JSON list of queues ({e}): {}",
            excerpt(body)
        )
    })?;
    Ok(list.into_iter().map(|q| (q.name, q.numbers)).collect())
}

/// The reason of an error answer: `HTTP 401 Unauthorized: not_authorized: Login failed`.
pub fn http_error(status: StatusCode, body: &[u8]) -> String {
    let head = format!(
        "HTTP {} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let head = head.trim_end().to_owned();
    let detail = match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let (e, r) = (field("error"), field("reason"));
            match (e.is_empty(), r.is_empty()) {
                (true, true) => excerpt(body),
                (false, true) => e,
                (true, false) => r,
                (false, false) => format!("{e}: {r}"),
            }
        }
        Err(_) => excerpt(body),
    };
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (check management.user and management.password)",
        StatusCode::NOT_FOUND => {
            " (no such vhost on this cluster, or the url is not the management API's)"
        }
        _ => "",
    };
    if detail.is_empty() {
        format!("{head}{hint}")
    } else {
        format!("{head}: {detail}{hint}")
    }
}

/// The first 200 characters of a body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut cut: String = one.chars().take(200).collect();
    if cut.len() < one.len() {
        cut.push_str("...");
    }
    cut
}

/// `GET /api/queues/VHOST?columns=...` of `m`: the vhost's queues by name.
pub async fn list_queues(
    m: &ManagementConfig,
    vhost: &str,
    connect_timeout: Duration,
    deadline: Instant,
) -> Result<BTreeMap<String, ApiQueue>, String> {
    let path = format!(
        "{}/api/queues/{}?columns={COLUMNS}",
        m.url.prefix,
        percent_encode(vhost)
    );
    let (status, body) = match tokio::time::timeout_at(
        deadline,
        get(m, &path, connect_timeout, MAX_MANAGEMENT_RESPONSE),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => return Err(format!("{}: no answer in time", m.url)),
    };
    if status != StatusCode::OK {
        return Err(format!("{}: {}", m.url, http_error(status, &body)));
    }
    parse_queue_list(&body).map_err(|e| format!("{}: {e}", m.url))
}

/// One GET of `path` on `m`'s host, over http or https: the status and the whole body (at most
/// `limit` bytes).
async fn get(
    m: &ManagementConfig,
    path: &str,
    connect_timeout: Duration,
    limit: usize,
) -> Result<(StatusCode, Bytes), String> {
    let url = &m.url;
    let tcp = match tokio::time::timeout(
        connect_timeout,
        TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("{url}: cannot connect: {e}")),
        Err(_) => {
            return Err(format!(
                "{url}: cannot connect: no connection within {} ms",
                connect_timeout.as_millis()
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut credentials = Vec::with_capacity(m.user.len() + 1 + m.password.len());
    credentials.extend_from_slice(m.user.as_bytes());
    credentials.push(b':');
    credentials.extend_from_slice(m.password.as_bytes());
    let request = Request::get(path)
        .header(HOST, url.authority())
        .header(AUTHORIZATION, format!("Basic {}", base64(&credentials)))
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, concat!("warren/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: cannot make the request: {e}"))?;
    let result = match &m.tls {
        None => http_client::send(tcp, request, limit).await,
        Some(tls) => {
            let (connector, name) = match tls {
                ManagementTls::Verify(t) => (
                    t.connector().clone(),
                    t.server_name(&url.host)
                        .map_err(|e| format!("{url}: {e}"))?,
                ),
                ManagementTls::InsecureSkipVerify => (
                    insecure_connector(),
                    rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|_| {
                        format!("{url}: {:?} is not a valid TLS server name", url.host)
                    })?,
                ),
            };
            let stream =
                match tokio::time::timeout(connect_timeout, connector.connect(name, tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(format!("{url}: TLS handshake failed: {e}")),
                    Err(_) => return Err(format!("{url}: TLS handshake: no answer in time")),
                };
            http_client::send(stream, request, limit).await
        }
    };
    result.map_err(|e| format!("{url}: {e}"))
}

/// Standard base64 with padding (RFC 4648), for HTTP basic authentication.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a vhost as a path segment:
/// `/` is `%2F`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A TLS connector that accepts any server certificate (`insecure_skip_verify = true`); the
/// handshake signatures are still checked, so the connection is encrypted to whoever answered.
fn insecure_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = crate::tls::provider();
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Passive declares

/// Asks one cluster about `names` in `vhost`; always returns one [`Depth`] per name.
async fn ask_cluster(
    cluster: &ClusterConfig,
    vhost: &str,
    names: &[String],
    connect_timeout: Duration,
    deadline: Instant,
) -> Vec<Depth> {
    let own = OwnLink {
        product: "warren admin",
        connection_name: "warren admin: queue depths".to_owned(),
        capabilities: &[],
        heartbeat_secs: 0,
        buffer_limit: 1024 * 1024,
        connect_timeout,
    };
    let spec = match own_link_spec(cluster, vhost, own) {
        Ok(spec) => spec,
        Err(e) => return vec![Depth::Error(e); names.len()],
    };
    let link = match tokio::time::timeout_at(deadline, link::connect(&spec)).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) => return vec![Depth::Error(e.to_string()); names.len()],
        Err(_) => return vec![Depth::Error("no answer in time".into()); names.len()],
    };
    let mut conn = ProbeConn {
        link,
        deadline,
        channel: 1,
        open: false,
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match conn.declare(name).await {
            Ok(d) => out.push(d),
            Err(Fatal(e)) => {
                out.push(Depth::Error(e.clone()));
                while out.len() < names.len() {
                    out.push(Depth::Error(e.clone()));
                }
                return out;
            }
        }
    }
    conn.close().await;
    out
}

/// The connection can no longer be used.
struct Fatal(String);

struct ProbeConn {
    link: Link,
    deadline: Instant,
    channel: u16,
    open: bool,
}

impl ProbeConn {
    /// The next command from the broker (connection-level closes are fatal).
    async fn next(&mut self) -> Result<Command, Fatal> {
        // What was sent goes out before waiting for its answer.
        self.link.outbox.flush();
        let Some(reader) = self.link.reader.as_mut() else {
            return Err(Fatal("connection lost".into()));
        };
        let cmd = match tokio::time::timeout_at(self.deadline, reader.recv()).await {
            Ok(Ok(cmd)) => cmd,
            Ok(Err(reason)) => return Err(Fatal(format!("connection lost: {reason}"))),
            Err(_) => return Err(Fatal("no answer in time".into())),
        };
        if let Method::ConnectionClose(c) = &cmd.method {
            self.link
                .send(0, &Method::ConnectionCloseOk(Default::default()));
            self.link.outbox.flush();
            return Err(Fatal(format!(
                "connection closed by the broker: {} {}",
                c.reply_code, c.reply_text
            )));
        }
        Ok(cmd)
    }

    /// The next command on the current channel (others, and connection.blocked, are skipped).
    async fn reply(&mut self) -> Result<Method, Fatal> {
        loop {
            let cmd = self.next().await?;
            if cmd.channel == self.channel {
                return Ok(cmd.method);
            }
        }
    }

    async fn open_channel(&mut self) -> Result<(), Fatal> {
        self.link
            .send(self.channel, &Method::ChannelOpen(Default::default()));
        match self.reply().await? {
            Method::ChannelOpenOk(_) => {
                self.open = true;
                Ok(())
            }
            Method::ChannelClose(c) => Err(Fatal(format!(
                "channel.open refused: {} {}",
                c.reply_code, c.reply_text
            ))),
            other => Err(Fatal(format!(
                "expected channel.open-ok, got {}",
                other.name()
            ))),
        }
    }

    async fn declare(&mut self, name: &str) -> Result<Depth, Fatal> {
        let Ok(queue) = ShortStr::try_from(name) else {
            return Ok(Depth::Error("queue name longer than 255 bytes".into()));
        };
        if !self.open {
            self.open_channel().await?;
        }
        self.link.send(
            self.channel,
            &Method::QueueDeclare(codec::QueueDeclare {
                queue,
                passive: true,
                ..Default::default()
            }),
        );
        match self.reply().await? {
            Method::QueueDeclareOk(ok) => Ok(Depth::Found {
                messages: u64::from(ok.message_count),
                consumers: u64::from(ok.consumer_count),
                unacked: None,
            }),
            Method::ChannelClose(c) => {
                // The broker closed the channel: acknowledge, and use the next number for the
                // next queue (a fresh channel, whatever the broker still has in flight).
                self.link
                    .send(self.channel, &Method::ChannelCloseOk(Default::default()));
                self.open = false;
                self.channel = if self.channel >= 60 {
                    1
                } else {
                    self.channel + 1
                };
                Ok(if c.reply_code == 404 {
                    Depth::Missing
                } else {
                    Depth::Error(format!("{} {}", c.reply_code, c.reply_text))
                })
            }
            other => Err(Fatal(format!(
                "expected queue.declare-ok, got {}",
                other.name()
            ))),
        }
    }

    /// connection.close, waiting briefly for close-ok.
    async fn close(mut self) {
        self.link.send(
            0,
            &Method::ConnectionClose(codec::ConnectionClose {
                reply_code: 200,
                reply_text: ShortStr::from_static("warren admin: done"),
                class_id: 0,
                method_id: 0,
            }),
        );
        self.deadline = self.deadline.min(Instant::now() + Duration::from_secs(1));
        loop {
            match self.next().await {
                Ok(Command {
                    method: Method::ConnectionCloseOk(_),
                    ..
                })
                | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.link.shutdown(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn queue_lists_parse() {
        let body = br#"[
            {"name": "celery", "messages": 12, "messages_ready": 10,
             "messages_unacknowledged": 2, "consumers": 3, "vhost": "/", "extra": {"x": 1}},
            {"name": "fresh"},
            {"name": "half", "messages": 5, "messages_ready": 5, "messages_unacknowledged": null}
        ]"#;
        let list = parse_queue_list(body).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(
            list["celery"].depth(),
            Some(Depth::Found {
                messages: 10,
                consumers: 3,
                unacked: Some(2)
            })
        );
        // A new queue the statistics have not reached yet: asked another way.
        assert_eq!(list["fresh"], ApiQueue::default());
        assert_eq!(list["fresh"].depth(), None);
        // Unacknowledged from the total when only that is there.
        assert_eq!(
            list["half"].depth(),
            Some(Depth::Found {
                messages: 5,
                consumers: 0,
                unacked: Some(0)
            })
        );
        assert!(parse_queue_list(b"[]").unwrap().is_empty());
        for bad in [
            &b"{\"error\": \"x\"}"[..],
            b"not json",
            b"[{\"messages\": 1}]",
            b"[{\"name\": \"q\", \"messages\": -1}]",
            b"",
        ] {
            let e = parse_queue_list(bad).unwrap_err();
            assert!(e.contains("not a JSON list of queues"), "{e}");
        }
    }

    #[test]
    fn http_errors_say_why() {
        assert_eq!(
            http_error(
                StatusCode::UNAUTHORIZED,
                br#"{"error":"not_authorized","reason":"Login failed"}"#
            ),
            "HTTP 401 Unauthorized: not_authorized: Login failed (check management.user and \
             management.password)"
        );
        assert!(
            http_error(
                StatusCode::NOT_FOUND,
                br#"{"error":"Object Not Found","reason":"Not Found"}"#
            )
            .starts_with("HTTP 404 Not Found: Object Not Found: Not Found (no such vhost")
        );
        assert_eq!(
            http_error(StatusCode::BAD_GATEWAY, b"<html>\n  bad   gateway\n</html>"),
            "HTTP 502 Bad Gateway: <html> bad gateway </html>"
        );
        assert_eq!(
            http_error(StatusCode::SERVICE_UNAVAILABLE, b""),
            "HTTP 503 Service Unavailable"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            http_error(StatusCode::IM_A_TEAPOT, long.as_bytes()).len(),
            "HTTP 418 I'm a teapot: ".len() + 200 + 3
        );
    }

    #[test]
    fn encodings() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0x00]), "//79AA==");
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(percent_encode("my vhost/é"), "my%20vhost%2F%C3%A9");
        assert_eq!(percent_encode("a-b_c.d~e"), "a-b_c.d~e");
    }

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn each_queue_names_the_routing_rule_its_publishes_take() {
        let c = config(
            "listen = \"127.0.0.1:5673\"\n\
             [[routing.rules]]\nmatch = [\"fast*\"]\nclusters = [\"a\"]\nspread = \"channel\"\n\
             [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n",
        );
        assert_eq!(
            rule_json(&c, "fast.high"),
            json!({"index": 0, "match": ["fast*"], "clusters": ["a"], "spread": "channel"})
        );
        assert_eq!(rule_json(&c, "feed"), Value::Null);
    }

    const TWO_SHARDS: &str = "listen = \"127.0.0.1:5673\"\n\
        [[clusters]]\nname = \"a\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:1\"]\n\
        [[clusters]]\nname = \"b\"\nrole = \"shard\"\nnodes = [\"127.0.0.1:2\"]\n\
        [[clusters]]\nname = \"c\"\nrole = \"control\"\nnodes = [\"127.0.0.1:3\"]\n";

    #[test]
    fn entries_merge_the_clusters_answers() {
        let config = config(TWO_SHARDS);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        let found = |m, c, u, source| Answer {
            depth: Depth::Found {
                messages: m,
                consumers: c,
                unacked: u,
            },
            source,
            at: t0,
        };
        let missing = |source| Answer {
            depth: Depth::Missing,
            source,
            at: t0 + Duration::from_millis(500),
        };
        let queues: Vec<(String, String)> = ["q1", "q2", "q3", "q4"]
            .iter()
            .map(|n| ("/".to_owned(), (*n).to_owned()))
            .collect();
        let answers: BTreeMap<String, Vec<Answer>> = [
            (
                "a".to_owned(),
                vec![
                    found(610, 4, Some(5), Source::Management),
                    found(7, 1, Some(1), Source::Management),
                    missing(Source::Management),
                    found(1, 0, Some(0), Source::Management),
                ],
            ),
            (
                "b".to_owned(),
                vec![
                    found(590, 3, Some(3), Source::Management),
                    found(2, 1, None, Source::Amqp),
                    missing(Source::Amqp),
                    Answer::error("management API: HTTP 401", Source::Management),
                ],
            ),
        ]
        .into_iter()
        .collect();
        let now = t0 + Duration::from_secs(2);
        let e = entries(&config, &queues, &answers, now);
        let (gone, q1) = &e[0];
        assert!(!gone);
        assert_eq!(q1["messages"], 1200);
        assert_eq!(q1["consumers"], 4);
        assert_eq!(q1["unacked"], 8);
        assert_eq!(q1["complete"], true);
        assert_eq!(q1["as_of"], "2024-05-01T12:00:00.000Z");
        assert_eq!(q1["age_ms"], 2000);
        assert_eq!(
            q1["clusters"][1],
            json!({"cluster": "b", "status": "ok", "source": "management", "messages": 590,
                "consumers": 3, "unacked": 3, "as_of": "2024-05-01T12:00:00.000Z"})
        );
        // A passive declare does not tell the unacknowledged messages: the sum is unknown.
        let (_, q2) = &e[1];
        assert_eq!(
            (q2["messages"].as_u64(), q2["unacked"].as_u64()),
            (Some(9), None)
        );
        assert_eq!(q2["clusters"][1]["source"], "amqp");
        // Missing everywhere.
        let (gone, q3) = &e[2];
        assert!(gone);
        assert_eq!(q3["messages"], 0);
        assert_eq!(q3["as_of"], "2024-05-01T12:00:00.500Z");
        // One cluster could not be asked: incomplete, never "gone".
        let (gone, q4) = &e[3];
        assert!(!gone);
        assert_eq!(q4["complete"], false);
        assert_eq!(q4["clusters"][1]["status"], "error");
        assert_eq!(q4["clusters"][1]["error"], "management API: HTTP 401");
        // The control cluster is never asked.
        assert_eq!(q1["clusters"].as_array().unwrap().len(), 2);
    }

    /// A one-shot HTTP server: answers the first request on `listener` with `response` and
    /// returns the request head it read.
    async fn serve_once(listener: TcpListener, response: Vec<u8>) -> String {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await;
        s.write_all(&response).await.unwrap();
        s.shutdown().await.ok();
        head
    }

    async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    fn http_response(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn management(url: &str, extra: &str) -> ManagementConfig {
        let text = format!(
            "listen = \"127.0.0.1:5673\"\n[[clusters]]\nname = \"a\"\nrole = \"shard\"\n\
             nodes = [\"127.0.0.1:1\"]\nmanagement = {{ url = \"{url}\", user = \"mon\", \
             password = \"s3cret\"{extra} }}\n"
        );
        config(&text).clusters[0].management.clone().unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn lists_a_vhost_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = r#"[{"name":"celery","messages":3,"messages_ready":3,"messages_unacknowledged":0,"consumers":1}]"#;
        let server = tokio::spawn(serve_once(listener, http_response("200 OK", body)));
        let m = management(&format!("http://127.0.0.1:{port}/prefix/"), "");
        let list = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap();
        assert_eq!(list["celery"].messages_ready, Some(3));
        let head = server.await.unwrap();
        assert!(
            head.starts_with(
                "GET /prefix/api/queues/%2F?columns=name,messages,messages_ready,\
                 messages_unacknowledged,consumers HTTP/1.1\r\n"
            ),
            "{head}"
        );
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        assert_eq!(header("host"), Some(format!("127.0.0.1:{port}")), "{head}");
        // mon:s3cret
        assert_eq!(
            header("authorization").as_deref(),
            Some("Basic bW9uOnMzY3JldA=="),
            "{head}"
        );
        assert_eq!(
            header("accept").as_deref(),
            Some("application/json"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn management_errors_are_reported() {
        // 401, with RabbitMQ's JSON reason.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_once(
            listener,
            http_response(
                "401 Unauthorized",
                r#"{"error":"not_authorized","reason":"Login failed"}"#,
            ),
        ));
        let m = management(&format!("http://127.0.0.1:{port}"), "");
        let e = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            format!(
                "http://127.0.0.1:{port}: HTTP 401 Unauthorized: not_authorized: Login failed \
                 (check management.user and management.password)"
            )
        );

        // Nothing listens.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let m = management(&format!("http://127.0.0.1:{port}"), "");
        let e = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");

        // A server that never answers: the deadline.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let m = management(&format!("http://127.0.0.1:{port}"), "");
        let started = Instant::now();
        let e = list_queues(
            &m,
            "/",
            Duration::from_secs(5),
            Instant::now() + Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(e.ends_with("no answer in time"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        silent.abort();

        // Not JSON, and too large.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_once(
            listener,
            http_response("200 OK", "<html></html>"),
        ));
        let m = management(&format!("http://127.0.0.1:{port}"), "");
        let e = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap_err();
        assert!(e.contains("not a JSON list of queues"), "{e}");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let big = format!("[{}]", "{\"name\":\"q\"},".repeat(200));
        tokio::spawn(serve_once(listener, http_response("200 OK", &big)));
        let m = management(&format!("http://127.0.0.1:{port}"), "");
        let e = get(&m, "/api/queues/%2F", Duration::from_secs(5), 1000)
            .await
            .unwrap_err();
        assert!(e.contains("answer larger than 1000 bytes"), "{e}");
    }

    /// A self-signed certificate for localhost and 127.0.0.1, its key, as DER.
    fn certificate() -> (String, rustls::pki_types::CertificateDer<'static>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), cert.der().clone(), key.serialize_der())
    }

    /// An https server answering one request with `body`.
    async fn serve_tls_once(
        listener: TcpListener,
        cert: rustls::pki_types::CertificateDer<'static>,
        key: Vec<u8>,
        body: &'static str,
    ) {
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (s, _) = listener.accept().await.unwrap();
        let Ok(mut tls) = acceptor.accept(s).await else {
            return;
        };
        read_head(&mut tls).await;
        tls.write_all(&http_response("200 OK", body)).await.unwrap();
        tls.shutdown().await.ok();
    }

    #[tokio::test]
    async fn lists_a_vhost_over_https() {
        let (pem, der, key) = certificate();
        let dir = std::env::temp_dir().join(format!("warren-mgmt-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pem).unwrap();
        let body = r#"[{"name":"t","messages":1,"messages_ready":1,"messages_unacknowledged":0,"consumers":0}]"#;

        // Verified against ca_file, by the URL's host name.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_tls_once(listener, der.clone(), key.clone(), body));
        let m = management(
            &format!("https://localhost:{port}"),
            &format!(", ca_file = \"{}\"", ca.display()),
        );
        let list = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap();
        assert_eq!(list["t"].messages_ready, Some(1));

        // The certificate does not carry 127.0.0.1: refused.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_tls_once(listener, der.clone(), key.clone(), body));
        let m = management(
            &format!("https://127.0.0.1:{port}"),
            &format!(", ca_file = \"{}\"", ca.display()),
        );
        let e = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap_err();
        assert!(e.contains("TLS handshake failed"), "{e}");

        // insecure_skip_verify: any certificate.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve_tls_once(listener, der, key, body));
        let m = management(
            &format!("https://127.0.0.1:{port}"),
            ", insecure_skip_verify = true",
        );
        let list = list_queues(&m, "/", Duration::from_secs(5), soon())
            .await
            .unwrap();
        assert_eq!(list["t"].messages_ready, Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pattern query with both clusters listed by fake management APIs (nothing listens on
    /// their AMQP ports, so nothing falls back to passive declares).
    #[tokio::test]
    async fn a_pattern_merges_the_lists() {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (pa, pb) = (
            la.local_addr().unwrap().port(),
            lb.local_addr().unwrap().port(),
        );
        let list_a = r#"[
            {"name":"celery","messages":12,"messages_ready":10,"messages_unacknowledged":2,"consumers":2},
            {"name":"celery.only-a","messages":1,"messages_ready":1,"messages_unacknowledged":0,"consumers":0},
            {"name":"worker1.celery.pidbox","messages":0,"messages_ready":0,"messages_unacknowledged":0,"consumers":1},
            {"name":"other","messages":5,"messages_ready":5,"messages_unacknowledged":0,"consumers":0}
        ]"#;
        let list_b = r#"[
            {"name":"celery","messages":7,"messages_ready":7,"messages_unacknowledged":0,"consumers":2}
        ]"#;
        tokio::spawn(serve_once(la, http_response("200 OK", list_a)));
        tokio::spawn(serve_once(lb, http_response("200 OK", list_b)));
        let text = TWO_SHARDS
            .replace(
                "nodes = [\"127.0.0.1:1\"]\n",
                &format!(
                    "nodes = [\"127.0.0.1:1\"]\nmanagement = {{ url = \"http://127.0.0.1:{pa}\", \
                     user = \"u\", password = \"p\" }}\n"
                ),
            )
            .replace(
                "nodes = [\"127.0.0.1:2\"]\n",
                &format!(
                    "nodes = [\"127.0.0.1:2\"]\nmanagement = {{ url = \"http://127.0.0.1:{pb}\", \
                     user = \"u\", password = \"p\" }}\n"
                ),
            );
        let config = config(&text);
        // A queue this process saw declared, which no cluster has any more: left out.
        let known = vec![("/".to_owned(), "celery.gone".to_owned())];
        let v = listing(&config, known, Some("celery*")).await;
        assert_eq!(v["listing_complete"], true, "{v:#}");
        assert_eq!(v["filter"], "celery*");
        let names: Vec<&str> = v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        // Control queues (the pidbox) and names that do not match are left out.
        assert_eq!(names, ["celery", "celery.only-a"], "{v:#}");
        let celery = &v["queues"][0];
        assert_eq!(celery["messages"], 17);
        assert_eq!(celery["unacked"], 2);
        assert_eq!(celery["consumers"], 2);
        assert_eq!(celery["clusters"][0]["messages"], 10);
        assert_eq!(celery["clusters"][1]["messages"], 7);
        let only_a = &v["queues"][1];
        assert_eq!(only_a["clusters"][1]["status"], "missing");
        assert_eq!(only_a["complete"], true);
        assert_eq!(v["total_messages"], 18);
        let m = v["management"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0]["cluster"].as_str(), m[0]["status"].as_str()),
            (Some("a"), Some("ok"))
        );
        assert_eq!(m[0]["queues"], 4);
    }
}
