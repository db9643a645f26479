//! Sockets on watched ports, found in `/proc` rather than in the kernel: `/proc/<pid>/net/tcp{,6}`
//! gives each socket's addresses, state and inode, one table per network namespace;
//! `/proc/<pid>/fd` says which processes hold that inode and under which fd numbers (forked
//! workers share a listener).
//!
//! Every network namespace counts, not only the daemon's: a server in a container (its own
//! namespace) is found as well. The processes are grouped by their namespace
//! (`/proc/<pid>/ns/net`) and each namespace's tables are read once, through one of its
//! processes. Socket inodes are unique host-wide (sockfs), so the tables merge into one list;
//! each socket keeps its namespace, since the same addresses can exist in two of them.
//!
//! Used by `observer check` to list listeners, by the process collector to find the servers,
//! and by the capture to seed connections that predate the daemon (`capture::seed`).
//! Read-only; a process that vanishes mid-scan is skipped, not an error.

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

/// A TCP socket and the network namespace it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsSocket {
    /// The inode of the namespace (`net:[INODE]`); 0 when it could not be read.
    pub netns: u64,
    pub socket: TcpSocket,
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
    /// The network namespace the socket is bound in (`net:[INODE]`'s inode; 0 when unknown).
    pub netns: u64,
    pub holders: Vec<SocketHolder>,
}

/// Every TCP socket of the network namespace of `proc_root` (`/proc`, or `/proc/<pid>` for
/// that process's namespace), IPv4 and IPv6.
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

/// The network namespace of a process directory (`/proc/<pid>`, `/proc/self`): the inode in
/// `ns/net`'s `net:[INODE]`. `None` when it cannot be read (the process is gone, or another
/// user's without the privilege to look).
pub fn netns_of(process: &Path) -> Option<u64> {
    let link = fs::read_link(process.join("ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The processes under `proc_root`, grouped by network namespace, each group in pid order.
/// Processes whose namespace cannot be read are left out.
pub fn network_namespaces(proc_root: &Path) -> std::io::Result<BTreeMap<u64, Vec<u32>>> {
    let mut namespaces: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for entry in fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = pid_of(&entry) else { continue };
        if let Some(netns) = netns_of(&entry.path()) {
            namespaces.entry(netns).or_default().push(pid);
        }
    }
    for pids in namespaces.values_mut() {
        pids.sort_unstable();
    }
    Ok(namespaces)
}

/// Every TCP socket of every network namespace, each once: the reader's own namespace first
/// (`proc_root/net/tcp{,6}`, as before namespaces counted, so a `/proc` where no other
/// process can be looked at still gives these), then each other namespace, in inode order,
/// through the first of its processes whose tables can be read.
pub fn all_tcp_sockets(proc_root: &Path) -> std::io::Result<Vec<NetnsSocket>> {
    let own = netns_of(&proc_root.join("self"));
    let mut seen = HashSet::new();
    let mut sockets = Vec::new();
    let mut add = |netns: u64, table: Vec<TcpSocket>| {
        for socket in table {
            if seen.insert(socket.inode) {
                sockets.push(NetnsSocket { netns, socket });
            }
        }
    };
    add(own.unwrap_or(0), tcp_sockets(proc_root)?);
    // IPv6 is the kernel's, not a namespace's: with it, every namespace has a tcp6 table.
    let ipv6 = proc_root.join("net/tcp6").exists();
    for (netns, pids) in network_namespaces(proc_root)? {
        if Some(netns) == own {
            continue;
        }
        // A process may exit between the listing and the read: try the next one.
        if let Some(table) = pids
            .iter()
            .find_map(|pid| namespace_tables(&proc_root.join(pid.to_string()), ipv6).ok())
        {
            add(netns, table);
        }
    }
    Ok(sockets)
}

/// The tables of one process's namespace, every one that should be there: unlike
/// [`tcp_sockets`], a missing table means the process is gone, not an empty table.
fn namespace_tables(process: &Path, ipv6: bool) -> std::io::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    let files: &[&str] = if ipv6 {
        &["net/tcp", "net/tcp6"]
    } else {
        &["net/tcp"]
    };
    for file in files {
        let text = fs::read_to_string(process.join(file))?;
        sockets.extend(text.lines().skip(1).filter_map(parse_tcp_line));
    }
    Ok(sockets)
}

/// Listening sockets whose local port is one of `ports`, in every network namespace, with
/// their holders.
pub fn listeners(proc_root: &Path, ports: &[u16]) -> std::io::Result<Vec<Listener>> {
    let listening: Vec<NetnsSocket> = all_tcp_sockets(proc_root)?
        .into_iter()
        .filter(|s| s.socket.state == TCP_LISTEN && ports.contains(&s.socket.local.port()))
        .collect();
    let inodes: HashSet<u64> = listening.iter().map(|s| s.socket.inode).collect();
    let mut holders = socket_holders(proc_root, &inodes)?;
    Ok(listening
        .into_iter()
        .map(|s| Listener {
            addr: s.socket.local,
            inode: s.socket.inode,
            netns: s.netns,
            holders: holders.remove(&s.socket.inode).unwrap_or_default(),
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
        let Some(pid) = pid_of(&entry) else { continue };
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

/// The pid a `/proc` entry names, if it names one.
fn pid_of(entry: &fs::DirEntry) -> Option<u32> {
    entry.file_name().to_str()?.parse().ok()
}

/// `socket:[12345]` → 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
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
    use std::net::TcpListener;

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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let found = listeners(Path::new("/proc"), &[port]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].addr.port(), port);
        assert_eq!(found[0].netns, netns_of(Path::new("/proc/self")).unwrap());
        let me = std::process::id();
        assert!(found[0].holders.iter().any(|h| h.pid == me), "{found:?}");
    }
}
