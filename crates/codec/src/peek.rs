//! Finding the two commands a broker sends most, a delivery and a publisher confirm, at the
//! front of a read buffer without decoding them into [`Method`](crate::Method)s.
//!
//! Why: a proxy passes a delivery on nearly as it came. Only its delivery tag changes; its
//! channel, consumer tag, exchange, routing key, properties and body do not. Splitting it into
//! frames, decoding the method, assembling the content and encoding it all again cost more
//! than half of what warren spends per delivered message. [`peek`] only locates the fields
//! the proxy needs and checks the frames are whole and well formed, so the caller can copy the
//! command's bytes out in one piece and patch the tag in place.
//!
//! [`peek`] is conservative: anything unusual (a frame that is not whole yet, a heartbeat between
//! a content's frames, a malformed or oversized frame, trailing bytes in a method) gives `None`,
//! and the caller takes the general path, which decodes the frames one by one and answers
//! errors as the spec says. So the fast path never has to get an error right.

use std::ops::Range;

use crate::frame::Head;
use crate::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD};

/// Bounds the commands must keep to for [`peek`] to report them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The frame_max negotiated with the peer the bytes came from (0: none). A larger frame is
    /// an error, for the general path to report.
    pub frame_max: usize,
    /// The frame_max of the peer the command goes to (0: none): the bytes are copied as they
    /// are, so no frame may be larger.
    pub out_frame_max: usize,
    /// The largest body accepted.
    pub max_body: u64,
}

/// A `basic.deliver` with its content header and body frames, all in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub channel: u16,
    /// Where the consumer tag's bytes are in the buffer.
    pub consumer_tag: Range<usize>,
    pub delivery_tag: u64,
    /// Where the 8 bytes of the delivery tag are in the buffer.
    pub delivery_tag_at: usize,
    /// Where the content header's payload is in the buffer.
    pub header: Range<usize>,
    /// The bytes the whole command takes, from the start of the buffer.
    pub len: usize,
}

/// A `basic.ack` or `basic.nack` (a publisher confirm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    pub channel: u16,
    pub delivery_tag: u64,
    pub multiple: bool,
    /// True for basic.ack, false for basic.nack.
    pub ack: bool,
    /// The bytes the frame takes.
    pub len: usize,
}

/// What [`peek`] found at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    Delivery(Delivery),
    Confirm(Confirm),
}

