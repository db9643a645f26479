//! Fault: the observer itself restarts while traffic goes on, as root on the real kernel:
//! nginx in front of `observer sim`, clients holding keep-alive connections to nginx (and
//! nginx its own to the simulator), two of them in the middle of a stream. `observer run` is
//! stopped (it must exit 0) and started again: the new daemon seeds the open connections from
//! `/proc`, so the next exchange on each of them is counted, by it, once per role. The streams
//! it joined in the middle are not counted (it never saw their requests): it skips their
//! remaining bytes (`mid_stream`) and picks up the exchanges after them.

mod support;

use support::faults::*;

/// Keep-alive clients idle across the restart.
const IDLE: usize = 4;
/// Clients with a stream running across the restart.
const STREAMING: usize = 2;

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn observer_restarted_while_keepalive_connections_are_open() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim: _sim,
        nginx: _nginx,
        gateway,
        ports,
    } = Stack::start();
    let first = start_daemon(ports, &[]);
    let mut before = Expected::default();
    let mut idle_clients = rt.block_on(chatted(gateway, IDLE, 1, &mut before));
    await_requests(&first, &before);

    // Streams of 8 s, their heads in before the restart; each then reads to its end and
    // hands its connection back for one more exchange.
    let streams = streams_started(&rt, gateway, STREAMING, &chat("token-ms=50, tokens=160"));

    let restart = std::time::Instant::now();
    first.stop();
    let second = start_daemon(ports, &[]);
    eprintln!("observer restarted in {:?}", restart.elapsed());
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "the streams ended before the new daemon was ready: make them longer"
    );
    let idle = Memory::of(&second);
    // The seeded connections are active from the start: the clients' to nginx, and nginx's
    // kept-alive ones to the simulator.
    let seeded = await_gauges_open(&second, ports);
    assert!(seeded.active[0] >= (IDLE + STREAMING) as f64, "{seeded:?}");

    // The next exchange on every idle connection, counted by the new daemon.
    let mut after = Expected::default();
    rt.block_on(chat_on(&mut idle_clients, &mut after));
    await_requests(&second, &after);

    // The streams end whole for their clients, uncounted by the new daemon; the exchange after
    // each, on the same connection, is counted.
    let mut streamed = Vec::new();
    for stream in streams {
        let (record, conn) = rt.block_on(stream).unwrap();
        assert!(record.is_ok(), "{record:?}");
        streamed.push(conn);
    }
    rt.block_on(chat_on(&mut streamed, &mut after));
    await_requests(&second, &after);
    await_gauges_settled(&second, ports);

    // The only bytes it could not read are the rest of the streams it joined late (seen from
    // each end of each connection it seeded: both count).
    let s = second.scrape();
    for role in ["gateway", "upstream"] {
        let errors = parse_errors(&s, role);
        eprintln!("{role} parse errors after the restart: {errors:?}");
        assert!(
            errors.keys().all(|&reason| reason == "mid_stream"),
            "{role}: {errors:?}"
        );
        assert!(
            errors.get("mid_stream").copied().unwrap_or(0) >= STREAMING as u64,
            "{role}: {errors:?}"
        );
    }
    assert_eq!(events_lost(&s), 0.0);
    drop(idle_clients);
    drop(streamed);
    await_gauges_settled(&second, ports);
    assert_fine(&second, idle, 32, 16);
    second.stop();
}

/// Waits until `tcp_connections_active` of each role equals the connections open on its port
/// (requests in flight aside: the streams are running); the gauges then.
fn await_gauges_open(daemon: &support::daemon::Daemon, ports: Ports) -> Gauges {
    wait_for("seeded connections active", SETTLE, || {
        let g = gauges(daemon, ports);
        match g.active[0] == g.open[0] as f64 && g.active[1] == g.open[1] as f64 {
            true => Ok(g),
            false => Err(format!("{g:?}")),
        }
    })
}
