//! The daemon's own sockets are left out in the kernel (root, real kernel): with
//! `exclude_self`, this process's connects, sends and receives on a watched port (and its
//! server's accepts) produce no event at all, while a child process's request to the same
//! port (curl) is reported in full.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use observer::base::{Direction, Role, Side};
use observer::capture::decode::Event;
use support::capture as cap;

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn own_traffic_is_excluded_and_a_childs_is_not() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let me = std::process::id();
    let (capture, mut reader) = cap::start(&cap::config(&[(addr.port(), Role::Gateway)], true));
    assert!(capture.seeded().is_empty(), "{:#?}", capture.seeded());

    // A tiny HTTP server in this process: each request it reads, and the client's address,
    // go back to the test.
    let (requests_tx, requests) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let peer = stream.peer_addr().unwrap();
            let request = read_head(&mut stream);
            stream.write_all(RESPONSE).unwrap();
            if requests_tx.send((request, peer)).is_err() {
                return;
            }
        }
    });

    // This process as a client: connect, send, receive, close.
    let own_request = b"GET /self HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut own = TcpStream::connect(addr).unwrap();
    own.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    own.write_all(own_request).unwrap();
    let mut response = Vec::new();
    own.read_to_end(&mut response).unwrap();
    assert_eq!(response, RESPONSE);
    drop(own);
    assert_eq!(requests.recv().unwrap().0, own_request);

    // A child process as a client.
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{addr}/child")])
        .output()
        .expect("run curl");
    assert!(curl.status.success(), "{curl:?}");
    assert_eq!(curl.stdout, b"hello\n");
    let (curl_request, curl_addr) = requests.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(curl_request.starts_with(b"GET /child HTTP/1.1\r\n"));

    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        match events
            .iter()
            .any(|e| matches!(e, Event::Close(c) if c.comm == "curl"))
        {
            true => Ok(()),
            false => Err("no close from curl".into()),
        }
    })
    .await;
    // Anything of this process's would have come before curl's (it all happened first).
    cap::collect_quiet(&mut reader, &mut events, Duration::from_millis(100)).await;
    assert!(
        events.iter().all(|e| tgid(e) != me),
        "events of this process:\n{}",
        cap::summary(&events)
    );

    let conns = cap::by_conn(&events);
    assert_eq!(
        conns.len(),
        1,
        "only curl's connection:\n{}",
        cap::summary(&events)
    );
    let view = conns.values().next().unwrap();
    let open = view.open.as_ref().expect("curl's open event");
    let curl_pid = open.tgid;
    assert_eq!(
        (
            open.role,
            open.side,
            open.port,
            open.comm.as_str(),
            open.local,
            open.remote
        ),
        (
            Role::Gateway,
            Side::Client,
            addr.port(),
            "curl",
            // Its own port is read from the socket (its address only /proc knows).
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                curl_addr.port()
            )),
            Some(addr)
        )
    );
    assert!(
        view.data
            .iter()
            .all(|d| d.tgid == curl_pid && d.side == Side::Client && d.comm == "curl"),
        "{}",
        cap::summary(&events)
    );
    assert_eq!(view.bytes(Direction::Egress).unwrap(), curl_request);
    assert_eq!(view.bytes(Direction::Ingress).unwrap(), RESPONSE);
    assert_eq!(view.close.as_ref().unwrap().tgid, curl_pid);
}

fn tgid(event: &Event) -> u32 {
    match event {
        Event::Data(d) => d.tgid,
        Event::Open(c) | Event::Close(c) => c.tgid,
    }
}

/// Reads a request head (no body) up to its blank line.
fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed mid-head: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    head
}