/// One whole, well-formed frame at `at`: its type, channel and payload range.
fn frame(buf: &[u8], at: usize, limits: &Limits) -> Option<(u8, u16, Range<usize>)> {
    let Head {
        kind,
        channel,
        total,
    } = Head::read(buf.get(at..)?)?;
    for max in [limits.frame_max, limits.out_frame_max] {
        if max != 0 && total > max {
            return None;
        }
    }
    let end = at.checked_add(total)?;
    if *buf.get(end - 1)? != FRAME_END {
        return None;
    }
    Some((kind, channel, at + 7..end - 1))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// The end of the short string at `at`, within `end`.
fn short_str(buf: &[u8], at: usize, end: usize) -> Option<usize> {
    let len = usize::from(*buf.get(at)?);
    let after = at + 1 + len;
    (after <= end).then_some(after)
}

/// The delivery or confirm at the front of `buf`, if that is what is there, whole and well
/// formed within `limits`; `None` for anything else (see the module's documentation).
pub fn peek(buf: &[u8], limits: &Limits) -> Option<Peeked> {
    let (kind, channel, payload) = frame(buf, 0, limits)?;
    if kind != FRAME_METHOD || channel == 0 {
        return None;
    }
    let (start, end) = (payload.start, payload.end);
    if u16_at(buf, start)? != 60 {
        return None;
    }
    match u16_at(buf, start + 2)? {
        // basic.ack, basic.nack: delivery-tag, then bits (multiple; nack: requeue).
        method @ (80 | 120) => {
            if end - start != 4 + 8 + 1 {
                return None;
            }
            let bits = buf[start + 12];
            let known = if method == 80 { 0b1 } else { 0b11 };
            if bits & !known != 0 {
                return None;
            }
            Some(Peeked::Confirm(Confirm {
                channel,
                delivery_tag: u64_at(buf, start + 4)?,
                multiple: bits & 1 != 0,
                ack: method == 80,
                len: end + 1,
            }))
        }
        // basic.deliver: consumer-tag, delivery-tag, redelivered, exchange, routing-key.
        60 => {
            let tag_start = start + 4;
            let tag_end = short_str(buf, tag_start, end)?;
            let delivery_tag_at = tag_end;
            let delivery_tag = u64_at(buf, delivery_tag_at)?;
            let redelivered = *buf.get(delivery_tag_at + 8)?;
            if redelivered > 1 {
                return None;
            }
            let exchange_end = short_str(buf, delivery_tag_at + 9, end)?;
            if short_str(buf, exchange_end, end)? != end {
                return None;
            }
            let (kind, header_channel, header) = frame(buf, end + 1, limits)?;
            // Content header: class, weight, body size, property flags.
            if kind != FRAME_HEADER || header_channel != channel || header.len() < 14 {
                return None;
            }
            if u16_at(buf, header.start)? != 60 {
                return None;
            }
            let body_size = u64_at(buf, header.start + 4)?;
            if body_size > limits.max_body {
                return None;
            }
            let mut at = header.end + 1;
            let mut received = 0u64;
            while received < body_size {
                let (kind, body_channel, body) = frame(buf, at, limits)?;
                if kind != FRAME_BODY || body_channel != channel {
                    return None;
                }
                received += body.len() as u64;
                if received > body_size {
                    return None;
                }
                at = body.end + 1;
            }
            Some(Peeked::Delivery(Delivery {
                channel,
                consumer_tag: tag_start + 1..tag_end,
                delivery_tag,
                delivery_tag_at,
                header,
                len: at,
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BasicAck, BasicDeliver, BasicNack, BasicProperties, ContentHeader, Method, ShortStr,
        write_body, write_header, write_method,
    };
    use bytes::BytesMut;

    const LIMITS: Limits = Limits {
        frame_max: 4096,
        out_frame_max: 4096,
        max_body: 1 << 20,
    };

    fn delivery(channel: u16, tag: u64, body: &[u8], frame_max: usize) -> BytesMut {
        let mut out = BytesMut::new();
        write_method(
            &mut out,
            channel,
            &Method::BasicDeliver(BasicDeliver {
                consumer_tag: ShortStr::from_static("ctag-1"),
                delivery_tag: tag,
                redelivered: true,
                exchange: ShortStr::from_static("ex"),
                routing_key: ShortStr::from_static("rk"),
            }),
        );
        write_header(
            &mut out,
            channel,
            &ContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: BasicProperties::default(),
            },
        );
        write_body(&mut out, channel, body, frame_max);
        out
    }

    #[test]
    fn a_whole_delivery_is_found_with_its_fields() {
        let bytes = delivery(3, 77, &[5u8; 10_000], 4096);
        let Some(Peeked::Delivery(d)) = peek(&bytes, &LIMITS) else {
            panic!("a delivery");
        };
        assert_eq!((d.channel, d.delivery_tag, d.len), (3, 77, bytes.len()));
        assert_eq!(&bytes[d.consumer_tag.clone()], b"ctag-1");
        assert_eq!(u64_at(&bytes, d.delivery_tag_at), Some(77));
        assert_eq!(u16_at(&bytes, d.header.start), Some(60));
    }

    #[test]
    fn only_the_first_command_is_taken() {
        let mut bytes = delivery(1, 1, b"hello", 4096);
        let first = bytes.len();
        bytes.extend_from_slice(&delivery(1, 2, b"again", 4096));
        let Some(Peeked::Delivery(d)) = peek(&bytes, &LIMITS) else {
            panic!("a delivery");
        };
        assert_eq!((d.delivery_tag, d.len), (1, first));
    }

    #[test]
    fn an_empty_body_has_no_body_frame() {
        let bytes = delivery(1, 9, b"", 4096);
        assert!(matches!(peek(&bytes, &LIMITS), Some(Peeked::Delivery(d)) if d.len == bytes.len()));
    }

    #[test]
    fn confirms_are_found() {
        for (method, ack, multiple) in [
            (
                Method::BasicAck(BasicAck {
                    delivery_tag: 5,
                    multiple: true,
                }),
                true,
                true,
            ),
            (
                Method::BasicNack(BasicNack {
                    delivery_tag: 5,
                    multiple: false,
                    requeue: true,
                }),
                false,
                false,
            ),
        ] {
            let mut out = BytesMut::new();
            write_method(&mut out, 2, &method);
            let want = Confirm {
                channel: 2,
                delivery_tag: 5,
                multiple,
                ack,
                len: out.len(),
            };
            assert_eq!(peek(&out, &LIMITS), Some(Peeked::Confirm(want)));
        }
    }

    /// Every prefix of a command is incomplete, and anything altered is left to the general
    /// path: the fast path reports only what the general one would decode the same way.
    #[test]
    fn incomplete_or_altered_commands_are_left_to_the_general_path() {
        let bytes = delivery(1, 1, &[1u8; 5000], 4096);
        for cut in 0..bytes.len() {
            assert_eq!(peek(&bytes[..cut], &LIMITS), None, "prefix of {cut} bytes");
        }
        // A frame-end octet altered; a delivery on channel 0.
        let mut bad = bytes.to_vec();
        let last = bad.len() - 1;
        bad[last] = 0;
        assert_eq!(peek(&bad, &LIMITS), None);
        let on_zero = delivery(0, 1, b"x", 4096);
        assert_eq!(peek(&on_zero, &LIMITS), None);
        // Frames larger than either side's frame_max, a body larger than allowed.
        let small = Limits {
            out_frame_max: 2048,
            ..LIMITS
        };
        assert_eq!(peek(&bytes, &small), None);
        let tight = Limits {
            max_body: 4999,
            ..LIMITS
        };
        assert_eq!(peek(&bytes, &tight), None);
        // Every single byte changed, one at a time: found as it was, or left alone.
        for i in 0..bytes.len().min(80) {
            let mut changed = bytes.to_vec();
            changed[i] ^= 0x40;
            if let Some(Peeked::Delivery(d)) = peek(&changed, &LIMITS) {
                let decoded = crate::decode_frame(&mut BytesMut::from(&changed[..]), 4096)
                    .expect("a frame the general path decodes")
                    .expect("whole");
                let method = Method::decode(decoded.payload).expect("a method it decodes");
                let Method::BasicDeliver(m) = method else {
                    panic!("byte {i}: a delivery to the fast path, {method:?} to the general one");
                };
                assert_eq!(m.delivery_tag, d.delivery_tag, "byte {i}");
                assert_eq!(
                    m.consumer_tag.as_bytes(),
                    &changed[d.consumer_tag],
                    "byte {i}"
                );
            }
        }
    }
}
