//! The server half of the AMQP connection handshake, toward the client.
//!
//! The proxy answers the handshake itself so it can negotiate each leg separately (frame_max,
//! heartbeat) and learn the credentials and vhost it needs to open the upstream links. Credentials
//! are not checked here: the broker checks them when the links open at connection.open.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec::{self, FieldTable, FieldValue, FrameKind, LongStr, Method, ReplyCode, ShortStr};
use crate::config::Config;
use crate::io::Stream;

/// What the client told us during the handshake.
#[derive(Debug, Clone)]
pub struct Greeting {
    /// The client logged in with AMQPLAIN (warren itself logs in to the clusters with PLAIN).
    pub amqplain: bool,
    pub user: Bytes,
    pub password: Bytes,
    pub client_properties: FieldTable,
    pub caps: ClientCaps,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// Optional server-to-client notifications the client said it understands.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCaps {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
}

/// How a handshake ended early.
#[derive(Debug)]
pub enum Refusal {
    /// Drop the socket (after writing `reply`, if any): wrong protocol header, silence, EOF.
    Drop {
        reason: String,
        reply: Option<&'static [u8]>,
        /// The client closed (or reset) the connection without sending a byte: a bare TCP
        /// connect, such as a load balancer's health check, rather than a refused client.
        silent: bool,
    },
    /// Send connection.close with this code and text, then wait for close-ok.
    Close {
        code: u16,
        text: String,
        class_id: u16,
        method_id: u16,
    },
}

/// The capabilities RabbitMQ 3.x advertises. Direct reply-to spans the clusters through
/// `session::reply_to`.
const CAPABILITIES: [&str; 9] = [
    "direct_reply_to",
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
];

/// The server properties shown to clients: the clusters' own product, version and platform (kombu
/// chooses Celery's qos flag from them) with the capabilities the proxy implements.
pub fn server_properties(upstream: Option<&FieldTable>) -> FieldTable {
    let mut props = FieldTable::default();
    match upstream {
        Some(up) => {
            for (k, v) in &up.0 {
                if k.as_bytes() != b"capabilities" {
                    props.insert(k.clone(), v.clone());
                }
            }
        }
        None => {
            props.insert(
                ShortStr::from_static("product"),
                FieldValue::LongStr(LongStr::from_static("warren")),
            );
            props.insert(
                ShortStr::from_static("version"),
                FieldValue::LongStr(LongStr::from_static(env!("CARGO_PKG_VERSION"))),
            );
        }
    }
    let mut caps = FieldTable::default();
    for cap in CAPABILITIES {
        caps.insert(ShortStr::from_static(cap), FieldValue::Bool(true));
    }
    props.insert(
        ShortStr::from_static("capabilities"),
        FieldValue::Table(caps),
    );
    props.insert(
        ShortStr::from_static("information"),
        FieldValue::LongStr(LongStr::from_static("warren AMQP proxy")),
    );
    props
}

struct Conn<'a> {
    stream: &'a mut Stream,
    buf: &'a mut BytesMut,
    deadline: tokio::time::Instant,
}

