//! Descriptors: which socket an fd refers to now, and the `(tgid, fd)` entries that follow a
//! connection across fork, dup2/dup3, close_range and exec.
//!
//! A connection is one open file (`struct file *`), possibly held under several `(tgid, fd)`
//! keys: a forked child inherits its parent's, `dup2` makes another. Every key is an entry in
//! `CONNS` carrying the file it referred to when it was made; `REFS` counts the keys of each
//! connection, and the connection's `CLOSE` event goes out when its last key is forgotten.
//!
//! The current file behind an fd is read from the task's descriptor table
//! (`task->files->fdt->fd[fd]`) with four offsets that userspace reads from the running
//! kernel's BTF at load time (`TASK_FILES_OFFSET` …): no offset is compiled in. Without them
//! (`FD_LAYOUT_KNOWN` 0) nothing is validated and nothing is inherited, as before.
//!
//! - data syscalls check that the fd still refers to the entry's file: an entry left stale by
//!   a path this side did not see is forgotten, never read as the old connection;
//! - `task_newtask` (a new process, not a thread) copies the parent's watched fds to the child;
//! - `dup2`/`dup3` forget what the new fd held and make it a key of the old fd's connection;
//!   `dup` and `fcntl(F_DUPFD, F_DUPFD_CLOEXEC)` make their new fd one too;
//! - `close_range` forgets the keys in its range;
//! - `sched_process_exec` forgets the keys that close-on-exec closed.

