//! Connection lifecycle: which sockets are watched, found without kernel struct offsets.
//!
//! - `connect` to a watched port (read from the caller's sockaddr, IPv4 or IPv6) makes a
//!   client-side connection;
//! - `bind` to a watched port makes a watched listener (userspace seeds the ones that predate
//!   the daemon from `/proc`);
//! - `accept`/`accept4` on a watched listener — held by this process or inherited from the
//!   process that forked it — makes a server-side connection;
//! - `close` forgets either (a connection closes with its last holder, see [`crate::fds`]).

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use observer_common::{ConnInfo, Endpoint, ListenInfo, SockKey, counter, family, kind, side};

use crate::{
    ARG0, ARG1, CONNS, LISTENERS, PARENTS, RET, WATCHED_PORTS, WATCHED_TGIDS, count, current,
    emit_conn,
    fds::{self, file_of, ports_of, same_file},
    is_self, new_conn_id,
};

const EINPROGRESS: i64 = 115;

/// Between a syscall's enter and exit, keyed by pid_tgid (one syscall per thread at a time).
/// LRU: an entry left by a thread that died mid-syscall is safe to evict.
#[map]
static PENDING_CONNECT: LruHashMap<u64, PendingConn> = LruHashMap::with_max_entries(16_384, 0);
#[map]
static PENDING_BIND: LruHashMap<u64, PendingConn> = LruHashMap::with_max_entries(1024, 0);
#[map]
static PENDING_ACCEPT: LruHashMap<u64, PendingAccept> = LruHashMap::with_max_entries(16_384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct PendingConn {
    fd: u32,
    role: u32,
    endpoint: Endpoint,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PendingAccept {
    listener: ListenInfo,
    /// The caller's `upeer_sockaddr` (may be null).
    peer: u64,
}

/// Reads the family, port and address of a user `sockaddr_in`/`sockaddr_in6`. Both start
/// with the family and the port in network order; the IPv4 address follows at 4, IPv6 at 8.
fn read_endpoint(ptr: u64) -> Option<Endpoint> {
    if ptr == 0 {
        return None;
    }
    let Ok(head) = (unsafe { bpf_probe_read_user(ptr as *const [u8; 8]) }) else {
        count(counter::READ_USER_FAILED);
        return None;
    };
    let mut endpoint = Endpoint {
        family: u16::from_ne_bytes([head[0], head[1]]) as u32,
        port: u16::from_be_bytes([head[2], head[3]]) as u32,
        addr: [0; 16],
    };
    match endpoint.family {
        family::INET => endpoint.addr[..4].copy_from_slice(&head[4..8]),
        family::INET6 => match unsafe { bpf_probe_read_user((ptr + 8) as *const [u8; 16]) } {
            Ok(addr) => endpoint.addr = addr,
            Err(_) => {
                count(counter::READ_USER_FAILED);
                return None;
            }
        },
        _ => return None,
    }
    Some(endpoint)
}

/// The sockaddr at `arg` if it names a watched port, with the port's role.
fn watched_endpoint(ctx: &TracePointContext, arg: usize) -> Option<(Endpoint, u32)> {
    let ptr: u64 = unsafe { ctx.read_at(arg) }.ok()?;
    let endpoint = read_endpoint(ptr)?;
    let role = unsafe { WATCHED_PORTS.get(endpoint.port as u16) }?;
    Some((endpoint, *role))
}

/// `int connect(int fd, struct sockaddr *uservaddr, int addrlen)`
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = try_remember_endpoint(&ctx, &PENDING_CONNECT);
    0
}

/// `int bind(int fd, struct sockaddr *umyaddr, int addrlen)`
#[tracepoint]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    let _ = try_remember_endpoint(&ctx, &PENDING_BIND);
    0
}

/// connect and bind: remember the fd when its sockaddr names a watched port.
fn try_remember_endpoint(
    ctx: &TracePointContext,
    pending: &LruHashMap<u64, PendingConn>,
) -> Option<()> {
    let (pid_tgid, tgid) = current();
    if is_self(tgid) {
        return None;
    }
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.ok()?;
    let (endpoint, role) = watched_endpoint(ctx, ARG1)?;
    let entry = PendingConn {
        fd: fd as u32,
        role,
        endpoint,
    };
    pending.insert(pid_tgid, entry, 0).ok()
}

/// Exit of `connect`: 0, or -EINPROGRESS on a non-blocking socket, makes a client-side
/// connection.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_connect(&ctx);
    0
}

fn try_sys_exit_connect(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let pending = *unsafe { PENDING_CONNECT.get(pid_tgid) }?;
    let _ = PENDING_CONNECT.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.ok()?;
    if ret != 0 && ret != -EINPROGRESS {
        return None;
    }
    let file = file_of(pending.fd).unwrap_or(0);
    // The ephemeral port, chosen inside connect(): userspace pairs this end with the server's.
    let local = match ports_of(file) {
        Some((port, _)) => Endpoint {
            family: pending.endpoint.family,
            port: port as u32,
            addr: [0; 16],
        },
        None => Endpoint::default(),
    };
    let conn = ConnInfo {
        conn_id: new_conn_id(),
        role: pending.role,
        side: side::CLIENT,
        port: pending.endpoint.port,
        lost: 0,
        local,
        remote: pending.endpoint,
        file,
    };
    track(
        ctx,
        SockKey {
            tgid,
            fd: pending.fd,
        },
        &conn,
        pid_tgid,
    )
}

/// Exit of `bind`: success makes the fd a watched listener (it may never listen; then it
/// never accepts either).
#[tracepoint]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit_bind(&ctx);
    0
}

