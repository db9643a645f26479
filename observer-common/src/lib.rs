//! Types shared by the kernel programs (`observer-ebpf`) and the daemon (`observer`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on the byte
//! layout without a kernel struct offset in sight. Flags are `u32`, never `bool`. The `user`
//! feature adds `aya::Pod` so userspace can put these types in maps; the kernel side never
//! enables it. No logic lives here beyond constants and plain data.
#![no_std]

/// Most payload bytes captured from the start of one syscall's buffer. The daemon may ask for
/// fewer at start-up (`HEAD_BYTES` global); never more.
pub const HEAD_MAX: usize = 1024;
/// Most payload bytes captured from the end of one syscall's buffer (`TAIL_BYTES` global).
pub const TAIL_MAX: usize = 256;

/// Names of the maps and globals in the kernel object, used by the loader.
pub mod names {
    pub const EVENTS: &str = "EVENTS";
    pub const WATCHED_PORTS: &str = "WATCHED_PORTS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const CONNS: &str = "CONNS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const HEAD_BYTES: &str = "HEAD_BYTES";
    pub const TAIL_BYTES: &str = "TAIL_BYTES";
    pub const SELF_TGID: &str = "SELF_TGID";
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    pub const REFS: &str = "REFS";
    pub const NEWTASK_PID_OFFSET: &str = "NEWTASK_PID_OFFSET";
    pub const NEWTASK_FLAGS_OFFSET: &str = "NEWTASK_FLAGS_OFFSET";
    pub const FD_LAYOUT_KNOWN: &str = "FD_LAYOUT_KNOWN";
    pub const TASK_FILES_OFFSET: &str = "TASK_FILES_OFFSET";
    pub const FILES_FDT_OFFSET: &str = "FILES_FDT_OFFSET";
    pub const FDT_MAX_FDS_OFFSET: &str = "FDT_MAX_FDS_OFFSET";
    pub const FDT_FD_OFFSET: &str = "FDT_FD_OFFSET";
    pub const SOCK_LAYOUT_KNOWN: &str = "SOCK_LAYOUT_KNOWN";
    pub const FILE_PRIVATE_DATA_OFFSET: &str = "FILE_PRIVATE_DATA_OFFSET";
    pub const SOCKET_SK_OFFSET: &str = "SOCKET_SK_OFFSET";
    pub const SOCK_NUM_OFFSET: &str = "SOCK_NUM_OFFSET";
    pub const SOCK_DPORT_OFFSET: &str = "SOCK_DPORT_OFFSET";
    pub const SYSCALLS: &str = "SYSCALLS";
    pub const MARKS: &str = "MARKS";
    pub const SEEDED_MARKS: &str = "SEEDED_MARKS";
    pub const FILTER_OFF: &str = "FILTER_OFF";
    pub const REGS_ARG0_OFFSET: &str = "REGS_ARG0_OFFSET";
    pub const REGS_ARG1_OFFSET: &str = "REGS_ARG1_OFFSET";
    pub const REGS_ARG2_OFFSET: &str = "REGS_ARG2_OFFSET";
    pub const REGS_NR_OFFSET: &str = "REGS_NR_OFFSET";
    pub const COMPAT_STATUS_OFFSET: &str = "COMPAT_STATUS_OFFSET";
    pub const EXIT_LAYOUT_KNOWN: &str = "EXIT_LAYOUT_KNOWN";
    pub const STATE_NEWSTATE_OFFSET: &str = "STATE_NEWSTATE_OFFSET";
    pub const STATE_SPORT_OFFSET: &str = "STATE_SPORT_OFFSET";
    pub const STATE_DPORT_OFFSET: &str = "STATE_DPORT_OFFSET";
    pub const STATE_FAMILY_OFFSET: &str = "STATE_FAMILY_OFFSET";
    pub const STATE_PROTOCOL_OFFSET: &str = "STATE_PROTOCOL_OFFSET";
    pub const STATE_SADDR_OFFSET: &str = "STATE_SADDR_OFFSET";
    pub const STATE_SADDR_V6_OFFSET: &str = "STATE_SADDR_V6_OFFSET";
    pub const TASK_SIGNAL_OFFSET: &str = "TASK_SIGNAL_OFFSET";
    pub const SIGNAL_LIVE_OFFSET: &str = "SIGNAL_LIVE_OFFSET";
}

