//! AMQP field tables and field values, with RabbitMQ's type tags.

use bytes::{BufMut, Bytes};

use super::wire::{Field, LongStr, Reader, ShortStr, Writer};
use super::{CodecError, syntax};

/// How deeply tables and arrays may nest inside one another. Deeper input is refused with a
/// syntax error instead of recursing without bound on hostile input.
pub const MAX_NESTING: usize = 64;

/// A field table. Entries keep their wire order (duplicates included) so that a decoded table
/// encodes back to the same bytes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(pub Vec<(ShortStr, FieldValue)>);

impl FieldTable {
    /// The value of the first entry named `key`.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0
            .iter()
            .find(|(k, _)| k.as_bytes() == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// Replaces the value of the first entry named `key`, or appends the entry.
    pub fn insert(&mut self, key: ShortStr, v: FieldValue) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => *old = v,
            None => self.0.push((key, v)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(ShortStr, FieldValue)> {
        self.0.iter()
    }

    /// Decodes a table's entries given without the table's length prefix: the form of an
    /// AMQPLAIN login response.
    pub fn decode_entries(entries: Bytes) -> Result<FieldTable, CodecError> {
        let mut r = Reader::new(entries);
        let mut out = Vec::new();
        while r.remaining() > 0 {
            let key = r.short_str()?;
            let value = read_value(&mut r, 1)?;
            out.push((key, value));
        }
        Ok(FieldTable(out))
    }
}

/// A field value. The tags are RabbitMQ's (see `rabbit_binary_parser`), which differ from the
/// 0-9-1 spec's table for a few types:
///
/// | variant | tag | | variant | tag |
/// |---|---|---|---|---|
/// | `Bool` | `t` | | `F32` | `f` |
/// | `I8` | `b` | | `F64` | `d` |
/// | `U8` | `B` | | `Decimal` | `D` |
/// | `I16` | `s` (spec: `U`) | | `LongStr` | `S` |
/// | `U16` | `u` | | `ByteArray` | `x` |
/// | `I32` | `I` | | `Array` | `A` |
/// | `U32` | `i` | | `Timestamp` | `T` |
/// | `I64` | `l` (spec: `L`) | | `Table` | `F` |
/// | `Void` | `V` | | | |
///
/// Decoding also accepts `L` as a signed 64-bit integer, as RabbitMQ does (it re-encodes as
/// `l`), and reads any non-zero `t` octet as true (re-encoded as 1).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal { scale: u8, value: u32 },
    LongStr(LongStr),
    ByteArray(Bytes),
    Array(Vec<FieldValue>),
    Timestamp(u64),
    Table(FieldTable),
    Void,
}

impl FieldValue {
    /// The tag octet this value is encoded with.
    pub fn tag(&self) -> u8 {
        match self {
            FieldValue::Bool(_) => b't',
            FieldValue::I8(_) => b'b',
            FieldValue::U8(_) => b'B',
            FieldValue::I16(_) => b's',
            FieldValue::U16(_) => b'u',
            FieldValue::I32(_) => b'I',
            FieldValue::U32(_) => b'i',
            FieldValue::I64(_) => b'l',
            FieldValue::F32(_) => b'f',
            FieldValue::F64(_) => b'd',
            FieldValue::Decimal { .. } => b'D',
            FieldValue::LongStr(_) => b'S',
            FieldValue::ByteArray(_) => b'x',
            FieldValue::Array(_) => b'A',
            FieldValue::Timestamp(_) => b'T',
            FieldValue::Table(_) => b'F',
            FieldValue::Void => b'V',
        }
    }
}

/// Checks, without building anything, that `entries` (a field table's bytes after its length)
/// decode as a [`FieldTable`]: every value's type known, every length inside the table, the
/// nesting within [`MAX_NESTING`]. For a message's `headers`, which the proxy passes on as
/// bytes: RabbitMQ meeting a value type it does not know there fails the whole connection
/// with 541 INTERNAL_ERROR, which says nothing of the cause.
pub fn check_table(entries: &[u8]) -> Result<(), CodecError> {
    check_entries(entries, 0, true)
}

/// The entries of a table (`keyed`) or of an array, enclosed in `depth` tables and arrays.
fn check_entries(mut b: &[u8], depth: usize, keyed: bool) -> Result<(), CodecError> {
    if depth >= MAX_NESTING {
        return Err(syntax("field table nesting too deep"));
    }
    let cut = || syntax("field table");
    while !b.is_empty() {
        if keyed {
            let n = usize::from(*b.first().ok_or_else(cut)?);
            b = b.get(1 + n..).ok_or_else(cut)?;
        }
        let (&tag, rest) = b.split_first().ok_or_else(cut)?;
        b = rest;
        let len = match tag {
            b't' | b'b' | b'B' => 1,
            b's' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'V' => 0,
            b'S' | b'x' | b'A' | b'F' => {
                let n = b.get(..4).ok_or_else(cut)?;
                let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
                let inner = b.get(4..4usize.saturating_add(n)).ok_or_else(cut)?;
                match tag {
                    b'A' => check_entries(inner, depth + 1, false)?,
                    b'F' => check_entries(inner, depth + 1, true)?,
                    _ => {}
                }
                4 + n
            }
            _ => return Err(syntax("field value type")),
        };
        b = b.get(len..).ok_or_else(cut)?;
    }
    Ok(())
}

/// Reads a table (32-bit byte length, then entries). `depth` counts the enclosing tables and
/// arrays.
fn read_table(r: &mut Reader, depth: usize) -> Result<FieldTable, CodecError> {
    if depth >= MAX_NESTING {
        return Err(syntax("field table nesting too deep"));
    }
    let body = r.long_bytes("field table")?;
    let mut entries = Vec::new();
    if !body.is_empty() {
        let mut r = Reader::new(body);
        while r.remaining() > 0 {
            let key = r.short_str()?;
            let value = read_value(&mut r, depth + 1)?;
            entries.push((key, value));
        }
    }
    Ok(FieldTable(entries))
}

fn read_array(r: &mut Reader, depth: usize) -> Result<Vec<FieldValue>, CodecError> {
    if depth >= MAX_NESTING {
        return Err(syntax("field array nesting too deep"));
    }
    let body = r.long_bytes("field array")?;
    let mut values = Vec::new();
    if !body.is_empty() {
        let mut r = Reader::new(body);
        while r.remaining() > 0 {
            values.push(read_value(&mut r, depth + 1)?);
        }
    }
    Ok(values)
}

fn read_value(r: &mut Reader, depth: usize) -> Result<FieldValue, CodecError> {
    let v = match r.u8()? {
        b't' => FieldValue::Bool(r.u8()? != 0),
        b'b' => FieldValue::I8(r.u8()? as i8),
        b'B' => FieldValue::U8(r.u8()?),
        b's' => FieldValue::I16(r.u16()? as i16),
        b'u' => FieldValue::U16(r.u16()?),
        b'I' => FieldValue::I32(r.u32()? as i32),
        b'i' => FieldValue::U32(r.u32()?),
        b'l' | b'L' => FieldValue::I64(r.u64()? as i64),
        b'f' => FieldValue::F32(f32::from_bits(r.u32()?)),
        b'd' => FieldValue::F64(f64::from_bits(r.u64()?)),
        b'D' => FieldValue::Decimal {
            scale: r.u8()?,
            value: r.u32()?,
        },
        b'S' => FieldValue::LongStr(r.long_str()?),
        b'x' => FieldValue::ByteArray(r.long_bytes("byte array")?),
        b'A' => FieldValue::Array(read_array(r, depth)?),
        b'T' => FieldValue::Timestamp(r.u64()?),
        b'F' => FieldValue::Table(read_table(r, depth)?),
        b'V' => FieldValue::Void,
        _ => return Err(syntax("field value type")),
    };
    Ok(v)
}

/// Writes a 32-bit length placeholder, runs `body`, then patches the length.
fn with_length(w: &mut Writer<'_>, body: impl FnOnce(&mut Writer<'_>)) {
    let start = {
        let out = w.out();
        let start = out.len();
        out.put_u32(0);
        start
    };
    body(w);
    let out = w.out();
    let len = out.len() - start - 4;
    debug_assert!(u32::try_from(len).is_ok(), "field table over 4 GiB");
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
}

