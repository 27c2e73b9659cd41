//! A small AMQP client for the evacuator, on the proxy's own [`Link`]: open a channel, call a
//! synchronous method, consume, publish, acknowledge.
//!
//! Why not reuse a session: sessions carry a client's state between a client and the
//! clusters; the evacuator is its own client with its own credentials (the cluster's `probe`
//! ones, as the queue-depth checks use) and must never steer a client session. Commands that
//! arrive while a call waits for its reply (deliveries, confirms) are kept, in order, for the
//! next [`Conn::recv`]; they are bounded by the prefetch and the publishes in flight.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::{self, Method, ShortStr};
use crate::config::ClusterConfig;
use crate::io::{Command, Content};
use crate::upstream::link::{self, Link};
use crate::upstream::own::{OwnLink, own_link_spec};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The broker closed the channel (404 no such queue, 405 exclusive...): the connection
    /// goes on; the channel must be opened again.
    Channel { code: u16, text: String },
    /// The connection is unusable (closed, lost, no answer in time).
    Connection(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Channel { code, text } => write!(f, "channel closed: {code} {text}"),
            Failure::Connection(e) => f.write_str(e),
        }
    }
}

/// How long one synchronous call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to one cluster and vhost.
pub struct Conn {
    link: Link,
    pub cluster: String,
    kept: VecDeque<Command>,
    next_channel: u16,
}

impl Conn {
    /// Connects to the first node of `cluster` that answers, with its `probe` credentials
    /// (guest/guest without them).
    pub async fn open(
        cluster: &ClusterConfig,
        vhost: &str,
        connect_timeout: Duration,
        purpose: &str,
    ) -> Result<Conn, String> {
        let spec = own_link_spec(
            cluster,
            vhost,
            OwnLink {
                product: "warren evacuator",
                connection_name: format!("warren evacuator: {purpose}"),
                capabilities: &["publisher_confirms", "basic.nack", "consumer_cancel_notify"],
                heartbeat_secs: 30,
                buffer_limit: 8 * 1024 * 1024,
                connect_timeout,
            },
        )?;
        let link = match tokio::time::timeout(connect_timeout * 2, link::connect(&spec)).await {
            Ok(Ok(link)) => link,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("{}: no answer in time", cluster.name)),
        };
        Ok(Conn {
            link,
            cluster: cluster.name.clone(),
            kept: VecDeque::new(),
            next_channel: 1,
        })
    }

    /// Opens a new channel (numbers go round below the negotiated `channel_max`, so a channel
    /// closed by the broker is never reused while frames for it may still arrive).
    pub async fn open_channel(&mut self) -> Result<u16, Failure> {
        let max = self.link.channel_max.max(2);
        let ch = self.next_channel;
        self.next_channel = if ch >= max { 1 } else { ch + 1 };
        self.call(ch, &Method::ChannelOpen(Default::default()), |m| {
            matches!(m, Method::ChannelOpenOk(_))
        })
        .await?;
        Ok(ch)
    }

    /// Sends without waiting.
    pub fn send(&self, ch: u16, method: &Method) {
        self.link.send(ch, method);
    }

    /// Publishes `content` to the default exchange with routing key `queue`, mandatory.
    pub fn publish(&self, ch: u16, queue: &ShortStr, content: &Content) {
        let method = Method::BasicPublish(codec::BasicPublish {
            ticket: 0,
            exchange: ShortStr::default(),
            routing_key: queue.clone(),
            mandatory: true,
            immediate: false,
        });
        let frame_max = self.link.frame_max;
        self.link.outbox.push(|buf| {
            codec::write_method(buf, ch, &method);
            content.write(buf, ch, frame_max);
        });
    }

    /// Sends what was queued.
    pub fn flush(&self) {
        self.link.outbox.flush();
    }

    /// Waits until the write buffer has room (a large batch to a slow target).
    pub async fn room(&self) {
        self.link.outbox.flush();
        self.link.outbox.room().await;
    }

    /// Sends `method` on `ch` and waits for the reply `is_reply` accepts; other commands are
    /// kept for [`Conn::recv`]. A channel.close of `ch` is answered and returned as
    /// [`Failure::Channel`].
    pub async fn call(
        &mut self,
        ch: u16,
        method: &Method,
        is_reply: impl Fn(&Method) -> bool,
    ) -> Result<Method, Failure> {
        self.send(ch, method);
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let cmd = self.read(deadline).await?.ok_or_else(|| {
                Failure::Connection(format!(
                    "{}: no answer to {} in time",
                    self.cluster,
                    method.name()
                ))
            })?;
            if cmd.channel == ch {
                if is_reply(&cmd.method) {
                    return Ok(cmd.method);
                }
                if let Method::ChannelClose(c) = &cmd.method {
                    self.send(ch, &Method::ChannelCloseOk(Default::default()));
                    return Err(Failure::Channel {
                        code: c.reply_code,
                        text: c.reply_text.as_str().into_owned(),
                    });
                }
            }
            if self.kept.len() > 100_000 {
                return Err(Failure::Connection("too many commands kept".into()));
            }
            self.kept.push_back(cmd);
        }
    }

    /// The next command (kept ones first), or `None` when none came by `deadline`.
    pub async fn recv(&mut self, deadline: Instant) -> Result<Option<Command>, Failure> {
        if let Some(cmd) = self.kept.pop_front() {
            return Ok(Some(cmd));
        }
        self.read(deadline).await
    }

    async fn read(&mut self, deadline: Instant) -> Result<Option<Command>, Failure> {
        self.link.outbox.flush();
        let Some(reader) = self.link.reader.as_mut() else {
            return Err(Failure::Connection(format!(
                "{}: connection lost",
                self.cluster
            )));
        };
        let cmd = match tokio::time::timeout_at(deadline, reader.recv()).await {
            Ok(Ok(cmd)) => cmd,
            Ok(Err(reason)) => {
                self.link.reader = None;
                return Err(Failure::Connection(format!(
                    "{}: connection lost: {reason}",
                    self.cluster
                )));
            }
            Err(_) => return Ok(None),
        };
        if let Method::ConnectionClose(c) = &cmd.method {
            self.link
                .send(0, &Method::ConnectionCloseOk(Default::default()));
            self.link.outbox.flush();
            self.link.reader = None;
            return Err(Failure::Connection(format!(
                "{}: connection closed by the broker: {} {}",
                self.cluster,
                c.reply_code,
                c.reply_text.as_str()
            )));
        }
        Ok(Some(cmd))
    }

    /// Closes a channel, dropping whatever still arrives on it (the broker requeues what the
    /// channel had unacknowledged).
    pub async fn close_channel(&mut self, ch: u16) -> Result<(), Failure> {
        let r = self
            .call(ch, &Method::ChannelClose(Default::default()), |m| {
                matches!(m, Method::ChannelCloseOk(_))
            })
            .await;
        self.kept.retain(|c| c.channel != ch);
        match r {
            Ok(_) | Err(Failure::Channel { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the connection politely (bounded).
    pub async fn close(mut self) {
        self.send(
            0,
            &Method::ConnectionClose(codec::ConnectionClose {
                reply_code: 200,
                reply_text: ShortStr::from_static("evacuation done"),
                class_id: 0,
                method_id: 0,
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(cmd)) = self.read(deadline).await {
            if matches!(cmd.method, Method::ConnectionCloseOk(_)) {
                break;
            }
        }
        self.link.shutdown(Duration::from_secs(1)).await;
    }
}