/// What the kernel programs do with a system call of a marked process, by number: the
/// `SYSCALLS` array the loader fills from the running architecture's numbers (0: nothing).
/// Every kind is handled at the call's exit.
pub mod syscall {
    // Data, at exit: the return value is the bytes moved.
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const RECVFROM: u32 = 3;
    pub const SENDTO: u32 = 4;
    pub const READV: u32 = 5;
    pub const WRITEV: u32 = 6;
    pub const RECVMSG: u32 = 7;
    pub const SENDMSG: u32 = 8;
    // Lifecycle, at exit.
    pub const CONNECT: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const ACCEPT: u32 = 11;
    pub const DUP: u32 = 12;
    pub const FCNTL: u32 = 13;
    pub const CLOSE: u32 = 14;
    pub const CLOSE_RANGE: u32 = 15;
    pub const DUP2: u32 = 16;
    /// Most kinds (array bound for tables indexed by kind).
    pub const KINDS: u32 = 17;

    /// Whether the kind moves bytes (handled by the data path).
    pub const fn is_data(kind: u32) -> bool {
        kind >= READ && kind <= SENDMSG
    }

    /// Direction of a data kind as seen by the caller.
    pub const fn direction(kind: u32) -> u32 {
        match kind {
            READ | RECVFROM | READV | RECVMSG => super::direction::INGRESS,
            _ => super::direction::EGRESS,
        }
    }

    /// Entries of the `SYSCALLS` array: system call numbers at or above it are never acted on.
    pub const TABLE_LEN: u32 = 1024;
}

/// Length of a process name (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Address families as the kernel numbers them.
pub mod family {
    pub const INET: u32 = 2;
    pub const INET6: u32 = 10;
}

/// What a watched port is to the host: the gateway in front, or the model server behind it.
pub mod role {
    pub const GATEWAY: u32 = 1;
    pub const UPSTREAM: u32 = 2;
}

/// Which end of the connection the observed process is.
pub mod side {
    /// The process accepted the connection on a watched listener.
    pub const SERVER: u32 = 1;
    /// The process connected to a watched port.
    pub const CLIENT: u32 = 2;
}

/// Direction of bytes as seen by the observed process.
pub mod direction {
    /// Received by the process (read, recv*).
    pub const INGRESS: u32 = 1;
    /// Sent by the process (write, send*).
    pub const EGRESS: u32 = 2;
}

/// The first `u32` of every ring buffer record.
pub mod kind {
    pub const DATA: u32 = 1;
    pub const OPEN: u32 = 2;
    pub const CLOSE: u32 = 3;
}

/// Slots of the per-CPU `COUNTERS` array: conditions the kernel side counts instead of logging.
pub mod counter {
    /// A data event could not be reserved in the ring buffer.
    pub const LOST_DATA: u32 = 0;
    /// An open or close event could not be reserved in the ring buffer.
    pub const LOST_CONN: u32 = 1;
    /// The connection table was full when a new connection was to be tracked, or another
    /// holder of one (a forked child, a duplicated fd) added.
    pub const CONNS_FULL: u32 = 2;
    /// Reading the caller's sockaddr or payload failed.
    pub const READ_USER_FAILED: u32 = 3;
    /// The listener table was full when a watched listener (or a duplicated fd of one) was to
    /// be tracked.
    pub const LISTENERS_FULL: u32 = 4;
    /// The table of marked processes was full: the per-process filter is off from then on
    /// (every process's data calls pay a connection lookup; nothing is missed).
    pub const TGIDS_FULL: u32 = 5;
    /// A read of kernel memory failed: a saved register of the system call, a field of a
    /// tracepoint's record, of the task, of its descriptor table or of a socket. What needed
    /// it was not done, or done without it (an fd not checked against its connection).
    pub const READ_KERNEL_FAILED: u32 = 6;
    /// A map update failed other than the full tables counted above (a forked child's
    /// parent, a listen waiting for its exit, a connection's holder count), or a per-CPU
    /// slot could not be had.
    pub const MAP_UPDATE_FAILED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Key of the `CONNS` map: a socket as a process sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub tgid: u32,
    pub fd: u32,
}

