//! Data: the eight send/receive syscalls on watched connections become `DataEvent`s.
//!
//! Enter looks the fd up in `CONNS` — the whole cost for every other fd —, checks that the fd
//! still refers to the connection's socket ([`crate::fds`]), and remembers the buffer (or
//! iovec array) per thread; exit reads the return value (errors and `EAGAIN` are
//! not data) and copies the first `HEAD_BYTES` and last `TAIL_BYTES` of what moved.
//!
//! For iovec syscalls (`readv`, `writev`, `recvmsg`, `sendmsg`) the head is gathered across up
//! to [`MAX_IOV`] segments; the tail comes from the last segment that holds data (so it can be
//! shorter than `TAIL_BYTES` when that segment is short).

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_probe_read_kernel, bpf_probe_read_user as probe_read_user_raw},
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use observer_common::{DataEvent, HEAD_MAX, SockKey, TAIL_MAX, counter, direction, kind};

use crate::{
    ARG0, ARG1, ARG2, CONNS, EVENTS, HEAD_BYTES, RET, TAIL_BYTES, comm, count, current,
    fds::{file_of, forget, same_file},
    wakeup_flags,
};

/// Bounds every copy's size for the verifier (a power of two above HEAD_MAX and TAIL_MAX).
const COPY_MASK: u64 = 2 * HEAD_MAX as u64 - 1;

/// Most iovec segments walked per syscall.
const MAX_IOV: u64 = 8;
/// Offset of `msg_iov` (then `msg_iovlen`) in the user ABI's `struct user_msghdr`.
const MSGHDR_IOV: u64 = 16;

/// A data syscall between enter and exit, keyed by pid_tgid. LRU: an entry left by a thread
/// that died mid-syscall is safe to evict.
#[map]
static PENDING_IO: LruHashMap<u64, PendingIo> = LruHashMap::with_max_entries(16_384, 0);

/// Where iovec heads are assembled: twice the head so that a bounded offset plus a bounded
/// length always fits (the verifier checks each bound, not their sum).
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    bytes: [u8; 2 * HEAD_MAX],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PendingIo {
    conn_id: u64,
    /// The buffer, or the iovec array when `iovcnt` > 0.
    buf: u64,
    iovcnt: u64,
    role: u32,
    side: u32,
    port: u32,
    fd: u32,
    direction: u32,
    _pad: u32,
}

/// `ssize_t read(unsigned int fd, char *buf, size_t count)`
#[tracepoint]
pub fn sys_enter_read(ctx: TracePointContext) -> u32 {
    let _ = enter_plain(&ctx, direction::INGRESS);
    0
}

/// `ssize_t write(unsigned int fd, const char *buf, size_t count)`
#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    let _ = enter_plain(&ctx, direction::EGRESS);
    0
}

/// `ssize_t recvfrom(int fd, void *ubuf, size_t size, unsigned flags, struct sockaddr *addr, int *addr_len)`
#[tracepoint]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    let _ = enter_plain(&ctx, direction::INGRESS);
    0
}

/// `ssize_t sendto(int fd, void *buff, size_t len, unsigned flags, struct sockaddr *addr, int addr_len)`
#[tracepoint]
pub fn sys_enter_sendto(ctx: TracePointContext) -> u32 {
    let _ = enter_plain(&ctx, direction::EGRESS);
    0
}

/// `ssize_t readv(unsigned long fd, const struct iovec *vec, unsigned long vlen)`
#[tracepoint]
pub fn sys_enter_readv(ctx: TracePointContext) -> u32 {
    let _ = enter_iovec(&ctx, direction::INGRESS);
    0
}

/// `ssize_t writev(unsigned long fd, const struct iovec *vec, unsigned long vlen)`
#[tracepoint]
pub fn sys_enter_writev(ctx: TracePointContext) -> u32 {
    let _ = enter_iovec(&ctx, direction::EGRESS);
    0
}

/// `ssize_t recvmsg(int fd, struct user_msghdr *msg, unsigned flags)`
#[tracepoint]
pub fn sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    let _ = enter_msg(&ctx, direction::INGRESS);
    0
}

/// `ssize_t sendmsg(int fd, struct user_msghdr *msg, unsigned flags)`
#[tracepoint]
pub fn sys_enter_sendmsg(ctx: TracePointContext) -> u32 {
    let _ = enter_msg(&ctx, direction::EGRESS);
    0
}

