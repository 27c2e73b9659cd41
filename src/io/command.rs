//! Commands: a method frame together with its content (header and body frames).
//!
//! AMQP sends a publish or a delivery as a method frame, one content header frame and zero or more
//! body frames, and nothing else may interleave on that channel. The proxy forwards a content only
//! once it is whole: a client that dies half-way through a publish then leaves nothing partial on any
//! cluster, and a content can be re-split to the other leg's frame_max. Body frames are kept as
//! `Bytes` slices of the read buffer, never copied.

use bytes::{Bytes, BytesMut};

use crate::codec::{self, CodecError, FrameKind, Method, RawFrame, ReplyCode};

/// A method with its content, if the method carries one.
#[derive(Debug, Clone)]
pub struct Command {
    pub channel: u16,
    pub method: Method,
    pub content: Option<Content>,
}

/// The header and body of a publish, delivery, get-ok or return.
#[derive(Debug, Clone)]
pub struct Content {
    /// The content header payload exactly as received (properties are not decoded on the hot path).
    pub header: Bytes,
    pub body_size: u64,
    pub body: Body,
}

/// Body frames as received; almost every message has exactly one, so that case does not allocate.
#[derive(Debug, Clone, Default)]
pub enum Body {
    #[default]
    Empty,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Body {
    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::take(self) {
            Body::Empty => Body::One(chunk),
            Body::One(first) => Body::Many(vec![first, chunk]),
            Body::Many(mut v) => {
                v.push(chunk);
                Body::Many(v)
            }
        }
    }

    pub fn chunks(&self) -> &[Bytes] {
        match self {
            Body::Empty => &[],
            Body::One(b) => std::slice::from_ref(b),
            Body::Many(v) => v,
        }
    }
}

impl Content {
    /// Appends the header and body frames, each body frame at most `frame_max` bytes.
    pub fn write(&self, out: &mut BytesMut, channel: u16, frame_max: usize) {
        codec::write_header_raw(out, channel, &self.header);
        for chunk in self.body.chunks() {
            codec::write_body(out, channel, chunk, frame_max);
        }
    }

    /// Total bytes this content occupies in memory (header and body).
    pub fn len(&self) -> usize {
        self.header.len() + self.body_size as usize
    }

    pub fn is_empty(&self) -> bool {
        self.body_size == 0
    }

    /// Joins the body into one buffer (used off the hot path only).
    pub fn body_bytes(&self) -> Bytes {
        match &self.body {
            Body::Empty => Bytes::new(),
            Body::One(b) => b.clone(),
            Body::Many(v) => {
                let mut out = BytesMut::with_capacity(self.body_size as usize);
                for b in v {
                    out.extend_from_slice(b);
                }
                out.freeze()
            }
        }
    }
}

/// Why a frame could not be assembled into a command.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A protocol error that ends the connection (501, 502, 503, 505). `method` names the
    /// class and method of a method frame that could not be decoded, as RabbitMQ's
    /// connection.close names them; `(0, 0)` otherwise.
    #[error("{text}")]
    Connection {
        code: ReplyCode,
        text: String,
        method: (u16, u16),
    },
    /// The content is larger than the configured maximum, alone or together with the contents
    /// in progress on the connection's other channels (`others` bytes): the channel is closed
    /// with 406 and the rest of this content is discarded.
    #[error("message size {size} (+{others} in progress) is larger than configured max size {max}")]
    TooLarge {
        channel: u16,
        method: Box<Method>,
        size: u64,
        others: u64,
        max: u64,
    },
}

impl AssembleError {
    /// The same error, naming the class and method of the method frame it is about.
    fn naming(mut self, ids: (u16, u16)) -> Self {
        if let AssembleError::Connection { method, .. } = &mut self {
            *method = ids;
        }
        self
    }

    fn unexpected(text: String) -> Self {
        AssembleError::Connection {
            code: ReplyCode::UnexpectedFrame,
            text: ReplyCode::UnexpectedFrame.text(text),
            method: (0, 0),
        }
    }
}

impl From<CodecError> for AssembleError {
    fn from(e: CodecError) -> Self {
        let code = e.reply_code();
        AssembleError::Connection {
            code,
            text: code.text(e),
            method: (0, 0),
        }
    }
}

#[derive(Debug)]
enum Stage {
    AwaitHeader,
    AwaitBody {
        header: Bytes,
        body_size: u64,
        received: u64,
        body: Body,
    },
    /// Swallowing the rest of a content that was refused.
    Discard {
        remaining: u64,
    },
}

