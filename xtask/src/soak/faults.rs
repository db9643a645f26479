//! The soak's faults, one at a time in rotation: the upstream killed mid-stream and started
//! again, nginx reloaded, nginx restarted, garbage and other protocols on both watched ports, a
//! burst of connections, half-open connections. Each returns a line saying what happened.
//! Exchanges the faults make through the gateway go into the same [`Tally`] as the workload's;
//! the answers to garbage (not HTTP exchanges) go into [`Probes`].

use std::{
    collections::BTreeMap,
    fmt,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::Duration,
};

use anyhow::Context as _;
use testkit::{nginx::Nginx, observer::Sim};

use super::workload::{CLIENT_TIMEOUT, Dice, Tally};
use crate::chat::{Api, ChatClient, ChatRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    KillUpstream,
    ReloadGateway,
    RestartGateway,
    Garbage,
    Burst,
    HalfOpen,
}

/// The default rotation. The burst and the half-open connections come first: they raise the
/// daemon's memory high-water mark the most (many connections at once), so that a soak of ten
/// periods repeats them in its second half, where the memory slope is measured.
pub const ROTATION: [Fault; 6] = [
    Fault::Burst,
    Fault::HalfOpen,
    Fault::KillUpstream,
    Fault::ReloadGateway,
    Fault::RestartGateway,
    Fault::Garbage,
];

/// Connections of the burst.
pub const BURST: usize = 1000;
/// Half-open connections, and how long they are held.
pub const HALF_OPEN: usize = 50;
const HALF_OPEN_HOLD: Duration = Duration::from_secs(3);
/// How long the upstream stays dead.
const UPSTREAM_DOWN: Duration = Duration::from_secs(1);

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillUpstream => "upstream killed (SIGKILL) mid-stream, restarted",
            Fault::ReloadGateway => "nginx reloaded (nginx -s reload)",
            Fault::RestartGateway => "nginx restarted (stopped, started)",
            Fault::Garbage => "garbage and non-HTTP protocols on both ports",
            Fault::Burst => "burst of connections opened and closed",
            Fault::HalfOpen => "half-open connections",
        })
    }
}

/// What the faults sent that is not a client's exchange.
#[derive(Clone, Debug, Default)]
pub struct Probes {
    /// Answers to the garbage, which no HTTP exchange should count: per port role, the status
    /// answered (`"400"`, ...), `"closed"` or `"other bytes"`.
    pub answers: BTreeMap<(&'static str, String), u64>,
    /// Half-open requests to the gateway whose head was whole (their body was not): an
    /// exchange without a response once they vanish, `code="none"`.
    pub abandoned_with_head: u64,
}

/// Everything a fault may touch.
pub struct Target<'a> {
    pub gateway: &'a mut Nginx,
    pub sim: &'a mut Sim,
    pub tally: &'a Mutex<Tally>,
    pub probes: &'a mut Probes,
    pub dice: &'a mut Dice,
}

impl Fault {
    pub fn inject(self, t: &mut Target<'_>) -> anyhow::Result<String> {
        match self {
            Fault::KillUpstream => kill_upstream(t),
            Fault::ReloadGateway => {
                let old = t.gateway.worker_pids();
                t.gateway.reload_and_wait()?;
                Ok(format!(
                    "old workers {old:?}, now {:?}",
                    t.gateway.worker_pids()
                ))
            }
            Fault::RestartGateway => {
                t.gateway.restart()?;
                Ok(format!("new master {:?}", t.gateway.master_pid()))
            }
            Fault::Garbage => garbage(t),
            Fault::Burst => burst(t.gateway.addr),
            Fault::HalfOpen => half_open(t.gateway.addr, t.sim.addr, t.probes),
        }
    }
}

