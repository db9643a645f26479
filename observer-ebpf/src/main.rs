//! Kernel programs: syscall tracepoints that see the bytes crossing watched TCP ports.
//!
//! No kprobes, no fentry, no compiled-in kernel struct offsets: the tracepoint formats of
//! `syscalls:sys_enter_*`/`sys_exit_*` (arguments at 16 + 8·i, the return value at 16, the same
//! on every kernel), the `task_newtask` field offsets read by userspace from its format file,
//! and four offsets of the descriptor table read by userspace from the kernel's BTF ([`fds`]).
//! A connection becomes watched when a process connects to a watched port or accepts on a
//! watched listener ([`lifecycle`]); userspace seeds listeners and established connections it
//! finds in `/proc` (every network namespace). Data syscalls on watched connections become
//! events ([`data`]); every other fd costs one `CONNS` lookup. A connection held under several
//! fds or by several processes (dup2, fork) is one connection ([`fds`]).
//!
//! Conditions are counted in `COUNTERS`, never dropped in silence; logging (`aya-log`) is for
//! rare conditions only, never per syscall.
#![no_std]
#![no_main]

mod data;
mod fds;
mod lifecycle;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    COMM_LEN, ConnEvent, ConnInfo, HEAD_MAX, ListenInfo, SockKey, TAIL_MAX, counter,
};

// Sizes here are defaults; the loader overrides them from the daemon's configuration.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);
/// Watched port (host order) → role.
#[map]
static WATCHED_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(64, 0);
/// Every (tgid, fd) that holds a watched listening socket.
#[map]
static LISTENERS: HashMap<SockKey, ListenInfo> = HashMap::with_max_entries(4096, 0);
/// Watched connections. Not LRU: evicting a live connection would lose its data in silence;
/// a full table is counted instead, and userspace removes the entries of exited processes.
#[map]
static CONNS: HashMap<SockKey, ConnInfo> = HashMap::with_max_entries(65_536, 0);
/// Holders (`(tgid, fd)` keys in `CONNS`) of each connection, by connection id: its `CLOSE`
/// goes out when the last one is forgotten (a forked child or a dup2 copy may outlive the
/// fd that opened it).
#[map]
static REFS: HashMap<u64, u64> = HashMap::with_max_entries(65_536, 0);
/// Processes that hold a watched listener or connection, and their descendants: their forks,
/// execs, dup2/dup3 and close_range calls are followed. LRU: an evicted entry only stops
/// following those calls for a process that has long made none (its fds are still checked
/// at every use).
#[map]
static WATCHED_TGIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16_384, 0);
/// Child tgid → parent tgid, for processes forked by a watched process (nginx workers
/// inherit the master's listening fds under the same numbers).
#[map]
static PARENTS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16_384, 0);
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
/// Unread bytes in the ring buffer above which a submit wakes the reader; below it the reader
/// finds events on its own short timer (batched wake-ups).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 256 * 1024;
/// Offsets of `pid` and `clone_flags` in `task_newtask` (read from its format file).
#[unsafe(no_mangle)]
static NEWTASK_PID_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static NEWTASK_FLAGS_OFFSET: u32 = 0;
/// Non-zero when userspace found the descriptor table's layout in the kernel's BTF: the
/// offsets of `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds` and `fdtable.fd`.
#[unsafe(no_mangle)]
static FD_LAYOUT_KNOWN: u32 = 0;
#[unsafe(no_mangle)]
static TASK_FILES_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FILES_FDT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static FDT_FD_OFFSET: u32 = 0;
/// Non-zero when userspace found the socket's layout in the kernel's BTF: the offsets of
/// `file.private_data`, `socket.sk`, and the local and remote ports of `struct sock`
/// (`__sk_common.skc_num`, host order; `__sk_common.skc_dport`, network order).
#[unsafe(no_mangle)]
static SOCK_LAYOUT_KNOWN: u32 = 0;
#[unsafe(no_mangle)]
static FILE_PRIVATE_DATA_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_SK_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_NUM_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_DPORT_OFFSET: u32 = 0;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Offsets of a syscall tracepoint's arguments and return value.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

/// The current (pid_tgid, tgid).
#[inline(always)]
fn current() -> (u64, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid, (pid_tgid >> 32) as u32)
}

#[inline(always)]
fn is_self(tgid: u32) -> bool {
    tgid == global(&SELF_TGID)
}

/// A global set by the loader (read through a volatile load, or the compiler would fold in
/// the compiled-in default).
#[inline(always)]
fn global(value: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(value) }
}

#[inline(always)]
fn comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

/// The open timestamp with the CPU number in the low byte: unique for the host's uptime. The
/// low byte is never 0xff (userspace's seeded ids).
#[inline(always)]
fn new_conn_id() -> u64 {
    let ts = unsafe { bpf_ktime_get_ns() };
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    (ts << 8) | (cpu % 0xff)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *value += 1 };
    }
}

/// Submit flags: wake the reader only once enough is waiting (or never wake it for little).
#[inline(always)]
fn wakeup_flags() -> u64 {
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA);
    if waiting >= unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) } {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Emits an open or close event for `conn`.
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
        seeded: 0,
        local: conn.local,
        remote: conn.remote,
        comm: comm(),
    });
    entry.submit(wakeup_flags());
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
