//! A ring buffer too small for a burst (root, real kernel): hundreds of writes while nobody
//! reads the ring overflow a 4 KiB ring; every data event is then either delivered or counted
//! in `lost_data`, the capture keeps running, and after draining, later events arrive.

mod support;

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use observer::base::{Direction, Role, Side};
use observer::capture::{CaptureConfig, decode::Event};
use support::{
    capture as cap,
    socket_io::{Api, recv_exact, send_once},
};

const BURST: usize = 300;
const BURST_WRITE: &[u8] = b"0123456789";
const MARKER: &[u8] = b"after the burst";

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(root), ignore = "needs root")]
async fn overflowing_burst_is_counted_and_capture_goes_on() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let me = std::process::id();
    let config = CaptureConfig {
        ring_bytes: 4096,
        ..cap::config(&[(port, Role::Gateway)], false)
    };
    let (capture, mut reader) = cap::start(&config);

    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (client_fd, server_fd) = (client.as_raw_fd() as u32, server.as_raw_fd() as u32);
    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        for (side, fd) in [(Side::Client, client_fd), (Side::Server, server_fd)] {
            cap::find_open(events, me, side, fd).ok_or(format!("no {side:?} open"))?;
        }
        Ok(())
    })
    .await;
    let client_conn = cap::find_open(&events, me, Side::Client, client_fd)
        .unwrap()
        .conn_id;
    let server_conn = cap::find_open(&events, me, Side::Server, server_fd)
        .unwrap()
        .conn_id;
    let before = capture.counters().unwrap();
    assert_eq!((before.lost_data, before.lost_conn), (0, 0), "{before:?}");

    // The burst, with nobody reading the ring (this runtime has one thread, busy here).
    for _ in 0..BURST {
        assert_eq!(
            send_once(&mut client, Api::ReadWrite, BURST_WRITE),
            BURST_WRITE.len()
        );
    }
    let after_burst = capture.counters().unwrap();
    assert!(
        after_burst.lost_data > 0,
        "a 4 KiB ring cannot hold {BURST} data events: {after_burst:?}"
    );
    assert_eq!(after_burst.lost_conn, 0, "{after_burst:?}");

    events.clear();
    cap::collect_quiet(&mut reader, &mut events, Duration::from_millis(200)).await;
    let delivered = events
        .iter()
        .filter(|e| matches!(e, Event::Data(d) if d.conn_id == client_conn && d.direction == Direction::Egress && d.head == BURST_WRITE))
        .count() as u64;
    assert_eq!(
        events.len() as u64,
        delivered,
        "only burst writes: {}",
        cap::summary(&events)
    );
    assert_eq!(
        delivered + after_burst.lost_data,
        BURST as u64,
        "every write delivered or counted as lost ({delivered} delivered, {after_burst:?})"
    );

    // The capture goes on: a later write, then the server's read of everything.
    events.clear();
    assert_eq!(send_once(&mut client, Api::ReadWrite, MARKER), MARKER.len());
    cap::collect_until(&mut reader, &mut events, |events| {
        match events
            .iter()
            .any(|e| matches!(e, Event::Data(d) if d.conn_id == client_conn && d.head == MARKER))
        {
            true => Ok(()),
            false => Err("the marker write did not arrive".into()),
        }
    })
    .await;
    let total = BURST * BURST_WRITE.len() + MARKER.len();
    let received = recv_exact(&mut server, Api::ReadWrite, total, total);
    assert!(received.ends_with(MARKER));
    cap::collect_until(&mut reader, &mut events, |events| {
        let read = cap::by_conn(events)
            .get(&server_conn)
            .map_or(0, |v| v.total(Direction::Ingress));
        match read == total as u64 {
            true => Ok(()),
            false => Err(format!("the server's reads: {read} of {total} bytes")),
        }
    })
    .await;
    let end = capture.counters().unwrap();
    assert_eq!(
        (end.lost_data, end.lost_conn),
        (after_burst.lost_data, 0),
        "nothing lost after the burst: {end:?}"
    );
}
