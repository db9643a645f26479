//! Common ground of the deployment suites (`tests/deploy_*.rs`): the traffic every topology
//! carries (15 chats answered 200 and 3 answered 404, on three keep-alive connections through
//! the gateway, each recorded by the client), and what the daemon must show for it: every
//! exchange counted once per role with the client's code, an overhead observation for every
//! gateway exchange that got a response, nothing left in flight, and
//! `tcp_connections_active{role}` equal to the connections really open at each role's real
//! server (in its namespace; a relay's own connections left out).
//!
//! The topologies themselves are in `netns.rs`; the counts and gauges are polled as in
//! `faults.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use super::daemon::{Daemon, FAST_SIM, Sim};
use super::faults::{
    Expected, HttpConn, Ports, REQUESTS, SETTLE, await_gauges_settled_with, await_requests, chat,
    chat_for, events_lost, open_conns, parse_errors, runtime, start_daemon, tail,
};
use super::netns::{self, Netns, Proc};
use super::nginx::Nginx;

/// Keep-alive connections the traffic uses.
pub const CONNS: usize = 3;
/// Chats answered 200 on each connection.
pub const OK_EACH: usize = 5;
/// Chats answered 404 (a model the server does not have) on each connection.
pub const NOT_FOUND_EACH: usize = 1;
pub const OVERHEAD_COUNT: &str = "observer_gateway_overhead_seconds_count";

/// The two requests of the traffic.
#[derive(Debug, Clone)]
pub struct Requests {
    /// Answered 200.
    pub ok: Vec<u8>,
    /// Answered 404.
    pub not_found: Vec<u8>,
}

impl Requests {
    /// For `observer sim`: its default model, and one it does not know.
    pub fn sim() -> Requests {
        Requests {
            ok: chat(""),
            not_found: chat_for("no-such-model:1b", ""),
        }
    }

    /// For a server that knows only `model`.
    pub fn for_model(model: &str) -> Requests {
        Requests {
            ok: chat_for(model, ""),
            not_found: chat_for(&format!("not-{model}"), ""),
        }
    }
}

/// The traffic through `gateway`: on each of [`CONNS`] keep-alive connections (those in
/// `conns` first, new ones for the rest, all kept in `conns`), [`OK_EACH`] chats answered 200
/// and [`NOT_FOUND_EACH`] answered 404, each required and recorded in `want` for both roles.
pub async fn traffic(
    gateway: SocketAddr,
    conns: &mut Vec<HttpConn>,
    requests: &Requests,
    want: &mut Expected,
) {
    while conns.len() < CONNS {
        conns.push(HttpConn::connect(gateway).await);
    }
    for conn in conns.iter_mut() {
        for i in 0..OK_EACH + NOT_FOUND_EACH {
            let (request, status) = match i < OK_EACH {
                true => (&requests.ok, 200),
                false => (&requests.not_found, 404),
            };
            let record = conn.exchange(request).await;
            assert_eq!(
                (record.status, record.complete),
                (Some(status), true),
                "through {gateway}"
            );
            want.both(&record);
        }
    }
}

/// `n` keep-alive connections through `gateway`, one chat answered 200 on each, recorded
/// nowhere: connections open before the daemon starts.
pub async fn warm(gateway: SocketAddr, n: usize, requests: &Requests) -> Vec<HttpConn> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = HttpConn::connect(gateway).await;
        let record = conn.exchange(&requests.ok).await;
        assert!(record.is_ok(), "{record:?}");
        conns.push(conn);
    }
    conns
}

/// The lines of `/metrics` that a failure in these suites is about, and the daemon's log tail.
pub fn context(daemon: &Daemon) -> String {
    let (_, text) = daemon.get("/metrics");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            [
                REQUESTS,
                OVERHEAD_COUNT,
                "observer_gateway_unmatched",
                "observer_http_requests_in_flight",
                "observer_tcp_connections",
                "observer_http_parse_errors_total",
                "observer_ebpf_events_lost_total",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect();
    format!("{}\n{}", lines.join("\n"), tail(&daemon.log()))
}

/// Runs `check`; when it fails, prints [`context`] before the failure goes on.
pub fn with_context<T>(daemon: &Daemon, check: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("the daemon at the failure:\n{}", context(daemon));
            std::panic::resume_unwind(panic)
        }
    }
}