#[derive(Debug)]
struct Partial {
    channel: u16,
    method: Method,
    stage: Stage,
}

/// Turns frames into commands for one connection.
///
/// A content is passed on only once it is complete (nothing partial may reach a cluster), so
/// its body is buffered here meanwhile. AMQP lets a client interleave contents of different
/// channels; each is at most `max_message` bytes, and so is their sum (`receiving`, counted
/// from the sizes the headers declare): otherwise a client with 2047 channels could make the
/// proxy buffer 2047 maximal messages at once.
#[derive(Debug)]
pub struct Assembler {
    /// At most one partial content per channel; a connection rarely has more than a few in
    /// progress at once, so a small vector beats a map.
    partial: Vec<Partial>,
    max_message: u64,
    /// Sum of the declared body sizes of the contents in [`Stage::AwaitBody`].
    receiving: u64,
    /// Body bytes of those contents received so far: what the partial contents take in memory
    /// (counted by the session in the process-wide budget, see [`crate::held::Receiving`]).
    buffered: u64,
}

impl Assembler {
    pub fn new(max_message: u64) -> Self {
        Assembler {
            partial: Vec::new(),
            max_message,
            receiving: 0,
            buffered: 0,
        }
    }

    /// Feeds one non-heartbeat frame; returns a command once it is complete.
    pub fn push(&mut self, frame: RawFrame) -> Result<Option<Command>, AssembleError> {
        let mut idx = self.partial.iter().position(|p| p.channel == frame.channel);
        match frame.kind {
            FrameKind::Method => {
                if let Some(i) = idx
                    && matches!(self.partial[i].stage, Stage::Discard { .. })
                {
                    // The refused content's channel was closed for it, and the client may
                    // answer (close-ok) without sending the rest: the content is abandoned.
                    self.partial.swap_remove(i);
                    idx = None;
                }
                if idx.is_some() {
                    return Err(AssembleError::unexpected(format!(
                        "expected content frame on channel {}, got method frame",
                        frame.channel
                    )));
                }
                // The class and method ids lead the payload: a method whose arguments cannot
                // be decoded is named in the connection.close, as RabbitMQ names it.
                let ids = match frame.payload.get(..4) {
                    Some(&[c0, c1, m0, m1]) => {
                        (u16::from_be_bytes([c0, c1]), u16::from_be_bytes([m0, m1]))
                    }
                    _ => (0, 0),
                };
                let method = Method::decode(frame.payload)
                    .map_err(|e| AssembleError::from(e).naming(ids))?;
                if method.has_content() {
                    if frame.channel == 0 {
                        // RabbitMQ's answer to a content method on channel 0.
                        return Err(AssembleError::Connection {
                            code: ReplyCode::ChannelError,
                            text: ReplyCode::ChannelError
                                .text(format_args!("{} on channel 0", method.name())),
                            method: (0, 0),
                        });
                    }
                    self.partial.push(Partial {
                        channel: frame.channel,
                        method,
                        stage: Stage::AwaitHeader,
                    });
                    Ok(None)
                } else {
                    Ok(Some(Command {
                        channel: frame.channel,
                        method,
                        content: None,
                    }))
                }
            }
            FrameKind::Header => {
                let Some(i) = idx else {
                    return Err(AssembleError::unexpected(format!(
                        "content header on channel {} without a method",
                        frame.channel
                    )));
                };
                if !matches!(self.partial[i].stage, Stage::AwaitHeader) {
                    return Err(AssembleError::unexpected(format!(
                        "second content header on channel {}",
                        frame.channel
                    )));
                }
                let (class_id, body_size) = codec::peek_content_header(&frame.payload)?;
                if class_id != 60 {
                    return Err(AssembleError::unexpected(format!(
                        "content header for class {class_id} on channel {}",
                        frame.channel
                    )));
                }
                let others = self.receiving;
                if body_size.saturating_add(others) > self.max_message {
                    let p = &mut self.partial[i];
                    let method = p.method.clone();
                    if body_size == 0 {
                        self.partial.swap_remove(i);
                    } else {
                        p.stage = Stage::Discard {
                            remaining: body_size,
                        };
                    }
                    return Err(AssembleError::TooLarge {
                        channel: frame.channel,
                        method: Box::new(method),
                        size: body_size,
                        others,
                        max: self.max_message,
                    });
                }
                if body_size == 0 {
                    let p = self.partial.swap_remove(i);
                    return Ok(Some(Command {
                        channel: p.channel,
                        method: p.method,
                        content: Some(Content {
                            header: frame.payload,
                            body_size,
                            body: Body::Empty,
                        }),
                    }));
                }
                self.receiving += body_size;
                self.partial[i].stage = Stage::AwaitBody {
                    header: frame.payload,
                    body_size,
                    received: 0,
                    body: Body::Empty,
                };
                Ok(None)
            }
            FrameKind::Body => {
                let Some(i) = idx else {
                    return Err(AssembleError::unexpected(format!(
                        "content body on channel {} without a method",
                        frame.channel
                    )));
                };
                let len = frame.payload.len() as u64;
                let done = match &mut self.partial[i].stage {
                    Stage::AwaitHeader => {
                        return Err(AssembleError::unexpected(format!(
                            "content body on channel {} before its header",
                            frame.channel
                        )));
                    }
                    Stage::Discard { remaining } => {
                        *remaining = remaining.saturating_sub(len);
                        if *remaining == 0 {
                            self.partial.swap_remove(i);
                        }
                        return Ok(None);
                    }
                    Stage::AwaitBody {
                        body_size,
                        received,
                        body,
                        ..
                    } => {
                        if *received + len > *body_size {
                            return Err(AssembleError::unexpected(format!(
                                "content body on channel {} overruns its declared size {}",
                                frame.channel, body_size
                            )));
                        }
                        *received += len;
                        self.buffered += len;
                        if len > 0 {
                            body.push(frame.payload);
                        }
                        *received == *body_size
                    }
                };
                if !done {
                    return Ok(None);
                }
                let p = self.partial.swap_remove(i);
                let Stage::AwaitBody {
                    header,
                    body_size,
                    body,
                    ..
                } = p.stage
                else {
                    unreachable!("stage checked above")
                };
                self.receiving -= body_size;
                self.buffered -= body_size;
                Ok(Some(Command {
                    channel: p.channel,
                    method: p.method,
                    content: Some(Content {
                        header,
                        body_size,
                        body,
                    }),
                }))
            }
            FrameKind::Heartbeat => Ok(None),
        }
    }

