//! Connections and listeners that predate the daemon, found in `/proc` (through
//! [`crate::procfs::sockets`]) and turned into the kernel's map entries, so that the capture
//! follows them as if it had seen them open.

use std::{collections::HashSet, fs, path::Path};

use observer_common::{ConnInfo, ListenInfo, SockKey};

use super::decode::encode_endpoint;
use crate::base::{ConnRecord, Side, WatchedPort, clock::monotonic_ns};
use crate::procfs::sockets::{
    NetnsSocket, SocketHolder, TCP_ESTABLISHED, TCP_LISTEN, all_tcp_sockets, socket_holders,
    socket_inode,
};

/// Whether `key`'s process still holds the socket `inode` under its fd.
pub fn holds_inode(proc_root: &Path, key: SockKey, inode: u64) -> bool {
    let link = proc_root
        .join(key.tgid.to_string())
        .join("fd")
        .join(key.fd.to_string());
    fs::read_link(link)
        .ok()
        .and_then(|target| socket_inode(&target.to_string_lossy()))
        == Some(inode)
}

/// What `/proc` shows on the watched ports, as kernel map entries.
#[derive(Debug, Default)]
pub struct Seed {
    /// Every (holder tgid, fd) of a watched listener.
    pub listeners: Vec<(SockKey, ListenInfo)>,
    /// Every established connection on a watched port, once, with all its holders.
    pub conns: Vec<SeededConn>,
}

/// One established connection on a watched port: one id, however many processes and fds
/// hold its socket (a forked child and its parent, a dup'd fd).
#[derive(Debug, Clone)]
pub struct SeededConn {
    pub conn_id: u64,
    /// The socket's inode.
    pub inode: u64,
    /// The network namespace of the socket (0 when unknown).
    pub netns: u64,
    /// The `CONNS` value, the same under every holder.
    pub info: ConnInfo,
    /// The one open record reported for the connection: its first holder's (lowest pid,
    /// then lowest fd).
    pub record: ConnRecord,
    /// Every (tgid, fd) that holds the socket, by pid then fd; never empty.
    pub holders: Vec<SockKey>,
}

impl Seed {
    /// Every `CONNS` entry: each holder of each connection, with its connection's value.
    pub fn conn_entries(&self) -> impl Iterator<Item = (SockKey, ConnInfo)> + '_ {
        self.conns
            .iter()
            .flat_map(|conn| conn.holders.iter().map(move |&key| (key, conn.info)))
    }
}

