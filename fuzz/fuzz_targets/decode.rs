//! Feeds arbitrary bytes to the frame splitter and to the method / content header decoders.
//!
//! Properties checked (beyond "no panic"):
//! * a frame split off the buffer re-assembles to exactly the bytes it consumed, and the
//!   frame_max check refuses exactly the frames that are too large;
//! * whatever decodes re-encodes, decodes again to the same value, and re-encodes to the same
//!   bytes (encode ∘ decode is stable after one step);
//! * `peek_content_header` agrees with `ContentHeader::decode`, and so does `reply_to_span`;
//! * body frames written by `write_body` split and join back to the payload;
//! * every error maps to a hard-error reply code;
//! * the frames, fed to a connection's `Assembler` (with a small max message size), give
//!   commands whose bodies are exactly the size their headers declared, and errors with the
//!   spec's connection codes (501-505) or a per-channel refusal within the bound.

#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use warren::codec::{
    CodecError, ContentHeader, FRAME_OVERHEAD, FrameKind, Method, RawFrame, decode_frame,
    peek_content_header, properties, write_body, write_header, write_method,
};
use warren::io::Assembler;
use warren::io::command::AssembleError;

fn check_error(e: &CodecError) {
    assert!(matches!(e.reply_code().code(), 501..=503), "{e:?}");
}

/// Splits exactly one frame out of `bytes`, which must hold exactly one frame.
fn one_frame(bytes: BytesMut) -> RawFrame {
    let mut buf = bytes;
    let f = decode_frame(&mut buf, 0)
        .expect("re-encoded frame")
        .expect("complete");
    assert!(buf.is_empty(), "re-encoded frame left bytes behind");
    f
}

fn check_method(channel: u16, payload: &bytes::Bytes) {
    let m1 = match Method::decode(payload.clone()) {
        Ok(m) => m,
        Err(e) => return check_error(&e),
    };
    let (class_id, method_id) = m1.ids();
    assert_eq!(
        &payload[..4],
        &[
            (class_id >> 8) as u8,
            class_id as u8,
            (method_id >> 8) as u8,
            method_id as u8
        ]
    );
    assert!(!m1.name().is_empty());

    let mut b1 = BytesMut::new();
    write_method(&mut b1, channel, &m1);
    let f1 = one_frame(b1.clone());
    assert_eq!((f1.kind, f1.channel), (FrameKind::Method, channel));
    let m2 = Method::decode(f1.payload).expect("re-encoded method decodes");
    // Debug, not ==: floats in tables may be NaN. The byte comparison below is exact.
    assert_eq!(format!("{m1:?}"), format!("{m2:?}"));
    let mut b2 = BytesMut::new();
    write_method(&mut b2, channel, &m2);
    assert_eq!(b1, b2, "encoding is not stable");
    assert!(
        b1.len() <= payload.len() + FRAME_OVERHEAD,
        "re-encoding grew the payload"
    );
}

fn check_header(channel: u16, payload: &bytes::Bytes) {
    let peeked = peek_content_header(payload);
    // Read on every delivery, decoded or not: never past the end.
    let span = properties::reply_to_span(payload);
    if let Some(s) = &span {
        assert!(s.start <= s.end && s.end <= payload.len(), "{s:?}");
    }
    let h1 = match ContentHeader::decode(payload.clone()) {
        Ok(h) => h,
        Err(e) => return check_error(&e),
    };
    assert_eq!(peeked, Ok((h1.class_id, h1.body_size)));
    // ...and on a header that decodes, it finds exactly the decoded reply-to, and replacing it
    // changes nothing else.
    match (&h1.properties.reply_to, span) {
        (Some(r), Some(s)) => {
            assert_eq!(&payload[s.clone()], r.as_bytes());
            let replaced = properties::replace_short_str(payload, s, b"x").expect("short");
            let mut expected = h1.clone();
            expected.properties.reply_to = Some("x".try_into().expect("short str"));
            let got = ContentHeader::decode(replaced).expect("replaced header decodes");
            assert_eq!(format!("{got:?}"), format!("{expected:?}"));
        }
        (None, None) => {}
        (r, s) => panic!("reply_to {r:?} but span {s:?}"),
    }

    let mut b1 = BytesMut::new();
    write_header(&mut b1, channel, &h1);
    let f1 = one_frame(b1.clone());
    assert_eq!((f1.kind, f1.channel), (FrameKind::Header, channel));
    let h2 = ContentHeader::decode(f1.payload).expect("re-encoded header decodes");
    assert_eq!(format!("{h1:?}"), format!("{h2:?}"));
    let mut b2 = BytesMut::new();
    write_header(&mut b2, channel, &h2);
    assert_eq!(b1, b2, "encoding is not stable");
}

