//! AMQP strings as zero-copy slices, and the primitive [`Reader`] / [`Writer`] the rest of the
//! codec is built on.

use std::borrow::{Borrow, Cow};
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use super::{CodecError, syntax};

/// An AMQP `shortstr`: at most 255 bytes, not necessarily UTF-8 (the spec says nothing of the
/// encoding and RabbitMQ only checks UTF-8 on some fields). Decoded strings are slices of the
/// frame they came from.
#[derive(Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ShortStr(Bytes);

/// Error for building a [`ShortStr`] from more than 255 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("short string of {len} bytes exceeds 255 bytes")]
pub struct ShortStrTooLong {
    /// The length that was refused.
    pub len: usize,
}

impl ShortStr {
    /// The longest short string.
    pub const MAX_LEN: usize = 255;

    /// A short string from a literal. Panics (at compile time in a const context) if `s` is
    /// longer than 255 bytes.
    pub const fn from_static(s: &'static str) -> Self {
        assert!(s.len() <= Self::MAX_LEN, "ShortStr longer than 255 bytes");
        ShortStr(Bytes::from_static(s.as_bytes()))
    }

    /// Wraps `b` if it is at most 255 bytes long.
    pub fn from_bytes(b: Bytes) -> Result<Self, ShortStrTooLong> {
        if b.len() > Self::MAX_LEN {
            Err(ShortStrTooLong { len: b.len() })
        } else {
            Ok(ShortStr(b))
        }
    }
}

impl TryFrom<String> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_bytes(Bytes::from(s))
    }
}

impl TryFrom<&str> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        if s.len() > Self::MAX_LEN {
            return Err(ShortStrTooLong { len: s.len() });
        }
        Ok(ShortStr(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl TryFrom<Vec<u8>> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(v: Vec<u8>) -> Result<Self, Self::Error> {
        Self::from_bytes(Bytes::from(v))
    }
}

impl TryFrom<Bytes> for ShortStr {
    type Error = ShortStrTooLong;
    fn try_from(b: Bytes) -> Result<Self, Self::Error> {
        Self::from_bytes(b)
    }
}

impl Borrow<[u8]> for ShortStr {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

/// An AMQP `longstr`: up to 2^32-1 bytes of binary data. Decoded strings are slices of the
/// frame they came from.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct LongStr(Bytes);

impl LongStr {
    pub const fn from_static(s: &'static str) -> Self {
        LongStr(Bytes::from_static(s.as_bytes()))
    }
}

impl From<Vec<u8>> for LongStr {
    fn from(v: Vec<u8>) -> Self {
        LongStr(Bytes::from(v))
    }
}

impl From<String> for LongStr {
    fn from(s: String) -> Self {
        LongStr(Bytes::from(s))
    }
}

impl From<&str> for LongStr {
    fn from(s: &str) -> Self {
        LongStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<Bytes> for LongStr {
    fn from(b: Bytes) -> Self {
        LongStr(b)
    }
}

/// What both string types are: bytes, shown as text (invalid UTF-8 replaced by U+FFFD).
macro_rules! amqp_string {
    ($t:ident) => {
        impl $t {
            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// The string, with invalid UTF-8 replaced by U+FFFD (borrowed when it is valid
            /// UTF-8).
            pub fn as_str(&self) -> Cow<'_, str> {
                String::from_utf8_lossy(&self.0)
            }

            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }

            pub fn len(&self) -> usize {
                self.0.len()
            }

            pub fn into_bytes(self) -> Bytes {
                self.0
            }
        }

        impl AsRef<[u8]> for $t {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.as_str(), f)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.as_str())
            }
        }
    };
}

amqp_string!(ShortStr);
amqp_string!(LongStr);

