//! Data: the eight send/receive system calls on watched connections become `DataEvent`s, at
//! their exit only.
//!
//! The caller is marked (checked by `sys_exit`) and the call moved bytes; its fd (the first
//! saved argument) is looked up in `CONNS` and checked to still refer to the connection's
//! socket ([`crate::fds`]). The record is built in a per-CPU scratch area — the header, the
//! first `HEAD_BYTES` of what moved, then its last `TAIL_BYTES` — and copied into the ring
//! buffer at its exact size.
//!
//! For iovec calls (`readv`, `writev`, `recvmsg`, `sendmsg`) the head is gathered across the
//! first [`HEAD_IOV`] segments and the tail across the last [`TAIL_IOV`] that hold data, found
//! by walking up to [`MAX_IOV`] segments (Node writes an HTTP chunk as size line, data and CRLF,
//! three segments, and several chunks in one `writev`). A tail that would reach back past
//! those four segments is cut there; a call with more segments than [`MAX_IOV`] has no tail.

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::map,
    maps::PerCpuArray,
};
use observer_common::{
    DataEvent, HEAD_MAX, PAYLOAD_MAX, SockKey, TAIL_MAX, counter, kind, syscall,
};

use crate::{
    BPF_RB_NO_WAKEUP, CONNS, EVENTS, Fail, Failed, HEAD_BYTES, NotOurs, Outcome, Regs, TAIL_BYTES,
    comm, count,
    fds::{file_of, forget, same_file},
    wakeup_flags,
};

/// Bounds every copy's size for the verifier (a power of two above HEAD_MAX and TAIL_MAX).
const COPY_MASK: u64 = 2 * HEAD_MAX as u64 - 1;

/// Iovec segments whose bytes may go into the head.
const HEAD_IOV: u64 = 16;
/// Most iovec segments walked per syscall (past [`HEAD_IOV`], their lengths only).
const MAX_IOV: u64 = 32;
/// Segments the tail may be gathered from: the last ones that hold data.
const TAIL_IOV: usize = 4;
/// A user `struct user_msghdr` (uapi `linux/socket.h`), up to its iovec array and the
/// array's length, which are read together.
#[repr(C)]
struct UserMsghdr {
    msg_name: u64,
    msg_namelen: i32,
    msg_iov: u64,
    msg_iovlen: u64,
}

/// A user `struct iovec` (uapi `linux/uio.h`).
#[repr(C)]
struct Iovec {
    iov_base: u64,
    iov_len: u64,
}

const _: () = assert!(core::mem::offset_of!(UserMsghdr, msg_iov) == 16);
const _: () = assert!(
    core::mem::offset_of!(UserMsghdr, msg_iovlen) == core::mem::offset_of!(UserMsghdr, msg_iov) + 8
);
const _: () = assert!(core::mem::size_of::<Iovec>() == 16);
const HEADER: usize = core::mem::size_of::<DataEvent>();

/// Where a record is built: its header, then room for the payload. The head is assembled at
/// offsets the verifier bounds one by one (a bounded offset plus a bounded length), hence twice
/// the head; the tail follows the head.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    event: DataEvent,
    payload: [u8; 2 * HEAD_MAX],
    /// Records this CPU has output: the ring's fill is queried (for the reader's wake-up) on
    /// every [`WAKEUP_EVERY`]th only.
    outputs: u64,
    /// An iovec call's walk: the last segments holding data, how far it got, the head taken.
    /// Kept here, not on the stack, so that the verifier reads them back as plain numbers and
    /// checks the tail's copies once, not once per way through the walk.
    walk: Walk,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Walk {
    last: [Held; TAIL_IOV],
    seen: u64,
    head_len: u64,
    ok: u64,
    /// The call's bytes moved, its iovec array and count, for the lengths-only walk.
    len: u64,
    iov: u64,
    iovcnt: u64,
    /// The head's length wanted, for [`head_segment`]; where the tail starts among the moved
    /// bytes, for [`tail_piece`].
    head_want: u64,
    tail_at: u64,
}

/// How often a CPU asks how full the ring is: the reader is woken at most this many of the
/// CPU's records late (out of the thousands an eighth of the ring holds).
const WAKEUP_EVERY: u64 = 16;

const _: () = assert!(HEAD_MAX + TAIL_MAX <= 2 * HEAD_MAX);

