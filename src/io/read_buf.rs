//! Room for the next read from a socket; and reading the rest of what a peer sends before its
//! socket is closed.
//!
//! Frames are cut out of the read buffer without copying (`split_to`), so a buffer's
//! allocation stays referenced while any frame of it is (a publish held until its cluster
//! confirms it, a content waiting for its turn). Reads therefore move on through an
//! allocation, and a new one starts when too little is left. But most of the time every frame
//! of the last read has been handed on and dropped by the next one: then the next read goes to
//! the start of the allocation again, onto cache lines still hot from the last, instead of onto
//! cold ones further on (what a plain relay gets from its one small buffer).

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Makes room for the next read into `buf`: back at the start of its allocation when it is
/// empty and nothing else refers to it; a new allocation of `chunk` bytes when less than `min`
/// is left.
pub fn make_room(buf: &mut BytesMut, min: usize, chunk: usize) {
    if buf.is_empty() {
        // Asking for more than is left after the read position moves the position back to
        // the start when the allocation is not shared; never allocates.
        let _ = buf.try_reclaim(buf.capacity() + 1);
    }
    if buf.capacity() - buf.len() < min {
        buf.reserve(chunk);
    }
}

/// Reads and drops what a peer still sends until it hangs up or `limit` passes. Closing a
/// socket with input unread makes the kernel reset it, and a peer still writing would then
/// see the reset instead of the last thing it was told (a close-ok, a refusal).
pub async fn drain(read: &mut (impl AsyncRead + Unpin), limit: std::time::Duration) {
    let _ = tokio::time::timeout(limit, async {
        let mut scratch = [0u8; 8192];
        while let Ok(n) = read.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_buffer_no_one_refers_to_is_read_into_from_its_start_again() {
        let mut buf = BytesMut::with_capacity(1024);
        let start = buf.as_ptr();
        buf.extend_from_slice(&[1; 100]);
        let frame = buf.split_to(100);
        drop(frame);
        assert_ne!(buf.as_ptr(), start, "split_to moved the read position on");
        make_room(&mut buf, 64, 1024);
        assert_eq!(
            buf.as_ptr(),
            start,
            "back at the start of the same allocation"
        );
        assert!(buf.capacity() >= 1024);
    }

    #[test]
    fn a_buffer_whose_frames_are_held_goes_on_after_them() {
        let mut buf = BytesMut::with_capacity(1024);
        buf.extend_from_slice(&[1; 100]);
        let held = buf.split_to(100).freeze();
        let after = buf.as_ptr();
        make_room(&mut buf, 64, 1024);
        assert_eq!(
            buf.as_ptr(),
            after,
            "the held frame's bytes are not written over"
        );
        assert_eq!(&held[..], &[1; 100][..]);
    }

    #[test]
    fn too_little_left_starts_a_new_allocation() {
        let mut buf = BytesMut::with_capacity(128);
        buf.extend_from_slice(&[1; 100]);
        let held = buf.split_to(100).freeze();
        make_room(&mut buf, 64, 1024);
        assert!(buf.capacity() >= 1024);
        assert_eq!(held.len(), 100);
    }
}