fn write_table(t: &FieldTable, w: &mut Writer<'_>) {
    with_length(w, |w| {
        for (k, v) in &t.0 {
            w.short_str(k);
            write_value(v, w);
        }
    });
}

fn write_value(v: &FieldValue, w: &mut Writer<'_>) {
    w.u8(v.tag());
    match v {
        FieldValue::Bool(b) => w.u8(u8::from(*b)),
        FieldValue::I8(x) => w.u8(*x as u8),
        FieldValue::U8(x) => w.u8(*x),
        FieldValue::I16(x) => w.u16(*x as u16),
        FieldValue::U16(x) => w.u16(*x),
        FieldValue::I32(x) => w.u32(*x as u32),
        FieldValue::U32(x) => w.u32(*x),
        FieldValue::I64(x) => w.u64(*x as u64),
        FieldValue::F32(x) => w.u32(x.to_bits()),
        FieldValue::F64(x) => w.u64(x.to_bits()),
        FieldValue::Decimal { scale, value } => {
            w.u8(*scale);
            w.u32(*value);
        }
        FieldValue::LongStr(s) => w.long_str(s),
        FieldValue::ByteArray(b) => w.long_bytes(b),
        FieldValue::Array(a) => with_length(w, |w| a.iter().for_each(|v| write_value(v, w))),
        FieldValue::Timestamp(t) => w.u64(*t),
        FieldValue::Table(t) => write_table(t, w),
        FieldValue::Void => {}
    }
}