/// Exit of a data call that moved `len` bytes, by a marked process.
#[inline(never)]
pub fn exit_data(regs: &Regs, call: u32, len: u64, pid_tgid: u64, tgid: u32) -> Outcome {
    let fd = regs.fd()?;
    let key = SockKey { tgid, fd };
    let entry = CONNS.get_ptr_mut(key).ok_or(NotOurs)?;
    let conn = unsafe { *entry };
    // The fd must still refer to the connection's socket: an entry left stale by a close this
    // side did not see is forgotten here, and the fd's bytes are not the connection's.
    let file = file_of(fd);
    if !same_file(conn.file, file) {
        forget(key, &conn, pid_tgid);
        return Err(NotOurs);
    }
    if conn.file == 0
        && let Some(file) = file
    {
        unsafe { (*entry).file = file };
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))?;
    // SAFETY: this CPU's scratch value, exclusively ours while the program runs.
    let (event, payload) = unsafe { (&raw mut (*scratch).event, (*scratch).payload.as_mut_ptr()) };
    let arg1 = regs.arg1()?;
    let complete = match call {
        syscall::READV | syscall::WRITEV => {
            let iovcnt = regs.arg2()?;
            unsafe { capture_iovec(scratch, arg1, iovcnt, len) }
        }
        syscall::RECVMSG | syscall::SENDMSG => {
            if arg1 == 0 {
                return Err(NotOurs);
            }
            let iov_at = arg1 + core::mem::offset_of!(UserMsghdr, msg_iov) as u64;
            let [iov, iovcnt] = unsafe { bpf_probe_read_user(iov_at as *const [u64; 2]) }
                .map_err(|_| Failed(Fail::ReadUser))?;
            unsafe { capture_iovec(scratch, iov, iovcnt.max(1), len) }
        }
        _ => unsafe { capture_plain(event, payload, arg1, len) },
    };
    if !complete {
        count(counter::READ_USER_FAILED);
    }
    // SAFETY: as above.
    let captured = unsafe {
        (*event).kind = kind::DATA;
        (*event).direction = syscall::direction(call);
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).conn_id = conn.conn_id;
        (*event).tgid = tgid;
        (*event).pid = pid_tgid as u32;
        (*event).role = conn.role;
        (*event).side = conn.side;
        (*event).fd = fd;
        (*event).port = conn.port;
        (*event).len = len;
        (*event).comm = comm();
        (*event).head_len as u64 + (*event).tail_len as u64
    };
    // Bounded again where the verifier sees it: the record is the header and what was captured.
    let captured = unsafe { core::ptr::read_volatile(&captured) };
    if captured > PAYLOAD_MAX as u64 {
        // Never: the head and the tail were bounded when captured.
        return Err(NotOurs);
    }
    let size = HEADER as u64 + captured;
    let record = unsafe { core::slice::from_raw_parts(scratch.cast::<u8>(), size as usize) };
    // SAFETY: as above.
    let outputs = unsafe {
        (*scratch).outputs = (*scratch).outputs.wrapping_add(1);
        (*scratch).outputs
    };
    let flags = if outputs % WAKEUP_EVERY == 0 {
        wakeup_flags()
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<[u8]>(record, flags).is_err() {
        count(counter::LOST_DATA);
        // The connection's exchanges lost bytes: userspace puts it back in step when it sees
        // the count change (it never writes the entry: its key may name another socket by
        // then).
        if let Some(conn) = CONNS.get_ptr_mut(key) {
            unsafe { (*conn).lost = (*conn).lost.wrapping_add(1) };
        }
    }
    Ok(())
}

/// Head and tail of one contiguous buffer, into `payload`. False when a user read failed
/// (that part is empty).
unsafe fn capture_plain(event: *mut DataEvent, payload: *mut u8, buf: u64, len: u64) -> bool {
    unsafe {
        let head_len = capture_len(len, core::ptr::read_volatile(&HEAD_BYTES), HEAD_MAX);
        let head_ok = read_user_into(payload, buf, head_len, HEAD_MAX);
        let head_len = if head_ok { head_len } else { 0 };
        (*event).head_len = head_len as u32;
        // The tail covers what the head did not, up to TAIL_BYTES.
        let tail_len = capture_len(
            len - head_len,
            core::ptr::read_volatile(&TAIL_BYTES),
            TAIL_MAX,
        );
        let tail_ok = match bounded_head(head_len) {
            Some(offset) => read_user_into(
                payload.add(offset as usize),
                buf + len - tail_len,
                tail_len,
                TAIL_MAX,
            ),
            None => false,
        };
        (*event).tail_len = if tail_ok { tail_len as u32 } else { 0 };
        head_ok && tail_ok
    }
}

/// A segment of an iovec array that holds moved bytes: its address, how many of the moved
/// bytes it holds, and the offset of its first one among them.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Held {
    base: u64,
    len: u64,
    at: u64,
}

/// Remembers the segment at `base` holding `len` of the moved bytes, the first of them at
/// offset `at`, as the newest of the last [`TAIL_IOV`] segments holding data: a shift, with
/// constant indexes only.
#[inline(always)]
unsafe fn remember(walk: *mut Walk, base: u64, len: u64, at: u64) {
    unsafe {
        (*walk).last[0] = (*walk).last[1];
        (*walk).last[1] = (*walk).last[2];
        (*walk).last[2] = (*walk).last[3];
        (*walk).last[3] = Held { base, len, at };
    }
}

