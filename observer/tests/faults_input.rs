//! Faults of the input, as root on the real kernel: nginx in front of `observer sim`,
//! `observer run` watching both ports, and clients that do not speak HTTP or stop half-way.
//!
//! - Garbage and other protocols (a TLS ClientHello, a Redis `PING`, random bytes, text that
//!   is not a request) on both watched ports while valid chats run on other connections.
//! - Half-open clients: half a request head, a whole head whose body never comes, idle
//!   connections, connections that vanish with a reset (no FIN), while valid chats run.
//!
//! The valid exchanges are counted exactly, the bad bytes as parse errors by reason, the
//! gauges settle to what is really open once the clients are gone, and the daemon keeps
//! running within its memory.

mod support;

use tokio::io::AsyncWriteExt;

use support::faults::*;

/// Valid chats, per client, that run beside the bad ones.
const CHATS: usize = 5;

/// A TLS 1.2 ClientHello for `example.com` (one cipher suite, SNI): what an HTTPS client
/// sends first to a port it takes for TLS.
fn client_hello() -> Vec<u8> {
    let host = b"example.com";
    let mut sni = vec![0x00];
    sni.extend((host.len() as u16).to_be_bytes());
    sni.extend(host);
    let mut sni_list = (sni.len() as u16).to_be_bytes().to_vec();
    sni_list.extend(sni);
    let mut extensions = vec![0x00, 0x00];
    extensions.extend((sni_list.len() as u16).to_be_bytes());
    extensions.extend(sni_list);
    let mut hello = vec![0x03, 0x03];
    hello.extend(support::capture::pattern(32, 1));
    hello.push(0); // session id
    hello.extend([0x00, 0x02, 0xc0, 0x2f]); // one suite: ECDHE-RSA-AES128-GCM-SHA256
    hello.extend([0x01, 0x00]); // null compression
    hello.extend((extensions.len() as u16).to_be_bytes());
    hello.extend(extensions);
    let mut handshake = vec![0x01];
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// What is not HTTP, by name.
fn garbage() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("tls", client_hello()),
        ("redis", b"*1\r\n$4\r\nPING\r\n".to_vec()),
        ("binary", support::capture::pattern(4096, 9)),
        ("text", b"hello there, this is not HTTP\r\n\r\n".to_vec()),
    ]
}

/// Valid chats on `clients` keep-alive connections, [`CHATS`] each, all while `during` runs.
async fn chats_beside<T>(
    gateway: std::net::SocketAddr,
    clients: usize,
    want: &mut Expected,
    during: impl std::future::Future<Output = T>,
) -> T {
    let valid: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = HttpConn::connect(gateway).await;
                let mut records = Vec::new();
                for _ in 0..CHATS {
                    records.push(conn.exchange(&chat("")).await);
                }
                records
            })
        })
        .collect();
    let out = during.await;
    for task in valid {
        for record in task.await.unwrap() {
            assert!(record.is_ok(), "{record:?}");
            want.both(&record);
        }
    }
    out
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn garbage_and_other_protocols_on_watched_ports() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim,
        nginx,
        gateway: _,
        ports,
    } = Stack::start();
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);
    let mut want = Expected::default();

    // Each kind of garbage on its own connection to each port, while two clients chat. nginx
    // and the simulator both answer 400 and close.
    let targets = [("gateway", nginx.addr()), ("upstream", sim.addr)];
    let replies = rt.block_on(chats_beside(nginx.addr(), 2, &mut want, async {
        let mut replies = Vec::new();
        for (role, addr) in targets {
            for (what, bytes) in garbage() {
                let mut conn = HttpConn::connect(addr).await;
                let _ = conn.send(&bytes).await;
                let reply = conn.read_until_closed(READ_WAIT).await;
                assert!(conn.ended, "{role} {what}: the server kept the connection");
                replies.push((role, what, String::from_utf8_lossy(&reply).into_owned()));
            }
        }
        replies
    }));
    for (role, what, reply) in &replies {
        // nginx reads what is left before it closes; the simulator does not, and its reset
        // may overtake its 400 at the client.
        assert!(
            reply.starts_with("HTTP/1.1 400 ") || (*role == "upstream" && reply.is_empty()),
            "{role} {what}: {reply:?}"
        );
    }

    // The chats, exactly: the 400s answered to garbage are no exchanges (no request came).
    await_requests(&daemon, &want);
    await_gauges_settled(&daemon, ports);
    // Each garbage connection is one `bad_head` (its bytes) and one `unmatched_response` (the
    // 400 that answered no request), counted once per connection like its exchanges would be:
    // on the server's side, not again from the client's end of the loopback connection.
    let kinds = garbage().len() as u64;
    let s = daemon.scrape();
    for role in ["gateway", "upstream"] {
        assert_eq!(
            parse_errors(&s, role),
            [("bad_head", kinds), ("unmatched_response", kinds)].into(),
            "{role}: parse errors for {kinds} garbage connections"
        );
    }
    assert_eq!(events_lost(&s), 0.0);
    assert_fine(&daemon, idle, 32, 16);
    daemon.stop();
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn half_open_and_vanishing_clients() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim,
        nginx: _nginx,
        gateway,
        ports,
    } = Stack::start();
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);
    let mut want = Expected::default();

    // Three kinds of stalled client: half a request head, a whole head with 10 bytes of its
    // body, nothing at all. One of each goes away with a FIN, one with a reset (no FIN: as
    // a crashed client host's would). Half a head and a whole head with half a body go to
    // the simulator as well, ending with a FIN.
    let request = chat("");
    let head_end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let stalls: [&[u8]; 3] = [&request[..head_end / 2], &request[..head_end + 10], b""];
    let (finned, reset) = rt.block_on(chats_beside(gateway, 2, &mut want, async {
        let mut finned = Vec::new();
        let mut reset = Vec::new();
        for bytes in stalls {
            for list in [&mut finned, &mut reset] {
                let mut conn = HttpConn::connect(gateway).await;
                conn.send(bytes).await.unwrap();
                list.push(conn);
            }
        }
        for bytes in &stalls[..2] {
            let mut conn = HttpConn::connect(sim.addr).await;
            conn.send(bytes).await.unwrap();
            finned.push(conn);
        }
        (finned, reset)
    }));

    // While they stall: the requests whose heads came are in flight (two at nginx, one at
    // the simulator), every connection is active.
    let held = wait_for("the stalled requests in flight", SETTLE, || {
        let g = gauges(&daemon, ports);
        let right = g.in_flight == [2.0, 1.0]
            && g.active[0] == g.open[0] as f64
            && g.active[1] == g.open[1] as f64;
        match right {
            true => Ok(g),
            false => Err(format!("{g:?}")),
        }
    });
    assert!(held.active[0] >= reset.len() as f64 * 2.0, "{held:?}");

    // They go. The whole heads end as exchanges without a response (code none): two at the
    // gateway (the reset one and the FIN one), one at the simulator. Half heads and idle
    // connections are no exchange and no parse error: nothing was sent that could be read.
    for conn in reset {
        conn.reset();
    }
    rt.block_on(async {
        for mut conn in finned {
            conn.stream.shutdown().await.unwrap();
            let rest = conn.read_until_closed(READ_WAIT).await;
            assert!(
                conn.ended && rest.is_empty(),
                "{:?}",
                String::from_utf8_lossy(&rest)
            );
        }
    });
    want.gateway.add("none", 2);
    want.upstream.add("none", 1);
    assert_recovered(&daemon, ports, &want, idle);
    daemon.stop();
}