/// A long stream of the soak's own through the gateway, then the upstream killed while it
/// (and whatever the users have in flight) streams, then started again on the same port.
fn kill_upstream(t: &mut Target<'_>) -> anyhow::Result<String> {
    let gateway = t.gateway.addr;
    let tally = t.tally;
    let sim = &mut *t.sim;
    let cut = std::thread::scope(|scope| {
        let stream = scope.spawn(move || {
            let mut client = ChatClient::new(gateway, CLIENT_TIMEOUT);
            let request = ChatRequest::new(Api::Chat, true)
                .with_sim("first-token-ms=10, token-ms=20, tokens=500");
            let exchange = client.send(&request);
            tally.lock().expect("no panics hold it").record(&exchange);
            (
                exchange.outcome,
                exchange.status,
                exchange.response.content_lines,
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        sim.kill();
        let long = stream.join().expect("the stream thread does not panic");
        std::thread::sleep(UPSTREAM_DOWN);
        sim.restart().map(|()| long)
    })?;
    let status = cut.1.map_or_else(|| "none".to_owned(), |c| c.to_string());
    Ok(format!(
        "a stream of its own: {} (status {status}) after {} content lines",
        cut.0, cut.2
    ))
}

/// What is sent to each port on a fresh connection.
fn garbage_payloads(dice: &mut Dice) -> Vec<(&'static str, Vec<u8>)> {
    let random: Vec<u8> = (0..512).map(|_| dice.next_u64() as u8).collect();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x31, // TLS record: handshake, 49 bytes
        0x01, 0x00, 0x00, 0x2d, 0x03, 0x03, // ClientHello, 45 bytes, TLS 1.2
    ];
    hello.extend((0..32).map(|_| dice.next_u64() as u8)); // random
    hello.extend([0x00, 0x00, 0x04, 0x13, 0x01, 0x00, 0x2f, 0x01, 0x00]); // suites, compression
    hello.extend([0x00, 0x00]); // no extensions
    vec![
        ("random bytes", random),
        ("TLS ClientHello", hello),
        ("Redis PING", b"*1\r\n$4\r\nPING\r\n".to_vec()),
        ("SSH banner", b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
    ]
}

fn garbage(t: &mut Target<'_>) -> anyhow::Result<String> {
    let mut said = Vec::new();
    for (role, addr) in [("gateway", t.gateway.addr), ("upstream", t.sim.addr)] {
        for (what, bytes) in garbage_payloads(t.dice) {
            let answer = send_garbage(addr, &bytes)
                .with_context(|| format!("sending {what} to the {role} port"))?;
            said.push(format!("{what} to {role}: {answer}"));
            *t.probes.answers.entry((role, answer)).or_default() += 1;
        }
    }
    Ok(said.join("; "))
}

/// Sends `bytes` and reads until the peer closes or stays silent for a second: the status
/// code of an HTTP answer, `closed`, or `silent`.
fn send_garbage(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(bytes)?;
    let mut answer = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    Ok(match text.strip_prefix("HTTP/1.") {
        Some(rest) => rest.get(2..5).unwrap_or("?").to_owned(),
        None if answer.is_empty() => "closed".to_owned(),
        None => "other bytes".to_owned(),
    })
}

/// [`BURST`] connections to the gateway opened one after another, held together for a
/// moment, then closed together; nothing sent.
fn burst(gateway: SocketAddr) -> anyhow::Result<String> {
    let mut open = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        open.push(TcpStream::connect_timeout(
            &gateway,
            Duration::from_secs(2),
        )?);
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(open);
    Ok(format!("{BURST} connections to the gateway"))
}

/// [`HALF_OPEN`] connections (most to the gateway, a fifth to the upstream) that send part of
/// a request head and hold it; then half are closed and half reset (SO_LINGER 0), as a client
/// that vanishes.
fn half_open(
    gateway: SocketAddr,
    upstream: SocketAddr,
    probes: &mut Probes,
) -> anyhow::Result<String> {
    let mut held = Vec::new();
    for i in 0..HALF_OPEN {
        let to_gateway = i % 5 != 4;
        let addr = if to_gateway { gateway } else { upstream };
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        let whole_head = i % 3 == 1;
        let partial: &[u8] = match i % 3 {
            0 => b"POST /api/chat HTTP/1.1\r\nHost: soak\r\nContent-Le",
            1 => b"POST /api/chat HTTP/1.1\r\nHost: soak\r\nContent-Length: 200\r\n\r\n{\"model\":",
            _ => b"GET /api/ta",
        };
        probes.abandoned_with_head += u64::from(to_gateway && whole_head);
        stream.write_all(partial)?;
        held.push(stream);
    }
    std::thread::sleep(HALF_OPEN_HOLD);
    let mut reset = 0;
    for (i, stream) in held.into_iter().enumerate() {
        if i % 2 == 0 && set_linger_zero(&stream) {
            reset += 1;
        }
    }
    Ok(format!(
        "{HALF_OPEN} connections ({} to the upstream) held {} s with part of a request; {reset} reset, the rest closed",
        HALF_OPEN / 5,
        HALF_OPEN_HOLD.as_secs()
    ))
}

/// SO_LINGER with a zero timeout: closing the socket then resets the connection.
fn set_linger_zero(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger`, which outlives the call, with its exact size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        ) == 0
    }
}
