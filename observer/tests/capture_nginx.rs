//! A real gateway (root, real kernel): nginx with two workers proxies to the simulated
//! upstream with upstream keep-alive; the capture starts after nginx, so its listener comes
//! from `/proc` and its workers were forked before. Requests through nginx show on both
//! watched ports: the gateway's server side in nginx's workers (never the master), the
//! upstream's client side in a worker and its server side in the simulator, with nginx's
//! `readv`/`writev` payloads right.

mod support;

use std::os::fd::AsRawFd;

use observer::base::{ConnRecord, Direction, Role, Side};
use observer::capture::decode::{DataRecord, Event};
use support::{capture as cap, capture::ConnView, sim_client};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const REQUESTS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn requests_through_nginx_show_on_gateway_and_upstream() {
    support::assert_root();
    let (sim, nginx) = support::nginx::in_front_of_sim().await;
    let sim_addr = sim.local_addr();
    let (master, workers) = (nginx.master_pid(), nginx.worker_pids());
    let me = std::process::id();
    // The simulator is this process: it must not be left out.
    let config = cap::config(
        &[
            (nginx.port, Role::Gateway),
            (sim_addr.port(), Role::Upstream),
        ],
        false,
    );
    let (capture, mut reader) = tokio::task::spawn_blocking(move || cap::start(&config))
        .await
        .unwrap();
    assert!(capture.seeded().is_empty(), "{:#?}", capture.seeded());

    // Two streamed chats on one client connection.
    let request = sim_client::post("/api/chat", sim_client::CHAT);
    let mut client = TcpStream::connect(nginx.addr()).await.unwrap();
    let client_fd = client.as_raw_fd() as u32;
    let mut received = Vec::new();
    let mut ndjson_lines = Vec::new();
    for _ in 0..REQUESTS {
        client.write_all(&request).await.unwrap();
        let response = read_chunked_response(&mut client).await;
        let text = String::from_utf8(response.clone()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\n"),
            "{text}\n{}",
            nginx.error_log()
        );
        ndjson_lines.extend(ndjson(&text));
        received.extend(response);
    }
    assert_eq!(
        ndjson_lines.len(),
        REQUESTS * (sim_client::TOKENS as usize + 1)
    );
    drop(client);

    let mut events = Vec::new();
    cap::collect_until(&mut reader, &mut events, |events| {
        let gateway = gateway_server_conns(events);
        let [(open, view)] = gateway.as_slice() else {
            return Err(format!("{} gateway server-side connections", gateway.len()));
        };
        if view.close.is_none() {
            return Err(format!("no close of the worker's connection {open:?}"));
        }
        if view.total(Direction::Egress) < received.len() as u64 {
            return Err("the worker's writes to the client are incomplete".into());
        }
        let (to_sim, at_sim) = upstream_totals(events, me);
        if to_sim.0 == 0 || to_sim != at_sim {
            return Err(format!(
                "upstream bytes: worker sent/received {to_sim:?}, simulator received/sent {at_sim:?}"
            ));
        }
        if at_sim.1 == 0 {
            return Err("no upstream response yet".into());
        }
        Ok(())
    })
    .await;
    let summary = cap::summary(&events);

    // Nothing from the master; everything of nginx's from its workers, named nginx.
    for event in &events {
        let (tgid, comm) = who(event);
        assert_ne!(tgid, master, "an event from nginx's master:\n{summary}");
        assert!(
            tgid == me || workers.contains(&tgid),
            "an event from {tgid}, neither this process nor a worker ({workers:?}):\n{summary}"
        );
        if tgid != me {
            assert_eq!(comm, "nginx", "{summary}");
        }
    }

    // The gateway: the worker accepted from the seeded, inherited listener.
    let gateway = gateway_server_conns(&events);
    let (open, view) = &gateway[0];
    assert_eq!(
        (open.role, open.port, open.local, open.seeded),
        (Role::Gateway, nginx.port, Some(nginx.addr()), false),
        "{summary}"
    );
    assert!(workers.contains(&open.tgid), "{summary}");
    let worker_read = view.bytes(Direction::Ingress).unwrap();
    assert_eq!(
        worker_read,
        request.repeat(REQUESTS),
        "what the worker read"
    );
    assert!(
        view.data[0]
            .head
            .starts_with(b"POST /api/chat HTTP/1.1\r\n")
    );
    assert_eq!(view.total(Direction::Egress), received.len() as u64);
    match view.bytes(Direction::Egress) {
        Ok(written) => assert!(written == received, "what the worker wrote to the client"),
        // A write larger than head + tail: each line still shows in some capture.
        Err(_) => {
            let captures: Vec<String> = view
                .data
                .iter()
                .filter(|d| d.direction == Direction::Egress)
                .map(|d| {
                    String::from_utf8_lossy(&[d.head.clone(), d.tail.clone()].concat()).into_owned()
                })
                .collect();
            for line in &ndjson_lines {
                assert!(
                    captures.iter().any(|c| c.contains(line.as_str())),
                    "{line} not in the worker's writes:\n{summary}"
                );
            }
        }
    }
    // This process's client side of that connection.
    let client_open = cap::find_open(&events, me, Side::Client, client_fd).expect("client open");
    let client_view = &cap::by_conn(&events)[&client_open.conn_id];
    assert_eq!(
        client_view.total(Direction::Egress),
        (request.len() * REQUESTS) as u64
    );
    assert_eq!(client_view.total(Direction::Ingress), received.len() as u64);

    // The upstream: a worker connected to the simulator; what it sent is what the simulator
    // read, and the other way round.
    let upstream_clients: Vec<ConnRecord> = opens(&events)
        .filter(|o| o.role == Role::Upstream && o.side == Side::Client)
        .cloned()
        .collect();
    assert!(!upstream_clients.is_empty(), "{summary}");
    // The simulator's ends of them: their peers are the workers' own ports.
    let peer_ports: Vec<u16> = opens(&events)
        .filter(|o| o.role == Role::Upstream && o.side == Side::Server)
        .filter_map(|o| o.remote.map(|r| r.port()))
        .collect();
    for open in &upstream_clients {
        assert!(workers.contains(&open.tgid), "{summary}");
        assert_eq!((open.port, open.remote), (sim_addr.port(), Some(sim_addr)));
        // Its own port, read from the socket (the address only /proc knows).
        let local = open.local.expect("the client's own port");
        assert!(local.ip().is_unspecified(), "{local}");
        assert!(
            peer_ports.contains(&local.port()),
            "{local} not among {peer_ports:?}"
        );
    }
    let (to_sim, at_sim) = upstream_totals(&events, me);
    assert_eq!(to_sim, at_sim, "upstream bytes, worker vs simulator");
    let forwarded: Vec<&DataRecord<'static>> = data_of(&events, Role::Upstream, Side::Client)
        .filter(|d| d.direction == Direction::Egress)
        .collect();
    let first = forwarded.first().expect("a request forwarded upstream");
    assert!(
        first.head.starts_with(b"POST /api/chat HTTP/1.1\r\n"),
        "{summary}"
    );
    let at_sim_bytes: Vec<u8> = data_of(&events, Role::Upstream, Side::Server)
        .filter(|d| d.direction == Direction::Ingress)
        .flat_map(|d| cap::complete_bytes(d).expect("a small request read whole"))
        .collect();
    let forwarded_bytes: Vec<u8> = forwarded
        .iter()
        .flat_map(|d| cap::complete_bytes(d).expect("a small request written whole"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&forwarded_bytes),
        String::from_utf8_lossy(&at_sim_bytes),
        "the worker's writev and the simulator's reads"
    );
    assert_eq!(
        forwarded_bytes
            .windows(sim_client::CHAT.len())
            .filter(|w| *w == sim_client::CHAT.as_bytes())
            .count(),
        REQUESTS,
        "the chat body forwarded once per request"
    );
    assert!(
        data_of(&events, Role::Upstream, Side::Server).all(|d| d.tgid == me),
        "{summary}"
    );
    cap::assert_no_loss(&capture);
    drop(nginx);
    sim.shutdown().await.unwrap();
}

