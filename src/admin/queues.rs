//! Depths of the sharded queues, read with passive `queue.declare` on every shard cluster.
//!
//! Why not the management API: the management plugin is not required on the clusters (it costs
//! memory on every node and opens another port), and a passive declare answers the two numbers
//! needed (ready messages and consumers) over the AMQP port the proxy already reaches.
//!
//! One link per (cluster, vhost) is opened with the cluster's `probe` credentials (default
//! guest/guest) through [`crate::upstream::link::connect`]. The queues of that vhost are declared
//! one after the other on one channel; a queue the cluster does not have closes the channel with
//! 404, which is answered with `channel.close-ok` before the channel is opened again for the next
//! queue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::codec::{self, FieldTable, FieldValue, LongStr, Method, ShortStr};
use crate::config::{ClusterConfig, Config};
use crate::io::Command;
use crate::upstream::link::{self, Link, LinkSpec};

/// Longest time one cluster gets to answer all its queues.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(10);
/// At most this many queues are looked up per request (the rest are reported as truncated).
pub const MAX_QUEUES: usize = 10_000;

/// What one cluster said about one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Depth {
    Found {
        messages: u32,
        consumers: u32,
    },
    /// 404: the cluster has no such queue (counts as empty).
    Missing,
    /// The cluster could not be asked, or refused (403, 405 exclusive queue, ...).
    Error(String),
}

/// The depths of `queues` (vhost, name) on every shard cluster of `config`, by cluster name and
/// then by queue, in the order of `queues`.
pub async fn depths(config: &Config, queues: &[(String, String)]) -> BTreeMap<String, Vec<Depth>> {
    let mut by_vhost: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (vhost, _)) in queues.iter().enumerate() {
        by_vhost.entry(vhost.as_str()).or_default().push(i);
    }
    let mut out: BTreeMap<String, Vec<Depth>> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let connect_timeout = config.timeouts.connect();
    for cluster in config.shard_clusters() {
        out.insert(
            cluster.name.clone(),
            vec![Depth::Error("not asked".into()); queues.len()],
        );
        for (vhost, idx) in &by_vhost {
            let cluster = cluster.clone();
            let vhost = (*vhost).to_owned();
            let names: Vec<String> = idx.iter().map(|&i| queues[i].1.clone()).collect();
            let idx = idx.clone();
            tasks.spawn(async move {
                let deadline = Instant::now() + connect_timeout + CLUSTER_DEADLINE;
                let result = ask_cluster(&cluster, &vhost, &names, connect_timeout, deadline).await;
                (cluster.name, idx, result)
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((cluster, idx, result)) = joined else {
            continue;
        };
        if let Some(slots) = out.get_mut(&cluster) {
            for (i, d) in idx.into_iter().zip(result) {
                slots[i] = d;
            }
        }
    }
    out
}

/// One `/queues` entry per queue of `queues` (vhost, name), in their order, asked on every shard
/// cluster of `config` now (whether or not a client declared them through this process):
///
/// ```json
/// {"vhost": "/", "name": "celery", "messages": 1200, "consumers": 4, "complete": true,
///  "clusters": [{"cluster": "shard-a", "status": "ok", "messages": 610, "consumers": 4}, ...]}
/// ```
///
/// `messages` is the sum over the clusters, `consumers` the largest per-cluster count (every
/// client consumer consumes from every shard cluster); a cluster without the queue is
/// `"status": "missing"` (0 messages), one that could not be asked `"status": "error"` with the
/// reason, and makes the entry `"complete": false`. `warren check-queues --queue NAME` builds
/// its answer with this, so every instance answers the same for a named queue.
pub async fn report(config: &Config, queues: &[(String, String)]) -> Vec<Value> {
    let depths = depths(config, queues).await;
    let shard_names: Vec<&str> = config.shard_clusters().map(|c| c.name.as_str()).collect();
    queues
        .iter()
        .enumerate()
        .map(|(i, (vhost, name))| {
            let mut messages: u64 = 0;
            let mut consumers: u32 = 0;
            let mut complete = true;
            let split: Vec<Value> = shard_names
                .iter()
                .map(|cluster| match depths.get(*cluster).and_then(|v| v.get(i)) {
                    Some(Depth::Found {
                        messages: m,
                        consumers: c,
                    }) => {
                        messages += u64::from(*m);
                        consumers = consumers.max(*c);
                        json!({"cluster": cluster, "status": "ok", "messages": m, "consumers": c})
                    }
                    Some(Depth::Missing) => {
                        json!({"cluster": cluster, "status": "missing", "messages": 0, "consumers": 0})
                    }
                    Some(Depth::Error(e)) => {
                        complete = false;
                        json!({"cluster": cluster, "status": "error", "error": e, "messages": null, "consumers": null})
                    }
                    None => {
                        complete = false;
                        json!({"cluster": cluster, "status": "error", "error": "not asked", "messages": null, "consumers": null})
                    }
                })
                .collect();
            json!({
                "vhost": vhost,
                "name": name,
                "messages": messages,
                "consumers": consumers,
                "complete": complete,
                "clusters": split,
            })
        })
        .collect()
}

/// Asks one cluster about `names` in `vhost`; always returns one [`Depth`] per name.
async fn ask_cluster(
    cluster: &ClusterConfig,
    vhost: &str,
    names: &[String],
    connect_timeout: Duration,
    deadline: Instant,
) -> Vec<Depth> {
    let (user, password) = match &cluster.probe {
        Some(p) => (p.user.clone(), p.password.clone()),
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let Ok(vhost_str) = ShortStr::try_from(vhost) else {
        return vec![Depth::Error("vhost name longer than 255 bytes".into()); names.len()];
    };
    let mut props = FieldTable::default();
    props.insert(
        ShortStr::from_static("product"),
        FieldValue::LongStr(LongStr::from_static("warren admin")),
    );
    props.insert(
        ShortStr::from_static("connection_name"),
        FieldValue::LongStr(LongStr::from_static("warren admin: queue depths")),
    );
    let mut caps = FieldTable::default();
    caps.insert(
        ShortStr::from_static("authentication_failure_close"),
        FieldValue::Bool(true),
    );
    props.insert(
        ShortStr::from_static("capabilities"),
        FieldValue::Table(caps),
    );
    let spec = LinkSpec {
        cluster: Arc::from(cluster.name.as_str()),
        nodes: cluster.nodes.clone(),
        user: Bytes::from(user),
        password: Bytes::from(password),
        vhost: vhost_str,
        client_properties: props,
        heartbeat_secs: 0,
        frame_max: 131_072,
        channel_max: 64,
        connect_timeout,
        buffer_limit: 1024 * 1024,
        metrics: None,
        tls: cluster.tls.clone(),
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
                messages: ok.message_count,
                consumers: ok.consumer_count,
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
