//! Frame splitting and frame writers.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::method::Method;
use super::properties::ContentHeader;
use super::{
    CodecError, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_OVERHEAD,
    syntax,
};

/// Size of the frame header: type, channel, payload size.
const HEADER_LEN: usize = 7;

/// The four frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Method,
    Header,
    Body,
    Heartbeat,
}

impl FrameKind {
    /// The kind for a frame type octet.
    pub fn from_octet(t: u8) -> Result<Self, CodecError> {
        match t {
            FRAME_METHOD => Ok(FrameKind::Method),
            FRAME_HEADER => Ok(FrameKind::Header),
            FRAME_BODY => Ok(FrameKind::Body),
            FRAME_HEARTBEAT => Ok(FrameKind::Heartbeat),
            other => Err(CodecError::FrameType(other)),
        }
    }

    /// The frame type octet.
    pub fn octet(self) -> u8 {
        match self {
            FrameKind::Method => FRAME_METHOD,
            FrameKind::Header => FRAME_HEADER,
            FrameKind::Body => FRAME_BODY,
            FrameKind::Heartbeat => FRAME_HEARTBEAT,
        }
    }
}

/// One frame, its payload a slice of the read buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct RawFrame {
    pub kind: FrameKind,
    pub channel: u16,
    pub payload: Bytes,
}

/// Splits one complete frame off the front of `buf` without copying (`split_to` + `freeze`);
/// `Ok(None)` when more bytes are needed.
///
/// `frame_max` is the negotiated limit for the whole frame (payload + 8); 0 means no limit.
/// The type octet is checked as soon as it is present and the size as soon as the 7-byte header
/// is in, so an oversized frame is refused before it is buffered; the frame-end octet is checked
/// once the whole frame is in. Nothing is reserved from the announced size: memory is only
/// committed for bytes the peer actually sent.
///
/// A heartbeat frame is returned with whatever payload it carries: callers that follow
/// RabbitMQ treat a non-empty heartbeat or one on a channel other than 0 as an error.
pub fn decode_frame(buf: &mut BytesMut, frame_max: usize) -> Result<Option<RawFrame>, CodecError> {
    decode(buf, frame_max, 0)
}

/// [`decode_frame`] for what clients send, with RabbitMQ's tolerance: a frame may be 8 bytes
/// longer than `frame_max`, that is a payload of up to `frame_max` bytes. Clients that count
/// the limit as the payload size (AMQPStorm, rabbitpy: every body frame of a message above
/// 128 KiB) work against RabbitMQ because of it, and must work through warren.
pub fn decode_client_frame(
    buf: &mut BytesMut,
    frame_max: usize,
) -> Result<Option<RawFrame>, CodecError> {
    decode(buf, frame_max, FRAME_OVERHEAD)
}

fn decode(
    buf: &mut BytesMut,
    frame_max: usize,
    slack: usize,
) -> Result<Option<RawFrame>, CodecError> {
    let Some(&type_octet) = buf.first() else {
        return Ok(None);
    };
    let kind = FrameKind::from_octet(type_octet)?;
    let Some(Head { channel, total, .. }) = Head::read(buf) else {
        return Ok(None);
    };
    if frame_max != 0 && total > frame_max.saturating_add(slack) {
        return Err(CodecError::FrameTooLarge {
            size: total,
            max: frame_max,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != FRAME_END {
        return Err(CodecError::FrameEnd(end));
    }
    let mut frame = buf.split_to(total);
    frame.truncate(total - 1);
    frame.advance(HEADER_LEN);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload: frame.freeze(),
    }))
}

/// A frame's 7-byte header, read without checking anything: the general decoder above and
/// [`peek`](crate::peek) apply their own checks to it.
pub(crate) struct Head {
    /// The type octet.
    pub(crate) kind: u8,
    pub(crate) channel: u16,
    /// The bytes the whole frame takes (payload + 8); `usize::MAX`, which is "too large" to
    /// any limit, where the sum overflows (16/32-bit targets).
    pub(crate) total: usize,
}

impl Head {
    /// The header at the front of `buf`; `None` until all 7 bytes are in.
    pub(crate) fn read(buf: &[u8]) -> Option<Head> {
        let header = buf.get(..HEADER_LEN)?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
        Some(Head {
            kind: header[0],
            channel: u16::from_be_bytes([header[1], header[2]]),
            total: usize::try_from(size)
                .ok()
                .and_then(|s| s.checked_add(FRAME_OVERHEAD))
                .unwrap_or(usize::MAX),
        })
    }
}

/// Writes a frame header with a zero size and returns where the size goes.
fn begin_frame(out: &mut BytesMut, kind: u8, channel: u16, payload_hint: usize) -> usize {
    out.reserve(payload_hint + FRAME_OVERHEAD);
    out.put_u8(kind);
    out.put_u16(channel);
    let size_at = out.len();
    out.put_u32(0);
    size_at
}

