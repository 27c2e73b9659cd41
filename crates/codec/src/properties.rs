//! Content header payloads: class id, weight, body size and the basic-class properties.

use bytes::{BufMut, Bytes, BytesMut};

use super::table::FieldTable;
use super::wire::{Field, Reader, ShortStr, Writer};
use super::{CodecError, syntax};

/// The properties of the basic class (the only class with content), in wire order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BasicProperties {
    pub content_type: Option<ShortStr>,
    pub content_encoding: Option<ShortStr>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub priority: Option<u8>,
    pub correlation_id: Option<ShortStr>,
    pub reply_to: Option<ShortStr>,
    pub expiration: Option<ShortStr>,
    pub message_id: Option<ShortStr>,
    pub timestamp: Option<u64>,
    /// The `type` property.
    pub kind: Option<ShortStr>,
    pub user_id: Option<ShortStr>,
    pub app_id: Option<ShortStr>,
    pub cluster_id: Option<ShortStr>,
}

/// A decoded content header frame payload.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: BasicProperties,
}

/// Property flag bit of the first property (content-type); the next ones follow downwards.
const FIRST_FLAG: u16 = 1 << 15;
/// Bit 0 of a flag word says another flag word follows.
const CONTINUATION: u16 = 1;
/// Flag bits that name a basic property: bits 15 down to 2.
const KNOWN_FLAGS: u16 = 0xFFFC;

/// Applies `$m!(field, Type)` to each property in wire order.
macro_rules! each_property {
    ($m:ident) => {
        $m!(content_type);
        $m!(content_encoding);
        $m!(headers);
        $m!(delivery_mode);
        $m!(priority);
        $m!(correlation_id);
        $m!(reply_to);
        $m!(expiration);
        $m!(message_id);
        $m!(timestamp);
        $m!(kind);
        $m!(user_id);
        $m!(app_id);
        $m!(cluster_id);
    };
}

impl BasicProperties {
    /// The first property-flags word (this class never needs a second one).
    pub fn flags(&self) -> u16 {
        let mut flags = 0u16;
        let mut bit = FIRST_FLAG;
        macro_rules! flag {
            ($f:ident) => {
                if self.$f.is_some() {
                    flags |= bit;
                }
                bit >>= 1;
            };
        }
        each_property!(flag);
        let _ = bit;
        flags
    }

    fn read(r: &mut Reader) -> Result<Self, CodecError> {
        // Flag words: the continuation bit (bit 0) says another word follows. The basic class
        // only defines 14 properties, so any flag beyond them is a property we cannot skip.
        let flags = r.u16()?;
        if flags & !KNOWN_FLAGS & !CONTINUATION != 0 {
            return Err(syntax("content header property flags"));
        }
        let mut more = flags & CONTINUATION != 0;
        while more {
            let word = r.u16()?;
            if word & !CONTINUATION != 0 {
                return Err(syntax("content header property flags"));
            }
            more = word & CONTINUATION != 0;
        }
        let mut props = BasicProperties::default();
        let mut bit = FIRST_FLAG;
        macro_rules! read_prop {
            ($f:ident) => {
                if flags & bit != 0 {
                    props.$f = Some(Field::read(r)?);
                }
                bit >>= 1;
            };
        }
        each_property!(read_prop);
        let _ = bit;
        Ok(props)
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.u16(self.flags());
        macro_rules! write_prop {
            ($f:ident) => {
                if let Some(v) = &self.$f {
                    v.write(w);
                }
            };
        }
        each_property!(write_prop);
    }
}

/// Where a content header payload's first property-flags word is: after the class id, the
/// weight and the body size.
const FLAGS_AT: usize = 12;

