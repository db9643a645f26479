//! Kernel programs: syscall tracepoints that see the bytes crossing watched TCP ports.
//!
//! No kprobes, no fentry, no kernel struct offsets: only the stable tracepoint formats of
//! `syscalls:sys_enter_*`/`sys_exit_*` (arguments at 16 + 8·i, the return value at 16). A
//! connection becomes watched when a process connects to a watched port (port read from the
//! caller's sockaddr); userspace adds more (accepted and pre-existing sockets) to `CONNS`.
//! Every other socket, and every non-socket fd, costs one `CONNS` lookup and nothing more.
//!
//! Conditions are counted in `COUNTERS`, never dropped in silence; logging (`aya-log`) is for
//! rare conditions only, never per syscall.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use observer_common::{
    ConnEvent, ConnInfo, DataEvent, HEAD_MAX, SockKey, TAIL_MAX, counter, direction, kind, side,
};

// Sizes here are defaults; the loader overrides them from the daemon's configuration.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);
#[map]
static WATCHED_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(64, 0);
#[map]
static CONNS: HashMap<SockKey, ConnInfo> = HashMap::with_max_entries(65_536, 0);
/// A syscall between its enter and exit, keyed by pid_tgid (one syscall per thread at a time).
#[map]
static PENDING_CONNECT: HashMap<u64, PendingConnect> = HashMap::with_max_entries(16_384, 0);
#[map]
static PENDING_IO: HashMap<u64, PendingIo> = HashMap::with_max_entries(16_384, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Payload bytes to capture from the start of a buffer (≤ HEAD_MAX); set by the loader.
#[unsafe(no_mangle)]
static HEAD_BYTES: u32 = HEAD_MAX as u32;
/// Payload bytes to capture from the end of a buffer (≤ TAIL_MAX); set by the loader.
#[unsafe(no_mangle)]
static TAIL_BYTES: u32 = TAIL_MAX as u32;
/// The daemon's own tgid: its sockets (the readiness probe) are never captured.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;

const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct PendingConnect {
    fd: u32,
    port: u32,
    role: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PendingIo {
    conn: ConnInfo,
    buf: u64,
    fd: u32,
    direction: u32,
}

/// `int connect(int fd, struct sockaddr *uservaddr, int addrlen)`
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_connect(&ctx);
    0
}

fn try_sys_enter_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid_tgid, tgid) = current();
    if is_self(tgid) {
        return Ok(());
    }
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.map_err(i64::from)?;
    let addr: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    // sockaddr_in and sockaddr_in6 both start with the family, then the port in network order.
    let head: [u16; 2] = match unsafe { bpf_probe_read_user(addr as *const [u16; 2]) } {
        Ok(head) => head,
        Err(_) => {
            count(counter::READ_USER_FAILED);
            return Ok(());
        }
    };
    if head[0] != AF_INET && head[0] != AF_INET6 {
        return Ok(());
    }
    let port = u16::from_be(head[1]);
    let Some(role) = (unsafe { WATCHED_PORTS.get(port) }) else {
        return Ok(());
    };
    let pending = PendingConnect {
        fd: fd as u32,
        port: u32::from(port),
        role: *role,
        _pad: 0,
    };
    let _ = PENDING_CONNECT.insert(pid_tgid, pending, 0);
    Ok(())
}

/// Exit of `connect`: 0, or -EINPROGRESS on a non-blocking socket, means the connection is ours.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_connect(&ctx);
    0
}

fn try_sys_exit_connect(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid_tgid, tgid) = current();
    let Some(pending) = (unsafe { PENDING_CONNECT.get(pid_tgid) }).copied() else {
        return Ok(());
    };
    let _ = PENDING_CONNECT.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.map_err(i64::from)?;
    if ret != 0 && ret != -EINPROGRESS {
        return Ok(());
    }
    let conn = ConnInfo {
        conn_id: new_conn_id(),
        role: pending.role,
        side: side::CLIENT,
        port: pending.port,
        _pad: 0,
    };
    let key = SockKey {
        tgid,
        fd: pending.fd,
    };
    if CONNS.insert(key, conn, 0).is_err() {
        count(counter::CONNS_FULL);
        warn!(
            ctx,
            "connection table full: a connection to port {} is not watched", pending.port
        );
        return Ok(());
    }
    emit_conn(kind::OPEN, &conn, pid_tgid, pending.fd);
    Ok(())
}

/// `ssize_t write(unsigned int fd, const char *buf, size_t count)`
#[tracepoint]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    let _ = enter_io(&ctx, direction::EGRESS);
    0
}

/// Exit of `write`: the return value is the number of bytes sent.
#[tracepoint]
pub fn sys_exit_write(ctx: TracePointContext) -> u32 {
    let _ = exit_io(&ctx);
    0
}

