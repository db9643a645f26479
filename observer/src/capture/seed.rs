//! Sockets on watched ports, found in `/proc` rather than in the kernel: `/proc/net/tcp{,6}`
//! gives each socket's addresses, state and inode; `/proc/<pid>/fd` says which processes
//! hold that inode and under which fd numbers (forked workers share a listener).
//!
//! Used by `observer check` to list listeners, and by the capture to seed connections that
//! predate the daemon. Read-only; a process that vanishes mid-scan is skipped, not an error.

use super::{
    WatchedPort,
    decode::{ConnRecord, Side, encode_endpoint},
};
use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

/// TCP states as `/proc/net/tcp` writes them.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// One line of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

/// A process holding a socket, and the fd number it holds it under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SocketHolder {
    pub pid: u32,
    pub fd: u32,
    pub comm: String,
}

/// A listening socket on a watched port and the processes that can accept on it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
    pub holders: Vec<SocketHolder>,
}

/// Every TCP socket of this network namespace (IPv4 and IPv6).
pub fn tcp_sockets(proc_root: &Path) -> std::io::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    for file in ["net/tcp", "net/tcp6"] {
        match fs::read_to_string(proc_root.join(file)) {
            Ok(text) => sockets.extend(text.lines().skip(1).filter_map(parse_tcp_line)),
            // A kernel without IPv6 has no tcp6.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(sockets)
}

/// Listening sockets whose local port is one of `ports`, with their holders.
pub fn listeners(proc_root: &Path, ports: &[u16]) -> std::io::Result<Vec<Listener>> {
    let listening: Vec<TcpSocket> = tcp_sockets(proc_root)?
        .into_iter()
        .filter(|s| s.state == TCP_LISTEN && ports.contains(&s.local.port()))
        .collect();
    let inodes: HashSet<u64> = listening.iter().map(|s| s.inode).collect();
    let mut holders = socket_holders(proc_root, &inodes)?;
    Ok(listening
        .into_iter()
        .map(|s| Listener {
            addr: s.local,
            inode: s.inode,
            holders: holders.remove(&s.inode).unwrap_or_default(),
        })
        .collect())
}

/// For each inode of interest, the processes that hold it, sorted by pid then fd.
pub fn socket_holders(
    proc_root: &Path,
    inodes: &HashSet<u64>,
) -> std::io::Result<BTreeMap<u64, Vec<SocketHolder>>> {
    let mut found: BTreeMap<u64, Vec<SocketHolder>> = BTreeMap::new();
    if inodes.is_empty() {
        return Ok(found);
    }
    for entry in fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go during the scan; what cannot be read is simply not listed.
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(fd_num) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let comm = comm.get_or_insert_with(|| {
                fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_default()
            });
            found.entry(inode).or_default().push(SocketHolder {
                pid,
                fd: fd_num,
                comm: comm.clone(),
            });
        }
    }
    for holders in found.values_mut() {
        holders.sort_by_key(|h| (h.pid, h.fd));
    }
    Ok(found)
}