/// Waits until `gateway_overhead_seconds_count`, over all its series, equals `n` and still
/// does 300 ms later; more fails at once.
pub fn await_overhead(daemon: &Daemon, n: u64) {
    let start = Instant::now();
    let mut matched_at: Option<Instant> = None;
    loop {
        let got = daemon.scrape().value(OVERHEAD_COUNT, &[]) as u64;
        assert!(
            got <= n,
            "{OVERHEAD_COUNT} {got}, more than the {n} gateway exchanges:\n{}",
            context(daemon)
        );
        match (got == n, matched_at) {
            (true, Some(at)) if at.elapsed() >= Duration::from_millis(300) => return,
            (true, None) => matched_at = Some(Instant::now()),
            (true, Some(_)) => {}
            (false, _) => matched_at = None,
        }
        assert!(
            start.elapsed() < SETTLE,
            "{OVERHEAD_COUNT} {got} after {SETTLE:?}, want {n} (one per gateway exchange \
             with a response):\n{}",
            context(daemon)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything the daemon must show for `want`: the counts per role and code, an overhead
/// observation per gateway exchange with a response, no request in flight and
/// `tcp_connections_active` equal to `open()` (`[gateway, upstream]`, counted at the real
/// servers), no parse error but those of a reason in `allowed` (`mid_stream` for connections
/// open before the daemon), nothing lost.
pub fn assert_counted(
    daemon: &Daemon,
    want: &Expected,
    open: impl Fn() -> [u64; 2],
    allowed: &[&str],
) {
    with_context(daemon, || await_requests(daemon, want));
    let responses: u64 = want
        .gateway
        .codes()
        .filter(|(code, _)| *code != "none")
        .map(|(_, n)| n)
        .sum();
    await_overhead(daemon, responses);
    let gauges = with_context(daemon, || await_gauges_settled_with(daemon, open));
    eprintln!("settled: {gauges:?}");
    let s = daemon.scrape();
    for role in ["gateway", "upstream"] {
        let errors = parse_errors(&s, role);
        assert!(
            errors.keys().all(|reason| allowed.contains(reason)),
            "{role}: parse errors {errors:?}\n{}",
            context(daemon)
        );
    }
    assert_eq!(events_lost(&s), 0.0, "{}", context(daemon));
}

/// A plain TCP echo server on a free loopback port (an unwatched one): every connection gets
/// its bytes back until it closes. Its threads live as long as the test binary.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// One run of a topology, once the daemon watches it: the traffic through `gateway` on
/// `conns` (more opened as needed), its counts checked (`allowed`: the parse error reasons
/// expected, `mid_stream` where connections predate the daemon), then `also`, the connections
/// let go and the gauges waited for against `open`; the daemon stops at the end.
#[allow(clippy::too_many_arguments)]
pub fn exercise(
    rt: &tokio::runtime::Runtime,
    daemon: Daemon,
    gateway: SocketAddr,
    mut conns: Vec<HttpConn>,
    requests: &Requests,
    open: impl Fn() -> [u64; 2],
    allowed: &[&str],
    also: impl FnOnce(&Daemon),
) {
    let mut want = Expected::default();
    rt.block_on(traffic(gateway, &mut conns, requests, &mut want));
    assert_counted(&daemon, &want, &open, allowed);
    also(&daemon);
    drop(conns);
    await_gauges_settled_with(&daemon, &open);
    daemon.stop();
}

/// nginx on the host proxying to `upstream`, and the ports the daemon watches (nginx's as the
/// gateway, `upstream`'s port as the upstream).
pub fn gateway_to(upstream: SocketAddr) -> (Nginx, Ports) {
    let nginx = Nginx::start(upstream);
    let ports = Ports {
        gateway: nginx.port,
        upstream: upstream.port(),
    };
    (nginx, ports)
}

/// The traffic with the daemon started after keep-alive connections through `nginx` (and on
/// to the upstream: `open()[1]`, the connections open at the upstream's real server) were
/// opened and used: the daemon picks them up mid-stream.
pub fn exercise_after_warm_up(
    rt: &tokio::runtime::Runtime,
    nginx: &Nginx,
    ports: Ports,
    requests: &Requests,
    open: impl Fn() -> [u64; 2],
    also: impl FnOnce(&Daemon),
) {
    let conns = rt.block_on(warm(nginx.addr(), 2, requests));
    assert!(
        open()[1] >= 1,
        "no upstream connection open before the daemon"
    );
    let daemon = start_daemon(ports, &[]);
    exercise(
        rt,
        daemon,
        nginx.addr(),
        conns,
        requests,
        open,
        &["mid_stream"],
        also,
    );
}

/// The traffic through `nginx` to the simulator in `ns` (on the upstream port, behind the
/// relay `relay` where there is one), on fresh connections: `/status` must name the simulator
/// as the server (and the relay as a relay), the gauges count the simulator's connections.
pub fn exercise_to_namespace(
    rt: &tokio::runtime::Runtime,
    daemon: Daemon,
    nginx: &Nginx,
    ports: Ports,
    ns: &Netns,
    sim: &Sim,
    relay: Option<u32>,
) {
    exercise(
        rt,
        daemon,
        nginx.addr(),
        Vec::new(),
        &Requests::sim(),
        || [open_conns(ports.gateway), ns.open_conns(ports.upstream)],
        &[],
        |daemon| await_hops(daemon, ports.upstream, sim.pid(), relay),
    );
}

/// Waits until `/status` names `server` as a process whose accepted connections on `port` are
/// counted and, where given, `relay` as a relay on it (the daemon updates it once a second):
/// what is measured is the server behind the relay, not the relay.
pub fn await_hops(daemon: &Daemon, port: u16, server: u32, relay: Option<u32>) {
    let listed = |status: &serde_json::Value, list: &str, pid: u32| {
        status[list].as_array().is_some_and(|hops| {
            hops.iter()
                .any(|h| h["port"] == u64::from(port) && h["pid"] == u64::from(pid))
        })
    };
    let start = Instant::now();
    loop {
        let (code, body) = daemon.get("/status");
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let servers_ok = listed(&status, "servers", server);
        let relays_ok = relay.is_none_or(|pid| listed(&status, "relays", pid));
        if code == 200 && servers_ok && relays_ok {
            return;
        }
        assert!(
            start.elapsed() < SETTLE,
            "/status does not show server {server}{} on port {port}: {body}",
            relay
                .map(|r| format!(" behind relay {r}"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The upstream in a namespace of its own behind a relay on the host's 127.0.0.1:P (`relay`
/// starts it: what it listens on, where it forwards to), both started after the daemon, nginx
/// on the host proxying to 127.0.0.1:P: every exchange counted once per role, at the
/// simulator, and `/status` naming the simulator as the server and the relay as a relay.
pub fn relay_started_after_the_daemon(
    name: &str,
    relay: impl FnOnce(SocketAddr, SocketAddr) -> Proc,
) {
    let rt = runtime();
    let port = netns::spare_port();
    let published = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
    let (nginx, ports) = gateway_to(published);
    let daemon = start_daemon(ports, &[]);

    let ns = Netns::new(name);
    let sim = Sim::start_in(Some(&ns.name), &format!("{}:{port}", ns.ip), FAST_SIM);
    let relay = relay(published, sim.addr);
    eprintln!(
        "client -> nginx {} -> {name} {published} -> sim {} in {}",
        nginx.addr(),
        sim.addr,
        ns.name
    );
    exercise_to_namespace(&rt, daemon, &nginx, ports, &ns, &sim, Some(relay.pid()));

    let names = ns.names();
    drop((relay, nginx, sim, ns));
    netns::assert_nothing_left(&names);
}
