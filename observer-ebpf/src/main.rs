//! Kernel programs: a raw tracepoint on system call exit, and three process and socket
//! tracepoints, that see the bytes crossing watched TCP ports.
//!
//! No kprobes, no fentry, no compiled-in kernel struct offsets. The raw tracepoint `sys_exit`
//! runs for every system call of every process; for a process that holds no watched socket
//! its whole cost is one bit of `MARKS`/`SEEDED_MARKS` (bitmaps by tgid). A process is marked
//! when it connects to or listens on a watched port (`inet_sock_set_state`, inside those
//! calls), when a marked process forks it (`task_newtask`), or when userspace seeds its sockets
//! from `/proc`; the kernel's mark goes when the process exits (`sched_process_exit`). For a
//! marked process the call's number (saved registers, offsets from the loader) is looked up
//! in `SYSCALLS` (filled by the loader from the architecture's numbers): every call the
//! programs follow is handled at its exit, its arguments still in the saved registers, so no
//! state is kept between entry and exit.
//!
//! A connection becomes watched when a process connects to a watched port or accepts on a
//! watched listener ([`lifecycle`]); userspace seeds listeners and established connections it
//! finds in `/proc` (every network namespace). Data calls on watched connections become
//! variable-size events ([`data`]). A connection held under several fds or by several
//! processes (dup2, fork) is one connection ([`fds`]); the tracepoints' field offsets come from
//! their format files, the descriptor table's from the kernel's BTF.
//!
//! Conditions are counted in `COUNTERS`, never dropped in silence; logging (`aya-log`) is for
//! rare conditions only, never per syscall.
//!
//! Names: a program is named after its tracepoint (userspace attaches it by that name) and
//! only calls `try_<the same name>`, which does the work and returns an [`Outcome`]; an arm of
//! `sys_exit` is `exit_<call>`, after the system call whose exit it handles; every other
//! function is named for what it does (`track`, `forget`, `mark`).
//!
//! Outcomes: a step that stops returns why ([`Miss`]): [`Miss::NotOurs`] for what the
//! programs do not follow (most calls of most processes end there, in silence), or
//! [`Miss::Failed`] for what they follow but could not do (a kernel read or a map update
//! failed). The program counts a failure once, in `COUNTERS` ([`settle`]); a failure a step
//! goes on without (an fd not checked against its connection) is counted where it happens.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write in `core::sync::atomic`; an
// add whose result is unused is the kernel's oldest atomic instruction (`BPF_XADD`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod data;
mod fds;
mod lifecycle;