/// A cursor over a frame payload. Every read checks the remaining length first; slices are
/// taken with `Bytes::split_to` (no copy). Consecutive bit reads share one octet, as in the
/// spec's bit-packing rule; any other read starts after that octet.
pub(crate) struct Reader {
    buf: Bytes,
    /// The octet the next bit comes from, and how many of its bits are used (8 = none left).
    bits: u8,
    bit_pos: u8,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader {
            buf,
            bits: 0,
            bit_pos: 8,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte has been consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(syntax(what))
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        self.bit_pos = 8;
        let head: [u8; N] = match self.buf.get(..N) {
            Some(s) => s.try_into().map_err(|_| syntax(what))?,
            None => return Err(syntax(what)),
        };
        bytes::Buf::advance(&mut self.buf, N);
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        self.array::<1>("octet").map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CodecError> {
        self.array("short").map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        self.array("long").map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        self.array("longlong").map(u64::from_be_bytes)
    }

    pub(crate) fn bit(&mut self) -> Result<bool, CodecError> {
        if self.bit_pos >= 8 {
            self.bits = self.u8()?;
            self.bit_pos = 0;
        }
        let v = (self.bits >> self.bit_pos) & 1 == 1;
        self.bit_pos += 1;
        Ok(v)
    }

    /// `n` bytes as a slice of the frame; fails before touching anything if fewer are present.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, CodecError> {
        self.bit_pos = 8;
        if n > self.buf.len() {
            return Err(syntax(what));
        }
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn short_str(&mut self) -> Result<ShortStr, CodecError> {
        let n = self.u8()?;
        self.take(usize::from(n), "short string").map(ShortStr)
    }

    /// A 32-bit length followed by that many bytes.
    pub(crate) fn long_bytes(&mut self, what: &'static str) -> Result<Bytes, CodecError> {
        let n = self.u32()?;
        let n = usize::try_from(n).map_err(|_| syntax(what))?;
        self.take(n, what)
    }

    pub(crate) fn long_str(&mut self) -> Result<LongStr, CodecError> {
        self.long_bytes("long string").map(LongStr)
    }
}

/// Appends AMQP primitives to a `BytesMut`. Consecutive bits are packed into one octet (low bit
/// first); the pending octet is flushed before any other field, after 8 bits, and by
/// [`Writer::finish`].
pub(crate) struct Writer<'a> {
    out: &'a mut BytesMut,
    bits: u8,
    nbits: u8,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut BytesMut) -> Self {
        Writer {
            out,
            bits: 0,
            nbits: 0,
        }
    }

    fn flush_bits(&mut self) {
        if self.nbits > 0 {
            self.out.put_u8(self.bits);
            self.bits = 0;
            self.nbits = 0;
        }
    }

    /// Flushes a pending bit octet. Must be called after the last field.
    pub(crate) fn finish(mut self) {
        self.flush_bits();
    }

    pub(crate) fn bit(&mut self, v: bool) {
        if self.nbits == 8 {
            self.flush_bits();
        }
        if v {
            self.bits |= 1 << self.nbits;
        }
        self.nbits += 1;
    }

    /// Direct access to the buffer for non-bit fields (flushes pending bits first).
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        self.flush_bits();
        self.out
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out().put_u8(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.out().put_u16(v);
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out().put_u32(v);
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.out().put_u64(v);
    }

    pub(crate) fn short_str(&mut self, s: &ShortStr) {
        // The constructors keep a ShortStr at or under 255 bytes.
        let out = self.out();
        out.put_u8(s.len() as u8);
        out.put_slice(s.as_bytes());
    }

    /// A 32-bit length and the bytes. Data over 4 GiB cannot be framed anyway (a frame size is
    /// 32 bits), so the length is not checked beyond a debug assertion.
    pub(crate) fn long_bytes(&mut self, b: &[u8]) {
        debug_assert!(u32::try_from(b.len()).is_ok(), "long string over 4 GiB");
        let out = self.out();
        out.put_u32(b.len() as u32);
        out.put_slice(b);
    }

    pub(crate) fn long_str(&mut self, s: &LongStr) {
        self.long_bytes(s.as_bytes());
    }
}

