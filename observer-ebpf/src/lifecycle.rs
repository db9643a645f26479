//! Connection lifecycle: which sockets are watched, found without kernel struct offsets.
//!
//! - the TCP state change to `SYN_SENT` (inside `connect`) towards a watched port, or to
//!   `LISTEN` (inside `listen`) on one, marks the calling process (`inet_sock_set_state`,
//!   fields from its format file): only a marked process's system calls are looked at;
//! - `connect` to a watched port (read from the caller's sockaddr, IPv4 or IPv6) makes a
//!   client-side connection;
//! - `listen` on a watched port makes a watched listener (userspace seeds the ones that predate
//!   the daemon from `/proc`);
//! - `accept`/`accept4` on a watched listener — held by this process or inherited from the
//!   process that forked it — makes a server-side connection;
//! - `close` forgets either (a connection closes with its last holder, see [`crate::fds`]).
//!
//! Every call is handled at its exit, with its arguments still in the saved registers.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use observer_common::{ConnInfo, Endpoint, ListenInfo, SockKey, family, kind, side};

use crate::{
    CONNS, Fail, Failed, LISTENERS, Miss, NotOurs, Outcome, PARENTS, Regs, STATE_DPORT_OFFSET,
    STATE_FAMILY_OFFSET, STATE_NEWSTATE_OFFSET, STATE_PROTOCOL_OFFSET, STATE_SADDR_OFFSET,
    STATE_SADDR_V6_OFFSET, STATE_SPORT_OFFSET, WATCHED_PORTS, current, emit_conn,
    fds::{self, file_of, ports_of, same_file},
    global, is_self, mark, new_conn_id, settle,
};

pub const EINPROGRESS: i64 = 115;
const TCP_SYN_SENT: i32 = 2;
const TCP_LISTEN: i32 = 10;
const IPPROTO_TCP: u16 = 6;

/// A watched listener made inside `listen` (by `inet_sock_set_state`), by pid_tgid, until the
/// call's exit names its fd. LRU: an entry left by a thread that died mid-call is safe to
/// evict.
#[map]
static PENDING_LISTEN: LruHashMap<u64, ListenInfo> = LruHashMap::with_max_entries(1024, 0);

/// Where a new connection's entry is put together before [`track`] stores it: on the stack,
/// with the calls under it, it took more than the 512 bytes a program's calls share on
/// kernels before 6.13 (Debian 12's 6.1 and 6.12 rejected `sys_exit`).
#[map]
static NEW_CONN: PerCpuArray<ConnInfo> = PerCpuArray::with_max_entries(1, 0);

/// `sock:inet_sock_set_state`: a TCP socket changes state. Called inside `connect` (to
/// `SYN_SENT`) and `listen` (to `LISTEN`) by the calling task; the other changes happen in
/// softirq context for any task and are ignored.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    settle(try_inet_sock_set_state(&ctx));
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Outcome {
    let record = SockSetState::of(ctx)?;
    let state = record.new_state()?;
    if state != TCP_SYN_SENT && state != TCP_LISTEN {
        return Err(NotOurs);
    }
    if record.protocol()? != IPPROTO_TCP {
        return Err(NotOurs);
    }
    let (pid_tgid, tgid) = current();
    if is_self(tgid) {
        return Err(NotOurs);
    }
    let port = if state == TCP_LISTEN {
        record.sport()?
    } else {
        record.dport()?
    };
    let role = *unsafe { WATCHED_PORTS.get(port) }.ok_or(NotOurs)?;
    mark(tgid);
    if state == TCP_LISTEN {
        let family = record.family()? as u32;
        let mut local = Endpoint {
            family,
            port: port as u32,
            addr: [0; 16],
        };
        if family == family::INET6 {
            local.addr = record.saddr_v6()?;
        } else {
            local.addr[..4].copy_from_slice(&record.saddr()?);
        }
        let listener = ListenInfo {
            role,
            port: port as u32,
            local,
            file: 0,
        };
        PENDING_LISTEN
            .insert(pid_tgid, listener, 0)
            .map_err(|_| Failed(Fail::MapUpdate))?;
    }
    Ok(())
}