/// Patches the size written by [`begin_frame`] and appends the frame-end octet.
fn end_frame(out: &mut BytesMut, size_at: usize) {
    let size = out.len() - size_at - 4;
    debug_assert!(u32::try_from(size).is_ok(), "frame payload over 4 GiB");
    out[size_at..size_at + 4].copy_from_slice(&(size as u32).to_be_bytes());
    out.put_u8(FRAME_END);
}

/// Appends a whole method frame (header, payload, frame-end) to `out`, writing the payload in
/// place and patching the size (no temporary buffer).
pub fn write_method(out: &mut BytesMut, channel: u16, method: &Method) {
    let size_at = begin_frame(out, FRAME_METHOD, channel, 64);
    method.encode(out);
    end_frame(out, size_at);
}

/// Appends a content header frame whose payload is already encoded (as received).
pub fn write_header_raw(out: &mut BytesMut, channel: u16, payload: &[u8]) {
    let size_at = begin_frame(out, FRAME_HEADER, channel, payload.len());
    out.put_slice(payload);
    end_frame(out, size_at);
}

/// Appends a content header frame, encoding `header` in place.
pub fn write_header(out: &mut BytesMut, channel: u16, header: &ContentHeader) {
    let size_at = begin_frame(out, FRAME_HEADER, channel, 64);
    header.encode(out);
    end_frame(out, size_at);
}

/// Appends body frames for `body`, split so that no frame exceeds `frame_max` (0 = unlimited,
/// though a frame never carries more than 2^32-1 bytes). An empty body gives no frames.
/// A `frame_max` of 8 or less cannot carry any payload; it is treated as room for one byte.
pub fn write_body(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: usize) {
    if body.is_empty() {
        return;
    }
    let max_payload = u32::MAX as usize;
    let chunk = if frame_max == 0 {
        max_payload
    } else {
        frame_max
            .saturating_sub(FRAME_OVERHEAD)
            .clamp(1, max_payload)
    };
    let frames = body.len().div_ceil(chunk);
    out.reserve(body.len() + frames * FRAME_OVERHEAD);
    for part in body.chunks(chunk) {
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(part.len() as u32);
        out.put_slice(part);
        out.put_u8(FRAME_END);
    }
}