/// Finds the watched listeners and established connections in every network namespace and
/// who holds them, leaving out `exclude_tgid` (the daemon itself). A connection whose local
/// port is watched is the server side; one whose remote port is watched is the client side.
pub fn scan(
    proc_root: &Path,
    watch: &[WatchedPort],
    exclude_tgid: Option<u32>,
) -> std::io::Result<Seed> {
    use observer_common::side;

    let role_of = |port: u16| watch.iter().find(|w| w.port == port).map(|w| w.role);
    let sockets: Vec<NetnsSocket> = all_tcp_sockets(proc_root)?
        .into_iter()
        .filter(|s| match s.socket.state {
            TCP_LISTEN => role_of(s.socket.local.port()).is_some(),
            TCP_ESTABLISHED => role_of(s.socket.local.port())
                .or(role_of(s.socket.remote.port()))
                .is_some(),
            _ => false,
        })
        .collect();
    let inodes: HashSet<u64> = sockets.iter().map(|s| s.socket.inode).collect();
    let holders = socket_holders(proc_root, &inodes)?;
    let now = monotonic_ns();
    let mut seed = Seed::default();
    for NetnsSocket { netns, socket } in sockets {
        let holders: Vec<&SocketHolder> = holders
            .get(&socket.inode)
            .into_iter()
            .flatten()
            .filter(|h| Some(h.pid) != exclude_tgid)
            .collect();
        let Some(first) = holders.first() else {
            continue;
        };
        let keys = holders.iter().map(|h| SockKey {
            tgid: h.pid,
            fd: h.fd,
        });
        if socket.state == TCP_LISTEN {
            let role = role_of(socket.local.port()).expect("filtered on a watched port");
            let listener = ListenInfo {
                role: role.to_kernel(),
                port: u32::from(socket.local.port()),
                local: encode_endpoint(socket.local),
                file: 0,
            };
            seed.listeners.extend(keys.map(|key| (key, listener)));
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
        // One id per connection, shared by its holders. Unique beside the kernel's ids: theirs
        // never end in 0xff.
        let conn_id = ((now + seed.conns.len() as u64) << 8) | 0xff;
        let info = ConnInfo {
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
            file: 0,
        };
        let record = ConnRecord {
            ts_ns: now,
            conn_id,
            tgid: first.pid,
            pid: first.pid,
            comm: first.comm.clone(),
            role,
            side,
            fd: first.fd,
            port,
            local: Some(socket.local),
            remote: Some(socket.remote),
            seeded: true,
        };
        seed.conns.push(SeededConn {
            conn_id,
            inode: socket.inode,
            netns,
            info,
            record,
            holders: keys.collect(),
        });
    }
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Role;
    use crate::procfs::sockets::{Listener, listeners, netns_of, network_namespaces};
    use std::net::SocketAddr;
    use std::{
        io::{BufRead as _, Write as _},
        net::{TcpListener, TcpStream},
        os::{
            fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
            unix::process::CommandExt as _,
        },
        path::PathBuf,
        process::{Child, Command, Stdio},
    };

    fn watching(port: u16) -> [WatchedPort; 1] {
        [WatchedPort {
            port,
            role: Role::Upstream,
        }]
    }

    fn own_netns() -> u64 {
        netns_of(Path::new("/proc/self")).expect("our own namespace is readable")
    }

    /// A child process, killed and reaped however the test ends.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A `/proc` made of files: tables, namespace links and fd links.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> FakeProc {
            let root =
                std::env::temp_dir().join(format!("observer-seed-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            FakeProc(root)
        }

        /// `dir/net/tcp` with one line per `(local, remote, state, inode)`.
        fn table(&self, dir: &str, sockets: &[(&str, &str, u8, u64)]) {
            let net = self.0.join(dir).join("net");
            fs::create_dir_all(&net).unwrap();
            let mut text = String::from("  sl  local_address rem_address   st\n");
            for (slot, (local, remote, state, inode)) in sockets.iter().enumerate() {
                text.push_str(&format!(
                    "{slot:4}: {local} {remote} {state:02X} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
                ));
            }
            fs::write(net.join("tcp"), text).unwrap();
        }

        /// `dir/ns/net` naming namespace `netns`.
        fn netns(&self, dir: &str, netns: u64) {
            let ns = self.0.join(dir).join("ns");
            fs::create_dir_all(&ns).unwrap();
            std::os::unix::fs::symlink(format!("net:[{netns}]"), ns.join("net")).unwrap();
        }

        /// A process holding `sockets` as `(fd, inode)`.
        fn process(&self, pid: u32, comm: &str, sockets: &[(u32, u64)]) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            for (fd, inode) in sockets {
                std::os::unix::fs::symlink(
                    format!("socket:[{inode}]"),
                    dir.join(format!("fd/{fd}")),
                )
                .unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn scan_finds_listener_and_both_ends_of_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let watch = watching(port);
        let me = std::process::id();
        let seed = scan(Path::new("/proc"), &watch, None).unwrap();
        assert!(
            seed.listeners
                .iter()
                .any(|(k, l)| k.tgid == me && l.port == u32::from(port)),
            "{seed:?}"
        );
        let mine: Vec<&SeededConn> = seed
            .conns
            .iter()
            .filter(|c| c.holders.iter().any(|k| k.tgid == me))
            .collect();
        let sides: Vec<Side> = mine.iter().map(|c| c.record.side).collect();
        assert!(
            sides.contains(&Side::Server) && sides.contains(&Side::Client),
            "{sides:?}"
        );
        assert!(mine.iter().all(|c| c.netns == own_netns()));
        assert!(seed.conns.iter().all(|c| c.conn_id & 0xff == 0xff
            && c.info.conn_id == c.conn_id
            && c.record.conn_id == c.conn_id
            && c.record.seeded
            && c.record.port == port));
        // The daemon leaves itself out.
        let without_me = scan(Path::new("/proc"), &watch, Some(me)).unwrap();
        assert!(without_me.listeners.iter().all(|(k, _)| k.tgid != me));
        assert!(without_me.conn_entries().all(|(k, _)| k.tgid != me));
        assert!(without_me.conns.iter().all(|c| c.record.tgid != me));
    }

    #[test]
    fn each_namespace_is_read_once_through_a_live_process() {
        let proc = FakeProc::new("netns");
        let listen = "0100007F:2CAA";
        let any = "00000000:0000";
        let peer = "0100007F:9C40";
        // The reader's namespace (1): `/proc/net/tcp` and `/proc/self`.
        proc.table("", &[(listen, any, TCP_LISTEN, 11)]);
        proc.netns("self", 1);
        proc.process(10, "host", &[(3, 11)]);
        proc.netns("10", 1);
        // Read through `/proc/net/tcp` already: never read again.
        proc.table("10", &[(listen, any, TCP_LISTEN, 88)]);
        // Namespace 2: 20 is gone, 21 is read, 22 is not needed.
        proc.netns("20", 2);
        proc.process(21, "ollama", &[(3, 22), (4, 23)]);
        proc.netns("21", 2);
        proc.table(
            "21",
            &[
                (listen, any, TCP_LISTEN, 22),
                (listen, peer, TCP_ESTABLISHED, 23),
            ],
        );
        proc.process(22, "ollama", &[(5, 23)]);
        proc.netns("22", 2);
        proc.table("22", &[(listen, any, TCP_LISTEN, 99)]);
        // A process whose namespace cannot be read is not looked at.
        proc.process(30, "hidden", &[]);
        proc.table("30", &[(listen, any, TCP_LISTEN, 77)]);

        let namespaces = network_namespaces(&proc.0).unwrap();
        assert_eq!(
            namespaces.into_iter().collect::<Vec<_>>(),
            [(1, vec![10]), (2, vec![20, 21, 22])]
        );
        let inodes: Vec<(u64, u64)> = all_tcp_sockets(&proc.0)
            .unwrap()
            .iter()
            .map(|s| (s.netns, s.socket.inode))
            .collect();
        assert_eq!(inodes, [(1, 11), (2, 22), (2, 23)]);

        let found = listeners(&proc.0, &[11434]).unwrap();
        let listener = |netns: u64, inode: u64, pid: u32, comm: &str| Listener {
            addr: "127.0.0.1:11434".parse().unwrap(),
            inode,
            netns,
            holders: vec![SocketHolder {
                pid,
                fd: 3,
                comm: comm.into(),
            }],
        };
        assert_eq!(
            found,
            [listener(1, 11, 10, "host"), listener(2, 22, 21, "ollama")]
        );

        let seed = scan(&proc.0, &watching(11434), None).unwrap();
        let keys: Vec<(u32, u32)> = seed.listeners.iter().map(|(k, _)| (k.tgid, k.fd)).collect();
        assert_eq!(keys, [(10, 3), (21, 3)]);
        assert_eq!(seed.conns.len(), 1, "{seed:?}");
        let conn = &seed.conns[0];
        assert_eq!((conn.netns, conn.inode), (2, 23));
        assert_eq!(
            conn.holders,
            [SockKey { tgid: 21, fd: 4 }, SockKey { tgid: 22, fd: 5 }]
        );
        assert_eq!(
            (conn.record.tgid, conn.record.fd, conn.record.comm.as_str()),
            (21, 4, "ollama")
        );
        assert_eq!(conn.record.side, Side::Server);
        assert_eq!(
            conn.record.remote,
            Some(SocketAddr::from(([127, 0, 0, 1], 40000)))
        );
        // Leaving 21 out makes 22 the holder that is reported.
        let seed = scan(&proc.0, &watching(11434), Some(21)).unwrap();
        assert_eq!(seed.conns[0].holders, [SockKey { tgid: 22, fd: 5 }]);
        assert_eq!(seed.conns[0].record.tgid, 22);
    }

    #[test]
    fn a_socket_held_twice_is_one_connection_with_one_id() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        // A second fd of the server's socket in this process.
        // SAFETY: dup of an open fd; the new fd is owned here alone.
        let dup = unsafe {
            let fd = libc::dup(server.as_raw_fd());
            assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
            OwnedFd::from_raw_fd(fd)
        };
        // And the client's socket in a child process too, under the same fd number.
        let fd = client.as_raw_fd();
        let mut sleep = Command::new("sleep");
        sleep.arg("60").stdin(Stdio::null());
        // SAFETY: fcntl is async-signal-safe.
        unsafe {
            sleep.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = Reaped(sleep.spawn().unwrap());
        let me = std::process::id();
        let kid = child.0.id();
        let inode_of = |fd: i32| {
            let link = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            socket_inode(link.to_str().unwrap()).unwrap()
        };
        // The child has exec'd once its fd table no longer has our other sockets.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fs::read_link(format!("/proc/{kid}/exe"))
            .map(|exe| !exe.to_string_lossy().contains("sleep"))
            .unwrap_or(true)
        {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let seed = scan(Path::new("/proc"), &watching(port), None).unwrap();
        let of = |inode: u64| {
            let conns: Vec<&SeededConn> = seed.conns.iter().filter(|c| c.inode == inode).collect();
            assert_eq!(conns.len(), 1, "one connection per socket: {seed:?}");
            conns[0]
        };
        let server_conn = of(inode_of(server.as_raw_fd()));
        let mut fds = [server.as_raw_fd() as u32, dup.as_raw_fd() as u32];
        fds.sort();
        let both = fds.map(|fd| SockKey { tgid: me, fd });
        assert!(
            both.iter().all(|k| server_conn.holders.contains(k)),
            "{server_conn:?}"
        );
        assert_eq!(server_conn.record.side, Side::Server);
        let client_conn = of(inode_of(fd));
        let fd = fd as u32;
        for key in [SockKey { tgid: me, fd }, SockKey { tgid: kid, fd }] {
            assert!(client_conn.holders.contains(&key), "{client_conn:?}");
        }
        assert_eq!(client_conn.record.side, Side::Client);
        assert_ne!(server_conn.conn_id, client_conn.conn_id);
        for conn in [server_conn, client_conn] {
            // The record is the first holder's, and it is the one record of the connection.
            let first = conn.holders[0];
            assert_eq!((conn.record.tgid, conn.record.fd), (first.tgid, first.fd));
            assert!(
                conn.holders
                    .windows(2)
                    .all(|w| (w[0].tgid, w[0].fd) < (w[1].tgid, w[1].fd))
            );
            let ids: Vec<u64> = seed
                .conn_entries()
                .filter(|(k, _)| conn.holders.contains(k))
                .map(|(_, info)| info.conn_id)
                .collect();
            assert_eq!(ids.len(), conn.holders.len());
            assert!(ids.iter().all(|&id| id == conn.conn_id), "{ids:?}");
        }
        drop(child);
    }

    /// Whether this process may make network namespaces (root, and not forbidden by a
    /// sandbox).
    fn can_unshare_net() -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return false;
        }
        Command::new("unshare")
            .args(["--net", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn finds_a_listener_and_a_connection_in_another_network_namespace() {
        if !can_unshare_net() {
            eprintln!("skipped: needs root and `unshare --net`");
            return;
        }
        // Our listener and theirs on the same address: only the namespace tells them apart.
        let ours_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ours_listener.local_addr().unwrap().port();
        // Listens, connects to itself, says its pid, then holds everything until stdin ends.
        let script = "import os, socket, sys\n\
            port = int(sys.argv[1])\n\
            l = socket.socket()\n\
            l.bind(('127.0.0.1', port))\n\
            l.listen()\n\
            c = socket.create_connection(('127.0.0.1', port))\n\
            s, _ = l.accept()\n\
            print(os.getpid(), flush=True)\n\
            sys.stdin.read()\n";
        let mut child = Reaped(
            Command::new("unshare")
                .args([
                    "--net",
                    "sh",
                    "-c",
                    "ip link set lo up && exec python3 -c \"$0\" \"$1\"",
                    script,
                    &port.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        std::io::BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the namespaced server did not start: {line:?}"));
        let theirs = netns_of(Path::new(&format!("/proc/{pid}"))).unwrap();
        let ours = own_netns();
        assert_ne!(theirs, ours);

        let found = listeners(Path::new("/proc"), &[port]).unwrap();
        let in_ns = |netns: u64| {
            found
                .iter()
                .find(|l| l.netns == netns)
                .unwrap_or_else(|| panic!("no listener in net:[{netns}]: {found:?}"))
        };
        let me = std::process::id();
        assert!(in_ns(ours).holders.iter().any(|h| h.pid == me), "{found:?}");
        assert!(
            in_ns(theirs).holders.iter().any(|h| h.pid == pid),
            "{found:?}"
        );
        assert_eq!(in_ns(ours).addr, in_ns(theirs).addr);
        assert_ne!(in_ns(ours).inode, in_ns(theirs).inode);

        let seed = scan(Path::new("/proc"), &watching(port), Some(me)).unwrap();
        assert!(
            seed.listeners
                .iter()
                .any(|(k, l)| k.tgid == pid && l.port == u32::from(port)),
            "{seed:?}"
        );
        let theirs_conns: Vec<&SeededConn> =
            seed.conns.iter().filter(|c| c.netns == theirs).collect();
        let mut sides: Vec<Side> = theirs_conns.iter().map(|c| c.record.side).collect();
        sides.sort_by_key(|s| *s == Side::Client);
        assert_eq!(sides, [Side::Server, Side::Client], "{seed:?}");
        for conn in theirs_conns {
            assert_eq!(conn.record.tgid, pid);
            assert!(conn.holders.iter().all(|k| k.tgid == pid), "{conn:?}");
            assert_eq!(conn.conn_id & 0xff, 0xff);
        }
        // Their two ends are each other's mirror.
        let ends: Vec<(Option<SocketAddr>, Option<SocketAddr>)> = seed
            .conns
            .iter()
            .filter(|c| c.netns == theirs)
            .map(|c| (c.record.local, c.record.remote))
            .collect();
        assert_eq!(ends[0], (ends[1].1, ends[1].0));
    }
}
