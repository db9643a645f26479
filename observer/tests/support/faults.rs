//! Common ground of the fault suite (`tests/faults_*.rs`): nginx in front of `observer sim` with
//! `observer run` watching both ports; a client that records how each of its exchanges ended
//! (status, and whether the whole response came) and tolerates every way a connection can end;
//! the counts the daemon must show for those records, polled from `/metrics` until they match
//! or a deadline passes; the gauges compared with the kernel's own connection table; the
//! daemon's memory against its idle size.
//!
//! Every wait polls a condition under a deadline; nothing sleeps for a fixed time to let the
//! daemon catch up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use observer::engine::ErrorReason;
use testkit::http::Conn;
use testkit::ledger::mismatches;
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::ledger::{Expected, Ledger, REQUESTS, Record};
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::net::{open_conns, open_conns_at};

pub use super::daemon::FAST_SIM;
use super::daemon::{Daemon, Samples, Sim};
use super::nginx::{Nginx, NginxOptions};

/// No readiness probe (its connections would be the daemon's own, and it would look for an
/// Ollama on the default port) and no NVML.
pub const DAEMON_FLAGS: &[&str] = &["--no-probe", "--gpu", "off"];
/// A fault that keeps a stream going for 12 s (120 tokens, 100 ms apart): long enough to act
/// on it while it runs, never long enough to end on its own during a test.
pub const LONG_STREAM: &str = "token-ms=100, tokens=120";
/// How long counts and gauges may take to show what happened: events arrive within
/// milliseconds, a process's exit is swept within a second, a loaded 2-core machine running
/// the other tests is slower.
pub const SETTLE: Duration = Duration::from_secs(15);
/// The longest a client waits for one read; a test stuck longer than this is a failure.
pub const READ_WAIT: Duration = Duration::from_secs(20);

/// The two watched ports.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub gateway: u16,
    pub upstream: u16,
}

/// What every fault test observes: `observer sim` ([`FAST_SIM`]) with nginx in front of it.
pub struct Stack {
    pub sim: Sim,
    pub nginx: Nginx,
    /// nginx's address, where clients go.
    pub gateway: SocketAddr,
    pub ports: Ports,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with(NginxOptions::default())
    }

    pub fn start_with(options: NginxOptions) -> Stack {
        let sim = Sim::start(FAST_SIM);
        let nginx = Nginx::start_with(sim.addr, options);
        let ports = Ports {
            gateway: nginx.port,
            upstream: sim.addr.port(),
        };
        Stack {
            gateway: nginx.addr(),
            sim,
            nginx,
            ports,
        }
    }
}

/// `observer run --watch GATEWAY=gateway --watch UPSTREAM=upstream` with [`DAEMON_FLAGS`] and
/// `flags`, ready.
pub fn start_daemon(ports: Ports, flags: &[&str]) -> Daemon {
    let flags: Vec<&str> = DAEMON_FLAGS.iter().chain(flags).copied().collect();
    Daemon::start_with(
        &[(ports.gateway, "gateway"), (ports.upstream, "upstream")],
        &flags,
    )
}

/// A runtime for the clients, its workers beside the test's thread, which scrapes and waits.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One client connection: testkit's async client, every read bounded by [`READ_WAIT`]; an
/// end of stream or a reset is an outcome, not a failure ([`Conn::exchange`] gives the
/// [`Record`]).
pub struct HttpConn(Conn);

impl Deref for HttpConn {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        &self.0
    }
}

impl DerefMut for HttpConn {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.0
    }
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> HttpConn {
        HttpConn(Conn::connect_waiting(addr, READ_WAIT).await)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.try_send(bytes).await
    }

    /// Ends the connection with a reset instead of a FIN (`SO_LINGER` 0, then close): the
    /// client vanishes as a crashed host's would.
    pub fn reset(self) {
        self.0.reset();
    }
}

/// A streamed `/api/chat` (Ollama's default) with `X-Sim-Fault: FAULT` unless `fault` is empty.
pub fn chat(fault: &str) -> Vec<u8> {
    chat_for(MODEL, fault)
}

/// The model of [`chat`], one the simulator knows.
pub const MODEL: &str = "llama3.2:1b";