use aya_ebpf::{
    helpers::bpf_get_current_task,
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use observer_common::{ConnInfo, SockKey, kind};

use crate::{
    CONNS, FD_LAYOUT_KNOWN, FDT_FD_OFFSET, FDT_MAX_FDS_OFFSET, FILE_PRIVATE_DATA_OFFSET,
    FILES_FDT_OFFSET, Fail, Failed, LISTENERS, Miss, NEWTASK_FLAGS_OFFSET, NEWTASK_PID_OFFSET,
    NotOurs, Outcome, PARENTS, REFS, Regs, SOCK_DPORT_OFFSET, SOCK_LAYOUT_KNOWN, SOCK_NUM_OFFSET,
    SOCKET_SK_OFFSET, TASK_FILES_OFFSET, current, emit_conn, global, mark, read_kernel, settle,
    watched,
};

/// Most descriptors walked when a process forks, execs or calls close_range, and most
/// connections acted on: fds beyond are not inherited by a child, and a stale key beyond is
/// found at the fd's next use (never read as the old connection) or when the process exits.
const MAX_WALK: u32 = 256;
const MAX_ACT: usize = 16;
/// `clone(2)`: the new task is a thread of the caller (same tgid, same descriptors).
const CLONE_THREAD: u64 = 0x0001_0000;
/// `close_range(2)`: mark close-on-exec instead of closing.
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
/// `fcntl(2)` commands that duplicate an fd.
const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// The current task's descriptor table: its `fd` array and its size.
#[derive(Clone, Copy)]
pub struct FdTable {
    array: u64,
    max_fds: u32,
}

impl FdTable {
    /// The table of the current task; not ours where the layout is unknown or the task has
    /// none (it is exiting).
    #[inline(always)]
    pub fn current() -> Result<FdTable, Miss> {
        if global(&FD_LAYOUT_KNOWN) == 0 {
            return Err(NotOurs);
        }
        let task = unsafe { bpf_get_current_task() };
        let files: u64 = read_kernel(task + global(&TASK_FILES_OFFSET) as u64)?;
        if files == 0 {
            return Err(NotOurs);
        }
        let fdt: u64 = read_kernel(files + global(&FILES_FDT_OFFSET) as u64)?;
        if fdt == 0 {
            return Err(NotOurs);
        }
        let (max_fds_at, fd_at) = (global(&FDT_MAX_FDS_OFFSET), global(&FDT_FD_OFFSET));
        if fd_at == max_fds_at + 8 {
            // `unsigned int max_fds; struct file **fd;` side by side (every kernel): one read.
            let [max_fds, array]: [u64; 2] = read_kernel(fdt + max_fds_at as u64)?;
            return Ok(FdTable {
                array,
                max_fds: max_fds as u32,
            });
        }
        let max_fds: u32 = read_kernel(fdt + max_fds_at as u64)?;
        let array: u64 = read_kernel(fdt + fd_at as u64)?;
        Ok(FdTable { array, max_fds })
    }

    /// The open file behind `fd` (0: none).
    #[inline(always)]
    pub fn file(&self, fd: u32) -> Result<u64, Miss> {
        if fd >= self.max_fds {
            return Ok(0);
        }
        read_kernel(self.array + fd as u64 * 8)
    }
}

/// The (local, remote) ports of the TCP socket behind `file` (host order), where the socket's
/// layout is known: the client's ephemeral port is only in the socket, and a server that
/// accepts without asking for the peer's address learns it nowhere else.
#[inline(always)]
pub fn ports_of(file: u64) -> Result<(u16, u16), Miss> {
    if global(&SOCK_LAYOUT_KNOWN) == 0 || file == 0 {
        return Err(NotOurs);
    }
    let socket: u64 = read_kernel(file + global(&FILE_PRIVATE_DATA_OFFSET) as u64)?;
    if socket == 0 {
        return Err(NotOurs);
    }
    let sock: u64 = read_kernel(socket + global(&SOCKET_SK_OFFSET) as u64)?;
    if sock == 0 {
        return Err(NotOurs);
    }
    let local: u16 = read_kernel(sock + global(&SOCK_NUM_OFFSET) as u64)?;
    let remote: u16 = read_kernel(sock + global(&SOCK_DPORT_OFFSET) as u64)?;
    Ok((local, u16::from_be(remote)))
}

/// The file behind `fd` of the current process, where it can be told (a failed read
/// counted): an fd that cannot be checked is taken for what its entry says.
#[inline(always)]
pub fn file_of(fd: u32) -> Option<u64> {
    settle(FdTable::current().and_then(|table| table.file(fd)))
}

/// Whether an entry made for `recorded` still describes an fd that refers to `now`: an entry
/// seeded by userspace (0) takes the first file it is seen with.
#[inline(always)]
pub fn same_file(recorded: u64, now: Option<u64>) -> bool {
    match now {
        None => true,
        Some(now) => recorded == now || (recorded == 0 && now != 0),
    }
}

/// Makes `key` one more holder of `conn` (inherited or duplicated), forgetting what `key`
/// held before.
pub fn add_holder(key: SockKey, conn: &ConnInfo, pid_tgid: u64) -> Outcome {
    if let Some(old) = unsafe { CONNS.get(key) } {
        let old = *old;
        if old.conn_id == conn.conn_id {
            return Ok(());
        }
        forget(key, &old, pid_tgid);
    }
    CONNS
        .insert(key, conn, 0)
        .map_err(|_| Failed(Fail::ConnsFull))?;
    add_ref(conn.conn_id, 1);
    Ok(())
}

/// A new connection's first holder. Without its count, the connection closes when any one
/// holder is forgotten.
pub fn first_holder(conn_id: u64) -> Outcome {
    REFS.insert(conn_id, 1, 0)
        .map_err(|_| Failed(Fail::MapUpdate))
}

/// Adds `delta` (wrapping: `u64::MAX` is −1) to the connection's holder count; the count after.
///
/// Not atomic (the BPF target has no atomic fetch-and-add in `core`): two holders of one
/// connection changing it at the same instant on two CPUs can leave it one too high, and the
/// connection then closes at the userspace sweep (its last key gone from `CONNS`) instead of
/// at once.
#[inline(always)]
fn add_ref(conn_id: u64, delta: u64) -> Option<u64> {
    let refs = REFS.get_ptr_mut(conn_id)?;
    // SAFETY: a map value pointer, valid for the program's run.
    unsafe {
        let now = core::ptr::read_volatile(refs).wrapping_add(delta);
        core::ptr::write_volatile(refs, now);
        Some(now)
    }
}

/// `key` no longer holds `conn`: its entry goes, and the connection closes (a `CLOSE` event)
/// when that was its last holder.
pub fn forget(key: SockKey, conn: &ConnInfo, pid_tgid: u64) {
    if CONNS.remove(key).is_err() {
        // Another path forgot it first.
        return;
    }
    match add_ref(conn.conn_id, u64::MAX) {
        Some(left) if left != 0 && left < u64::MAX / 2 => {}
        _ => {
            let _ = REFS.remove(conn.conn_id);
            emit_conn(kind::CLOSE, conn, pid_tgid, key.fd);
        }
    }
}

/// Forgets the keys of `tgid` in `first..=last` whose fd no longer refers to their file
/// (`table`: the descriptors now), or every one of them when `table` is `None`.
///
/// Two passes keep the verifier's work small: a walk of at most [`MAX_WALK`] fds that only
/// looks up, then at most [`MAX_ACT`] of the keys it found checked and forgotten.
fn forget_replaced(
    tgid: u32,
    first: u32,
    last: u32,
    table: Option<FdTable>,
    pid_tgid: u64,
) -> Outcome {
    let found = FOUND.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))?;
    let found = unsafe { &mut *found };
    found.len = 0;
    for i in 0..MAX_WALK {
        let Some(fd) = first.checked_add(i) else {
            break;
        };
        if fd > last || found.len as usize >= MAX_ACT {
            break;
        }
        if unsafe { CONNS.get(SockKey { tgid, fd }) }.is_some() {
            found.fds[found.len as usize & (MAX_ACT - 1)] = fd;
            found.len += 1;
        }
    }
    for i in 0..MAX_ACT {
        if i >= found.len as usize {
            break;
        }
        let key = SockKey {
            tgid,
            fd: found.fds[i],
        };
        let Some(conn) = (unsafe { CONNS.get(key) }) else {
            continue;
        };
        let conn = *conn;
        let stale = match table {
            Some(table) => {
                let now = settle(table.file(key.fd));
                !same_file(conn.file, now) || now == Some(0)
            }
            None => true,
        };
        if stale {
            forget(key, &conn, pid_tgid);
        }
    }
    Ok(())
}