/// One method argument / property type: how it is read and written.
pub(crate) trait Field: Sized {
    fn read(r: &mut Reader) -> Result<Self, CodecError>;
    fn write(&self, w: &mut Writer<'_>);
}

/// `Field` for types the reader and writer handle with a method of the same name: by value for
/// the numbers and bits, by reference for the strings.
macro_rules! fields {
    ($($ty:ty => $name:ident($($by:tt)*);)*) => {$(
        impl Field for $ty {
            fn read(r: &mut Reader) -> Result<Self, CodecError> {
                r.$name()
            }
            fn write(&self, w: &mut Writer<'_>) {
                w.$name($($by)* self)
            }
        }
    )*};
}

fields! {
    u8 => u8(*);
    u16 => u16(*);
    u32 => u32(*);
    u64 => u64(*);
    bool => bit(*);
    ShortStr => short_str();
    LongStr => long_str();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(f: impl FnOnce(&mut Writer<'_>)) -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut w = Writer::new(&mut out);
        f(&mut w);
        w.finish();
        out.to_vec()
    }

    #[test]
    fn bits_pack_low_bit_first_and_flush_before_other_fields() {
        let b = encode(|w| {
            w.bit(true);
            w.bit(false);
            w.bit(true);
            w.u8(0xAA);
            w.bit(true);
        });
        assert_eq!(b, [0b101, 0xAA, 0b1]);
    }

    #[test]
    fn nine_bits_take_two_octets() {
        let pattern = [true, false, false, true, true, false, true, false, true];
        let b = encode(|w| pattern.iter().for_each(|&v| w.bit(v)));
        assert_eq!(b, [0b0101_1001, 0b1]);
        let mut r = Reader::new(Bytes::from(b));
        for &v in &pattern {
            assert_eq!(r.bit().unwrap(), v);
        }
        r.finish("bits").unwrap();
    }

    #[test]
    fn reader_bits_restart_after_other_field() {
        let mut r = Reader::new(Bytes::from_static(&[0b11, 7, 0b10]));
        assert!(r.bit().unwrap());
        assert_eq!(r.u8().unwrap(), 7);
        assert!(!r.bit().unwrap());
        assert!(r.bit().unwrap());
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn no_bits_no_octet() {
        assert!(encode(|_| {}).is_empty());
    }

    #[test]
    fn truncated_reads_fail_cleanly() {
        let mut r = Reader::new(Bytes::from_static(&[0, 1, 2]));
        assert!(r.u32().is_err());
        assert_eq!(r.u16().unwrap(), 1);
        assert!(r.u16().is_err());
        let mut r = Reader::new(Bytes::from_static(&[5, b'a', b'b']));
        assert!(r.short_str().is_err());
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 1]));
        assert!(r.long_str().is_err());
    }

    #[test]
    fn strings_are_slices_of_the_frame() {
        let frame = Bytes::from(vec![3, b'a', b'b', b'c', 0, 0, 0, 1, b'z']);
        let mut r = Reader::new(frame.clone());
        let s = r.short_str().unwrap();
        let l = r.long_str().unwrap();
        assert_eq!(s, "abc");
        assert_eq!(l.as_bytes(), b"z");
        // Same memory as the frame: no copy was made.
        assert_eq!(s.as_bytes().as_ptr(), frame[1..].as_ptr());
        assert_eq!(l.as_bytes().as_ptr(), frame[8..].as_ptr());
    }

    #[test]
    fn short_str_limits() {
        assert!(ShortStr::try_from("x".repeat(255)).is_ok());
        assert_eq!(
            ShortStr::try_from("x".repeat(256)),
            Err(ShortStrTooLong { len: 256 })
        );
        assert!(ShortStr::try_from(vec![0u8; 300]).is_err());
        let s = ShortStr::try_from(vec![b'a', 0xff]).unwrap();
        assert_eq!(s.as_str(), "a\u{fffd}");
        assert_eq!(format!("{s:?}"), "\"a\u{fffd}\"");
        assert_eq!(s.to_string(), "a\u{fffd}");
        const Q: ShortStr = ShortStr::from_static("amq.direct");
        assert_eq!(Q.len(), 10);
        assert!(!Q.is_empty());
        assert_eq!(Q.into_bytes(), Bytes::from_static(b"amq.direct"));
    }

    #[test]
    fn long_str_helpers() {
        let l = LongStr::from(String::from("PLAIN"));
        assert_eq!(l, LongStr::from_static("PLAIN"));
        assert_eq!(l, LongStr::from(b"PLAIN".to_vec()));
        assert_eq!(l, LongStr::from(Bytes::from_static(b"PLAIN")));
        assert_eq!(l.len(), 5);
        assert_eq!(format!("{l:?}"), "\"PLAIN\"");
        assert!(LongStr::default().is_empty());
    }
}