/// An IPv4 or IPv6 endpoint as the kernel side knows it. `family` 0 means unknown; IPv4
/// addresses use the first 4 bytes of `addr`. The port is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub family: u32,
    pub port: u32,
    pub addr: [u8; 16],
}

/// Value of the `LISTENERS` map: a watched listening socket, keyed by every `(tgid, fd)` that
/// holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenInfo {
    pub role: u32,
    /// The watched port (host byte order).
    pub port: u32,
    /// The bound address (may be the wildcard).
    pub local: Endpoint,
    /// The open file (`struct file *`) the fd referred to when the entry was made: the
    /// socket's identity. 0 until the kernel side first sees it (entries seeded by userspace).
    pub file: u64,
}

/// Value of the `CONNS` map: a watched connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Unique for the host's uptime: the open timestamp with the CPU number in the low byte
    /// (0xff for connections seeded by userspace).
    pub conn_id: u64,
    pub role: u32,
    pub side: u32,
    /// The watched port (host byte order).
    pub port: u32,
    /// How many of this connection's data events could not be delivered (the ring buffer was
    /// full; wrapping): its exchanges are no longer framed right. Userspace reads it in its
    /// sweep and puts the connection back in step whenever it changed. Only the kernel writes
    /// it: a write from userspace, made after its walk of the table, could land on the same
    /// key reused by a newer connection and replace that one's entry.
    pub lost: u32,
    /// What is known of the two ends: the listener's address and the peer for the server
    /// side, the connect() target for the client side.
    pub local: Endpoint,
    pub remote: Endpoint,
    /// The open file (`struct file *`) behind `(tgid, fd)` when the entry was made: the
    /// socket's identity, shared by every fd and process that holds it (dup, fork). An fd
    /// that no longer refers to it (dup2 onto it, close_range, close-on-exec) is a stale
    /// entry, never read as this connection. 0 until the kernel side first sees it (entries
    /// seeded by userspace).
    pub file: u64,
}

/// One send or receive on a watched connection: the header of a ring buffer record that is
/// followed by `head_len` bytes from the start of the buffer, then `tail_len` from its end.
/// The record is as long as that (variable size: a 100-byte chunk costs 100 bytes of ring).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    /// Always [`kind::DATA`].
    pub kind: u32,
    pub direction: u32,
    /// `bpf_ktime_get_ns` at syscall exit (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub role: u32,
    pub side: u32,
    pub fd: u32,
    pub port: u32,
    /// Bytes the syscall returned (always > 0 for a data event).
    pub len: u64,
    pub head_len: u32,
    pub tail_len: u32,
    /// Process name at the syscall, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// Most payload bytes after a [`DataEvent`] header.
pub const PAYLOAD_MAX: usize = HEAD_MAX + TAIL_MAX;

/// A watched connection opened (connect/accept) or closed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    /// [`kind::OPEN`] or [`kind::CLOSE`].
    pub kind: u32,
    pub side: u32,
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub role: u32,
    pub fd: u32,
    /// The watched port (host byte order).
    pub port: u32,
    /// 1 when userspace found the connection in /proc rather than seeing it open.
    pub seeded: u32,
    pub local: Endpoint,
    pub remote: Endpoint,
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] plain integers and byte arrays with no implicit padding.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::ListenInfo {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::DataEvent {}
    unsafe impl aya::Pod for super::ConnEvent {}
}

// The layouts are part of the contract between the two sides: catch accidental padding.
const _: () = assert!(core::mem::size_of::<SockKey>() == 8);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 24);
const _: () = assert!(core::mem::size_of::<ListenInfo>() == 40);
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 80);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 112);
const _: () = assert!(core::mem::size_of::<DataEvent>() == 80);