    /// True if no content is being received on any channel.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty()
    }

    /// The largest content body accepted.
    pub fn max_message(&self) -> u64 {
        self.max_message
    }

    /// True if a content is being received on `channel` (a channel.close must wait for it).
    pub fn in_content(&self, channel: u16) -> bool {
        self.partial.iter().any(|p| p.channel == channel)
    }

    /// Forgets a partial content, e.g. when its channel is closed.
    pub fn abandon(&mut self, channel: u16) {
        let (receiving, buffered) = (&mut self.receiving, &mut self.buffered);
        self.partial.retain(|p| {
            if p.channel != channel {
                return true;
            }
            if let Stage::AwaitBody {
                body_size,
                received,
                ..
            } = p.stage
            {
                *receiving -= body_size;
                *buffered -= received;
            }
            false
        });
    }

    /// Body bytes of partial contents held here now.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn frames(channel: u16, body_size: u64) -> (RawFrame, RawFrame) {
        let mut out = BytesMut::new();
        codec::write_method(
            &mut out,
            channel,
            &Method::BasicPublish(codec::BasicPublish::default()),
        );
        codec::write_header(
            &mut out,
            channel,
            &codec::ContentHeader {
                class_id: 60,
                body_size,
                properties: Default::default(),
            },
        );
        let method = codec::decode_frame(&mut out, 1 << 20).unwrap().unwrap();
        let header = codec::decode_frame(&mut out, 1 << 20).unwrap().unwrap();
        (method, header)
    }

    fn body(channel: u16, len: usize) -> RawFrame {
        RawFrame {
            kind: FrameKind::Body,
            channel,
            payload: vec![7u8; len].into(),
        }
    }

    /// A method whose arguments cannot be decoded is refused with 501 naming its class and
    /// method (a basic.qos cut short: 60.10), as RabbitMQ's connection.close names them.
    #[test]
    fn an_undecodable_method_is_named_in_the_refusal() {
        let mut a = Assembler::new(1000);
        let frame = |payload: &'static [u8]| RawFrame {
            kind: FrameKind::Method,
            channel: 1,
            payload: Bytes::from_static(payload),
        };
        match a.push(frame(&[0, 60, 0, 10, 0, 0, 0])) {
            Err(AssembleError::Connection {
                code: ReplyCode::FrameError,
                method: (60, 10),
                ..
            }) => {}
            other => panic!("expected 501 naming 60.10, got {other:?}"),
        }
        match a.push(frame(&[0, 60])) {
            Err(AssembleError::Connection {
                code: ReplyCode::FrameError,
                method: (0, 0),
                ..
            }) => {}
            other => panic!("expected 501 naming nothing, got {other:?}"),
        }
    }

    /// Contents interleaved on several channels may not add up to more than one maximal message:
    /// the one that would is refused, the others complete, and a completed one frees its share.
    #[test]
    fn interleaved_contents_share_one_max_message() {
        let mut a = Assembler::new(1000);
        for (ch, size) in [(1, 600), (2, 600)] {
            let (m, _) = frames(ch, size);
            assert!(a.push(m).unwrap().is_none());
        }
        assert!(a.push(frames(1, 600).1).unwrap().is_none());
        match a.push(frames(2, 600).1) {
            Err(AssembleError::TooLarge {
                channel: 2,
                size: 600,
                others: 600,
                max: 1000,
                ..
            }) => {}
            other => panic!("expected TooLarge on channel 2, got {other:?}"),
        }
        // Channel 2's body is swallowed; channel 1's completes.
        assert!(a.push(body(2, 600)).unwrap().is_none());
        let cmd = a.push(body(1, 600)).unwrap().expect("channel 1 complete");
        assert_eq!((cmd.channel, cmd.content.unwrap().body_size), (1, 600));
        // Now a 1000-byte message fits again; an abandoned one gives its share back too.
        let (m, h) = frames(3, 1000);
        assert!(a.push(m).unwrap().is_none());
        assert!(a.push(h).unwrap().is_none());
        a.abandon(3);
        let (m, h) = frames(4, 1000);
        assert!(a.push(m).unwrap().is_none());
        assert!(a.push(h).unwrap().is_none());
        assert!(a.push(body(4, 1000)).unwrap().is_some());
        assert_eq!(a.receiving, 0);
    }

    /// The body bytes held while contents arrive: what was received of each, back to zero once
    /// a content completes or is abandoned; a refused content's discarded bytes are not held.
    #[test]
    fn buffered_counts_the_body_bytes_received_of_partial_contents() {
        let mut a = Assembler::new(1000);
        for (ch, size) in [(1, 600), (2, 300)] {
            let (m, h) = frames(ch, size);
            assert!(a.push(m).unwrap().is_none());
            assert!(a.push(h).unwrap().is_none());
        }
        assert_eq!(a.buffered(), 0, "headers announce, bodies count");
        assert!(a.push(body(1, 250)).unwrap().is_none());
        assert!(a.push(body(2, 100)).unwrap().is_none());
        assert_eq!(a.buffered(), 350);
        assert!(a.push(body(1, 350)).unwrap().is_some());
        assert_eq!(a.buffered(), 100, "channel 1 complete");
        a.abandon(2);
        assert_eq!(a.buffered(), 0, "channel 2 abandoned");
        let (m, h) = frames(3, 2000);
        assert!(a.push(m).unwrap().is_none());
        assert!(a.push(h).is_err(), "too large");
        assert!(a.push(body(3, 2000)).unwrap().is_none());
        assert_eq!(a.buffered(), 0, "discarded, not held");
    }

    /// A refused content's channel is closed for it at its header; the client may answer
    /// close-ok without sending the rest of the body (RabbitMQ would have waited for it): the
    /// method ends the discarded content instead of being an unexpected frame.
    #[test]
    fn a_method_ends_a_refused_content() {
        let mut a = Assembler::new(1000);
        let (m, h) = frames(1, 5000);
        assert!(a.push(m).unwrap().is_none());
        assert!(matches!(a.push(h), Err(AssembleError::TooLarge { .. })));
        assert!(a.push(body(1, 100)).unwrap().is_none());
        let mut out = BytesMut::new();
        codec::write_method(&mut out, 1, &Method::ChannelCloseOk(Default::default()));
        let close_ok = codec::decode_frame(&mut out, 1 << 20).unwrap().unwrap();
        let cmd = a.push(close_ok).unwrap().expect("close-ok passed on");
        assert!(matches!(cmd.method, Method::ChannelCloseOk(_)));
        assert!(a.partial.is_empty());
    }
}
