//! The 4-tuple of each connection, completed in userspace.
//!
//! The kernel side knows, without struct offsets, the remote of a client connection (the
//! connect() target) and, for the server side, the listener's address and the peer. The
//! client's ephemeral local port, and the server's real local address behind a wildcard
//! listener, are only in the socket: [`EndpointBook::complete`] reads them from the process's
//! own `/proc/<tgid>/net/tcp{,6}` (its network namespace) once per batch that has opens in it,
//! and remembers them so that the close of the same connection carries them too.

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::decode::Event;
use crate::base::ConnRecord;
use crate::procfs::sockets::{self, TcpSocket, tcp_sockets};

/// More remembered connections than this means closes were lost (a ring buffer overrun):
/// start over rather than grow.
const MAX_REMEMBERED: usize = 1 << 18;

/// Endpoints of open connections, by connection id.
#[derive(Debug)]
pub struct EndpointBook {
    proc_root: PathBuf,
    known: HashMap<u64, (Option<SocketAddr>, Option<SocketAddr>)>,
}

impl EndpointBook {
    pub fn new(proc_root: impl Into<PathBuf>) -> EndpointBook {
        EndpointBook {
            proc_root: proc_root.into(),
            known: HashMap::new(),
        }
    }

    /// Remembers a connection whose endpoints are already complete (seeded from `/proc`).
    pub fn remember(&mut self, conn: &ConnRecord) {
        self.known.insert(conn.conn_id, (conn.local, conn.remote));
    }

    /// Completes the endpoints of the opens in `events` and gives each close the endpoints its
    /// open had. A socket already gone when this runs keeps what the kernel side knew.
    pub fn complete(&mut self, events: &mut [Event]) {
        let mut tables: HashMap<u32, HashMap<u64, TcpSocket>> = HashMap::new();
        for event in events.iter_mut() {
            match event {
                Event::Open(open) => {
                    if incomplete(open)
                        && let Some(socket) = self.lookup(&mut tables, open.tgid, open.fd)
                    {
                        open.local = Some(socket.local);
                        open.remote = Some(socket.remote);
                    }
                    if self.known.len() >= MAX_REMEMBERED {
                        tracing::debug!(
                            "forgetting {} connection endpoints (closes were lost)",
                            self.known.len()
                        );
                        self.known.clear();
                    }
                    self.known.insert(open.conn_id, (open.local, open.remote));
                }
                Event::Close(close) => {
                    if let Some((local, remote)) = self.known.remove(&close.conn_id) {
                        close.local = local.or(close.local);
                        close.remote = remote.or(close.remote);
                    }
                }
                Event::Data(_) => {}
            }
        }
    }

    /// The socket behind `fd` of `tgid`, reading that process's TCP tables once per batch.
    fn lookup(
        &self,
        tables: &mut HashMap<u32, HashMap<u64, TcpSocket>>,
        tgid: u32,
        fd: u32,
    ) -> Option<TcpSocket> {
        let process = self.proc_root.join(tgid.to_string());
        let inode = socket_inode(&process, fd)?;
        let table = tables.entry(tgid).or_insert_with(|| {
            tcp_sockets(&process)
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.inode, s))
                .collect()
        });
        table.get(&inode).copied()
    }

    /// Connections remembered now (for tests and status).
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// The kernel side could not know the client's local port, nor the real address behind a
/// wildcard listener.
fn incomplete(conn: &ConnRecord) -> bool {
    match (conn.local, conn.remote) {
        (Some(local), Some(_)) => local.ip().is_unspecified(),
        _ => true,
    }
}

fn socket_inode(process: &Path, fd: u32) -> Option<u64> {
    let link = fs::read_link(process.join("fd").join(fd.to_string())).ok()?;
    sockets::socket_inode(link.to_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::{Role, Side};
    use std::os::fd::AsRawFd;

    fn open(
        conn_id: u64,
        fd: u32,
        local: Option<SocketAddr>,
        remote: Option<SocketAddr>,
    ) -> ConnRecord {
        ConnRecord {
            ts_ns: 1,
            conn_id,
            tgid: std::process::id(),
            pid: std::process::id(),
            comm: "test".into(),
            role: Role::Upstream,
            side: Side::Client,
            fd,
            port: remote.map_or(0, |r| r.port()),
            local,
            remote,
            seeded: false,
        }
    }

    #[test]
    fn completes_a_client_open_from_proc_and_its_close_from_memory() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut book = EndpointBook::new("/proc");

        let mut events = vec![
            Event::Open(open(7, client.as_raw_fd() as u32, None, Some(server))),
            // The server side behind a wildcard listener.
            Event::Open(open(
                8,
                accepted.as_raw_fd() as u32,
                Some("0.0.0.0:1".parse().unwrap()),
                None,
            )),
        ];
        book.complete(&mut events);
        let [Event::Open(c), Event::Open(s)] = &events[..] else {
            unreachable!()
        };
        assert_eq!(
            (c.local, c.remote),
            (Some(client.local_addr().unwrap()), Some(server))
        );
        assert_eq!(
            (s.local, s.remote),
            (Some(server), Some(client.local_addr().unwrap()))
        );
        assert_eq!(book.len(), 2);

        let mut closes = vec![Event::Close(open(7, 0, None, Some(server)))];
        book.complete(&mut closes);
        let [Event::Close(closed)] = &closes[..] else {
            unreachable!()
        };
        assert_eq!(closed.local, Some(client.local_addr().unwrap()));
        assert_eq!(book.len(), 1, "a closed connection is forgotten");
    }

    #[test]
    fn a_socket_already_gone_keeps_the_kernel_view() {
        let mut book = EndpointBook::new("/proc");
        let remote = Some("127.0.0.1:9".parse().unwrap());
        let mut events = vec![Event::Open(open(9, 1_000_000, None, remote))];
        book.complete(&mut events);
        let [Event::Open(o)] = &events[..] else {
            unreachable!()
        };
        assert_eq!((o.local, o.remote), (None, remote));
    }
}