impl Conn<'_> {
    async fn send(&mut self, method: &Method) -> Result<(), Refusal> {
        let mut out = BytesMut::with_capacity(512);
        codec::write_method(&mut out, 0, method);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| drop_with(format!("write failed: {e}")))
    }

    /// Next method on channel 0; heartbeats are skipped, anything else is a protocol error.
    async fn recv(&mut self, frame_max: usize) -> Result<Method, Refusal> {
        loop {
            match codec::decode_client_frame(self.buf, frame_max) {
                Ok(Some(frame)) => {
                    if frame.kind == FrameKind::Heartbeat {
                        continue;
                    }
                    if frame.channel != 0 {
                        // RabbitMQ's code for it.
                        return Err(close(
                            ReplyCode::UnexpectedFrame,
                            format!("frame on channel {} during handshake", frame.channel),
                        ));
                    }
                    if frame.kind != FrameKind::Method {
                        return Err(close(
                            ReplyCode::UnexpectedFrame,
                            "content frame during handshake",
                        ));
                    }
                    return Method::decode(frame.payload).map_err(|e| close(e.reply_code(), e));
                }
                Ok(None) => {}
                Err(e) => return Err(close(ReplyCode::FrameError, format!("{e}"))),
            }
            self.buf.reserve(4096);
            match tokio::time::timeout_at(self.deadline, self.stream.read_buf(self.buf)).await {
                Err(_) => return Err(drop_with("handshake timeout".into())),
                Ok(Ok(0)) => {
                    return Err(drop_with(
                        "client closed the connection during the handshake".into(),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(drop_with(format!("read failed: {e}"))),
            }
        }
    }
}

fn drop_with(reason: String) -> Refusal {
    Refusal::Drop {
        reason,
        reply: None,
        silent: false,
    }
}

/// A refusal with `code` and RabbitMQ's form of reply text (`"NAME - detail"`).
fn close(code: ReplyCode, detail: impl std::fmt::Display) -> Refusal {
    Refusal::Close {
        code: code.code(),
        text: code.text(detail),
        class_id: 0,
        method_id: 0,
    }
}

/// Runs the handshake up to and including connection.open; returns the greeting and the vhost.
/// The caller opens the upstream links and then answers open-ok (or closes with the broker's
/// refusal). The time a TLS handshake took before counts against the handshake timeout.
pub async fn greet(
    stream: &mut Stream,
    buf: &mut BytesMut,
    config: &Config,
    server_props: FieldTable,
) -> Result<(Greeting, ShortStr), Refusal> {
    let timeout = Duration::from_millis(config.timeouts.handshake_ms)
        .saturating_sub(stream.tls_handshake_time());
    let mut conn = Conn {
        stream,
        buf,
        deadline: tokio::time::Instant::now() + timeout,
    };

    while conn.buf.len() < 8 {
        match tokio::time::timeout_at(conn.deadline, conn.stream.read_buf(conn.buf)).await {
            Err(_) => {
                return Err(drop_with(
                    "no protocol header before the handshake timeout".into(),
                ));
            }
            Ok(Ok(0)) if conn.buf.is_empty() => {
                return Err(Refusal::Drop {
                    reason: "client closed the connection without sending a byte".into(),
                    reply: None,
                    silent: true,
                });
            }
            Ok(Ok(0)) => {
                return Err(drop_with(
                    "client closed the connection before the protocol header".into(),
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e))
                if conn.buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return Err(Refusal::Drop {
                    reason: format!("client reset the connection without sending a byte: {e}"),
                    reply: None,
                    silent: true,
                });
            }
            Ok(Err(e)) => return Err(drop_with(format!("read failed: {e}"))),
        }
    }
    // The 0-9 spec's form of the header ('AMQP' 1 1 0 9) names the protocol 0-9-1 revised:
    // RabbitMQ serves it as 0-9-1, and so does warren.
    if &conn.buf[..8] != codec::PROTOCOL_HEADER && &conn.buf[..8] != b"AMQP\x01\x01\x00\x09" {
        // What RabbitMQ does: answer with the header of the protocol it speaks, then close.
        return Err(Refusal::Drop {
            reason: format!(
                "bad protocol header {:?}",
                Bytes::copy_from_slice(&conn.buf[..8])
            ),
            reply: Some(codec::PROTOCOL_HEADER),
            silent: false,
        });
    }
    conn.buf.advance(8);

    conn.send(&Method::ConnectionStart(codec::ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: server_props,
        mechanisms: LongStr::from_static("PLAIN AMQPLAIN"),
        locales: LongStr::from_static("en_US"),
    }))
    .await?;

    // Before tune, frames are limited to the spec minimum.
    let min_frame = codec::FRAME_MIN_SIZE as usize;
    let start_ok = match conn.recv(min_frame).await? {
        Method::ConnectionStartOk(s) => s,
        Method::ConnectionClose(_) => {
            return Err(drop_with("client closed during the handshake".into()));
        }
        other => {
            return Err(close(
                ReplyCode::CommandInvalid,
                format!("expected connection.start-ok, got {}", other.name()),
            ));
        }
    };
    let (user, password) = match start_ok.mechanism.as_bytes() {
        b"PLAIN" => parse_plain(start_ok.response.as_bytes()),
        b"AMQPLAIN" => parse_amqplain(start_ok.response.as_bytes()),
        other => {
            return Err(close(
                ReplyCode::CommandInvalid,
                format!(
                    "unknown authentication mechanism '{}'",
                    String::from_utf8_lossy(other)
                ),
            ));
        }
    }
    .ok_or_else(|| {
        close(
            ReplyCode::AccessRefused,
            format!(
                "malformed {} response",
                String::from_utf8_lossy(start_ok.mechanism.as_bytes())
            ),
        )
    })?;
    let caps = client_caps(&start_ok.client_properties);

    let ours_channel_max = config.limits.max_channels;
    let ours_frame_max = config.limits.frame_max;
    conn.send(&Method::ConnectionTune(codec::ConnectionTune {
        channel_max: ours_channel_max,
        frame_max: ours_frame_max,
        heartbeat: config.timeouts.heartbeat_secs,
    }))
    .await?;
    let tune_ok = match conn.recv(min_frame).await? {
        Method::ConnectionTuneOk(t) => t,
        other => {
            return Err(close(
                ReplyCode::CommandInvalid,
                format!("expected connection.tune-ok, got {}", other.name()),
            ));
        }
    };
    // RabbitMQ's rules and words (rabbit_reader's validate_negotiated_integer_value): 0 means
    // "no limit", which is above ours; below the minimum or above ours is 530.
    let frame_max = negotiated(
        "frame_max",
        tune_ok.frame_max,
        codec::FRAME_MIN_SIZE,
        ours_frame_max,
    )?;
    let channel_max = negotiated(
        "channel_max",
        u32::from(tune_ok.channel_max),
        1,
        u32::from(ours_channel_max),
    )? as u16;

    let open = match conn.recv(frame_max as usize).await? {
        Method::ConnectionOpen(o) => o,
        other => {
            // RabbitMQ's answer once tuned (its "opening" state), naming the method.
            let (class_id, method_id) = other.ids();
            return Err(Refusal::Close {
                code: ReplyCode::ChannelError.code(),
                text: ReplyCode::ChannelError.text("unexpected method in connection state opening"),
                class_id,
                method_id,
            });
        }
    };
    Ok((
        Greeting {
            amqplain: start_ok.mechanism.as_bytes() == b"AMQPLAIN",
            user,
            password,
            client_properties: start_ok.client_properties,
            caps,
            channel_max,
            frame_max,
            heartbeat: tune_ok.heartbeat,
        },
        open.virtual_host,
    ))
}

/// PLAIN: `[authzid] NUL authcid NUL passwd` (RFC 4616). An authorization identity (acting as
/// another user) is refused, as RabbitMQ refuses it: it reads the response as
/// `NUL user NUL password` only.
fn parse_plain(response: &[u8]) -> Option<(Bytes, Bytes)> {
    let mut parts = response.split(|b| *b == 0);
    if !parts.next()?.is_empty() {
        return None;
    }
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((Bytes::copy_from_slice(user), Bytes::copy_from_slice(pass)))
}

/// AMQPLAIN: a field table without its length prefix, with `LOGIN` and `PASSWORD` strings (long
/// strings or byte arrays); as in RabbitMQ, the first entry of each name counts and other
/// entries, of any type, are ignored.
fn parse_amqplain(response: &[u8]) -> Option<(Bytes, Bytes)> {
    let table = FieldTable::decode_entries(Bytes::copy_from_slice(response)).ok()?;
    let text = |key: &str| match table.get(key)? {
        FieldValue::LongStr(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        FieldValue::ByteArray(b) => Some(b.clone()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}

fn client_caps(props: &FieldTable) -> ClientCaps {
    let Some(FieldValue::Table(caps)) = props.get("capabilities") else {
        return ClientCaps::default();
    };
    let on = |k: &str| matches!(caps.get(k), Some(FieldValue::Bool(true)));
    ClientCaps {
        consumer_cancel_notify: on("consumer_cancel_notify"),
        connection_blocked: on("connection.blocked"),
    }
}

/// Writes connection.close during or right after the handshake and waits (bounded) for close-ok.
pub async fn refuse(
    stream: &mut Stream,
    buf: &mut BytesMut,
    code: u16,
    text: &str,
    class_id: u16,
    method_id: u16,
) {
    let mut out = BytesMut::new();
    let reply_text = ShortStr::try_from(truncate(text)).unwrap_or_default();
    codec::write_method(
        &mut out,
        0,
        &Method::ConnectionClose(codec::ConnectionClose {
            reply_code: code,
            reply_text,
            class_id,
            method_id,
        }),
    );
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut conn = Conn {
        stream,
        buf,
        deadline,
    };
    loop {
        match conn.recv(0).await {
            Ok(Method::ConnectionCloseOk(_)) | Err(Refusal::Drop { .. }) => return,
            Ok(_) => {}
            Err(Refusal::Close { .. }) => break,
        }
    }
    // A frame the refusal cannot read past (a bad frame, a frame on a channel): the close-ok
    // cannot be told apart any more. Read and drop until the client hangs up or the deadline,
    // as the session does, so that the client reads the refusal, not a reset.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    crate::io::read_buf::drain(conn.stream, left).await;
}

/// Reply texts are short strings: keep them under 255 bytes on a char boundary.
pub fn truncate(text: &str) -> String {
    if text.len() <= 255 {
        return text.to_owned();
    }
    let mut end = 255;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Checks a client's tune-ok value as RabbitMQ does: below `min` (when not 0), or 0 ("no
/// limit") or above `ours` when we have a limit, refuses the connection with 530.
fn negotiated(field: &str, client: u32, min: u32, ours: u32) -> Result<u32, Refusal> {
    let detail = if client == 0 { " (no limit)" } else { "" };
    if client != 0 && client < min {
        return Err(close(
            ReplyCode::NotAllowed,
            format!(
                "negotiated {field} = {client}{detail} is lower than the minimum allowed value ({min})"
            ),
        ));
    }
    if ours != 0 && (client == 0 || client > ours) {
        return Err(close(
            ReplyCode::NotAllowed,
            format!(
                "negotiated {field} = {client}{detail} is higher than the maximum allowed value ({ours})"
            ),
        ));
    }
    Ok(if client == 0 { ours } else { client })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain() {
        assert_eq!(
            parse_plain(b"\0guest\0secret"),
            Some((Bytes::from("guest"), Bytes::from("secret")))
        );
        assert_eq!(parse_plain(b"guest"), None);
        let mut t = Vec::new();
        for (k, v) in [("LOGIN", "u"), ("PASSWORD", "p")] {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(b'S');
            t.extend_from_slice(&(v.len() as u32).to_be_bytes());
            t.extend_from_slice(v.as_bytes());
        }
        assert_eq!(
            parse_amqplain(&t),
            Some((Bytes::from("u"), Bytes::from("p")))
        );
        assert_eq!(parse_amqplain(&t[..t.len() - 1]), None);
    }

    /// RabbitMQ's readings of the odd responses: a PLAIN authorization identity is refused;
    /// in AMQPLAIN the first LOGIN and PASSWORD count, as strings or byte arrays, and entries
    /// of other names and types are ignored.
    #[test]
    fn login_responses_are_read_as_rabbitmq_reads_them() {
        assert_eq!(parse_plain(b"guest\0guest\0guest"), None);
        assert_eq!(parse_plain(b"bob\0guest\0guest"), None);
        let entry = |t: &mut Vec<u8>, k: &str, tag: u8, v: &[u8]| {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(tag);
            if tag == b'I' {
                t.extend_from_slice(&7u32.to_be_bytes());
            } else {
                t.extend_from_slice(&(v.len() as u32).to_be_bytes());
                t.extend_from_slice(v);
            }
        };
        let mut t = Vec::new();
        entry(&mut t, "LOGIN", b'S', b"first");
        entry(&mut t, "LOGIN", b'S', b"second");
        entry(&mut t, "EXTRA", b'I', b"");
        entry(&mut t, "PASSWORD", b'x', b"p1");
        entry(&mut t, "PASSWORD", b'S', b"p2");
        assert_eq!(
            parse_amqplain(&t),
            Some((Bytes::from("first"), Bytes::from("p1")))
        );
    }
}