use Miss::{Failed, NotOurs};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use observer_common::{
    COMM_LEN, ConnEvent, ConnInfo, HEAD_MAX, ListenInfo, SockKey, TAIL_MAX, counter, syscall,
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
/// What each system call number is to the programs (`observer_common::syscall`; 0: nothing).
#[map]
static SYSCALLS: Array<u32> = Array::with_max_entries(syscall::TABLE_LEN, 0);
/// Processes the kernel marked (bit `tgid % 64` of word `tgid / 64`): they hold, or held, a
/// watched listener or connection, or descend from one that did. Only the kernel writes it,
/// with atomic adds: a bit is added when its tgid enters `WATCHED_TGIDS` and taken away when
/// it leaves (the process exited), exactly once each. Sized by the loader from `pid_max`; a
/// tgid beyond counts as marked.
#[map]
static MARKS: Array<u64> = Array::with_max_entries(1, 0);
/// Processes userspace marked when it seeded their sockets from `/proc`: only userspace
/// writes it (and clears the bits of the processes that exited).
#[map]
static SEEDED_MARKS: Array<u64> = Array::with_max_entries(1, 0);
/// Non-zero once `WATCHED_TGIDS` was full: from then on every process counts as marked.
#[map]
static FILTER_OFF: Array<u32> = Array::with_max_entries(1, 0);
/// The processes marked in `MARKS`: an insert that succeeds is the one that adds the bit, a
/// removal that succeeds the one that takes it away.
#[map]
static WATCHED_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(16_384, 0);
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
/// Offsets in `struct pt_regs` of a system call's first three arguments and of its number, on
/// the running architecture (set by the loader).
#[unsafe(no_mangle)]
static REGS_ARG0_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static REGS_ARG1_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static REGS_ARG2_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static REGS_NR_OFFSET: u32 = 0;
/// Offset in `task_struct` of `thread_info.status` (x86-64: its `TS_COMPAT` bit marks a 32-bit
/// system call, whose numbers mean other calls); 0 where there is none to check.
#[unsafe(no_mangle)]
static COMPAT_STATUS_OFFSET: u32 = 0;
/// Non-zero when userspace found `task_struct.signal` and `signal_struct.live` in the BTF:
/// the exit program then tells a process's last thread.
#[unsafe(no_mangle)]
static EXIT_LAYOUT_KNOWN: u32 = 0;
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFFSET: u32 = 0;
/// Offsets of `newstate`, `sport`, `dport`, `family`, `protocol`, `saddr` and `saddr_v6` in
/// `inet_sock_set_state` (read from its format file; `newstate` 0: not found).
#[unsafe(no_mangle)]
static STATE_NEWSTATE_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_SPORT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_DPORT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_FAMILY_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_PROTOCOL_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_SADDR_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static STATE_SADDR_V6_OFFSET: u32 = 0;
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

pub const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// `bpf_map_update_elem`: make a new entry only.
const BPF_NOEXIST: u64 = 1;
/// x86-64 `thread_info.status`: the current system call is a 32-bit one.
const TS_COMPAT: u32 = 0x0002;

/// `sys_exit(struct pt_regs *regs, long ret)`, for every system call of every process: the
/// calls of a marked process that move bytes on, make, copy or close a watched socket. Any
/// other process costs the bitmap test.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    settle(try_sys_exit(&ctx));
    0
}

#[inline(always)]
fn try_sys_exit(ctx: &RawTracePointContext) -> Outcome {
    let (pid_tgid, tgid) = current();
    if !watched(tgid) {
        return Err(NotOurs);
    }
    let args = SysExitArgs::of(ctx);
    let regs = Regs(args.regs);
    let kind = syscall_kind(regs.nr()?).ok_or(NotOurs)?;
    let ret = args.ret;
    // Errors moved nothing and made nothing (EAGAIN: no record); connect on a non-blocking
    // socket returns -EINPROGRESS and has made the connection.
    if ret < 0 && kind == syscall::LISTEN {
        // What the failed listen's state change remembered must not be taken by a later one.
        lifecycle::forget_listen(pid_tgid);
        return Err(NotOurs);
    }
    // A call that cannot be told from a 32-bit one is a failure, not taken for a native one:
    // counting it on the way on had the verifier go through every arm twice.
    if (ret < 0 && !(kind == syscall::CONNECT && ret == -lifecycle::EINPROGRESS))
        || (ret == 0 && syscall::is_data(kind))
        || compat()?
    {
        return Err(NotOurs);
    }
    match kind {
        syscall::CONNECT => lifecycle::exit_connect(ctx, &regs, pid_tgid, tgid),
        syscall::LISTEN => lifecycle::exit_listen(ctx, &regs, pid_tgid, tgid),
        syscall::ACCEPT => lifecycle::exit_accept(ctx, &regs, ret, pid_tgid, tgid),
        syscall::CLOSE => lifecycle::exit_close(&regs, pid_tgid, tgid),
        syscall::DUP => fds::exit_dup(&regs, ret, pid_tgid, tgid, false),
        syscall::FCNTL => fds::exit_dup(&regs, ret, pid_tgid, tgid, true),
        syscall::DUP2 => fds::exit_dup2(&regs, pid_tgid, tgid),
        syscall::CLOSE_RANGE => fds::exit_close_range(&regs, pid_tgid, tgid),
        _ => data::exit_data(&regs, kind, ret as u64, pid_tgid, tgid),
    }
}

/// `sched_process_exit(struct task_struct *p)`, for every exiting thread: the process's last
/// thread takes its mark away (its fds are closed without `close`; userspace's sweep reports
/// its connections).
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    settle(try_sched_process_exit());
    0
}

