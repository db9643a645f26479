//! Kernel capture basics (root, real kernel): plain servers and clients in this process on a
//! watched port, one connection per pair of syscalls (`write`/`read`, `sendto`/`recvfrom`,
//! `writev`/`readv`, `sendmsg`/`recvmsg`), over IPv4 and IPv6 loopback. Each connection has
//! an open and a close event on both ends; per direction, the captured byte counts add up to
//! exactly what the client sent and received, heads and tails hold the right bytes, and
//! timestamps never go backwards.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use observer::base::{Direction, Role, Side};
use observer::capture::decode::Event;
use support::{
    capture::{self as cap, ConnView},
    socket_io::{Api, recv_exact, send_all},
};

/// What one client sends, as separate sends, and the size of the server's reply.
const CLIENT_SENDS: [usize; 4] = [5, 100, 2000, 37];
const REPLY_LEN: usize = 3000;
/// Receives read at most this much per syscall.
const RECV_CHUNK: usize = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn each_syscall_pair_is_captured_on_both_ends_over_ipv4() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    conversations(listener, &Api::ALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn ipv6_loopback_works_like_ipv4() {
    support::assert_root();
    let listener = match TcpListener::bind("[::1]:0") {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("SKIPPED ipv6_loopback_works_like_ipv4: no IPv6 loopback here ({err})");
            return;
        }
    };
    let conns = conversations(listener, &[Api::Std, Api::Vectored]).await;
    for conn in conns {
        assert!(conn.client_remote.is_ipv6() && conn.server_remote.is_ipv6());
    }
}

/// One connection as the test drove it.
struct Driven {
    api: Api,
    client_fd: u32,
    server_fd: u32,
    /// What the client connected to, and where the server saw it come from.
    client_remote: SocketAddr,
    server_remote: SocketAddr,
    sent: Vec<u8>,
    reply: Vec<u8>,
}