fn opens<'a>(events: &'a [Event<'static>]) -> impl Iterator<Item = &'a ConnRecord> {
    events.iter().filter_map(|e| match e {
        Event::Open(o) => Some(o),
        _ => None,
    })
}

fn data_of<'a>(
    events: &'a [Event<'static>],
    role: Role,
    side: Side,
) -> impl Iterator<Item = &'a DataRecord<'static>> {
    events.iter().filter_map(move |e| match e {
        Event::Data(d) if d.role == role && d.side == side => Some(d),
        _ => None,
    })
}

/// The gateway's server-side connections, with their events.
fn gateway_server_conns(events: &[Event<'static>]) -> Vec<(ConnRecord, ConnView)> {
    let conns = cap::by_conn(events);
    opens(events)
        .filter(|o| o.role == Role::Gateway && o.side == Side::Server)
        .map(|o| (o.clone(), conns[&o.conn_id].clone()))
        .collect()
}

/// Upstream bytes ((sent, received) by the workers, (received, sent) by the simulator).
fn upstream_totals(events: &[Event<'static>], me: u32) -> ((u64, u64), (u64, u64)) {
    let sum = |side: Side, direction: Direction| -> u64 {
        data_of(events, Role::Upstream, side)
            .filter(|d| d.direction == direction && (side == Side::Client) != (d.tgid == me))
            .map(|d| d.len)
            .sum()
    };
    (
        (
            sum(Side::Client, Direction::Egress),
            sum(Side::Client, Direction::Ingress),
        ),
        (
            sum(Side::Server, Direction::Ingress),
            sum(Side::Server, Direction::Egress),
        ),
    )
}

fn who<'a>(event: &'a Event<'_>) -> (u32, &'a str) {
    match event {
        Event::Data(d) => (d.tgid, &d.comm),
        Event::Open(c) | Event::Close(c) => (c.tgid, &c.comm),
    }
}

/// Reads one whole chunked response, raw.
async fn read_chunked_response(client: &mut TcpStream) -> Vec<u8> {
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    while !response.ends_with(b"\r\n0\r\n\r\n") {
        let n = tokio::time::timeout(sim_client::WAIT, client.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    response
}

/// The NDJSON lines of a chunked response (nginx may put several lines in one chunk).
fn ndjson(response: &str) -> Vec<String> {
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    body.split("\r\n")
        .filter(|part| part.starts_with('{'))
        .flat_map(|part| part.lines())
        .map(str::to_owned)
        .collect()
}