/// `socket:[12345]` → 12345.
pub(crate) fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 12345 ...`
fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = parse_endpoint(fields.next()?)?;
    let remote = parse_endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, then the inode.
    let inode = fields.nth(5)?.parse().ok()?;
    Some(TcpSocket {
        local,
        remote,
        state,
        inode,
    })
}

/// The kernel prints addresses as native-endian 32-bit words in hex, the port as plain hex.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipv4_and_ipv6_lines() {
        let v4 = "   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        let s = parse_tcp_line(v4).unwrap();
        assert_eq!(s.local, "127.0.0.1:11434".parse().unwrap());
        assert_eq!((s.state, s.inode), (TCP_LISTEN, 4242));
        let v6 = "   1: 00000000000000000000000001000000:4965 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let s = parse_tcp_line(v6).unwrap();
        assert_eq!(s.local, "[::1]:18789".parse().unwrap());
        assert_eq!(s.remote.port(), 0xD431);
        assert_eq!((s.state, s.inode), (TCP_ESTABLISHED, 777));
    }

    #[test]
    fn rejects_malformed_lines() {
        assert_eq!(parse_tcp_line(""), None);
        assert_eq!(parse_tcp_line("   0: 0100007F 00000000:0000 0A"), None);
        assert_eq!(
            parse_tcp_line("   0: 0100007F:ZZZZ 00000000:0000 0A 0:0 0:0 0 0 0 1"),
            None
        );
        assert_eq!(socket_inode("pipe:[12]"), None);
        assert_eq!(socket_inode("socket:[12]"), Some(12));
    }

    #[test]
    fn finds_this_process_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = listeners(Path::new("/proc"), &[port]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].addr.port(), port);
        let me = std::process::id();
        assert!(found[0].holders.iter().any(|h| h.pid == me), "{found:?}");
    }

    #[test]
    fn scan_finds_listener_and_both_ends_of_a_connection() {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let watch = [WatchedPort {
            port,
            role: crate::capture::Role::Upstream,
        }];
        let me = std::process::id();
        let seed = scan(Path::new("/proc"), &watch, None).unwrap();
        assert!(
            seed.listeners
                .iter()
                .any(|(k, l)| k.tgid == me && l.port == u32::from(port)),
            "{seed:?}"
        );
        let sides: Vec<Side> = seed
            .conns
            .iter()
            .filter(|(k, ..)| k.tgid == me)
            .map(|(.., r)| r.side)
            .collect();
        assert!(
            sides.contains(&Side::Server) && sides.contains(&Side::Client),
            "{sides:?}"
        );
        assert!(
            seed.conns
                .iter()
                .all(|(_, c, r)| c.conn_id & 0xff == 0xff && r.seeded && r.port == port)
        );
        // The daemon leaves itself out.
        let without_me = scan(Path::new("/proc"), &watch, Some(me)).unwrap();
        assert!(
            without_me
                .listeners
                .iter()
                .chain([])
                .all(|(k, _)| k.tgid != me)
        );
        assert!(without_me.conns.iter().all(|(k, ..)| k.tgid != me));
    }
}

/// What `/proc` shows on the watched ports, as kernel map entries.
#[derive(Debug, Default)]
pub struct Seed {
    /// Every (holder tgid, fd) of a watched listener.
    pub listeners: Vec<(observer_common::SockKey, observer_common::ListenInfo)>,
    /// Every (holder tgid, fd) of an established connection on a watched port, with the
    /// record reported for it.
    pub conns: Vec<(
        observer_common::SockKey,
        observer_common::ConnInfo,
        ConnRecord,
    )>,
}

/// Finds the watched listeners and established connections and who holds them, leaving out
/// `exclude_tgid` (the daemon itself). A connection whose local port is watched is the server
/// side; one whose remote port is watched is the client side.
pub fn scan(
    proc_root: &Path,
    watch: &[WatchedPort],
    exclude_tgid: Option<u32>,
) -> std::io::Result<Seed> {
    use observer_common::{ConnInfo, ListenInfo, SockKey, side};

    let role_of = |port: u16| watch.iter().find(|w| w.port == port).map(|w| w.role);
    let sockets = tcp_sockets(proc_root)?;
    let inodes: HashSet<u64> = sockets
        .iter()
        .filter(|s| match s.state {
            TCP_LISTEN => role_of(s.local.port()).is_some(),
            TCP_ESTABLISHED => role_of(s.local.port())
                .or(role_of(s.remote.port()))
                .is_some(),
            _ => false,
        })
        .map(|s| s.inode)
        .collect();
    let holders = socket_holders(proc_root, &inodes)?;
    let now = monotonic_ns();
    let mut seed = Seed::default();
    for socket in sockets.iter().filter(|s| inodes.contains(&s.inode)) {
        let Some(holders) = holders.get(&socket.inode) else {
            continue;
        };
        for holder in holders.iter().filter(|h| Some(h.pid) != exclude_tgid) {
            let key = SockKey {
                tgid: holder.pid,
                fd: holder.fd,
            };
            if socket.state == TCP_LISTEN {
                let role = role_of(socket.local.port()).expect("filtered on a watched port");
                let listener = ListenInfo {
                    role: role.to_kernel(),
                    port: u32::from(socket.local.port()),
                    local: encode_endpoint(socket.local),
                };
                seed.listeners.push((key, listener));
                continue;
            }
            let (side, role, port) = match role_of(socket.local.port()) {
                Some(role) => (Side::Server, role, socket.local.port()),
                None => (
                    Side::Client,
                    role_of(socket.remote.port()).expect("filtered"),
                    socket.remote.port(),
                ),
            };
            // Unique beside the kernel's ids: theirs never end in 0xff.
            let conn_id = ((now + seed.conns.len() as u64) << 8) | 0xff;
            let conn = ConnInfo {
                conn_id,
                role: role.to_kernel(),
                side: if side == Side::Server {
                    side::SERVER
                } else {
                    side::CLIENT
                },
                port: u32::from(port),
                lost: 0,
                local: encode_endpoint(socket.local),
                remote: encode_endpoint(socket.remote),
            };
            let record = ConnRecord {
                ts_ns: now,
                conn_id,
                tgid: holder.pid,
                pid: holder.pid,
                comm: holder.comm.clone(),
                role,
                side,
                fd: holder.fd,
                port,
                local: Some(socket.local),
                remote: Some(socket.remote),
                seeded: true,
            };
            seed.conns.push((key, conn, record));
        }
    }
    Ok(seed)
}

/// CLOCK_MONOTONIC in ns, the clock of the kernel side's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