/// The record of `sock:inet_sock_set_state`, whose prototype is
/// `TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)`: its fields
/// (`newstate`, `sport`, `dport`, `family`, `protocol`, `saddr`, `saddr_v6`) are read at the
/// offsets the loader found in the event's format file (`STATE_*_OFFSET`), not at offsets
/// compiled in: the record is the kernel's, not an ABI.
struct SockSetState<'a>(&'a TracePointContext);

impl SockSetState<'_> {
    /// The record, where the loader found its fields (`newstate` 0: not found).
    #[inline(always)]
    fn of(ctx: &TracePointContext) -> Result<SockSetState<'_>, Miss> {
        if global(&STATE_NEWSTATE_OFFSET) == 0 {
            return Err(NotOurs);
        }
        Ok(SockSetState(ctx))
    }

    /// The field at the offset the loader put in `offset`.
    #[inline(always)]
    fn field<T>(&self, offset: &u32) -> Result<T, Miss> {
        unsafe { self.0.read_at(global(offset) as usize) }.map_err(|_| Failed(Fail::ReadKernel))
    }

    /// The TCP state the socket enters (`TCP_SYN_SENT`, `TCP_LISTEN`, …).
    #[inline(always)]
    fn new_state(&self) -> Result<i32, Miss> {
        self.field(&STATE_NEWSTATE_OFFSET)
    }

    /// `IPPROTO_TCP` for TCP (other protocols' sockets share the event).
    #[inline(always)]
    fn protocol(&self) -> Result<u16, Miss> {
        self.field(&STATE_PROTOCOL_OFFSET)
    }

    /// The local port, host order (the record converts it).
    #[inline(always)]
    fn sport(&self) -> Result<u16, Miss> {
        self.field(&STATE_SPORT_OFFSET)
    }

    /// The remote port, host order.
    #[inline(always)]
    fn dport(&self) -> Result<u16, Miss> {
        self.field(&STATE_DPORT_OFFSET)
    }

    /// `AF_INET` or `AF_INET6`.
    #[inline(always)]
    fn family(&self) -> Result<u16, Miss> {
        self.field(&STATE_FAMILY_OFFSET)
    }

    /// The local IPv4 address (or the IPv4 form of an IPv6 one).
    #[inline(always)]
    fn saddr(&self) -> Result<[u8; 4], Miss> {
        self.field(&STATE_SADDR_OFFSET)
    }

    /// The local IPv6 address.
    #[inline(always)]
    fn saddr_v6(&self) -> Result<[u8; 16], Miss> {
        self.field(&STATE_SADDR_V6_OFFSET)
    }
}

/// The start of a user `struct sockaddr_in` (uapi `linux/in.h`), which `sockaddr_in6` shares
/// up to the address: the family, then the port in network order.
#[repr(C)]
struct SockaddrIn {
    sin_family: u16,
    sin_port: [u8; 2],
    sin_addr: [u8; 4],
}

/// A user `struct sockaddr_in6` (uapi `linux/in6.h`), up to its address.
#[repr(C)]
struct SockaddrIn6 {
    sin6_family: u16,
    sin6_port: [u8; 2],
    sin6_flowinfo: u32,
    sin6_addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<SockaddrIn>() == 8);
const _: () = assert!(core::mem::offset_of!(SockaddrIn6, sin6_addr) == 8);