/// Appends a heartbeat frame (channel 0, empty payload).
pub fn write_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Reads the class id and body size of a content header payload without decoding the
/// properties.
pub fn peek_content_header(payload: &[u8]) -> Result<(u16, u64), CodecError> {
    let (Some(class), Some(size)) = (payload.get(0..2), payload.get(4..12)) else {
        return Err(syntax("content header"));
    };
    let class_id = u16::from_be_bytes([class[0], class[1]]);
    let mut size_bytes = [0u8; 8];
    size_bytes.copy_from_slice(size);
    Ok((class_id, u64::from_be_bytes(size_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{BasicAck, BasicPublish};
    use crate::properties::BasicProperties;
    use crate::wire::ShortStr;

    fn ack_frame() -> BytesMut {
        let mut out = BytesMut::new();
        write_method(
            &mut out,
            7,
            &Method::BasicAck(BasicAck {
                delivery_tag: 42,
                multiple: true,
            }),
        );
        out
    }

    #[test]
    fn method_frame_layout() {
        let f = ack_frame();
        assert_eq!(
            &f[..],
            &[
                1, 0, 7, 0, 0, 0, 13, 0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 42, 1, 0xCE
            ]
        );
    }

    #[test]
    fn splits_on_partial_input() {
        let whole = ack_frame();
        // Feed the frame one byte at a time, followed by a heartbeat.
        let mut stream = whole.to_vec();
        stream.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in stream {
            buf.put_u8(b);
            while let Some(f) = decode_frame(&mut buf, 4096).unwrap() {
                frames.push(f);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].kind, FrameKind::Method);
        assert_eq!(frames[0].channel, 7);
        assert_eq!(&frames[0].payload[..], &whole[7..whole.len() - 1]);
        assert_eq!(
            Method::decode(frames[0].payload.clone()).unwrap(),
            Method::BasicAck(BasicAck {
                delivery_tag: 42,
                multiple: true
            })
        );
        assert_eq!(
            frames[1],
            RawFrame {
                kind: FrameKind::Heartbeat,
                channel: 0,
                payload: Bytes::new()
            }
        );
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = ack_frame();
        buf.extend_from_slice(&ack_frame());
        write_heartbeat(&mut buf);
        let mut n = 0;
        while decode_frame(&mut buf, 0).unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn payload_is_not_copied() {
        let mut buf = ack_frame();
        let ptr = buf[7..].as_ptr();
        let f = decode_frame(&mut buf, 0).unwrap().unwrap();
        assert_eq!(f.payload.as_ptr(), ptr);
    }

    #[test]
    fn client_frames_may_carry_a_payload_of_frame_max() {
        // A payload of 4096 bytes (the frame 4104): RabbitMQ's tolerance, waits for the rest.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x10, 0x00][..]);
        assert_eq!(decode_client_frame(&mut buf, 4096), Ok(None));
        assert!(decode_frame(&mut buf, 4096).is_err());
        // One byte more is refused.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x10, 0x01][..]);
        assert_eq!(
            decode_client_frame(&mut buf, 4096),
            Err(CodecError::FrameTooLarge {
                size: 4105,
                max: 4096
            })
        );
    }

    #[test]
    fn frame_max_refused_from_header_alone() {
        // Header announcing 4089 bytes of payload: 4097 with the overhead.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x0f, 0xf9][..]);
        assert_eq!(
            decode_frame(&mut buf, 4096),
            Err(CodecError::FrameTooLarge {
                size: 4097,
                max: 4096
            })
        );
        // Exactly frame_max is fine (and waits for the rest).
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0, 0x0f, 0xf8][..]);
        assert_eq!(decode_frame(&mut buf, 4096), Ok(None));
        assert_eq!(buf.len(), 7);
        // No limit: a 4 GiB announcement just waits, reserving nothing.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(decode_frame(&mut buf, 0), Ok(None));
        assert!(buf.capacity() < 1 << 20);
        assert_eq!(
            decode_frame(&mut buf, 1 << 20),
            Err(CodecError::FrameTooLarge {
                size: (1usize << 32) + 7,
                max: 1 << 20
            })
        );
    }

    #[test]
    fn bad_frame_end() {
        let mut buf = ack_frame();
        let last = buf.len() - 1;
        buf[last] = 0xCD;
        assert_eq!(decode_frame(&mut buf, 0), Err(CodecError::FrameEnd(0xCD)));
    }

    #[test]
    fn unknown_type_is_refused_at_first_byte() {
        let mut buf = BytesMut::from(&[4u8][..]);
        assert_eq!(decode_frame(&mut buf, 0), Err(CodecError::FrameType(4)));
        // The protocol header is not a frame.
        let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01"[..]);
        assert_eq!(decode_frame(&mut buf, 0), Err(CodecError::FrameType(b'A')));
        assert_eq!(decode_frame(&mut BytesMut::new(), 0), Ok(None));
    }

    #[test]
    fn body_is_split_by_frame_max() {
        let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut out = BytesMut::new();
        write_body(&mut out, 3, &body, 4096);
        let mut frames = Vec::new();
        while let Some(f) = decode_frame(&mut out, 4096).unwrap() {
            assert!(f.payload.len() + FRAME_OVERHEAD <= 4096);
            assert_eq!((f.kind, f.channel), (FrameKind::Body, 3));
            frames.push(f.payload);
        }
        assert_eq!(
            frames.iter().map(Bytes::len).collect::<Vec<_>>(),
            [4088, 4088, 1824]
        );
        assert_eq!(frames.concat(), body);
        // Unlimited: one frame; empty: none.
        write_body(&mut out, 3, &body, 0);
        assert_eq!(out.len(), body.len() + FRAME_OVERHEAD);
        let mut out = BytesMut::new();
        write_body(&mut out, 3, &[], 4096);
        assert!(out.is_empty());
        // Degenerate frame_max still terminates.
        write_body(&mut out, 3, b"abc", 8);
        assert_eq!(out.len(), 3 * 9);
    }

    #[test]
    fn header_frames() {
        let h = ContentHeader {
            class_id: 60,
            body_size: 5,
            properties: BasicProperties {
                content_type: Some(ShortStr::from_static("text/plain")),
                delivery_mode: Some(2),
                ..Default::default()
            },
        };
        let mut out = BytesMut::new();
        write_header(&mut out, 9, &h);
        let f = decode_frame(&mut out, 0).unwrap().unwrap();
        assert_eq!((f.kind, f.channel), (FrameKind::Header, 9));
        assert_eq!(peek_content_header(&f.payload), Ok((60, 5)));
        assert_eq!(ContentHeader::decode(f.payload.clone()).unwrap(), h);
        let mut raw = BytesMut::new();
        write_header_raw(&mut raw, 9, &f.payload);
        let g = decode_frame(&mut raw, 0).unwrap().unwrap();
        assert_eq!(g, f);
        assert!(peek_content_header(&f.payload[..11]).is_err());
    }

    #[test]
    fn write_method_appends() {
        let mut out = BytesMut::from(&b"xyz"[..]);
        write_method(
            &mut out,
            1,
            &Method::BasicPublish(BasicPublish {
                exchange: ShortStr::from_static("e"),
                ..Default::default()
            }),
        );
        assert_eq!(&out[..3], b"xyz");
        out.advance(3);
        let f = decode_frame(&mut out, 0).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Method);
        assert!(out.is_empty());
    }

    #[test]
    fn kind_octets() {
        for k in [
            FrameKind::Method,
            FrameKind::Header,
            FrameKind::Body,
            FrameKind::Heartbeat,
        ] {
            assert_eq!(FrameKind::from_octet(k.octet()), Ok(k));
        }
    }
}
