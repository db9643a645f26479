//! Captured payload bytes (root, real kernel): a 1 MiB response written with plain `write(2)`s
//! of known sizes (around the head and tail boundaries, and far beyond) and read with plain
//! `read(2)`s. For every data event, the head holds the first bytes and the tail the last
//! bytes of exactly that syscall's buffer, located by an offset accumulated from `len`; with
//! the default sizes and with small configured ones.

mod support;

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use observer::base::{Direction, Role, Side};
use observer::capture::CaptureConfig;
use support::{
    capture as cap,
    socket_io::{Api, recv_exact, send_once},
};

const RESPONSE_LEN: usize = 1 << 20;
/// Sizes of the successive writes, cycled until the response is written.
const WRITE_SIZES: [usize; 14] = [
    1, 2, 255, 256, 1023, 1024, 1025, 1279, 1280, 1281, 1500, 4096, 65_536, 100_000,
];
const REQUEST: &[u8] = b"GET /big HTTP/1.1\r\n\r\n";
const READ_CHUNK: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn head_and_tail_of_each_write_with_default_sizes() {
    support::assert_root();
    big_response(1024, 256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn head_and_tail_of_each_write_with_small_configured_sizes() {
    support::assert_root();
    big_response(100, 50).await;
}

async fn big_response(head_bytes: u32, tail_bytes: u32) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let me = std::process::id();
    let config = CaptureConfig {
        head_bytes,
        tail_bytes,
        ..cap::config(&[(port, Role::Upstream)], false)
    };
    let (capture, mut reader) = cap::start(&config);

    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let (client_fd, server_fd) = (client.as_raw_fd() as u32, server.as_raw_fd() as u32);
    let response = cap::pattern(RESPONSE_LEN, 99);

    let writer = {
        let response = response.clone();
        std::thread::spawn(move || {
            let request = recv_exact(&mut server, Api::ReadWrite, REQUEST.len(), 4096);
            assert_eq!(request, REQUEST);
            let mut written = Vec::new();
            let mut offset = 0;
            for size in WRITE_SIZES.iter().cycle() {
                if offset == RESPONSE_LEN {
                    break;
                }
                let end = (offset + size).min(RESPONSE_LEN);
                let n = send_once(&mut server, Api::ReadWrite, &response[offset..end]);
                written.push(n as u64);
                offset += n;
            }
            (server, written)
        })
    };
    assert_eq!(
        send_once(&mut client, Api::ReadWrite, REQUEST),
        REQUEST.len()
    );
    let got = recv_exact(&mut client, Api::ReadWrite, RESPONSE_LEN, READ_CHUNK);
    assert!(got == response, "the client read other bytes");
    let (server, written) = writer.join().unwrap();
    drop(client);
    drop(server);

    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        for (side, fd) in [(Side::Client, client_fd), (Side::Server, server_fd)] {
            let open = cap::find_open(events, me, side, fd).ok_or(format!("no {side:?} open"))?;
            if cap::by_conn(events)[&open.conn_id].close.is_none() {
                return Err(format!("no {side:?} close"));
            }
        }
        Ok(())
    })
    .await;

    let conns = cap::by_conn(&events);
    let server_view = &conns[&cap::find_open(&events, me, Side::Server, server_fd)
        .unwrap()
        .conn_id];
    let client_view = &conns[&cap::find_open(&events, me, Side::Client, client_fd)
        .unwrap()
        .conn_id];
    let sizes = (head_bytes as usize, tail_bytes as usize);

    // The server's writes: one event per write(2), of the size it returned.
    let server_writes: Vec<u64> = server_view
        .data
        .iter()
        .filter(|d| d.direction == Direction::Egress)
        .map(|d| d.len)
        .collect();
    assert_eq!(
        server_writes, written,
        "one event per write, its return value"
    );
    cap::assert_payload(server_view, Direction::Egress, &response, sizes);
    cap::assert_payload(server_view, Direction::Ingress, REQUEST, sizes);
    // The client's reads, of whatever sizes the kernel handed out.
    cap::assert_payload(client_view, Direction::Ingress, &response, sizes);
    cap::assert_payload(client_view, Direction::Egress, REQUEST, sizes);

    cap::assert_no_loss(&capture);
}