/// The first property-flags word of a content header payload.
fn flags_of(payload: &[u8]) -> Option<u16> {
    let b = payload.get(FLAGS_AT..FLAGS_AT + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// Where property number `index` (in wire order: 0 content-type, 1 content-encoding, 2 headers,
/// up to 6 reply-to) starts in a content header payload whose first flags word is `flags`,
/// found without decoding the properties before it: short strings are skipped by their length,
/// the headers table by its 32-bit length. `None` when the payload is too short for them.
fn property_at(payload: &[u8], flags: u16, index: usize) -> Option<usize> {
    // content-type, content-encoding, headers, delivery-mode, priority, correlation-id.
    const KINDS: [u8; 6] = [b's', b's', b'F', b'o', b'o', b's'];
    let mut at = FLAGS_AT + 2;
    let mut word = flags;
    while word & CONTINUATION != 0 {
        word = u16::from_be_bytes(payload.get(at..at + 2)?.try_into().ok()?);
        at += 2;
    }
    let mut bit = FIRST_FLAG;
    for kind in &KINDS[..index] {
        if flags & bit != 0 {
            at = match kind {
                b's' => at + 1 + usize::from(*payload.get(at)?),
                b'F' => {
                    let len = u32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?);
                    at.checked_add(4)?.checked_add(usize::try_from(len).ok()?)?
                }
                _ => at + 1,
            };
        }
        bit >>= 1;
    }
    Some(at)
}

/// Where the reply-to property's value lies in a content header payload, found without decoding
/// the properties before it (the headers table is skipped by its length): the one property the
/// proxy rewrites on deliveries (see warren's `client::session::reply_to`). `None` when the
/// message has no reply-to or the payload is malformed (then it is passed on as it is).
pub fn reply_to_span(payload: &[u8]) -> Option<std::ops::Range<usize>> {
    const REPLY_TO: u16 = FIRST_FLAG >> 6;
    let flags = flags_of(payload)?;
    if flags & REPLY_TO == 0 {
        return None;
    }
    let at = property_at(payload, flags, 6)?;
    let end = at + 1 + usize::from(*payload.get(at)?);
    (end <= payload.len()).then_some(at + 1..end)
}

/// Where the headers table's entries lie in a content header payload (after the table's
/// length): `Ok(None)` when the message has no headers (or the payload is too short for its
/// flags word), an error when the payload is too short for what its flags and lengths say.
pub fn headers_span(payload: &[u8]) -> Result<Option<std::ops::Range<usize>>, CodecError> {
    const HEADERS: u16 = FIRST_FLAG >> 2;
    let Some(flags) = flags_of(payload) else {
        return Ok(None);
    };
    if flags & HEADERS == 0 {
        return Ok(None);
    }
    let span = || {
        let at = property_at(payload, flags, 2)?;
        let len = u32::from_be_bytes(payload.get(at..at + 4)?.try_into().ok()?);
        let end = (at + 4).checked_add(usize::try_from(len).ok()?)?;
        (end <= payload.len()).then_some(at + 4..end)
    };
    span()
        .map(Some)
        .ok_or_else(|| crate::syntax("content header properties"))
}

/// A copy of `payload` with the short string whose value is at `span` (from
/// [`reply_to_span`]) replaced by `value`; `None` when `value` is too long for a short string.
pub fn replace_short_str(
    payload: &[u8],
    span: std::ops::Range<usize>,
    value: &[u8],
) -> Option<Bytes> {
    let len = u8::try_from(value.len()).ok()?;
    let mut out = BytesMut::with_capacity(payload.len() + value.len() - span.len());
    out.extend_from_slice(&payload[..span.start - 1]);
    out.put_u8(len);
    out.extend_from_slice(value);
    out.extend_from_slice(&payload[span.end..]);
    Some(out.freeze())
}

impl ContentHeader {
    /// Decodes a content header frame payload. The weight must be 0 (as RabbitMQ requires),
    /// and nothing may follow the properties. The properties are read with the basic class's
    /// layout whatever `class_id` says: basic is the only class that carries content.
    pub fn decode(payload: Bytes) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let class_id = r.u16()?;
        if r.u16()? != 0 {
            return Err(syntax("content header weight"));
        }
        let body_size = r.u64()?;
        let properties = BasicProperties::read(&mut r)?;
        r.finish("content header")?;
        Ok(ContentHeader {
            class_id,
            body_size,
            properties,
        })
    }

    /// Appends the payload (not the frame) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(14);
        out.put_u16(self.class_id);
        out.put_u16(0);
        out.put_u64(self.body_size);
        let mut w = Writer::new(out);
        self.properties.write(&mut w);
        w.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::FieldValue;

    fn all_set() -> ContentHeader {
        ContentHeader {
            class_id: 60,
            body_size: 1 << 40,
            properties: BasicProperties {
                content_type: Some(ShortStr::from_static("application/json")),
                content_encoding: Some(ShortStr::from_static("gzip")),
                headers: Some(FieldTable(vec![(
                    ShortStr::from_static("x-h"),
                    FieldValue::LongStr("v".into()),
                )])),
                delivery_mode: Some(2),
                priority: Some(9),
                correlation_id: Some(ShortStr::from_static("corr")),
                reply_to: Some(ShortStr::from_static("amq.rabbitmq.reply-to")),
                expiration: Some(ShortStr::from_static("60000")),
                message_id: Some(ShortStr::from_static("m-1")),
                timestamp: Some(1_700_000_000),
                kind: Some(ShortStr::from_static("event")),
                user_id: Some(ShortStr::from_static("guest")),
                app_id: Some(ShortStr::from_static("warren")),
                cluster_id: Some(ShortStr::from_static("c1")),
            },
        }
    }

    fn encode(h: &ContentHeader) -> Bytes {
        let mut out = BytesMut::new();
        h.encode(&mut out);
        out.freeze()
    }

    #[test]
    fn all_and_no_properties_round_trip() {
        let full = all_set();
        assert_eq!(full.properties.flags(), 0xFFFC);
        let b = encode(&full);
        assert_eq!(ContentHeader::decode(b.clone()).unwrap(), full);
        let empty = ContentHeader {
            class_id: 60,
            body_size: 0,
            properties: Default::default(),
        };
        let b = encode(&empty);
        assert_eq!(&b[..], &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ContentHeader::decode(b).unwrap(), empty);
    }

    #[test]
    fn each_property_alone() {
        let full = all_set().properties;
        let mut bit = FIRST_FLAG;
        macro_rules! one {
            ($f:ident) => {
                let mut p = BasicProperties::default();
                p.$f = full.$f.clone();
                assert_eq!(p.flags(), bit, stringify!($f));
                let h = ContentHeader {
                    class_id: 60,
                    body_size: 3,
                    properties: p,
                };
                assert_eq!(ContentHeader::decode(encode(&h)).unwrap(), h);
                bit >>= 1;
            };
        }
        each_property!(one);
        assert_eq!(bit, 2);
    }

    #[test]
    fn continuation_flag_words() {
        // delivery-mode with the continuation bit, then one empty continuation word.
        let b = Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x10, 0x01, 0, 0, 2]);
        let h = ContentHeader::decode(b).unwrap();
        assert_eq!(h.body_size, 5);
        assert_eq!(h.properties.delivery_mode, Some(2));
        // Two continuation words.
        let b = Bytes::from_static(&[
            0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x10, 0x01, 0, 1, 0, 0, 2,
        ]);
        assert_eq!(
            ContentHeader::decode(b).unwrap().properties.delivery_mode,
            Some(2)
        );
        // A continuation word naming an unknown property.
        let b = Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x10, 0x01, 0x80, 0, 2]);
        assert!(ContentHeader::decode(b).is_err());
        // Unknown bit 1 in the first word.
        let b = Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x00, 0x02]);
        assert!(ContentHeader::decode(b).is_err());
        // Continuation announced but missing.
        let b = Bytes::from_static(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x00, 0x01]);
        assert!(ContentHeader::decode(b).is_err());
    }

    #[test]
    fn headers_are_found_without_decoding() {
        let h = all_set();
        let payload = encode(&h);
        let span = headers_span(&payload).unwrap().expect("headers present");
        let mut table = BytesMut::new();
        let mut w = Writer::new(&mut table);
        h.properties.headers.as_ref().unwrap().write(&mut w);
        w.finish();
        assert_eq!(
            &payload[span],
            &table[4..],
            "the entries, after the table's length"
        );
        let mut none = all_set();
        none.properties.headers = None;
        assert_eq!(headers_span(&encode(&none)).unwrap(), None);
        // Truncated payloads: an error once the flags say headers, never a span past the end.
        for cut in 0..payload.len() {
            match headers_span(&payload[..cut]) {
                Ok(Some(span)) => assert!(span.end <= cut),
                Ok(None) => assert!(cut < FLAGS_AT + 2),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn reply_to_is_found_and_replaced_without_decoding() {
        let mut h = all_set();
        h.properties.reply_to = Some(ShortStr::try_from("amq.rabbitmq.reply-to.abc").unwrap());
        let payload = encode(&h);
        let span = reply_to_span(&payload).expect("reply-to present");
        assert_eq!(&payload[span.clone()], b"amq.rabbitmq.reply-to.abc");
        let replaced = replace_short_str(&payload, span, b"somewhere-else").unwrap();
        let mut expected = h.clone();
        expected.properties.reply_to = Some(ShortStr::try_from("somewhere-else").unwrap());
        assert_eq!(ContentHeader::decode(replaced).unwrap(), expected);
        // Each property before it present or not.
        for i in 0..6 {
            let mut h = ContentHeader {
                class_id: 60,
                body_size: 3,
                properties: BasicProperties {
                    reply_to: Some(ShortStr::try_from("r").unwrap()),
                    ..Default::default()
                },
            };
            let full = all_set().properties;
            match i {
                0 => h.properties.content_type = full.content_type,
                1 => h.properties.content_encoding = full.content_encoding,
                2 => h.properties.headers = full.headers,
                3 => h.properties.delivery_mode = full.delivery_mode,
                4 => h.properties.priority = full.priority,
                _ => h.properties.correlation_id = full.correlation_id,
            }
            let payload = encode(&h);
            let span = reply_to_span(&payload).unwrap();
            assert_eq!(&payload[span], b"r", "with property {i} before it");
        }
        let mut none = all_set();
        none.properties.reply_to = None;
        assert_eq!(reply_to_span(&encode(&none)), None);
        // Truncated payloads are not read past their end.
        for cut in 0..payload.len() {
            if let Some(span) = reply_to_span(&payload[..cut]) {
                assert!(span.end <= cut);
            }
        }
        assert_eq!(
            replace_short_str(&payload, reply_to_span(&payload).unwrap(), &[b'x'; 256]),
            None
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = encode(&all_set());
        for n in 0..good.len() {
            assert!(
                ContentHeader::decode(good.slice(..n)).is_err(),
                "truncated to {n}"
            );
        }
        let mut trailing = BytesMut::from(&good[..]);
        trailing.put_u8(0);
        assert!(ContentHeader::decode(trailing.freeze()).is_err());
        let mut weighted = BytesMut::from(&good[..]);
        weighted[3] = 1;
        assert!(ContentHeader::decode(weighted.freeze()).is_err());
    }
}
