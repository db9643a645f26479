//! One send or receive through a chosen system call, so that tests drive each syscall the
//! capture hooks: `write`/`read`, `sendto`/`recvfrom` (Rust's std), `writev`/`readv` and
//! `sendmsg`/`recvmsg` (two iovec segments), and `writev`/`readv` over twelve segments, the last
//! ones a few bytes long (as Node writes an HTTP chunk: size line, data, CRLF).

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
    /// `writev(2)` / `readv(2)` with twelve segments, the last three of 100, 5 and 2 bytes.
    Vectored,
    /// `sendmsg(2)` / `recvmsg(2)` with two segments.
    Msg,
}

impl Api {
    pub const ALL: [Api; 4] = [Api::ReadWrite, Api::Std, Api::Vectored, Api::Msg];
}

/// `len` bytes cut into the segments [`Api::Vectored`] uses: nine even ones, then 100, 5 and
/// 2 bytes (fewer, even, for a short buffer). Sizes only; they add up to `len`.
fn scattered(len: usize) -> Vec<usize> {
    const LAST: [usize; 3] = [100, 5, 2];
    let small: usize = LAST.iter().sum();
    if len < small + 9 {
        return vec![len / 2, len - len / 2];
    }
    let rest = len - small;
    let mut sizes: Vec<usize> = (0..9)
        .map(|i| rest / 9 + usize::from(i < rest % 9))
        .collect();
    sizes.extend(LAST);
    sizes
}

/// Iovecs over `base` with the given segment sizes.
fn iovecs(base: *mut u8, sizes: &[usize]) -> Vec<libc::iovec> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            // SAFETY: the sizes add up to the buffer's length, so every segment is inside it.
            let iov = libc::iovec {
                iov_base: unsafe { base.add(at) }.cast(),
                iov_len: n,
            };
            at += n;
            iov
        })
        .collect()
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
        Api::Vectored => {
            let many = iovecs(buf.as_ptr().cast_mut(), &scattered(buf.len()));
            unsafe { libc::writev(fd, many.as_ptr(), many.len() as i32) }
        }
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
        Api::Vectored => {
            let many = iovecs(buf.as_mut_ptr(), &scattered(buf.len()));
            unsafe { libc::readv(fd, many.as_ptr(), many.len() as i32) }
        }
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