/// Runs one connection per API against `listener` (watched, as the gateway, before the capture
/// starts: it comes from `/proc`) and checks every event of each.
async fn conversations(listener: TcpListener, apis: &[Api]) -> Vec<Driven> {
    let listen_addr = listener.local_addr().unwrap();
    let port = listen_addr.port();
    let me = std::process::id();
    // connect, accept and close happen on this thread; sends and receives on named ones.
    let body_comm = cap::thread_comm();
    let (capture, mut reader) = cap::start(&cap::config(&[(port, Role::Gateway)], false));

    // Every connection stays open until all are done, so no fd number is reused.
    let mut open = Vec::new();
    for (i, &api) in apis.iter().enumerate() {
        let client = TcpStream::connect(listen_addr).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let sent = cap::pattern(CLIENT_SENDS.iter().sum(), 2 * i as u32);
        let reply = cap::pattern(REPLY_LEN, 2 * i as u32 + 1);
        open.push((api, client, server, sent, reply));
    }
    // The streams themselves move to the threads (a clone would be another fd, which the
    // capture rightly does not know), and come back to be closed here.
    let running: Vec<_> = open
        .into_iter()
        .map(|(api, mut client, mut server, sent, reply)| {
            let driven = Driven {
                api,
                client_fd: client.as_raw_fd() as u32,
                server_fd: server.as_raw_fd() as u32,
                client_remote: client.peer_addr().unwrap(),
                server_remote: server.peer_addr().unwrap(),
                sent: sent.clone(),
                reply: reply.clone(),
            };
            let server_side = {
                let (sent, reply) = (sent.clone(), reply.clone());
                named(SERVER_THREAD, move || {
                    let got = recv_exact(&mut server, api, sent.len(), RECV_CHUNK);
                    assert!(got == sent, "{api:?}: the server got other bytes");
                    send_all(&mut server, api, &reply);
                    server
                })
            };
            let client_side = named(CLIENT_THREAD, move || {
                let mut offset = 0;
                for size in CLIENT_SENDS {
                    send_all(&mut client, api, &sent[offset..offset + size]);
                    offset += size;
                }
                let got = recv_exact(&mut client, api, reply.len(), RECV_CHUNK);
                assert!(got == reply, "{api:?}: the client got other bytes");
                client
            });
            (driven, client_side, server_side)
        })
        .collect();
    let mut driven = Vec::new();
    let mut sockets = Vec::new();
    for (d, client, server) in running {
        sockets.push((client.join().unwrap(), server.join().unwrap()));
        driven.push(d);
    }
    drop(sockets);

    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        for d in &driven {
            for (side, fd) in [(Side::Client, d.client_fd), (Side::Server, d.server_fd)] {
                let open = cap::find_open(events, me, side, fd)
                    .ok_or(format!("{:?}: no {side:?} open event", d.api))?;
                let view = &cap::by_conn(events)[&open.conn_id];
                if view.close.is_none() {
                    return Err(format!("{:?}: no {side:?} close event", d.api));
                }
            }
        }
        Ok(())
    })
    .await;

    let conns = cap::by_conn(&events);
    for d in &driven {
        let api = d.api;
        let client_open = cap::find_open(&events, me, Side::Client, d.client_fd).unwrap();
        let server_open = cap::find_open(&events, me, Side::Server, d.server_fd).unwrap();
        assert_ne!(client_open.conn_id, server_open.conn_id);
        for (open, side) in [(client_open, Side::Client), (server_open, Side::Server)] {
            assert_eq!(
                (open.role, open.side, open.port, open.tgid, open.seeded),
                (Role::Gateway, side, port, me, false),
                "{api:?} {side:?} open"
            );
            assert_eq!(open.comm, body_comm, "{api:?} {side:?} comm");
        }
        // The client's own port is read from its socket (its address only from /proc).
        let unspecified = match d.client_remote {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        assert_eq!(
            (client_open.local, client_open.remote),
            (
                Some(SocketAddr::new(unspecified, d.server_remote.port())),
                Some(d.client_remote)
            ),
            "{api:?}: client side addresses (its own port, the connect() target)"
        );
        assert_eq!(
            (server_open.local, server_open.remote),
            (Some(listen_addr), Some(d.server_remote)),
            "{api:?}: server side addresses (listener and accept()'s peer)"
        );

        let client = &conns[&client_open.conn_id];
        let server = &conns[&server_open.conn_id];
        check_conn(api, client, Side::Client, CLIENT_THREAD, d);
        check_conn(api, server, Side::Server, SERVER_THREAD, d);
        assert_eq!(client.total(Direction::Egress), d.sent.len() as u64);
        assert_eq!(client.total(Direction::Ingress), d.reply.len() as u64);
        assert_eq!(server.total(Direction::Ingress), d.sent.len() as u64);
        assert_eq!(server.total(Direction::Egress), d.reply.len() as u64);
        // The client's sends are single syscalls of known sizes (loopback takes them whole).
        let client_sends: Vec<u64> = client
            .data
            .iter()
            .filter(|e| e.direction == Direction::Egress)
            .map(|e| e.len)
            .collect();
        assert_eq!(client_sends, CLIENT_SENDS.map(|s| s as u64), "{api:?}");
    }
    cap::assert_no_loss(&capture);
    // Nothing but these connections was seen.
    let ours: Vec<u64> = driven
        .iter()
        .flat_map(|d| {
            [
                cap::find_open(&events, me, Side::Client, d.client_fd)
                    .unwrap()
                    .conn_id,
                cap::find_open(&events, me, Side::Server, d.server_fd)
                    .unwrap()
                    .conn_id,
            ]
        })
        .collect();
    assert!(
        events.iter().all(|e| ours.contains(&conn_id(e))),
        "{}",
        cap::summary(&events)
    );
    driven
}

/// Checks one end of a connection: side, payload bytes in both directions, event order.
fn check_conn(api: Api, view: &ConnView, side: Side, comm: &str, d: &Driven) {
    let (client_to_server, server_to_client) = match side {
        Side::Client => (Direction::Egress, Direction::Ingress),
        Side::Server => (Direction::Ingress, Direction::Egress),
    };
    assert!(
        view.data.iter().all(|e| e.side == side
            && e.role == Role::Gateway
            && e.tgid == std::process::id()
            && e.comm == comm),
        "{api:?} {side:?}: data events of another side, process or thread"
    );
    let sizes = (1024, 256);
    cap::assert_payload(view, client_to_server, &d.sent, sizes);
    cap::assert_payload(view, server_to_client, &d.reply, sizes);
    let ts = view.timestamps();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "{api:?} {side:?}: timestamps go backwards: {ts:?}"
    );
    let close = view.close.as_ref().unwrap();
    let open = view.open.as_ref().unwrap();
    assert_eq!(
        (close.side, close.fd, close.port),
        (open.side, open.fd, open.port),
        "{api:?} {side:?}: close event"
    );
}

const CLIENT_THREAD: &str = "test-client";
const SERVER_THREAD: &str = "test-server";

/// A thread with a name, which the kernel reports as its `comm`.
fn named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap()
}

fn conn_id(event: &Event) -> u64 {
    match event {
        Event::Data(d) => d.conn_id,
        Event::Open(c) | Event::Close(c) => c.conn_id,
    }
}