/// Reads the family, port and address of a user `sockaddr_in`/`sockaddr_in6` into
/// `endpoint`: the start of either, then the IPv6 address when it is one. Written in place:
/// returned in a `Result`, the endpoint took 96 bytes of this frame's stack (40 written in
/// place), of the 512 that nested calls share before 6.13.
#[inline(never)]
fn read_endpoint(ptr: u64, endpoint: &mut Endpoint) -> Outcome {
    if ptr == 0 {
        return Err(NotOurs);
    }
    let Ok(head) = (unsafe { bpf_probe_read_user(ptr as *const SockaddrIn) }) else {
        return Err(Failed(Fail::ReadUser));
    };
    endpoint.family = head.sin_family as u32;
    endpoint.port = u16::from_be_bytes(head.sin_port) as u32;
    endpoint.addr = [0; 16];
    match endpoint.family {
        family::INET => endpoint.addr[..4].copy_from_slice(&head.sin_addr),
        family::INET6 => {
            let addr = ptr + core::mem::offset_of!(SockaddrIn6, sin6_addr) as u64;
            match unsafe { bpf_probe_read_user(addr as *const [u8; 16]) } {
                Ok(addr) => endpoint.addr = addr,
                Err(_) => return Err(Failed(Fail::ReadUser)),
            }
        }
        _ => return Err(NotOurs),
    }
    Ok(())
}

/// The role of the watched port that the sockaddr of the call's second argument names, read
/// into `endpoint`.
fn watched_endpoint(regs: &Regs, endpoint: &mut Endpoint) -> Result<u32, Miss> {
    read_endpoint(regs.arg1()?, endpoint)?;
    let role = unsafe { WATCHED_PORTS.get(endpoint.port as u16) }.ok_or(NotOurs)?;
    Ok(*role)
}

/// Exit of `connect(fd, uservaddr, addrlen)`: 0, or -EINPROGRESS on a non-blocking socket,
/// to a watched port makes a client-side connection.
#[inline(never)]
pub fn exit_connect(ctx: &RawTracePointContext, regs: &Regs, pid_tgid: u64, tgid: u32) -> Outcome {
    let mut endpoint = Endpoint::default();
    let role = watched_endpoint(regs, &mut endpoint)?;
    let fd = regs.fd()?;
    let file = file_of(fd).unwrap_or(0);
    // The ephemeral port, chosen inside connect(): userspace pairs this end with the server's.
    let local = match settle(ports_of(file)) {
        Some((port, _)) => Endpoint {
            family: endpoint.family,
            port: port as u32,
            addr: [0; 16],
        },
        None => Endpoint::default(),
    };
    let conn = NEW_CONN.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))?;
    // SAFETY: this CPU's slot, exclusively ours while the program runs.
    let conn = unsafe {
        *conn = ConnInfo {
            conn_id: new_conn_id(),
            role,
            side: side::CLIENT,
            port: endpoint.port,
            lost: 0,
            local,
            remote: endpoint,
            file,
        };
        &*conn
    };
    track(ctx, SockKey { tgid, fd }, conn, pid_tgid)
}

/// Forgets what a `listen` of this thread remembered (its exit came, or the call failed).
pub fn forget_listen(pid_tgid: u64) {
    let _ = PENDING_LISTEN.remove(pid_tgid);
}

/// Exit of a successful `listen(fd, backlog)` that made a watched listener (remembered by
/// [`inet_sock_set_state`]): the fd is one.
#[inline(never)]
pub fn exit_listen(ctx: &RawTracePointContext, regs: &Regs, pid_tgid: u64, tgid: u32) -> Outcome {
    let mut listener = *unsafe { PENDING_LISTEN.get(pid_tgid) }.ok_or(NotOurs)?;
    forget_listen(pid_tgid);
    let fd = regs.fd()?;
    listener.file = file_of(fd).unwrap_or(0);
    // The socket this listen made a listener is the one the state change saw, where that can
    // be told.
    if let Some((port, _)) = settle(ports_of(listener.file))
        && port as u32 != listener.port
    {
        return Err(NotOurs);
    }
    if LISTENERS.insert(SockKey { tgid, fd }, listener, 0).is_err() {
        warn!(
            ctx,
            "listener table full: a listener on port {} is not watched", listener.port
        );
        return Err(Failed(Fail::ListenersFull));
    }
    Ok(())
}

/// A watched listener held under `fd` by this process, or inherited from its parent or
/// grandparent (nginx workers are forked by the master, which holds the listening fds).
#[inline(never)]
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