fn try_sys_exit_bind(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let pending = *unsafe { PENDING_BIND.get(pid_tgid) }?;
    let _ = PENDING_BIND.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.ok()?;
    if ret != 0 {
        return None;
    }
    let listener = ListenInfo {
        role: pending.role,
        port: pending.endpoint.port,
        local: pending.endpoint,
        file: file_of(pending.fd).unwrap_or(0),
    };
    if LISTENERS
        .insert(
            SockKey {
                tgid,
                fd: pending.fd,
            },
            listener,
            0,
        )
        .is_err()
    {
        count(counter::LISTENERS_FULL);
        warn!(
            ctx,
            "listener table full: a listener on port {} is not watched", listener.port
        );
        return None;
    }
    let _ = WATCHED_TGIDS.insert(tgid, 1, 0);
    Some(())
}

/// `int accept(int fd, struct sockaddr *upeer_sockaddr, int *upeer_addrlen)`
#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    let _ = try_enter_accept(&ctx);
    0
}

/// `int accept4(int fd, struct sockaddr *upeer_sockaddr, int *upeer_addrlen, int flags)`
#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_enter_accept(&ctx);
    0
}

fn try_enter_accept(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    if is_self(tgid) {
        return None;
    }
    let fd = unsafe { ctx.read_at::<u64>(ARG0) }.ok()? as u32;
    let listener = find_listener(tgid, fd)?;
    let peer: u64 = unsafe { ctx.read_at(ARG1) }.ok()?;
    PENDING_ACCEPT
        .insert(pid_tgid, PendingAccept { listener, peer }, 0)
        .ok()
}

/// A watched listener held under `fd` by this process, or inherited from its parent or
/// grandparent (nginx workers are forked by the master, which holds the listening fds).
fn find_listener(tgid: u32, fd: u32) -> Option<ListenInfo> {
    let key = SockKey { tgid, fd };
    if let Some(listener) = LISTENERS.get_ptr_mut(key) {
        let file = file_of(fd);
        let recorded = unsafe { (*listener).file };
        if !same_file(recorded, file) {
            // The fd was closed or replaced in a way not seen here: not this listener.
            let _ = LISTENERS.remove(key);
            return None;
        }
        if recorded == 0
            && let Some(file) = file
        {
            unsafe { (*listener).file = file };
        }
        return Some(unsafe { *listener });
    }
    let parent = *unsafe { PARENTS.get(tgid) }?;
    let inherited = match unsafe { LISTENERS.get(SockKey { tgid: parent, fd }) } {
        Some(listener) => *listener,
        None => {
            let grandparent = *unsafe { PARENTS.get(parent) }?;
            *unsafe {
                LISTENERS.get(SockKey {
                    tgid: grandparent,
                    fd,
                })
            }?
        }
    };
    // The parent's listener, if this fd is the inherited copy of it.
    if inherited.file != 0 && !same_file(inherited.file, file_of(fd)) {
        return None;
    }
    // Next time this process finds it in one lookup.
    let _ = LISTENERS.insert(key, inherited, 0);
    Some(inherited)
}

/// Exit of `accept`: the new fd is a server-side connection.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = try_exit_accept(&ctx);
    0
}

/// Exit of `accept4`: the new fd is a server-side connection.
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_exit_accept(&ctx);
    0
}

fn try_exit_accept(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let pending = *unsafe { PENDING_ACCEPT.get(pid_tgid) }?;
    let _ = PENDING_ACCEPT.remove(pid_tgid);
    let ret: i64 = unsafe { ctx.read_at(RET) }.ok()?;
    if ret < 0 {
        return None;
    }
    let file = file_of(ret as u32).unwrap_or(0);
    // A caller that did not ask for the peer's address (libuv, Node) still gets its port.
    let remote = match read_endpoint(pending.peer) {
        Some(peer) => peer,
        None => match ports_of(file) {
            Some((_, port)) => Endpoint {
                family: pending.listener.local.family,
                port: port as u32,
                addr: [0; 16],
            },
            None => Endpoint::default(),
        },
    };
    let conn = ConnInfo {
        conn_id: new_conn_id(),
        role: pending.listener.role,
        side: side::SERVER,
        port: pending.listener.port,
        lost: 0,
        local: pending.listener.local,
        remote,
        file,
    };
    track(
        ctx,
        SockKey {
            tgid,
            fd: ret as u32,
        },
        &conn,
        pid_tgid,
    )
}

/// Starts watching a connection and says so. An entry the fd still had (its close was not
/// seen: close_range, close-on-exec) is forgotten first.
fn track(ctx: &TracePointContext, key: SockKey, conn: &ConnInfo, pid_tgid: u64) -> Option<()> {
    if let Some(stale) = unsafe { CONNS.get(key) } {
        let stale = *stale;
        fds::forget(key, &stale, pid_tgid);
    }
    if CONNS.insert(key, *conn, 0).is_err() {
        count(counter::CONNS_FULL);
        warn!(
            ctx,
            "connection table full: a connection on port {} is not watched", conn.port
        );
        return None;
    }
    fds::first_holder(conn.conn_id);
    let _ = WATCHED_TGIDS.insert(key.tgid, 1, 0);
    emit_conn(kind::OPEN, conn, pid_tgid, key.fd);
    Some(())
}

/// `int close(unsigned int fd)`
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter_close(&ctx);
    0
}

fn try_sys_enter_close(ctx: &TracePointContext) -> Option<()> {
    let (pid_tgid, tgid) = current();
    let fd = unsafe { ctx.read_at::<u64>(ARG0) }.ok()? as u32;
    let key = SockKey { tgid, fd };
    match unsafe { CONNS.get(key) } {
        Some(conn) => {
            let conn = *conn;
            fds::forget(key, &conn, pid_tgid);
        }
        None => {
            let _ = LISTENERS.remove(key);
        }
    }
    Some(())
}
