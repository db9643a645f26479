//! One send or receive through a chosen system call, so that tests drive each syscall the
//! capture hooks: `write`/`read`, `sendto`/`recvfrom` (Rust's std), `writev`/`readv` and
//! `sendmsg`/`recvmsg` (two iovec segments each).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsRawFd,
};

/// Which pair of system calls moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `write(2)` / `read(2)`.
    ReadWrite,
    /// Rust's std: `sendto(2)` / `recvfrom(2)`.
    Std,
    /// `writev(2)` / `readv(2)` with two segments.
    Vectored,
    /// `sendmsg(2)` / `recvmsg(2)` with two segments.
    Msg,
}

impl Api {
    pub const ALL: [Api; 4] = [Api::ReadWrite, Api::Std, Api::Vectored, Api::Msg];

    /// Whether the tail of a capture is always the last bytes of the whole buffer (for iovec
    /// syscalls it may be shorter: it comes from the last segment only).
    pub fn exact_tail(self) -> bool {
        matches!(self, Api::ReadWrite | Api::Std)
    }
}

/// One send syscall; the bytes it moved.
pub fn send_once(stream: &mut TcpStream, api: Api, buf: &[u8]) -> usize {
    let fd = stream.as_raw_fd();
    let (first, second) = buf.split_at(buf.len() / 2);
    let iov = [
        libc::iovec {
            iov_base: first.as_ptr() as *mut _,
            iov_len: first.len(),
        },
        libc::iovec {
            iov_base: second.as_ptr() as *mut _,
            iov_len: second.len(),
        },
    ];
    // SAFETY: every pointer and length describes memory of `buf`, alive for the call.
    let n = match api {
        Api::Std => return stream.write(buf).unwrap(),
        Api::ReadWrite => unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) },
        Api::Vectored => unsafe { libc::writev(fd, iov.as_ptr(), 2) },
        Api::Msg => unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut _;
            msg.msg_iovlen = 2;
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        },
    };
    assert!(n >= 0, "{api:?} send: {}", std::io::Error::last_os_error());
    n as usize
}

/// One receive syscall into `buf`; the bytes it moved (0 at end of stream).
pub fn recv_once(stream: &mut TcpStream, api: Api, buf: &mut [u8]) -> usize {
    let fd = stream.as_raw_fd();
    let half = buf.len() / 2;
    let (first, second) = buf.split_at_mut(half);
    let iov = [
        libc::iovec {
            iov_base: first.as_mut_ptr().cast(),
            iov_len: first.len(),
        },
        libc::iovec {
            iov_base: second.as_mut_ptr().cast(),
            iov_len: second.len(),
        },
    ];
    // SAFETY: every pointer and length describes memory of `buf`, alive for the call.
    let n = match api {
        Api::Std => return stream.read(buf).unwrap(),
        Api::ReadWrite => unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) },
        Api::Vectored => unsafe { libc::readv(fd, iov.as_ptr(), 2) },
        Api::Msg => unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut _;
            msg.msg_iovlen = 2;
            libc::recvmsg(fd, &mut msg, 0)
        },
    };
    assert!(n >= 0, "{api:?} recv: {}", std::io::Error::last_os_error());
    n as usize
}

/// Sends all of `buf`, one syscall per call of [`send_once`]; the size of each.
pub fn send_all(stream: &mut TcpStream, api: Api, buf: &[u8]) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut sent = 0;
    while sent < buf.len() {
        let n = send_once(stream, api, &buf[sent..]);
        sent += n;
        sizes.push(n);
    }
    sizes
}

/// Receives exactly `len` bytes, reading at most `chunk` per syscall.
pub fn recv_exact(stream: &mut TcpStream, api: Api, len: usize, chunk: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    let mut got = 0;
    while got < len {
        let end = (got + chunk).min(len);
        let n = recv_once(stream, api, &mut out[got..end]);
        assert!(n > 0, "{api:?}: end of stream after {got} of {len} bytes");
        got += n;
    }
    out
}
