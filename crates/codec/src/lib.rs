//! AMQP 0-9-1 wire codec: frames, method arguments, field tables and content headers.
//!
//! # Why hand-written
//!
//! The proxy sits on the hot path of every message, so the codec is written for it rather than
//! borrowed from a client library:
//!
//! * **Zero-copy on [`bytes`].** A frame is split off the read buffer with
//!   `BytesMut::split_to` + `freeze`; every string, table key, long string and byte array decoded
//!   from it is a [`bytes::Bytes`] slice of that frame (a reference-count bump, never a copy).
//! * **No allocation for the common case.** Decoding `basic.publish`, `basic.deliver`,
//!   `basic.ack`, `basic.nack` and `basic.reject` allocates nothing; field tables only allocate
//!   when they are non-empty. Content headers can be inspected with [`peek_content_header`]
//!   and forwarded untouched with [`write_header_raw`], without decoding the properties at all.
//! * **Direct encoding.** [`write_method`] and [`write_header`] encode straight into the output
//!   buffer and patch the frame size afterwards, with no intermediate buffer.
//! * **Hostile input.** The decoder never panics, never indexes out of bounds and never allocates
//!   based on a length read from the wire before that many bytes are known to be present.
//!   Field-table nesting is bounded ([`table::MAX_NESTING`]).
//!
//! Client libraries (amq-protocol, amqprs) own their strings (`String`/`Vec<u8>`), drop the
//! reserved fields and sort tables, which makes them unsuitable for a proxy that must forward
//! what it receives faithfully; amq-protocol is still used as an independent oracle in the
//! round-trip tests (`tests/codec_roundtrip.rs`).

pub mod frame;
pub mod method;
pub mod peek;
pub mod properties;
pub mod reply_code;
pub mod table;
pub mod wire;

pub use frame::*;
pub use method::*;
pub use properties::{BasicProperties, ContentHeader};
pub use reply_code::ReplyCode;
pub use table::{FieldTable, FieldValue};
pub use wire::{LongStr, ShortStr, ShortStrTooLong};

/// The protocol header a client sends first: "AMQP", 0, 0, 9, 1.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes a frame adds around its payload: 7-byte header (type, channel, size) + frame-end.
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may negotiate (spec: frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// A decoding error. [`CodecError::reply_code`] gives the AMQP reply code to close the
/// connection with.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CodecError {
    /// The frame type octet is not 1, 2, 3 or 8.
    #[error("unknown frame type {0}")]
    FrameType(u8),
    /// The frame (payload + 8) is larger than the negotiated frame_max.
    #[error("frame of {size} bytes exceeds frame_max {max}")]
    FrameTooLarge { size: usize, max: usize },
    /// The octet after the payload is not 0xCE.
    #[error("bad frame end octet {0:#04x}")]
    FrameEnd(u8),
    /// A method frame names a class/method pair this codec does not know.
    #[error("unknown method {class_id}.{method_id}")]
    UnknownMethod { class_id: u16, method_id: u16 },
    /// A payload is truncated, has trailing bytes, or holds an illegal value.
    #[error("malformed {what}")]
    Syntax { what: &'static str },
}

impl CodecError {
    /// The AMQP 0-9-1 reply code (all of them hard errors: the connection must be closed).
    ///
    /// * Frame errors (type, size, frame-end) are 501 FRAME_ERROR, as in the spec and in
    ///   RabbitMQ (`rabbit_reader` answers `frame_error` for these).
    /// * [`CodecError::Syntax`] (arguments cut short or overrunning the frame, trailing bytes, a
    ///   field value of unknown type, tables nested too deep) is 501 FRAME_ERROR too: the
    ///   spec's code for "a malformed frame that the recipient could not decode", and RabbitMQ's
    ///   (its generated `decode_method_fields/2` falls back to `rabbit_misc:frame_error/2`,
    ///   "cannot decode ...").
    /// * [`CodecError::UnknownMethod`] is 503 COMMAND_INVALID. RabbitMQ has no reply code for
    ///   it: `rabbit_framing_amqp_0_9_1:lookup_method_name/1` calls
    ///   `exit({unknown_method_id, Id})`, which is not an `#amqp_error{}`, is not caught by
    ///   `rabbit_reader`, and so kills the connection process (the socket is closed without a
    ///   `connection.close`). 503 is the spec's closest code.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            CodecError::FrameType(_)
            | CodecError::FrameTooLarge { .. }
            | CodecError::FrameEnd(_)
            | CodecError::Syntax { .. } => ReplyCode::FrameError,
            CodecError::UnknownMethod { .. } => ReplyCode::CommandInvalid,
        }
    }
}

pub(crate) const fn syntax(what: &'static str) -> CodecError {
    CodecError::Syntax { what }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes() {
        assert_eq!(CodecError::FrameType(9).reply_code().code(), 501);
        assert_eq!(CodecError::FrameEnd(0).reply_code().code(), 501);
        assert_eq!(
            CodecError::FrameTooLarge { size: 9, max: 8 }
                .reply_code()
                .code(),
            501
        );
        assert_eq!(syntax("x").reply_code().code(), 501);
        assert_eq!(
            CodecError::UnknownMethod {
                class_id: 30,
                method_id: 10
            }
            .reply_code()
            .code(),
            503
        );
        assert_eq!(
            CodecError::FrameEnd(0x12).to_string(),
            "bad frame end octet 0x12"
        );
    }
}
