//! What of the client's input to drop after a frame warren refused.
//!
//! A frame error ends the connection: warren sends connection.close and waits for close-ok.
//! The bytes behind the bad frame header are still coming, and closing the socket with them
//! unread makes the kernel send a reset, which a client still writing (lapin sends a content
//! header of any size as one frame) reports as "connection aborted" before it reads the reason.
//! So the input is read on and dropped, as far as the framing allows:
//!
//! * a frame larger than frame_max says how long it is: its bytes are dropped as they arrive,
//!   and frames are decoded again behind it, so the client's close-ok is seen and the
//!   connection ends at once, as with RabbitMQ (which reads the whole frame first);
//! * a bad frame type or frame-end octet leaves nothing to find the next frame by: everything
//!   is dropped until the client's socket ends or the close times out.

use bytes::{Buf, BytesMut};

use crate::codec::CodecError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InputSkip {
    /// Frames are decoded as they come.
    None,
    /// This many more bytes belong to a refused frame.
    Bytes(u64),
    /// The framing is lost: drop everything.
    All,
}

impl InputSkip {
    /// What to drop after the frame decoder refused the front of the input with `e` (nothing
    /// of the bad frame has been taken off the buffer).
    pub(super) fn after(e: &CodecError) -> Self {
        match e {
            CodecError::FrameTooLarge { size, .. } => Self::Bytes(*size as u64),
            _ => Self::All,
        }
    }

    /// Drops what is to be skipped from the front of `buf`; true if frames can be decoded
    /// from what is left.
    pub(super) fn drop_from(&mut self, buf: &mut BytesMut) -> bool {
        match *self {
            Self::None => true,
            Self::All => {
                buf.clear();
                false
            }
            Self::Bytes(n) => {
                let now = n.min(buf.len() as u64);
                buf.advance(now as usize);
                if now == n {
                    *self = Self::None;
                    true
                } else {
                    *self = Self::Bytes(n - now);
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_too_large_is_dropped_as_it_arrives_and_decoding_resumes_behind_it() {
        let mut skip = InputSkip::after(&CodecError::FrameTooLarge { size: 10, max: 8 });
        let mut buf = BytesMut::from(&b"0123"[..]);
        assert!(!skip.drop_from(&mut buf));
        assert!(buf.is_empty());
        assert_eq!(skip, InputSkip::Bytes(6));
        buf.extend_from_slice(b"456789next");
        assert!(skip.drop_from(&mut buf));
        assert_eq!(&buf[..], b"next");
        assert_eq!(skip, InputSkip::None);
        assert!(skip.drop_from(&mut buf));
        assert_eq!(&buf[..], b"next", "nothing more is dropped");
    }

    #[test]
    fn a_lost_framing_drops_everything() {
        let mut skip = InputSkip::after(&CodecError::FrameEnd(0));
        for chunk in [&b"abc"[..], b"\x01\x00\x00"] {
            let mut buf = BytesMut::from(chunk);
            assert!(!skip.drop_from(&mut buf));
            assert!(buf.is_empty());
        }
        assert_eq!(InputSkip::after(&CodecError::FrameType(9)), InputSkip::All);
    }
}
