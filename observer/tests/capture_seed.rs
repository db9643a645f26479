//! Connections that predate the capture (root, real kernel): a keep-alive connection to the
//! simulated upstream carries one request, then the capture starts; both ends of that
//! connection are reported by `Capture::seeded()` (found in `/proc`, no open event), and the
//! next request on it is captured with exactly its bytes, up to the close.

mod support;

use std::os::fd::AsRawFd;

use observer::base::{Direction, Role, Side};
use observer::capture::decode::Event;
use support::{capture as cap, nginx::comm, sim_client};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const REQUEST: &[u8] = b"GET /api/version HTTP/1.1\r\nHost: sim\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn keep_alive_connection_open_before_start_is_seeded_and_captured() {
    support::assert_root();
    let sim = sim_client::start(sim_client::fast_config()).await;
    let sim_addr = sim.local_addr();
    let me = std::process::id();
    let mut client = TcpStream::connect(sim_addr).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    let client_fd = client.as_raw_fd() as u32;
    let first = exchange(&mut client).await;
    assert!(first.starts_with(b"HTTP/1.1 200 OK\r\n"), "{first:?}");

    let config = cap::config(&[(sim_addr.port(), Role::Upstream)], false);
    let (capture, mut reader) = tokio::task::spawn_blocking(move || cap::start(&config))
        .await
        .unwrap();

    // Both ends are in this process: the client's, and the simulator's accepted socket.
    let seeded = capture.seeded().to_vec();
    assert_eq!(seeded.len(), 2, "{seeded:#?}");
    let client_seed = seeded
        .iter()
        .find(|c| c.side == Side::Client)
        .expect("client side seeded");
    let server_seed = seeded
        .iter()
        .find(|c| c.side == Side::Server)
        .expect("server side seeded");
    let process_comm = comm(me);
    for (record, side, local, remote) in [
        (client_seed, Side::Client, client_addr, sim_addr),
        (server_seed, Side::Server, sim_addr, client_addr),
    ] {
        assert_eq!(
            (
                record.tgid,
                record.role,
                record.side,
                record.port,
                record.seeded
            ),
            (me, Role::Upstream, side, sim_addr.port(), true),
            "{record:#?}"
        );
        assert_eq!(
            (record.local, record.remote),
            (Some(local), Some(remote)),
            "{side:?} addresses"
        );
        assert_eq!(record.comm, process_comm, "{side:?} comm");
    }
    assert_eq!(client_seed.fd, client_fd);
    assert_ne!(client_seed.conn_id, server_seed.conn_id);

    let second = exchange(&mut client).await;
    assert!(second.starts_with(b"HTTP/1.1 200 OK\r\n"), "{second:?}");
    drop(client);

    let ids = [client_seed.conn_id, server_seed.conn_id];
    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        let conns = cap::by_conn(events);
        for id in ids {
            let view = conns.get(&id).ok_or(format!("nothing on conn {id}"))?;
            if view.close.is_none() {
                return Err(format!("no close on conn {id}"));
            }
        }
        Ok(())
    })
    .await;

    let conns = cap::by_conn(&events);
    let client_view = &conns[&client_seed.conn_id];
    let server_view = &conns[&server_seed.conn_id];
    assert!(
        client_view.open.is_none() && server_view.open.is_none(),
        "a seeded connection has no open event"
    );
    assert_eq!(client_view.bytes(Direction::Egress).unwrap(), REQUEST);
    assert_eq!(server_view.bytes(Direction::Ingress).unwrap(), REQUEST);
    assert_eq!(client_view.bytes(Direction::Ingress).unwrap(), second);
    assert_eq!(server_view.bytes(Direction::Egress).unwrap(), second);
    for (view, side) in [(client_view, Side::Client), (server_view, Side::Server)] {
        assert!(
            view.data
                .iter()
                .all(|d| d.side == side && d.tgid == me && d.role == Role::Upstream),
            "{side:?}: {}",
            cap::summary(&events)
        );
        let close = view.close.as_ref().unwrap();
        assert_eq!(
            (close.side, close.port, close.tgid),
            (side, sim_addr.port(), me)
        );
        let ts = view.timestamps();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{side:?}: {ts:?}");
    }
    assert_eq!(
        client_view.close.as_ref().unwrap().fd,
        client_fd,
        "client close fd"
    );
    assert_eq!(server_view.close.as_ref().unwrap().fd, server_seed.fd);
    // Nothing else happened on the watched port.
    assert!(
        events.iter().all(|e| !matches!(e, Event::Open(_))),
        "{}",
        cap::summary(&events)
    );
    sim.shutdown().await.unwrap();
}

/// One request on `client` and its whole raw response (a Content-Length body).
async fn exchange(client: &mut TcpStream) -> Vec<u8> {
    client.write_all(REQUEST).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(sim_client::WAIT, client.read(&mut buf))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert!(n > 0, "closed mid-response: {response:?}");
        response.extend_from_slice(&buf[..n]);
        if let Some(total) = complete_len(&response) {
            assert_eq!(total, response.len(), "more than one response");
            return response;
        }
    }
}

/// The length of a whole response head plus its Content-Length body, once it is all there.
fn complete_len(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf).unwrap() else {
        return None;
    };
    let length: usize = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
        .expect("a Content-Length response");
    (buf.len() >= head + length).then_some(head + length)
}