#[inline(always)]
fn try_sched_process_exit() -> Outcome {
    let (pid_tgid, tgid) = current();
    if unsafe { WATCHED_TGIDS.get(tgid) }.is_none() || !last_thread(pid_tgid)? {
        return Err(NotOurs);
    }
    if WATCHED_TGIDS.remove(tgid).is_ok() {
        add_mark(tgid, true);
    }
    Ok(())
}

/// Whether the exiting thread is its process's last: `signal->live` has reached 0 (it is
/// decremented before the tracepoint). Without the layout, the thread-group leader's exit is
/// taken for the process's.
#[inline(always)]
fn last_thread(pid_tgid: u64) -> Result<bool, Miss> {
    if global(&EXIT_LAYOUT_KNOWN) == 0 {
        return Ok(pid_tgid as u32 == (pid_tgid >> 32) as u32);
    }
    let task = unsafe { bpf_get_current_task() };
    let signal: u64 = read_kernel(task + global(&TASK_SIGNAL_OFFSET) as u64)?;
    if signal == 0 {
        return Ok(false);
    }
    let live: i32 = read_kernel(signal + global(&SIGNAL_LIVE_OFFSET) as u64)?;
    Ok(live == 0)
}

/// What system call `nr` is to the programs, `None` for one they do not follow.
#[inline(always)]
fn syscall_kind(nr: u64) -> Option<u32> {
    if nr >= syscall::TABLE_LEN as u64 {
        return None;
    }
    match SYSCALLS.get(nr as u32) {
        Some(&kind) if kind != 0 => Some(kind),
        _ => None,
    }
}

/// Whether `tgid` is marked (may hold a watched socket): the whole cost of a data call of
/// any other process.
#[inline(always)]
fn watched(tgid: u32) -> bool {
    let (word, bit) = (tgid / 64, 1u64 << (tgid % 64));
    match MARKS.get(word) {
        Some(&marks) if marks & bit != 0 => true,
        Some(_) => {
            matches!(SEEDED_MARKS.get(word), Some(&seeded) if seeded & bit != 0)
                || matches!(FILTER_OFF.get(0), Some(&off) if off != 0)
        }
        // Beyond the bitmap (pid_max raised since the load): every such process is looked up.
        None => true,
    }
}

/// Marks `tgid` (it now holds a watched socket, or descends from a process that does).
#[inline(always)]
fn mark(tgid: u32) {
    if unsafe { WATCHED_TGIDS.get(tgid) }.is_some() {
        return;
    }
    match WATCHED_TGIDS.insert(tgid, 1, BPF_NOEXIST) {
        Ok(()) => add_mark(tgid, false),
        // Marked on another CPU in between.
        Err(_) if unsafe { WATCHED_TGIDS.get(tgid) }.is_some() => {}
        Err(_) => {
            count(counter::TGIDS_FULL);
            if let Some(off) = FILTER_OFF.get_ptr_mut(0) {
                unsafe { core::ptr::write_volatile(off, 1) };
            }
        }
    }
}

/// Adds (or, with `clear`, takes away) the bit of `tgid` with one atomic add: other CPUs
/// change other bits of the same word at the same time.
#[inline(always)]
fn add_mark(tgid: u32, clear: bool) {
    let Some(word) = MARKS.get_ptr_mut(tgid / 64) else {
        return;
    };
    let bit = 1u64 << (tgid % 64);
    let delta = if clear { bit.wrapping_neg() } else { bit };
    // SAFETY: a map value pointer, valid and aligned for the program's run.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            word, delta,
        )
    };
}

/// The arguments of the raw tracepoint `sys_exit`, its prototype
/// `TP_PROTO(struct pt_regs *regs, long ret)`: a raw tracepoint's context is the prototype's
/// arguments, one `u64` each, a layout fixed at compile time (the kernel refuses a program
/// that reads past them when it is attached).
#[repr(C)]
struct SysExitArgs {
    /// `struct pt_regs *`: the saved user registers ([`Regs`]).
    regs: u64,
    /// The system call's return value.
    ret: i64,
}