/// The fds one walk found to act on.
#[repr(C)]
pub struct FdList {
    fds: [u32; MAX_ACT],
    len: u32,
}

#[map]
static FOUND: PerCpuArray<FdList> = PerCpuArray::with_max_entries(1, 0);

/// `task_newtask`: a watched process's new child (not a thread) is watched too, remembers its
/// parent, and holds what the parent's watched fds hold (they were copied into its table).
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    settle(try_task_newtask(&ctx));
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Outcome {
    let (pid_tgid, parent) = current();
    if !watched(parent) {
        return Err(NotOurs);
    }
    let record = NewTask::of(ctx)?;
    if record.clone_flags()? & CLONE_THREAD != 0 {
        return Err(NotOurs);
    }
    let child = record.pid()?;
    // Without it the child does not find the listeners it inherited: counted, and the
    // rest is done.
    settle(
        PARENTS
            .insert(child, parent, 0)
            .map_err(|_| Failed(Fail::MapUpdate)),
    );
    mark(child);
    // The child's table is a copy of the parent's as it is now (or the same table).
    let table = FdTable::current()?;
    let found = unsafe { &mut *FOUND.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))? };
    found.len = 0;
    for fd in 0..MAX_WALK {
        if fd >= table.max_fds || found.len as usize >= MAX_ACT {
            break;
        }
        if unsafe { CONNS.get(SockKey { tgid: parent, fd }) }.is_some() {
            found.fds[found.len as usize & (MAX_ACT - 1)] = fd;
            found.len += 1;
        }
    }
    for i in 0..MAX_ACT {
        if i >= found.len as usize {
            break;
        }
        let fd = found.fds[i];
        let Some(conn) = (unsafe { CONNS.get(SockKey { tgid: parent, fd }) }) else {
            continue;
        };
        let mut conn = *conn;
        let Some(file) = settle(table.file(fd)) else {
            continue;
        };
        if file == 0 || !same_file(conn.file, Some(file)) {
            continue;
        }
        conn.file = file;
        settle(add_holder(SockKey { tgid: child, fd }, &conn, pid_tgid));
    }
    Ok(())
}

/// The record of `task:task_newtask`, whose prototype is
/// `TP_PROTO(struct task_struct *task, unsigned long clone_flags)`: its fields `pid` and
/// `clone_flags` are read at the offsets the loader found in the event's format file
/// (`NEWTASK_*_OFFSET`): the record is the kernel's, not an ABI.
struct NewTask<'a>(&'a TracePointContext);

impl NewTask<'_> {
    /// The record, where the loader found both fields (0: not found).
    #[inline(always)]
    fn of(ctx: &TracePointContext) -> Result<NewTask<'_>, Miss> {
        if global(&NEWTASK_PID_OFFSET) == 0 || global(&NEWTASK_FLAGS_OFFSET) == 0 {
            return Err(NotOurs);
        }
        Ok(NewTask(ctx))
    }

    /// The new task's id: a new process's tgid (without `CLONE_THREAD`).
    #[inline(always)]
    fn pid(&self) -> Result<u32, Miss> {
        let pid: i32 = unsafe { self.0.read_at(global(&NEWTASK_PID_OFFSET) as usize) }
            .map_err(|_| Failed(Fail::ReadKernel))?;
        Ok(pid as u32)
    }

    /// The `clone(2)` flags it was made with.
    #[inline(always)]
    fn clone_flags(&self) -> Result<u64, Miss> {
        unsafe { self.0.read_at(global(&NEWTASK_FLAGS_OFFSET) as usize) }
            .map_err(|_| Failed(Fail::ReadKernel))
    }
}

