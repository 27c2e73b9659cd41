//! A TCP socket's receive low-water mark (`SO_RCVLOWAT`): how many bytes must be waiting before
//! the kernel reports the socket readable and wakes whoever waits on it.
//!
//! Why warren sets it: a link that only carries the broker's confirms of held publishes (see
//! `client::session::read_pace`) would otherwise wake its session for every 21-byte basic.ack,
//! about one wake-up, `epoll_wait` and `recvfrom` per message published. With the mark raised the
//! acks wait in the kernel until the session reads them all with one direct read. Linux also
//! reports end of stream, errors and hang-ups whatever the mark, so a dead link is still seen at
//! once, and lowering the mark signals the data already waiting.
//!
//! Neither the standard library nor socket2 sets this option, so this is one of warren's two
//! places with `unsafe` (the other is `memory.rs`): `setsockopt` with an `int` on the stack.

use std::io;

/// Sets the receive low-water mark of the TCP socket `sock` to `bytes` (at least 1). Returns
/// `Ok(false)` where the option is not used (systems other than Linux, whose wake-up rules
/// differ).
#[cfg(target_os = "linux")]
pub fn set(sock: &impl std::os::fd::AsFd, bytes: u32) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is borrowed from a live socket for the length of the call, and the
    // option value is an `int` on this stack frame whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn set(_sock: &impl std::os::fd::AsFd, _bytes: u32) -> io::Result<bool> {
    Ok(false)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;

    /// The kernel behaviour warren relies on: below the mark a read does not become ready; a
    /// lowered mark makes the waiting bytes readable; end of stream is seen whatever the mark.
    /// (Linux also wakes a reader below the mark once its receive window is down to one
    /// segment, to avoid a deadlock: loopback's segments are 64 KiB, so the receiving socket
    /// gets a buffer of 1 MiB here.)
    #[tokio::test]
    async fn bytes_below_the_mark_wait_until_it_is_lowered() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1 << 20).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut writer = std::net::TcpStream::connect(addr).unwrap();
        let (mut reader, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        writer.write_all(&[1; 64]).unwrap();
        reader.read_exact(&mut buf).await.unwrap();
        // A read that finds nothing clears tokio's readiness (the next read waits for epoll).
        let drained = reader.try_read(&mut buf).unwrap_err();
        assert_eq!(drained.kind(), std::io::ErrorKind::WouldBlock);
        assert!(super::set(&reader, 4096).unwrap());
        writer.write_all(&[1; 21]).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(100), reader.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "21 bytes under a 4096-byte mark must not wake the reader"
        );
        assert!(super::set(&reader, 1).unwrap());
        let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buf))
            .await
            .expect("lowering the mark signals the bytes waiting")
            .unwrap();
        assert_eq!(n, 21);
        assert!(super::set(&reader, 4096).unwrap());
        drop(writer);
        let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buf))
            .await
            .expect("end of stream is reported under a raised mark")
            .unwrap();
        assert_eq!(n, 0);
    }
}