/// [`chat`] for `model`: the simulator answers 404 for a model it does not know.
pub fn chat_for(model: &str, fault: &str) -> Vec<u8> {
    let body = super::sim_client::CHAT.replacen(MODEL, model, 1);
    let fault = match fault {
        "" => String::new(),
        fault => format!("X-Sim-Fault: {fault}\r\n"),
    };
    format!(
        "POST /api/chat HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n{fault}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `GET /api/version`: the smallest exchange the simulator serves.
pub fn version() -> Vec<u8> {
    b"GET /api/version HTTP/1.1\r\nHost: sim\r\n\r\n".to_vec()
}

/// One chat on each of `conns`; every one must succeed, and each is recorded in `want`.
pub async fn chat_on(conns: &mut [HttpConn], want: &mut Expected) {
    for conn in conns {
        let record = conn.exchange(&chat("")).await;
        assert!(record.is_ok(), "{record:?}");
        want.both(&record);
    }
}

/// `conns` new keep-alive connections through `gateway`, each opened and then used for `each`
/// chats (see [`chat_on`]) before the next; they are kept open.
pub async fn chatted(
    gateway: SocketAddr,
    conns: usize,
    each: usize,
    want: &mut Expected,
) -> Vec<HttpConn> {
    let mut out = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = HttpConn::connect(gateway).await;
        for _ in 0..each {
            chat_on(std::slice::from_mut(&mut conn), want).await;
        }
        out.push(conn);
    }
    out
}

/// `n` streams of `request` through `gateway`, each on a connection of its own, spawned on
/// `rt`: returns once every one has its response head. Each task then reads the rest and
/// yields its record and its connection.
pub fn streams_started(
    rt: &tokio::runtime::Runtime,
    gateway: SocketAddr,
    n: usize,
    request: &[u8],
) -> Vec<tokio::task::JoinHandle<(Record, HttpConn)>> {
    let (heads_tx, heads_rx) = std::sync::mpsc::channel();
    let streams = (0..n)
        .map(|_| {
            let heads = heads_tx.clone();
            let request = request.to_vec();
            rt.spawn(async move {
                let mut conn = HttpConn::connect(gateway).await;
                conn.send(&request).await.unwrap();
                let head = conn.response_head(false).await.expect("a response head");
                heads.send(()).unwrap();
                let record = conn.record(head).await;
                (record, conn)
            })
        })
        .collect();
    for _ in 0..n {
        heads_rx
            .recv_timeout(READ_WAIT)
            .expect("every stream's head");
    }
    streams
}

/// Polls until `check` returns `Ok`, every 50 ms; panics with its last complaint after `within`.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(complaint) if start.elapsed() > within => {
                panic!("{what}: not so after {within:?}: {complaint}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits until the daemon's `http_requests_total` of each role equals `want`: every code's
/// count, and the sum over all codes (so nothing is counted under a code not expected), and
/// still does a moment later (a late extra exchange fails too). More than expected fails at
/// once: counters only grow.
pub fn await_requests(daemon: &Daemon, want: &Expected) {
    await_requests_with(daemon, &[], want);
}

/// [`await_requests`] for the series that also have `labels` (e.g. one route).
pub fn await_requests_with(daemon: &Daemon, labels: &[(&str, &str)], want: &Expected) {
    let checks = want.checks(labels);
    let describe = |missing: &[String]| {
        let lines: Vec<String> = daemon
            .get("/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with(REQUESTS))
            .map(str::to_owned)
            .collect();
        format!(
            "{} (labels {labels:?})\n{}\n{}",
            missing.join("\n"),
            lines.join("\n"),
            tail(&daemon.log())
        )
    };
    let start = Instant::now();
    let mut matched_at: Option<Instant> = None;
    loop {
        let s = daemon.scrape();
        let missing = mismatches(&checks, s.scrape());
        if let Some(over) = want.over(s.scrape(), labels) {
            panic!(
                "more exchanges counted than happened: {over}: {}",
                describe(&missing)
            );
        }
        if missing.is_empty() {
            // Still equal 300 ms later: nothing was about to be counted twice.
            match matched_at {
                Some(at) if at.elapsed() >= Duration::from_millis(300) => return,
                Some(_) => {}
                None => matched_at = Some(Instant::now()),
            }
        } else {
            matched_at = None;
        }
        assert!(
            start.elapsed() < SETTLE,
            "http_requests_total after {SETTLE:?}: {}",
            describe(&missing)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gauges the daemon keeps, and what the kernel says they should be.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauges {
    /// `http_requests_in_flight` of gateway and upstream.
    pub in_flight: [f64; 2],
    /// `tcp_connections_active` of gateway and upstream.
    pub active: [f64; 2],
    /// Open connections on the gateway's and the upstream's port, from `/proc/net/tcp`.
    pub open: [u64; 2],
}

pub fn gauges(daemon: &Daemon, ports: Ports) -> Gauges {
    gauges_with(
        daemon,
        [open_conns(ports.gateway), open_conns(ports.upstream)],
    )
}

/// [`gauges`] with the connections really open, `[gateway, upstream]`, counted by the caller
/// (e.g. in the server's network namespace).
pub fn gauges_with(daemon: &Daemon, open: [u64; 2]) -> Gauges {
    let s = daemon.scrape();
    let g = |name: &str, role: &str| s.value(name, &[("role", role)]) + 0.0;
    Gauges {
        in_flight: [
            g("observer_http_requests_in_flight", "gateway"),
            g("observer_http_requests_in_flight", "upstream"),
        ],
        active: [
            g("observer_tcp_connections_active", "gateway"),
            g("observer_tcp_connections_active", "upstream"),
        ],
        open,
    }
}

/// Waits until no request is in flight and `tcp_connections_active` of each role equals the
/// connections really open on its port, in two readings 200 ms apart (a connection the
/// kernel has queued but the server not yet accepted reads as open for a moment).
pub fn await_gauges_settled(daemon: &Daemon, ports: Ports) -> Gauges {
    await_gauges_settled_with(daemon, || {
        [open_conns(ports.gateway), open_conns(ports.upstream)]
    })
}

/// [`await_gauges_settled`] with the connections really open, `[gateway, upstream]`, counted
/// by `open` (e.g. at the real server, in its network namespace, leaving out a relay's).
pub fn await_gauges_settled_with(daemon: &Daemon, open: impl Fn() -> [u64; 2]) -> Gauges {
    let start = Instant::now();
    let mut previous: Option<Gauges> = None;
    loop {
        let now = gauges_with(daemon, open());
        let right = now.in_flight == [0.0, 0.0]
            && now.active[0] == now.open[0] as f64
            && now.active[1] == now.open[1] as f64;
        if right && previous.as_ref() == Some(&now) {
            return now;
        }
        if start.elapsed() > SETTLE {
            let (_, text) = daemon.get("/metrics");
            let context: Vec<&str> = text
                .lines()
                .filter(|l| {
                    l.starts_with("observer_tcp_connections")
                        || l.starts_with("observer_ebpf_events")
                        || l.starts_with("observer_http_parse_errors_total")
                })
                .collect();
            panic!(
                "gauges not settled after {SETTLE:?} (in flight and active by role \
                 [gateway, upstream], open: connections really open at each role's server): \
                 {now:?}\n{}\n{}",
                context.join("\n"),
                tail(&daemon.log())
            );
        }
        previous = right.then_some(now);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `http_parse_errors_total` by role and reason, the reasons that are not zero.
pub fn parse_errors(s: &Samples, role: &str) -> BTreeMap<&'static str, u64> {
    ErrorReason::ALL
        .into_iter()
        .map(|reason| {
            let n = s.value(
                "observer_http_parse_errors_total",
                &[("role", role), ("reason", reason.as_str())],
            );
            (reason.as_str(), n as u64)
        })
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// `ebpf_events_lost_total` over every kind.
pub fn events_lost(s: &Samples) -> f64 {
    s.value("observer_ebpf_events_lost_total", &[]) + 0.0
}

/// The daemon's resident memory: all of it, and its anonymous part (heap and stacks: what
/// the daemon allocates; the rest is mapped files, the binary's pages among them).
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss: u64,
    pub anon: u64,
}

impl Memory {
    pub fn of(daemon: &Daemon) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid()))
            .expect("the daemon's /proc status");
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {status}"))
        };
        Memory {
            rss: kib("VmRSS:") * 1024,
            anon: kib("RssAnon:") * 1024,
        }
    }
}

const MIB: u64 = 1 << 20;

/// The end of a fault that leaves no trace but its exchanges: the counts are the clients'
/// records, the gauges the truth, no parse error, nothing lost, the daemon ready and its memory
/// back near idle.
pub fn assert_recovered(daemon: &Daemon, ports: Ports, want: &Expected, idle: Memory) {
    await_requests(daemon, want);
    await_gauges_settled(daemon, ports);
    let s = daemon.scrape();
    for role in ["gateway", "upstream"] {
        let errors = parse_errors(&s, role);
        assert!(errors.is_empty(), "{role}: parse errors {errors:?}");
    }
    assert_eq!(events_lost(&s), 0.0);
    assert_fine(daemon, idle, 32, 16);
}

/// The daemon answers `/readyz` and its memory is back within bounds once the fault is over:
/// `process_resident_memory_bytes` (its own figure) at most `idle.rss + rss_slack_mib`, and
/// its anonymous memory at most `idle.anon + anon_slack_mib`. Prints the figures.
pub fn assert_fine(daemon: &Daemon, idle: Memory, rss_slack_mib: u64, anon_slack_mib: u64) {
    let (status, body) = daemon.get("/readyz");
    assert_eq!(status, 200, "/readyz: {body}\n{}", tail(&daemon.log()));
    let now = Memory::of(daemon);
    let reported = daemon.scrape().value("process_resident_memory_bytes", &[]) as u64;
    eprintln!(
        "daemon memory: idle RSS {:.1} MiB (anonymous {:.1} MiB); now {:.1} MiB reported, \
         {:.1} MiB in /proc (anonymous {:.1} MiB)",
        idle.rss as f64 / MIB as f64,
        idle.anon as f64 / MIB as f64,
        reported as f64 / MIB as f64,
        now.rss as f64 / MIB as f64,
        now.anon as f64 / MIB as f64,
    );
    assert!(
        reported <= idle.rss + rss_slack_mib * MIB,
        "process_resident_memory_bytes {reported} over idle {} + {rss_slack_mib} MiB",
        idle.rss
    );
    assert!(
        now.anon <= idle.anon + anon_slack_mib * MIB,
        "anonymous memory {} over idle {} + {anon_slack_mib} MiB",
        now.anon,
        idle.anon
    );
}

/// The last lines of a log, for failure messages.
pub fn tail(log: &str) -> String {
    testkit::process::tail(log, 15)
}