/// Head gathered across the first [`HEAD_IOV`] segments of an iovec array, tail gathered
/// across the last [`TAIL_IOV`] segments that hold data (found by walking up to [`MAX_IOV`]
/// segments' lengths), into `payload`. False when a user read failed (that part is empty).
///
/// Not inlined: its many ways through join at its return, so the verifier follows the rest of
/// the record once (it would otherwise follow it once per way through the walk).
#[inline(never)]
unsafe fn capture_iovec(scratch: *mut Scratch, iov: u64, iovcnt: u64, len: u64) -> bool {
    // SAFETY: this CPU's scratch value, exclusively ours while the program runs.
    let (event, walk) = unsafe { (&raw mut (*scratch).event, &raw mut (*scratch).walk) };
    // Three steps that are not inlined: each one's ways through join at its return, and the
    // verifier follows the next step once (inlined, it followed every combination).
    unsafe {
        (*walk).len = len;
        (*walk).iov = iov;
        (*walk).iovcnt = iovcnt;
        walk_head(scratch);
        walk_lengths(scratch);
    }
    // Read back from memory the verifier does not follow: one check of what comes next.
    let (seen, head_len, ok) = unsafe {
        (
            core::ptr::read_volatile(&(*walk).seen),
            core::ptr::read_volatile(&(*walk).head_len),
            core::ptr::read_volatile(&(*walk).ok) != 0,
        )
    };
    let head_len = if ok {
        if head_len > HEAD_MAX as u64 {
            HEAD_MAX as u64
        } else {
            head_len
        }
    } else {
        0
    };
    unsafe { (*event).head_len = head_len as u32 };
    // The tail is known only when every moved byte was in the segments walked, and reaches
    // back no further than the oldest segment remembered.
    if !ok || seen != len || len < head_len {
        unsafe { (*event).tail_len = 0 };
        return ok;
    }
    let mut tail_len = capture_len(
        len - head_len,
        unsafe { core::ptr::read_volatile(&TAIL_BYTES) },
        TAIL_MAX,
    );
    let last = unsafe { (*walk).last };
    let mut oldest = len;
    for held in last {
        if held.len > 0 && held.at < oldest {
            oldest = held.at;
        }
    }
    if len - tail_len < oldest {
        tail_len = len - oldest;
    }
    // Each remembered segment's share of the tail is copied by a call that reads its inputs
    // from memory: the verifier checks each piece once, whatever came before it.
    unsafe {
        (*walk).tail_at = len - tail_len;
        (*walk).head_len = head_len;
    }
    let mut tail_ok = 1;
    for k in 0..TAIL_IOV as u64 {
        tail_ok &= unsafe { tail_piece(scratch, k) };
    }
    unsafe { (*event).tail_len = if tail_ok != 0 { tail_len as u32 } else { 0 } };
    tail_ok != 0
}

/// The part of the tail that remembered segment `k` holds, copied to its place after the
/// head; 0 when a read failed. Inputs (`len`, `head_len`, `tail_at`, the segment) are read
/// from the walk.
#[inline(never)]
unsafe fn tail_piece(scratch: *mut Scratch, k: u64) -> u64 {
    let (payload, walk) = unsafe { ((*scratch).payload.as_mut_ptr(), &raw mut (*scratch).walk) };
    let (held, len, head_len, tail_at) = unsafe {
        (
            core::ptr::read_volatile(&(*walk).last[(k as usize) & (TAIL_IOV - 1)]),
            core::ptr::read_volatile(&(*walk).len),
            core::ptr::read_volatile(&(*walk).head_len),
            core::ptr::read_volatile(&(*walk).tail_at),
        )
    };
    let end = held.at + held.len;
    if held.len == 0 || end <= tail_at || end > len || tail_at > len {
        return 1;
    }
    let from = if held.at > tail_at { held.at } else { tail_at };
    let Some(offset) = bounded_tail(head_len + (from - tail_at)) else {
        return 0;
    };
    u64::from(unsafe {
        read_user_into(
            payload.add(offset as usize),
            held.base + (from - held.at),
            end - from,
            TAIL_MAX,
        )
    })
}

/// The first [`HEAD_IOV`] segments of the walk of [`capture_iovec`] (its call's `len`, `iov`
/// and `iovcnt` in `walk`): the head copied into the payload, and how far the walk got.
#[inline(never)]
unsafe fn walk_head(scratch: *mut Scratch) -> u64 {
    let walk = unsafe { &raw mut (*scratch).walk };
    let len = unsafe { core::ptr::read_volatile(&(*walk).len) };
    unsafe {
        (*walk).head_want = capture_len(len, core::ptr::read_volatile(&HEAD_BYTES), HEAD_MAX);
        (*walk).last = [Held::default(); TAIL_IOV];
        (*walk).seen = 0;
        (*walk).head_len = 0;
        (*walk).ok = 1;
    }
    for i in 0..HEAD_IOV {
        if unsafe { head_segment(scratch, i) } == 0 {
            break;
        }
    }
    0
}