/// `int close(unsigned int fd)`
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_close(&ctx);
    0
}

fn try_sys_enter_close(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid_tgid, tgid) = current();
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.map_err(i64::from)?;
    let key = SockKey {
        tgid,
        fd: fd as u32,
    };
    let Some(conn) = (unsafe { CONNS.get(key) }).copied() else {
        return Ok(());
    };
    let _ = CONNS.remove(key);
    emit_conn(kind::CLOSE, &conn, pid_tgid, fd as u32);
    Ok(())
}

/// Enter of a plain-buffer I/O syscall (`fd`, `buf`, `count`): remember the buffer if the fd is
/// a watched connection. This lookup is the whole cost for every other fd.
fn enter_io(ctx: &TracePointContext, direction: u32) -> Result<(), i64> {
    let (pid_tgid, tgid) = current();
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.map_err(i64::from)?;
    let key = SockKey {
        tgid,
        fd: fd as u32,
    };
    let Some(conn) = (unsafe { CONNS.get(key) }).copied() else {
        return Ok(());
    };
    let buf: u64 = unsafe { ctx.read_at(ARG1) }.map_err(i64::from)?;
    let _count: u64 = unsafe { ctx.read_at(ARG2) }.map_err(i64::from)?;
    let pending = PendingIo {
        conn,
        buf,
        fd: fd as u32,
        direction,
    };
    let _ = PENDING_IO.insert(pid_tgid, pending, 0);
    Ok(())
}

/// Exit of an I/O syscall: a positive return is data; errors and `EAGAIN` are not.
fn exit_io(ctx: &TracePointContext) -> Result<(), i64> {
    let (pid_tgid, tgid) = current();
    let Some(pending) = (unsafe { PENDING_IO.get(pid_tgid) }).copied() else {
        return Ok(());
    };
    let _ = PENDING_IO.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.map_err(i64::from)?;
    if ret <= 0 {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<DataEvent>(0) else {
        count(counter::LOST_DATA);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    let len = ret as u64;
    // SAFETY: `event` points at a reserved, exclusively owned DataEvent-sized record.
    unsafe {
        (*event).kind = kind::DATA;
        (*event).direction = pending.direction;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).conn_id = pending.conn.conn_id;
        (*event).tgid = tgid;
        (*event).pid = pid_tgid as u32;
        (*event).role = pending.conn.role;
        (*event).side = pending.conn.side;
        (*event).fd = pending.fd;
        (*event).port = pending.conn.port;
        (*event).len = len;

        let head_len = capture_len(len, core::ptr::read_volatile(&HEAD_BYTES), HEAD_MAX);
        let head_ok = read_user_into(
            (*event).head.as_mut_ptr(),
            pending.buf,
            head_len as u32,
            HEAD_MAX as u32,
        );
        (*event).head_len = if head_ok { head_len as u32 } else { 0 };

        // The tail covers what the head did not, up to TAIL_BYTES.
        let rest = len - head_len;
        let tail_len = capture_len(rest, core::ptr::read_volatile(&TAIL_BYTES), TAIL_MAX);
        let tail_ok = read_user_into(
            (*event).tail.as_mut_ptr(),
            pending.buf + len - tail_len,
            tail_len as u32,
            TAIL_MAX as u32,
        );
        (*event).tail_len = if tail_ok { tail_len as u32 } else { 0 };
        if !head_ok || !tail_ok {
            count(counter::READ_USER_FAILED);
        }
    }
    entry.submit(0);
    Ok(())
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
unsafe fn read_user_into(dst: *mut u8, src: u64, len: u32, max: u32) -> bool {
    if len == 0 {
        return true;
    }
    if len > max {
        return false;
    }
    unsafe { probe_read_user_raw(dst.cast(), len, src as *const _) == 0 }
}

fn emit_conn(event_kind: u32, conn: &ConnInfo, pid_tgid: u64, fd: u32) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(counter::LOST_CONN);
        return;
    };
    entry.write(ConnEvent {
        kind: event_kind,
        side: conn.side,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: conn.conn_id,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        role: conn.role,
        fd,
        port: conn.port,
        _pad: 0,
    });
    entry.submit(0);
}

#[inline(always)]
fn current() -> (u64, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid, (pid_tgid >> 32) as u32)
}

#[inline(always)]
fn is_self(tgid: u32) -> bool {
    tgid == unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

/// The open timestamp with the CPU number in the low byte: unique for the host's uptime.
#[inline(always)]
fn new_conn_id() -> u64 {
    let ts = unsafe { bpf_ktime_get_ns() };
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    (ts << 8) | (cpu & 0xff)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
