//! Which processes the kernel side looks at (root, real kernel). Every system call of every
//! process passes the raw `sys_exit` tracepoint; only a marked process's calls are looked up.
//! A process that connects to a watched port is marked inside its `connect` (and its
//! connection captured), one that listens on a watched port inside its `listen` (and its
//! accepts captured); a process that only touches other ports is never marked, and the
//! kernel's mark goes when the marked process exits. A listen on a watched port that fails
//! after its state change leaves nothing for the thread's next listen to take.

mod support;

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::Duration,
};

use observer::base::Role;
use observer::capture::decode::Event;
use support::capture as cap;

/// Runs `script` in bash, its stdin a pipe (the scripts end when it closes).
fn bash(script: &str) -> std::process::Child {
    Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("bash")
}

/// Runs `script` in python3 (stdin and stdout piped; the scripts end when stdin closes) and
/// waits until it prints `ready`.
fn python_ready(script: &str) -> std::process::Child {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "the script's first line");
    child
}

/// Waits (bounded) until `ready` holds; `what` names it in the failure.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + cap::EVENT_WAIT;
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn connecting_or_listening_on_a_watched_port_marks_a_process_until_it_exits() {
    support::assert_root();
    // The watched upstream listens in a child started after the capture (python: a listen the
    // kernel side must see), the client is another child; the bystander talks to a port that
    // is not watched. The test process itself holds nothing watched.
    let port = cap::free_port();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let (capture, mut reader) = cap::start(&cap::config(&[(port, Role::Upstream)], true));
    assert!(!capture.marked(std::process::id()).unwrap());

    let mut server = python_ready(&format!(
        "import socket,sys\n\
         s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1',{port})); s.listen(8); print('ready', flush=True)\n\
         c,_=s.accept(); d=c.recv(100); c.sendall(b'pong:'+d); sys.stdin.read()"
    ));
    let server_pid = server.id();
    assert!(
        capture.marked(server_pid).unwrap(),
        "listen marks the server"
    );

    let mut bystander = bash(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{other_port}; echo hi >&3; read _"
    ));
    let (_conn, _) = other.accept().unwrap();
    let mut client = bash(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf ping >&3; read -n 9 reply <&3; read _"
    ));
    let client_pid = client.id();
    wait_for("the client is marked", || {
        capture.marked(client_pid).unwrap()
    });
    assert!(
        !capture.marked(bystander.id()).unwrap(),
        "a process that never touched a watched port is not looked at"
    );

    // Both ends of the watched connection are captured: the bytes each side moved.
    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        let moved = |tgid: u32, bytes: &[u8]| {
            events
                .iter()
                .any(|e| matches!(e, Event::Data(d) if d.tgid == tgid && d.head.as_ref() == bytes))
        };
        if moved(client_pid, b"ping")
            && moved(server_pid, b"ping")
            && moved(server_pid, b"pong:ping")
        {
            Ok(())
        } else {
            Err("the ping and its answer on both ends".to_owned())
        }
    })
    .await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Data(d) if d.tgid == bystander.id())),
        "nothing of the bystander is captured"
    );

    // The kernel's marks go with the processes.
    for child in [&mut client, &mut server, &mut bystander] {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    wait_for("the client's mark goes when it exits", || {
        !capture.marked(client_pid).unwrap()
    });
    wait_for("the server's mark goes when it exits", || {
        !capture.marked(server_pid).unwrap()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn a_failed_listen_on_a_watched_port_does_not_make_the_next_listen_a_watched_one() {
    support::assert_root();
    let (port, other) = (cap::free_port(), cap::free_port());
    let (_capture, mut reader) = cap::start(&cap::config(&[(port, Role::Upstream)], true));
    // One thread: a listen on the watched port, a second one on it that fails (the port is
    // taken; its state went to LISTEN and back), then a listen on a port nobody watches.
    let mut server = python_ready(&format!(
        "import socket,sys\n\
         def sock(p):\n    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',p)); return s\n\
         first=sock({port}); second=sock({port}); first.listen(8)\n\
         try:\n    second.listen(8); print('second listen worked', flush=True); sys.exit(1)\n\
         except OSError: pass\n\
         third=sock({other}); third.listen(8); print('ready', flush=True)\n\
         for s in (third, first):\n    c,_=s.accept(); c.sendall(c.recv(100)); c.close()\n\
         sys.stdin.read()"
    ));
    let server_pid = server.id();
    for to in [other, port] {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
        std::io::Write::write_all(&mut conn, b"hello").unwrap();
        let mut echo = [0u8; 5];
        std::io::Read::read_exact(&mut conn, &mut echo).unwrap();
    }
    // The accept on the watched port is seen; the one on the other port never is.
    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        let accepted = events
            .iter()
            .filter(|e| matches!(e, Event::Open(c) if c.tgid == server_pid))
            .count();
        if accepted >= 1 {
            Ok(())
        } else {
            Err("the accept on the watched port".to_owned())
        }
    })
    .await;
    // The other port's accept came first: its open, had there been one, is in already.
    let opens: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Open(c) if c.tgid == server_pid => Some(c.local),
            _ => None,
        })
        .collect();
    assert_eq!(opens.len(), 1, "only the watched accept: {opens:?}");
    drop(server.stdin.take());
    server.wait().unwrap();
}