fn check_body(channel: u16, payload: &bytes::Bytes) {
    // A small frame_max so that fuzz-sized bodies are split into several frames.
    let frame_max = 9 + usize::from(channel % 64);
    let mut out = BytesMut::new();
    write_body(&mut out, channel, payload, frame_max);
    let mut joined = Vec::with_capacity(payload.len());
    while let Some(f) = decode_frame(&mut out, frame_max).expect("body frames decode") {
        assert_eq!((f.kind, f.channel), (FrameKind::Body, channel));
        assert!(!f.payload.is_empty());
        joined.extend_from_slice(&f.payload);
    }
    assert!(out.is_empty());
    assert_eq!(joined, &payload[..]);
}

/// Feeds one frame to the assembler; false once the connection would be closed.
fn assemble(assembler: &mut Assembler, frame: RawFrame) -> bool {
    match assembler.push(frame) {
        Ok(None) => true,
        Ok(Some(cmd)) => {
            if let Some(content) = &cmd.content {
                let got: usize = content.body.chunks().iter().map(|c| c.len()).sum();
                assert_eq!(got as u64, content.body_size);
                assert!(content.body_size <= MAX_MESSAGE);
            }
            true
        }
        Err(AssembleError::Connection { code, .. }) => {
            assert!(matches!(code, 501..=505), "{code}");
            false
        }
        Err(AssembleError::TooLarge {
            size, others, max, ..
        }) => {
            assert_eq!(max, MAX_MESSAGE);
            assert!(size.saturating_add(others) > max);
            true
        }
    }
}

const MAX_MESSAGE: u64 = 1000;

fn run(data: &[u8], frame_max: usize) {
    let mut buf = BytesMut::from(data);
    let mut offset = 0;
    let mut assembler = Some(Assembler::new(MAX_MESSAGE));
    loop {
        let before = buf.len();
        match decode_frame(&mut buf, frame_max) {
            Ok(Some(frame)) => {
                let used = before - buf.len();
                assert_eq!(used, frame.payload.len() + FRAME_OVERHEAD);
                assert!(frame_max == 0 || used <= frame_max);
                // The frame re-assembles to exactly the bytes it consumed.
                let mut again = BytesMut::new();
                again.put_u8(match frame.kind {
                    FrameKind::Method => 1,
                    FrameKind::Header => 2,
                    FrameKind::Body => 3,
                    FrameKind::Heartbeat => 8,
                });
                again.put_u16(frame.channel);
                again.put_u32(frame.payload.len() as u32);
                again.put_slice(&frame.payload);
                again.put_u8(0xCE);
                assert_eq!(&again[..], &data[offset..offset + used]);
                offset += used;

                match frame.kind {
                    FrameKind::Method => check_method(frame.channel, &frame.payload),
                    FrameKind::Header => check_header(frame.channel, &frame.payload),
                    FrameKind::Body => check_body(frame.channel, &frame.payload),
                    FrameKind::Heartbeat => {}
                }
                if let Some(a) = assembler.as_mut()
                    && !assemble(a, frame)
                {
                    assembler = None;
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                break;
            }
            Err(e) => {
                check_error(&e);
                if let CodecError::FrameTooLarge { size, max } = e {
                    assert_eq!(max, frame_max);
                    assert!(size > max);
                }
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, 0);
    run(data, 4096);
    // The decoders on their own, on the raw input (no frame around it).
    let raw = bytes::Bytes::copy_from_slice(data);
    check_method(1, &raw);
    check_header(1, &raw);
});