/// `sched_process_exec`: close-on-exec has closed some of the process's fds; their keys go.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    settle(try_sched_process_exec());
    0
}

fn try_sched_process_exec() -> Outcome {
    let (pid_tgid, tgid) = current();
    if !watched(tgid) {
        return Err(NotOurs);
    }
    let table = FdTable::current()?;
    forget_replaced(tgid, 0, u32::MAX, Some(table), pid_tgid)
}

/// Exit of a successful `close_range(fd, max_fd, flags)` by a marked process: the keys in the
/// range whose fd no longer refers to their socket go (one reused by another thread in
/// between stays).
#[inline(never)]
pub fn exit_close_range(regs: &Regs, pid_tgid: u64, tgid: u32) -> Outcome {
    let first = regs.fd()?;
    let last = regs.arg1()? as u32;
    let flags = regs.arg2()?;
    if flags & CLOSE_RANGE_CLOEXEC != 0 || first > last {
        // Marked close-on-exec (exec forgets them), or nothing closed.
        return Err(NotOurs);
    }
    // Without the table every key in the range goes.
    forget_replaced(tgid, first, last, settle(FdTable::current()), pid_tgid)
}

/// Exit of a successful `dup2(oldfd, newfd)` or `dup3(oldfd, newfd, flags)` by a marked
/// process: `newfd` was closed and is now a copy of `oldfd`. What `newfd` held is forgotten,
/// and it becomes a key of `oldfd`'s connection or listener.
#[inline(never)]
pub fn exit_dup2(regs: &Regs, pid_tgid: u64, tgid: u32) -> Outcome {
    let old_fd = regs.fd()?;
    let new_fd = regs.arg1()? as u32;
    if old_fd == new_fd {
        return Err(NotOurs);
    }
    let new_key = SockKey { tgid, fd: new_fd };
    let old_key = SockKey { tgid, fd: old_fd };
    let old = unsafe { CONNS.get(old_key) }.copied();
    forget_held(new_key, old.map_or(0, |old| old.conn_id), pid_tgid);
    let _ = LISTENERS.remove(new_key);
    copy_key(old_key, old, new_key, pid_tgid)
}

/// Forgets the connection `key` held before a `dup2` made it a copy of another fd, unless it
/// is the same connection (`kept`, 0 for none: no connection's id is 0). A call of its own:
/// its copy of the entry and the close event it may emit take stack that the copy's own
/// calls then have. (Plain integer arguments: an `Option` leaves a register unset for
/// `None`, which the verifier rejects.)
#[inline(never)]
fn forget_held(key: SockKey, kept: u64, pid_tgid: u64) {
    if let Some(held) = unsafe { CONNS.get(key) } {
        let held = *held;
        if kept != held.conn_id {
            forget(key, &held, pid_tgid);
        }
    }
}

/// Exit of `dup(oldfd)`, and of `fcntl(oldfd, cmd, arg)` (`fcntl`) when its command
/// duplicates, by a marked process: the new fd (the return value) is one more key of the old
/// fd's connection or listener.
#[inline(never)]
pub fn exit_dup(regs: &Regs, ret: i64, pid_tgid: u64, tgid: u32, fcntl: bool) -> Outcome {
    if fcntl {
        let cmd = regs.arg1()? as u32 as u64;
        if cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC {
            return Err(NotOurs);
        }
    }
    let old_key = SockKey {
        tgid,
        fd: regs.fd()?,
    };
    let new_key = SockKey {
        tgid,
        fd: ret as u32,
    };
    let old = unsafe { CONNS.get(old_key) }.copied();
    copy_key(old_key, old, new_key, pid_tgid)
}

/// `new_key` becomes one more key of what `old_key` holds: its connection (`old`, while the
/// fd still refers to that connection's file) or its listener.
#[inline(always)]
fn copy_key(old_key: SockKey, old: Option<ConnInfo>, new_key: SockKey, pid_tgid: u64) -> Outcome {
    if let Some(mut conn) = old {
        let file = file_of(old_key.fd);
        if !same_file(conn.file, file) {
            return Err(NotOurs);
        }
        if let Some(file) = file {
            conn.file = file;
        }
        add_holder(new_key, &conn, pid_tgid)
    } else if let Some(listener) = unsafe { LISTENERS.get(old_key) } {
        let listener = *listener;
        LISTENERS
            .insert(new_key, listener, 0)
            .map_err(|_| Failed(Fail::ListenersFull))
    } else {
        Err(NotOurs)
    }
}