/// Segment `i` of the head's walk: its bytes into the head while the head is short, and
/// remembered for the tail. 0 when the walk ends here. Its state (`seen`, `head_len`, `ok`)
/// is read from and written to the walk, so the verifier checks each segment once, whatever
/// the segments before it did.
#[inline(never)]
unsafe fn head_segment(scratch: *mut Scratch, i: u64) -> u64 {
    let (payload, walk) = unsafe { ((*scratch).payload.as_mut_ptr(), &raw mut (*scratch).walk) };
    let (len, iov, iovcnt, seen, head_len, head_want) = unsafe {
        (
            core::ptr::read_volatile(&(*walk).len),
            core::ptr::read_volatile(&(*walk).iov),
            core::ptr::read_volatile(&(*walk).iovcnt),
            core::ptr::read_volatile(&(*walk).seen),
            core::ptr::read_volatile(&(*walk).head_len),
            core::ptr::read_volatile(&(*walk).head_want),
        )
    };
    if i >= iovcnt || seen >= len {
        return 0;
    }
    let Some((base, seg)) = segment(iov, i, len - seen) else {
        unsafe { (*walk).ok = 0 };
        return 0;
    };
    if seg == 0 {
        return 1;
    }
    if head_len < head_want && head_want <= HEAD_MAX as u64 {
        let take = if seg < head_want - head_len {
            seg
        } else {
            head_want - head_len
        };
        // Bounded where the verifier sees it: below HEAD_MAX, as head_len < head_want is.
        let offset = head_len & (HEAD_MAX as u64 - 1);
        if !unsafe { read_user_into(payload.add(offset as usize), base, take, HEAD_MAX) } {
            unsafe { (*walk).ok = 0 };
        }
        unsafe { (*walk).head_len = head_len + take };
    }
    unsafe {
        remember(walk, base, seg, seen);
        (*walk).seen = seen + seg;
    }
    1
}

/// Segment `i` of the iovec array at `iov`: its address and how many of the `left` bytes still
/// to be located it holds (only the first `len` bytes of the segments were moved); `None` when
/// it cannot be read.
#[inline(always)]
fn segment(iov: u64, i: u64, left: u64) -> Option<(u64, u64)> {
    let at = iov + i * core::mem::size_of::<Iovec>() as u64;
    let Iovec { iov_base, iov_len } = unsafe { bpf_probe_read_user(at as *const Iovec) }.ok()?;
    Some((iov_base, if iov_len < left { iov_len } else { left }))
}

/// Past the head's segments of the walk, only lengths are read, to find the last ones holding
/// data (a writev of many small pieces: HTTP chunk framing, WebSocket frame headers).
#[inline(never)]
unsafe fn walk_lengths(scratch: *mut Scratch) -> u64 {
    let walk = unsafe { &raw mut (*scratch).walk };
    let (ok, mut seen, len, iov, iovcnt) = unsafe {
        (
            core::ptr::read_volatile(&(*walk).ok),
            core::ptr::read_volatile(&(*walk).seen),
            core::ptr::read_volatile(&(*walk).len),
            core::ptr::read_volatile(&(*walk).iov),
            core::ptr::read_volatile(&(*walk).iovcnt),
        )
    };
    if ok == 0 {
        return 0;
    }
    for i in HEAD_IOV..MAX_IOV {
        if i >= iovcnt || seen >= len {
            break;
        }
        let Some((base, seg)) = segment(iov, i, len - seen) else {
            // The head stands; the tail is then unknown (not every byte was located).
            break;
        };
        if seg == 0 {
            continue;
        }
        unsafe { remember(walk, base, seg, seen) };
        seen += seg;
    }
    unsafe { (*walk).seen = seen };
    0
}

/// Where a piece of the tail goes (at most the head and the tail's length after the
/// payload's start), bounded for the verifier.
#[inline(always)]
fn bounded_tail(offset: u64) -> Option<u64> {
    let offset = unsafe { core::ptr::read_volatile(&offset) } & COPY_MASK;
    if offset > (HEAD_MAX + TAIL_MAX) as u64 {
        None
    } else {
        Some(offset)
    }
}

/// Where the tail goes (right after the head), bounded for the verifier.
#[inline(always)]
fn bounded_head(head_len: u64) -> Option<u64> {
    let offset = unsafe { core::ptr::read_volatile(&head_len) } & COPY_MASK;
    if offset > HEAD_MAX as u64 {
        None
    } else {
        Some(offset)
    }
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
