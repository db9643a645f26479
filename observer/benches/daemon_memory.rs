//! Daemon memory with many open watched connections (issue target: under 64 MiB resident
//! with 10,000). Needs root: it runs the real `observer run` (the release-profile binary cargo
//! builds for benchmarks) watching a port this benchmark listens on, opens N connections to
//! it, and on each sends the head and the start of a request whose body never finishes, so
//! both ends of every connection hold engine state (a pending request, a body scan). It then
//! reads the daemon's VmRSS and VmHWM from /proc.
//!
//! `cargo xtask bench daemon-memory` (or `cargo bench -p observer --bench daemon_memory`);
//! `OBSERVER_BENCH_CONNS` changes N (default 10000); with `OBSERVER_BENCH_RESULTS=PATH` the
//! figures are also written there (JSON), for the xtask to put into docs/BENCHMARKS.md.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::{http, net::free_port, observer::Run};

const TARGET_MIB: f64 = 64.0;

fn main() {
    if let Ok(spec) = std::env::var("OBSERVER_BENCH_SERVE") {
        let (conns, port) = spec.split_once(':').unwrap();
        return serve(conns.parse().unwrap(), port.parse().unwrap());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("daemon_memory: needs root (it loads the kernel programs); not run");
        std::process::exit(2);
    }
    let conns: usize = std::env::var("OBSERVER_BENCH_CONNS")
        .ok()
        .map(|v| v.parse().expect("OBSERVER_BENCH_CONNS is a number"))
        .unwrap_or(10_000);
    raise_fd_limit(conns as u64 + 1024);

    // A blocking accept() already waiting when the programs attach is not seen (its enter
    // was missed), so the server starts listening only once the daemon is ready.
    let port = free_port();
    let max_conns = (4 * conns).max(65_536).to_string();
    // The daemon, ready; stopped (SIGTERM) however the benchmark ends.
    let daemon = Run::start(
        Path::new(env!("CARGO_BIN_EXE_observer")),
        &[(port, "upstream")],
        &["--max-conns", &max_conns],
    )
    .unwrap_or_else(|err| panic!("{err:#}"));
    let pid = daemon.pid();
    let idle = rss_kib(pid);

    // The server ends live in a second process: one process may not hold 2N descriptors.
    let mut server = Command::new(std::env::current_exe().unwrap())
        .env("OBSERVER_BENCH_SERVE", format!("{conns}:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the server process");
    let mut ready = [0u8; 1];
    server
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();

    let started = Instant::now();
    let mut clients = Vec::with_capacity(conns);
    let request = b"POST /api/chat HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\":\"llama3.2:1b\",\"messages\":[{\"role\":\"user\",\"content\":\"";
    for _ in 0..conns {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(request).unwrap();
        clients.push(stream);
    }
    let opened = started.elapsed();

    // Both ends of every connection are watched: wait until the daemon has them all.
    wait_for(
        Duration::from_secs(60),
        "the daemon to see every connection",
        || status_field(daemon.metrics, "connections_open") >= 2 * conns as u64,
    );
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = (rss_kib(pid), hwm_kib(pid));
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "daemon_memory: {conns} open watched connections ({} ends tracked), opened in {:.1} s",
        2 * conns,
        opened.as_secs_f64()
    );
    println!(
        "daemon_memory: idle RSS {:.1} MiB; with the connections RSS {:.1} MiB, peak {:.1} MiB (target < {TARGET_MIB} MiB)",
        mib(idle),
        mib(rss),
        mib(hwm)
    );
    if let Ok(path) = std::env::var("OBSERVER_BENCH_RESULTS") {
        let results = serde_json::json!({
            "connections": conns,
            "ends": 2 * conns,
            "opened_seconds": opened.as_secs_f64(),
            "idle_rss_kib": idle,
            "rss_kib": rss,
            "hwm_kib": hwm,
            "target_mib": TARGET_MIB,
        });
        std::fs::write(&path, results.to_string()).expect("writing OBSERVER_BENCH_RESULTS");
    }
    drop(clients);
    // Closing its stdin ends the server process.
    drop(server.stdin.take());
    let _ = server.wait();
    drop(daemon);
    if mib(hwm) >= TARGET_MIB {
        eprintln!("daemon_memory: over the target");
        std::process::exit(1);
    }
}

/// The server process: accepts `conns` connections, reads each request's first bytes, and
/// holds them until stdin closes.
fn serve(conns: usize, port: u16) {
    raise_fd_limit(conns as u64 + 1024);
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    print!("+");
    std::io::stdout().flush().unwrap();
    let mut held = Vec::with_capacity(conns);
    let mut buf = [0u8; 512];
    for _ in 0..conns {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.read(&mut buf).unwrap();
        held.push(stream);
    }
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn raise_fd_limit(want: u64) {
    let limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        panic!(
            "cannot raise the open file limit to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A number of `/status`, 0 until it answers.
fn status_field(admin: SocketAddr, field: &str) -> u64 {
    let Ok((200, body)) = http::get(admin, "/status") else {
        return 0;
    };
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v[field].as_u64())
        .unwrap_or(0)
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}