/// Exit of every data syscall: the return value is the number of bytes moved.
#[tracepoint]
pub fn sys_exit_read(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_write(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_recvfrom(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_sendto(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_readv(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_writev(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_recvmsg(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// See [`sys_exit_read`].
#[tracepoint]
pub fn sys_exit_sendmsg(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// `(fd, buf, count)` syscalls.
fn enter_plain(ctx: &TracePointContext, direction: u32) -> Option<()> {
    remember(ctx, direction, |ctx| {
        Some((unsafe { ctx.read_at(ARG1) }.ok()?, 0))
    })
}

/// `(fd, iov, iovcnt)` syscalls.
fn enter_iovec(ctx: &TracePointContext, direction: u32) -> Option<()> {
    remember(ctx, direction, |ctx| {
        let iov: u64 = unsafe { ctx.read_at(ARG1) }.ok()?;
        let iovcnt: u64 = unsafe { ctx.read_at(ARG2) }.ok()?;
        Some((iov, iovcnt))
    })
}

/// `(fd, msghdr, flags)` syscalls: the iovec array is in the user's msghdr.
fn enter_msg(ctx: &TracePointContext, direction: u32) -> Option<()> {
    remember(ctx, direction, |ctx| {
        let msg: u64 = unsafe { ctx.read_at(ARG1) }.ok()?;
        if msg == 0 {
            return None;
        }
        match unsafe { bpf_probe_read_user((msg + MSGHDR_IOV) as *const [u64; 2]) } {
            Ok([iov, iovcnt]) => Some((iov, iovcnt.max(1))),
            Err(_) => {
                count(counter::READ_USER_FAILED);
                None
            }
        }
    })
}

/// Remembers the buffer of a syscall on a watched connection. The `CONNS` lookup is the whole
/// cost for every other fd: `buffer` (the syscall's buffer, or iovec array and count) is read
/// only after it.
#[inline(always)]
fn remember(
    ctx: &TracePointContext,
    direction: u32,
    buffer: impl FnOnce(&TracePointContext) -> Option<(u64, u64)>,
) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let fd = unsafe { ctx.read_at::<u64>(ARG0) }.ok()? as u32;
    let key = SockKey { tgid, fd };
    let entry = CONNS.get_ptr_mut(key)?;
    let conn = unsafe { *entry };
    // The fd must still refer to the connection's socket: an entry left stale by a close this
    // side did not see is forgotten here, and the fd's bytes are not the connection's.
    let file = file_of(fd);
    if !same_file(conn.file, file) {
        forget(key, &conn, pid_tgid);
        return None;
    }
    if conn.file == 0
        && let Some(file) = file
    {
        unsafe { (*entry).file = file };
    }
    let (buf, iovcnt) = buffer(ctx)?;
    let pending = PendingIo {
        conn_id: conn.conn_id,
        buf,
        iovcnt,
        role: conn.role,
        side: conn.side,
        port: conn.port,
        fd,
        direction,
        _pad: 0,
    };
    PENDING_IO.insert(pid_tgid, pending, 0).ok()
}

/// Exit of a data syscall on a watched connection: a positive return is data.
fn exit_io(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let pending = *unsafe { PENDING_IO.get(pid_tgid) }?;
    let _ = PENDING_IO.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.ok()?;
    if ret <= 0 {
        return None;
    }
    let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
        count(counter::LOST_DATA);
        // The connection's exchanges lost bytes: userspace puts it back in step when it sees
        // the count change (it never writes the entry: its key may name another socket by
        // then).
        let key = SockKey {
            tgid,
            fd: pending.fd,
        };
        if let Some(conn) = CONNS.get_ptr_mut(key) {
            unsafe { (*conn).lost = (*conn).lost.wrapping_add(1) };
        }
        return None;
    };
    let event = entry.as_mut_ptr();
    let len = ret as u64;
    // SAFETY: `event` points at a reserved, exclusively owned DataEvent-sized record.
    let complete = unsafe {
        (*event).kind = kind::DATA;
        (*event).direction = pending.direction;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).conn_id = pending.conn_id;
        (*event).tgid = tgid;
        (*event).pid = pid_tgid as u32;
        (*event).role = pending.role;
        (*event).side = pending.side;
        (*event).fd = pending.fd;
        (*event).port = pending.port;
        (*event).len = len;
        (*event).comm = comm();
        if pending.iovcnt == 0 {
            capture_plain(event, pending.buf, len)
        } else {
            capture_iovec(event, pending.buf, pending.iovcnt, len)
        }
    };
    if !complete {
        count(counter::READ_USER_FAILED);
    }
    entry.submit(wakeup_flags());
    Some(())
}

/// Head and tail of one contiguous buffer. False when a user read failed (that part is empty).
unsafe fn capture_plain(event: *mut DataEvent, buf: u64, len: u64) -> bool {
    unsafe {
        let head_len = capture_len(len, core::ptr::read_volatile(&HEAD_BYTES), HEAD_MAX);
        let head_ok = read_user_into((*event).head.as_mut_ptr(), buf, head_len, HEAD_MAX);
        (*event).head_len = if head_ok { head_len as u32 } else { 0 };
        // The tail covers what the head did not, up to TAIL_BYTES.
        let tail_len = capture_len(
            len - head_len,
            core::ptr::read_volatile(&TAIL_BYTES),
            TAIL_MAX,
        );
        let tail_ok = read_user_into(
            (*event).tail.as_mut_ptr(),
            buf + len - tail_len,
            tail_len,
            TAIL_MAX,
        );
        (*event).tail_len = if tail_ok { tail_len as u32 } else { 0 };
        head_ok && tail_ok
    }
}

/// Head gathered across the first segments of an iovec array, tail from the last segment
/// that holds data. False when a user read failed (that part is empty).
unsafe fn capture_iovec(event: *mut DataEvent, iov: u64, iovcnt: u64, len: u64) -> bool {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let scratch = unsafe { (*scratch).bytes.as_mut_ptr() };
    let head_want = capture_len(
        len,
        unsafe { core::ptr::read_volatile(&HEAD_BYTES) },
        HEAD_MAX,
    );
    let mut head_len: u64 = 0;
    let mut seen: u64 = 0;
    let (mut last_base, mut last_len) = (0u64, 0u64);
    let mut ok = true;
    for i in 0..MAX_IOV {
        if i >= iovcnt || seen >= len {
            break;
        }
        let Ok([base, seg_len]) =
            (unsafe { bpf_probe_read_user((iov + i * 16) as *const [u64; 2]) })
        else {
            ok = false;
            break;
        };
        // Only the first `len` bytes of the segments were moved.
        let seg = if seg_len < len - seen {
            seg_len
        } else {
            len - seen
        };
        if seg == 0 {
            continue;
        }
        if head_len < head_want {
            let take = if seg < head_want - head_len {
                seg
            } else {
                head_want - head_len
            };
            // Bound the offset in a way the verifier sees: masked after an opaque load.
            let offset = unsafe { core::ptr::read_volatile(&head_len) } & (HEAD_MAX as u64 - 1);
            ok &= unsafe { read_user_into(scratch.add(offset as usize), base, take, HEAD_MAX) };
            head_len += take;
        }
        last_base = base;
        last_len = seg;
        seen += seg;
    }
    let head_len = unsafe { core::ptr::read_volatile(&head_len) };
    let head_len = if head_len > HEAD_MAX as u64 {
        HEAD_MAX as u64
    } else {
        head_len
    };
    if ok && head_len > 0 {
        ok = unsafe {
            bpf_probe_read_kernel(
                (*event).head.as_mut_ptr().cast(),
                head_len as u32,
                scratch.cast(),
            )
        } == 0;
    }
    unsafe { (*event).head_len = if ok { head_len as u32 } else { 0 } };
    // The tail is known only when every moved byte was in the segments walked.
    let tail_len = if ok && seen == len {
        let rest = if len - head_len < last_len {
            len - head_len
        } else {
            last_len
        };
        capture_len(
            rest,
            unsafe { core::ptr::read_volatile(&TAIL_BYTES) },
            TAIL_MAX,
        )
    } else {
        0
    };
    let tail_ok = unsafe {
        read_user_into(
            (*event).tail.as_mut_ptr(),
            last_base + last_len - tail_len,
            tail_len,
            TAIL_MAX,
        )
    };
    unsafe { (*event).tail_len = if tail_ok { tail_len as u32 } else { 0 } };
    ok && tail_ok
}

/// Bytes to capture: what is available, no more than configured, never more than the buffer.
#[inline(always)]
fn capture_len(available: u64, configured: u32, max: usize) -> u64 {
    let want = if available < configured as u64 {
        available
    } else {
        configured as u64
    };
    if want > max as u64 { max as u64 } else { want }
}

/// Copies `len` (≤ `max`) bytes of user memory. The explicit bound is for the verifier.
#[inline(always)]
unsafe fn read_user_into(dst: *mut u8, src: u64, len: u64, max: usize) -> bool {
    if len == 0 {
        return true;
    }
    // The verifier wants a size it can prove non-negative and bounded: an opaque load keeps
    // the compiler from dropping the mask and the check, so the verifier sees both.
    let size = unsafe { core::ptr::read_volatile(&len) } & COPY_MASK;
    if size != len || size > max as u64 {
        return false;
    }
    unsafe { probe_read_user_raw(dst.cast(), size as u32, src as *const _) == 0 }
}
