//! A process that exits closes its sockets without `close(2)`: the kernel side never sees
//! it, so `Capture::sweep_exited` forgets them and reports each as closed (root, real kernel).

mod support;

use std::{net::TcpListener, process::Command, time::Duration};

use observer::base::{Role, Side, WatchedPort};
use observer::capture::{Capture, CaptureConfig, decode::Event, reader::EventReader};

#[tokio::test(flavor = "current_thread")]
#[cfg_attr(not(root), ignore = "needs root")]
async fn connections_of_exited_processes_are_swept() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = CaptureConfig {
        watch: vec![WatchedPort {
            port,
            role: Role::Gateway,
        }],
        ..CaptureConfig::default()
    };
    let mut capture = Capture::start(&config).unwrap();
    let mut reader = EventReader::new(capture.take_events().unwrap()).unwrap();

    // The child connects, sends, and exits without closing: the exit closes the socket.
    let script = format!(
        "import os, socket\ns = socket.create_connection(('127.0.0.1', {port}))\n\
         s.sendall(b'hello')\nprint(s.fileno(), flush=True)\nos._exit(0)\n"
    );
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let child_fd: u32 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    let (_accepted, _) = listener.accept().unwrap();

    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !events
        .iter()
        .any(|e| matches!(e, Event::Data(d) if d.side == Side::Client))
    {
        tokio::time::timeout_at(deadline, reader.read_batch(&mut events))
            .await
            .expect("the child's write")
            .unwrap();
    }
    let open = events
        .iter()
        .find_map(|e| match e {
            Event::Open(o) if o.side == Side::Client => Some(o.clone()),
            _ => None,
        })
        .expect("the child's connect");
    assert!(open.comm.starts_with("python"), "{open:?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Close(c) if c.conn_id == open.conn_id)),
        "the child closed its socket by exiting, not with close(2): {events:#?}"
    );

    let swept = capture.sweep_exited().unwrap();
    let closed: Vec<_> = swept.iter().filter(|c| c.conn_id == open.conn_id).collect();
    assert_eq!(closed.len(), 1, "{swept:#?}");
    assert_eq!(
        (closed[0].tgid, closed[0].fd, closed[0].port),
        (open.tgid, child_fd, port)
    );
    assert_eq!(closed[0].side, Side::Client);
    // Nothing left to sweep for it the second time.
    assert!(
        capture
            .sweep_exited()
            .unwrap()
            .iter()
            .all(|c| c.conn_id != open.conn_id)
    );
}
