//! Kernel smoke test (root, real kernel): the embedded object loads, syscall tracepoint
//! programs attach, a loopback TCP write on a watched test port arrives in the ring buffer
//! with the right length, payload and timestamp, and the programs detach cleanly.

mod support;

use std::{io::Read, net::TcpListener, os::fd::AsRawFd, time::Duration};

use observer::base::{Direction, Role, Side, WatchedPort};
use observer::capture::{
    Capture, CaptureConfig, decode::Event, program_count, reader::EventReader,
};

const PAYLOAD_LEN: usize = 3000;

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(root), ignore = "needs root")]
async fn loopback_write_on_watched_port_reaches_the_ring_buffer() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = CaptureConfig {
        watch: vec![WatchedPort {
            port,
            role: Role::Upstream,
        }],
        // The test process is the one writing: do not exclude it.
        exclude_self: false,
        ..CaptureConfig::default()
    };
    let mut capture = Capture::start(&config).expect("load and attach the embedded kernel object");
    let attached = capture.attached();
    assert_eq!(attached.len(), program_count(), "{attached:?}");
    assert!(attached.contains(&"sys_exit"), "{attached:?}");
    let mut reader = EventReader::new(capture.take_events().unwrap()).unwrap();

    let payload: Vec<u8> = (0..PAYLOAD_LEN).map(|i| (i % 251) as u8).collect();
    let before = support::monotonic_ns();
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    // A plain write(2), the syscall under test.
    // SAFETY: valid fd and buffer.
    let written =
        unsafe { libc::write(client.as_raw_fd(), payload.as_ptr().cast(), payload.len()) };
    assert_eq!(written, PAYLOAD_LEN as isize);
    let mut received = vec![0; PAYLOAD_LEN];
    server.read_exact(&mut received).unwrap();
    let client_fd = client.as_raw_fd() as u32;
    drop(client);
    let after = support::monotonic_ns();

    // Client side: open, the write, close. Server side (the listener was seeded from /proc):
    // open on accept, the read.
    let events = collect(&mut reader, 5).await;
    let client: Vec<&Event> = events
        .iter()
        .filter(|e| side_of(e) == Side::Client)
        .collect();
    let server: Vec<&Event> = events
        .iter()
        .filter(|e| side_of(e) == Side::Server)
        .collect();
    let [Event::Open(open), Event::Data(data), Event::Close(close)] = client.as_slice() else {
        panic!("client side: expected open, data, close; got {events:#?}");
    };
    let me = std::process::id();
    assert_eq!(
        (open.port, open.role, open.side, open.tgid, open.fd),
        (port, Role::Upstream, Side::Client, me, client_fd)
    );
    assert_eq!(
        open.remote,
        Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    );
    assert!(!open.seeded);
    assert_eq!(data.conn_id, open.conn_id);
    assert_eq!(close.conn_id, open.conn_id);
    assert_eq!(data.direction, Direction::Egress);
    assert_eq!(data.len, PAYLOAD_LEN as u64, "length the syscall returned");
    assert_eq!(*data.head, payload[..1024], "head bytes");
    assert_eq!(*data.tail, payload[PAYLOAD_LEN - 256..], "tail bytes");
    assert!(
        before <= open.ts_ns
            && open.ts_ns <= data.ts_ns
            && data.ts_ns <= close.ts_ns
            && close.ts_ns <= after,
        "timestamps out of order: {before} {} {} {} {after}",
        open.ts_ns,
        data.ts_ns,
        close.ts_ns
    );
    let [Event::Open(accepted), Event::Data(read)] = server.as_slice() else {
        panic!("server side: expected open, data; got {events:#?}");
    };
    assert_eq!(
        (accepted.port, accepted.tgid, read.conn_id),
        (port, me, accepted.conn_id)
    );
    assert_eq!(accepted.local.map(|a| a.port()), Some(port));
    assert_eq!(
        (read.direction, read.len),
        (Direction::Ingress, PAYLOAD_LEN as u64)
    );
    assert_eq!(*read.head, payload[..1024], "server head bytes");
    assert_eq!(
        *read.tail,
        payload[PAYLOAD_LEN - 256..],
        "server tail bytes"
    );
    assert_eq!(
        capture.counters().unwrap(),
        Default::default(),
        "no loss, no failures"
    );

    // Detach, then the same traffic must produce nothing.
    capture.detach().expect("detach cleanly");
    assert!(capture.attached().is_empty());
    let mut again = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_server2, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut again, b"after detach").unwrap();
    drop(again);
    let mut late = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(300), reader.read_batch(&mut late)).await;
    assert!(waited.is_err(), "events after detach: {late:?}");
}

fn side_of(event: &Event) -> Side {
    match event {
        Event::Data(d) => d.side,
        Event::Open(c) | Event::Close(c) => c.side,
    }
}

async fn collect(reader: &mut EventReader, want: usize) -> Vec<Event<'static>> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events.len() < want {
        match tokio::time::timeout_at(deadline, reader.read_batch(&mut events)).await {
            Ok(result) => {
                result.unwrap();
            }
            Err(_) => panic!(
                "timed out with {} of {want} events: {events:#?}",
                events.len()
            ),
        }
    }
    assert!(
        reader.decode_errors().is_empty(),
        "decode errors: {:?}",
        reader.decode_errors()
    );
    events
}