/// Exit of `accept(fd, upeer_sockaddr, upeer_addrlen)` and `accept4`: the new fd (the return
/// value) is a server-side connection when `fd` is a watched listener.
#[inline(never)]
pub fn exit_accept(
    ctx: &RawTracePointContext,
    regs: &Regs,
    ret: i64,
    pid_tgid: u64,
    tgid: u32,
) -> Outcome {
    // Two calls one after the other: the entry is put together (a large frame) and returned
    // from before `track` and its calls take theirs.
    accepted(regs, ret, tgid)?;
    let conn = NEW_CONN.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))?;
    let key = SockKey {
        tgid,
        fd: ret as u32,
    };
    // SAFETY: this CPU's slot, filled by `accepted`, ours while the program runs.
    track(ctx, key, unsafe { &*conn }, pid_tgid)
}

/// The connection `accept` returned as `ret`, put together in [`NEW_CONN`]; not ours when
/// the listening fd is no watched listener.
#[inline(never)]
fn accepted(regs: &Regs, ret: i64, tgid: u32) -> Outcome {
    let fd = regs.fd()?;
    let listener = find_listener(tgid, fd).ok_or(NotOurs)?;
    let peer = regs.arg1()?;
    let file = file_of(ret as u32).unwrap_or(0);
    // A caller that did not ask for the peer's address (libuv, Node) still gets its port.
    let mut remote = Endpoint::default();
    if settle(read_endpoint(peer, &mut remote)).is_none() {
        remote = match settle(ports_of(file)) {
            Some((_, port)) => Endpoint {
                family: listener.local.family,
                port: port as u32,
                addr: [0; 16],
            },
            None => Endpoint::default(),
        };
    }
    let conn = NEW_CONN.get_ptr_mut(0).ok_or(Failed(Fail::MapUpdate))?;
    // SAFETY: this CPU's slot, exclusively ours while the program runs.
    unsafe {
        *conn = ConnInfo {
            conn_id: new_conn_id(),
            role: listener.role,
            side: side::SERVER,
            port: listener.port,
            lost: 0,
            local: listener.local,
            remote,
            file,
        };
    }
    Ok(())
}

/// Starts watching a connection and says so. An entry the fd still had (its close was not
/// seen: close_range, close-on-exec) is forgotten first.
fn track(ctx: &RawTracePointContext, key: SockKey, conn: &ConnInfo, pid_tgid: u64) -> Outcome {
    if let Some(stale) = unsafe { CONNS.get(key) } {
        let stale = *stale;
        fds::forget(key, &stale, pid_tgid);
    }
    if CONNS.insert(key, conn, 0).is_err() {
        warn!(
            ctx,
            "connection table full: a connection on port {} is not watched", conn.port
        );
        return Err(Failed(Fail::ConnsFull));
    }
    // Watched without its holder count all the same (it closes with its first holder): the
    // failure is returned once the rest is done.
    let holders = fds::first_holder(conn.conn_id);
    mark(key.tgid);
    emit_conn(kind::OPEN, conn, pid_tgid, key.fd);
    holders
}

/// Exit of a successful `close(fd)` by a marked process: the key goes (and the connection with
/// its last holder) — unless the number already names a new socket, opened by another thread
/// between the close and this exit, whose entry it now is.
#[inline(never)]
pub fn exit_close(regs: &Regs, pid_tgid: u64, tgid: u32) -> Outcome {
    let fd = regs.fd()?;
    let key = SockKey { tgid, fd };
    let now = file_of(fd);
    let reused = |recorded: u64| matches!(now, Some(file) if file != 0 && file == recorded);
    match unsafe { CONNS.get(key) } {
        Some(conn) => {
            let conn = *conn;
            if !reused(conn.file) {
                fds::forget(key, &conn, pid_tgid);
            }
        }
        None => {
            let listener = unsafe { LISTENERS.get(key) }.ok_or(NotOurs)?;
            if !reused(listener.file) {
                let _ = LISTENERS.remove(key);
            }
        }
    }
    Ok(())
}