impl SysExitArgs {
    #[inline(always)]
    fn of(ctx: &RawTracePointContext) -> &SysExitArgs {
        // SAFETY: the context of a program attached to `sys_exit` is its two arguments.
        unsafe { &*ctx.as_ptr().cast::<SysExitArgs>() }
    }
}

/// The saved user registers of the current system call, read at the offsets of the running
/// architecture's `struct pt_regs` that the loader set (`REGS_*_OFFSET`).
pub struct Regs(u64);

impl Regs {
    /// The saved register at `offset` (one of the loader's `REGS_*_OFFSET` globals).
    #[inline(always)]
    fn at(&self, offset: &u32) -> Result<u64, Miss> {
        read_kernel(self.0 + global(offset) as u64)
    }

    /// The first argument: an fd.
    #[inline(always)]
    pub fn fd(&self) -> Result<u32, Miss> {
        self.at(&REGS_ARG0_OFFSET).map(|fd| fd as u32)
    }

    /// The second argument.
    #[inline(always)]
    pub fn arg1(&self) -> Result<u64, Miss> {
        self.at(&REGS_ARG1_OFFSET)
    }

    /// The third argument.
    #[inline(always)]
    pub fn arg2(&self) -> Result<u64, Miss> {
        self.at(&REGS_ARG2_OFFSET)
    }

    /// The system call's number.
    #[inline(always)]
    fn nr(&self) -> Result<u64, Miss> {
        self.at(&REGS_NR_OFFSET)
    }
}

#[inline(always)]
pub fn read_kernel<T: Copy>(addr: u64) -> Result<T, Miss> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| Failed(Fail::ReadKernel))
}

/// Why a program, or a step of one, stopped short.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// Nothing the programs follow: a process, call, socket or record of no interest, or a
    /// layout the loader could not find (it said so once). Not counted.
    NotOurs,
    /// Something the programs follow, left undone: counted once.
    Failed(Fail),
}

/// What failed: its value is the slot of `COUNTERS` that counts it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Fail {
    ConnsFull = counter::CONNS_FULL,
    ReadUser = counter::READ_USER_FAILED,
    ListenersFull = counter::LISTENERS_FULL,
    ReadKernel = counter::READ_KERNEL_FAILED,
    MapUpdate = counter::MAP_UPDATE_FAILED,
}

/// What a program's work, or a step of it, came to.
pub type Outcome = Result<(), Miss>;

// Returned in a register: a larger result would go through the stack that nested calls share
// (512 bytes in all before 6.13).
const _: () = assert!(core::mem::size_of::<Outcome>() == 4);

/// The value, with a failure counted: where a program ends, and where a step goes on
/// without what failed.
#[inline(always)]
fn settle<T>(result: Result<T, Miss>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(Failed(fail)) => {
            count(fail as u32);
            None
        }
        Err(NotOurs) => None,
    }
}

/// Whether the current system call is a 32-bit one (its number means another call).
#[inline(always)]
fn compat() -> Result<bool, Miss> {
    let offset = global(&COMPAT_STATUS_OFFSET);
    if offset == 0 {
        return Ok(false);
    }
    let task = unsafe { bpf_get_current_task() };
    let status: u32 = read_kernel(task + offset as u64)?;
    Ok(status & TS_COMPAT != 0)
}

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

/// Emits an open or close event for `conn`. Its fields are written straight into the ring's
/// record: an event built on the stack first took 128 bytes of the 512 that a program's
/// calls share on kernels before 6.13.
fn emit_conn(event_kind: u32, conn: &ConnInfo, pid_tgid: u64, fd: u32) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(counter::LOST_CONN);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved record, ours until it is submitted.
    unsafe {
        (*event).kind = event_kind;
        (*event).side = conn.side;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).conn_id = conn.conn_id;
        (*event).tgid = (pid_tgid >> 32) as u32;
        (*event).pid = pid_tgid as u32;
        (*event).role = conn.role;
        (*event).fd = fd;
        (*event).port = conn.port;
        (*event).seeded = 0;
        (*event).local = conn.local;
        (*event).remote = conn.remote;
        (*event).comm = comm();
    }
    entry.submit(wakeup_flags());
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
