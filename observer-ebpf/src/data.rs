//! Data: the eight send/receive system calls on watched connections become `DataEvent`s, at
//! their exit only.
//!
//! The caller is marked (checked by `sys_exit`) and the call moved bytes; its fd (the first
//! saved argument) is looked up in `CONNS` and checked to still refer to the connection's
//! socket ([`crate::fds`]). The record is built in a per-CPU scratch area — the header, the
//! first `HEAD_BYTES` of what moved, then its last `TAIL_BYTES` — and copied into the ring
//! buffer at its exact size.
//!
//! For iovec calls (`readv`, `writev`, `recvmsg`, `sendmsg`) the head is gathered across up to
//! [`MAX_IOV`] segments; the tail comes from the last segment that holds data (so it can be
//! shorter than `TAIL_BYTES` when that segment is short).

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
    BPF_RB_NO_WAKEUP, CONNS, EVENTS, HEAD_BYTES, Regs, TAIL_BYTES, comm, count,
    fds::{file_of, forget, same_file},
    wakeup_flags,
};

/// Bounds every copy's size for the verifier (a power of two above HEAD_MAX and TAIL_MAX).
const COPY_MASK: u64 = 2 * HEAD_MAX as u64 - 1;

/// Most iovec segments walked per syscall.
const MAX_IOV: u64 = 8;
/// Offset of `msg_iov` (then `msg_iovlen`) in the user ABI's `struct user_msghdr`.
const MSGHDR_IOV: u64 = 16;
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
}

/// How often a CPU asks how full the ring is: the reader is woken at most this many of the
/// CPU's records late (out of the thousands an eighth of the ring holds).
const WAKEUP_EVERY: u64 = 16;

const _: () = assert!(HEAD_MAX + TAIL_MAX <= 2 * HEAD_MAX);

/// Exit of a data call that moved `len` bytes, by a marked process.
pub fn exit_data(regs: &Regs, call: u32, len: u64, pid_tgid: u64, tgid: u32) -> Option<()> {
    let fd = regs.fd()?;
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
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch value, exclusively ours while the program runs.
    let (event, payload) = unsafe { (&raw mut (*scratch).event, (*scratch).payload.as_mut_ptr()) };
    let arg1 = regs.arg1()?;
    let complete = match call {
        syscall::READV | syscall::WRITEV => {
            let iovcnt = regs.arg2()?;
            unsafe { capture_iovec(event, payload, arg1, iovcnt, len) }
        }
        syscall::RECVMSG | syscall::SENDMSG => {
            if arg1 == 0 {
                return None;
            }
            match unsafe { bpf_probe_read_user((arg1 + MSGHDR_IOV) as *const [u64; 2]) } {
                Ok([iov, iovcnt]) => unsafe {
                    capture_iovec(event, payload, iov, iovcnt.max(1), len)
                },
                Err(_) => {
                    count(counter::READ_USER_FAILED);
                    return None;
                }
            }
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
        return None;
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
    Some(())
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

/// Head gathered across the first segments of an iovec array, tail from the last segment
/// that holds data, into `payload`. False when a user read failed (that part is empty).
unsafe fn capture_iovec(
    event: *mut DataEvent,
    payload: *mut u8,
    iov: u64,
    iovcnt: u64,
    len: u64,
) -> bool {
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
            ok &= unsafe { read_user_into(payload.add(offset as usize), base, take, HEAD_MAX) };
            head_len += take;
        }
        last_base = base;
        last_len = seg;
        seen += seg;
    }
    let head_len = if ok {
        let head_len = unsafe { core::ptr::read_volatile(&head_len) };
        if head_len > HEAD_MAX as u64 {
            HEAD_MAX as u64
        } else {
            head_len
        }
    } else {
        0
    };
    unsafe { (*event).head_len = head_len as u32 };
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
    let tail_ok = match bounded_head(head_len) {
        Some(offset) => unsafe {
            read_user_into(
                payload.add(offset as usize),
                last_base + last_len - tail_len,
                tail_len,
                TAIL_MAX,
            )
        },
        None => false,
    };
    unsafe { (*event).tail_len = if tail_ok { tail_len as u32 } else { 0 } };
    ok && tail_ok
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