impl Field for FieldTable {
    fn read(r: &mut Reader) -> Result<Self, CodecError> {
        read_table(r, 0)
    }
    fn write(&self, w: &mut Writer<'_>) {
        write_table(self, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn encode_table(t: &FieldTable) -> Bytes {
        let mut out = BytesMut::new();
        let mut w = Writer::new(&mut out);
        t.write(&mut w);
        w.finish();
        out.freeze()
    }

    fn decode_table(b: Bytes) -> Result<FieldTable, CodecError> {
        let mut r = Reader::new(b);
        let t = FieldTable::read(&mut r)?;
        r.finish("trailing")?;
        Ok(t)
    }

    fn key(s: &'static str) -> ShortStr {
        ShortStr::from_static(s)
    }

    fn every_value() -> Vec<FieldValue> {
        vec![
            FieldValue::Bool(true),
            FieldValue::Bool(false),
            FieldValue::I8(-5),
            FieldValue::U8(250),
            FieldValue::I16(-30000),
            FieldValue::U16(60000),
            FieldValue::I32(-2_000_000_000),
            FieldValue::U32(4_000_000_000),
            FieldValue::I64(-9_000_000_000_000),
            FieldValue::F32(1.5),
            FieldValue::F64(-2.25e100),
            FieldValue::Decimal {
                scale: 2,
                value: 12345,
            },
            FieldValue::LongStr(LongStr::from("long \u{e9}")),
            FieldValue::ByteArray(Bytes::from_static(&[0, 1, 0xff])),
            FieldValue::Array(vec![FieldValue::I32(1), FieldValue::LongStr("a".into())]),
            FieldValue::Array(vec![]),
            FieldValue::Timestamp(1_700_000_000),
            FieldValue::Table(FieldTable(vec![(key("inner"), FieldValue::Void)])),
            FieldValue::Table(FieldTable::default()),
            FieldValue::Void,
        ]
    }

    #[test]
    fn every_value_type_round_trips() {
        for v in every_value() {
            let t = FieldTable(vec![(key("k"), v.clone())]);
            let bytes = encode_table(&t);
            let back = decode_table(bytes.clone()).unwrap();
            assert_eq!(back, t, "value {v:?}");
            assert_eq!(encode_table(&back), bytes);
        }
        // And all of them in one table and one array.
        let t = FieldTable(
            every_value()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (ShortStr::try_from(format!("k{i}")).unwrap(), v))
                .collect(),
        );
        assert_eq!(decode_table(encode_table(&t)).unwrap(), t);
        let a = FieldTable(vec![(key("a"), FieldValue::Array(every_value()))]);
        assert_eq!(decode_table(encode_table(&a)).unwrap(), a);
    }

    #[test]
    fn exact_wire_bytes_use_rabbitmq_tags() {
        let t = FieldTable(vec![
            (key("s"), FieldValue::I16(-2)),
            (key("l"), FieldValue::I64(1)),
            (key("d"), FieldValue::Decimal { scale: 1, value: 2 }),
            (key("t"), FieldValue::Bool(true)),
            (key("V"), FieldValue::Void),
        ]);
        let expected: &[u8] = &[
            0, 0, 0, 31, // table length
            1, b's', b's', 0xff, 0xfe, // i16
            1, b'l', b'l', 0, 0, 0, 0, 0, 0, 0, 1, // i64
            1, b'd', b'D', 1, 0, 0, 0, 2, // decimal
            1, b't', b't', 1, // bool
            1, b'V', b'V', // void
        ];
        assert_eq!(&encode_table(&t)[..], expected);
    }

    #[test]
    fn keeps_wire_order_and_duplicates() {
        let t = FieldTable(vec![
            (key("z"), FieldValue::U8(1)),
            (key("a"), FieldValue::U8(2)),
            (key("z"), FieldValue::U8(3)),
        ]);
        let b = encode_table(&t);
        let back = decode_table(b.clone()).unwrap();
        assert_eq!(back, t);
        assert_eq!(encode_table(&back), b);
        assert_eq!(back.get("z"), Some(&FieldValue::U8(1)));
        assert_eq!(back.get("q"), None);
    }

    #[test]
    fn insert_replaces_or_appends() {
        let mut t = FieldTable::default();
        assert!(t.is_empty());
        t.insert(key("a"), FieldValue::U8(1));
        t.insert(key("b"), FieldValue::U8(2));
        t.insert(key("a"), FieldValue::U8(3));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a"), Some(&FieldValue::U8(3)));
        assert_eq!(t.0[0].0, "a");
    }

    #[test]
    fn lenient_decoding_like_rabbitmq() {
        // 'L' is read as a signed 64-bit integer; a bool octet of 2 is true.
        let b = Bytes::from_static(&[
            0, 0, 0, 15, 1, b'L', b'L', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, b't',
            b't', 2,
        ]);
        let t = decode_table(b).unwrap();
        assert_eq!(t.get("L"), Some(&FieldValue::I64(-1)));
        assert_eq!(t.get("t"), Some(&FieldValue::Bool(true)));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0, 5, 1, b'k', b'?'],             // length past the end
            &[0, 0, 0, 3, 1, b'k', b'?'],             // unknown tag
            &[0, 0, 0, 3, 1, b'k', b'I'],             // truncated value
            &[0, 0, 0, 2, 5, b'k'],                   // truncated key
            &[0, 0, 0, 7, 1, b'k', b'S', 0, 0, 1, 0], // long string past the table
            &[0, 0, 0, 3, 1, b'k', b'A'],             // truncated array length
            &[0, 0],                                  // truncated table length
            &[0xff, 0xff, 0xff, 0xff],                // 4 GiB table, 0 bytes present
        ];
        for c in cases {
            assert!(
                matches!(
                    decode_table(Bytes::from_static(c)),
                    Err(CodecError::Syntax { .. })
                ),
                "{c:?}"
            );
        }
    }

    fn nested(depth: usize) -> FieldTable {
        let mut t = FieldTable::default();
        for i in 0..depth {
            t = if i % 2 == 0 {
                FieldTable(vec![(key("t"), FieldValue::Table(t))])
            } else {
                FieldTable(vec![(
                    key("a"),
                    FieldValue::Array(vec![FieldValue::Table(t)]),
                )])
            };
        }
        t
    }

    #[test]
    fn nesting_limit() {
        // The outer table is depth 0; each wrapper adds a table or an array + table.
        let ok = nested(MAX_NESTING / 2 - 1);
        assert_eq!(decode_table(encode_table(&ok)).unwrap(), ok);
        let too_deep = nested(MAX_NESTING);
        assert!(matches!(
            decode_table(encode_table(&too_deep)),
            Err(CodecError::Syntax { .. })
        ));
        // A hostile, well-formed but very deep input built by hand: key "k" holding 100k
        // arrays nested in one another (each level is 'A' + the 32-bit length of the rest).
        let depth = 100_000;
        let mut buf = Vec::with_capacity(depth * 5 + 6);
        buf.extend_from_slice(&((2 + depth * 5) as u32).to_be_bytes());
        buf.extend_from_slice(&[1, b'k']);
        for i in 0..depth {
            buf.push(b'A');
            buf.extend_from_slice(&(((depth - i - 1) * 5) as u32).to_be_bytes());
        }
        assert!(matches!(
            decode_table(Bytes::from(buf)),
            Err(CodecError::Syntax { .. })
        ));
    }

    /// [`check_table`] over a whole encoded table (its length first), as the decoder reads it.
    fn checks(b: &[u8]) -> bool {
        let Some(n) = b.get(..4) else {
            return false;
        };
        let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
        b.get(4..4 + n)
            .is_some_and(|entries| check_table(entries).is_ok())
    }

    #[test]
    fn check_table_accepts_and_refuses_what_decoding_does() {
        let mut accepted: Vec<Bytes> = every_value()
            .into_iter()
            .map(|v| encode_table(&FieldTable(vec![(key("k"), v)])))
            .collect();
        accepted.push(encode_table(&FieldTable(vec![(
            key("a"),
            FieldValue::Array(every_value()),
        )])));
        accepted.push(encode_table(&nested(MAX_NESTING / 2 - 1)));
        accepted.push(Bytes::from_static(&[
            0, 0, 0, 15, 1, b'L', b'L', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, b't',
            b't', 2,
        ]));
        for b in &accepted {
            assert!(decode_table(b.clone()).is_ok());
            assert!(checks(b), "{b:?}");
        }
        let refused: Vec<Bytes> = [
            &[0, 0, 0, 3, 1, b'k', b'?'][..],
            &[0, 0, 0, 3, 1, b'k', b'I'],
            &[0, 0, 0, 2, 5, b'k'],
            &[0, 0, 0, 7, 1, b'k', b'S', 0, 0, 1, 0],
            &[0, 0, 0, 3, 1, b'k', b'A'],
            &[0, 0, 0, 8, 1, b'k', b'A', 0, 0, 0, 1, b'U'],
        ]
        .iter()
        .map(|c| Bytes::copy_from_slice(c))
        .chain([encode_table(&nested(MAX_NESTING))])
        .collect();
        for b in &refused {
            assert!(decode_table(b.clone()).is_err(), "{b:?}");
            assert!(!checks(b), "{b:?}");
        }
    }

    #[test]
    fn empty_table_does_not_allocate_entries() {
        let t = decode_table(Bytes::from_static(&[0, 0, 0, 0])).unwrap();
        assert_eq!(t.0.capacity(), 0);
    }
}
