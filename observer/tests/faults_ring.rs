//! Fault: a flood that overruns the ring buffer, as root on the real kernel: nginx in front of
//! `observer sim`, `observer run --ring-bytes 65536` watching both ports, 64 connections
//! sending requests as fast as nginx answers. The losses are counted
//! (`ebpf_events_lost_total`), and the daemon recovers: fresh exchanges after the flood are
//! counted exactly, and its gauges come back to the truth (nothing in flight, the connections
//! active those really open, read from the kernel's table) although the events that would
//! have said so were lost.

mod support;

use support::faults::*;
use support::nginx::NginxOptions;

/// The ring buffer of the flood test: 64 KiB, about 45 data events (each holds up to 1,280
/// payload bytes, ~1.4 KiB in all). The smallest ring accepted (4 KiB) holds two, fewer than
/// one exchange makes in the microseconds between nginx's, the simulator's and the client's
/// system calls: with it not even single requests are counted whole, so there is nothing to
/// recover to. 64 KiB holds every event of one exchange at a time, and overflows within a
/// second of a flood from 64 connections.
const SMALL_RING: &str = "65536";
/// Connections of the flood, each sending request after request.
const FLOOD_CONNECTIONS: usize = 64;
/// Fresh exchanges after the flood, one at a time.
const FRESH: usize = 20;

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn ring_buffer_overrun_is_counted_and_the_daemon_recovers() {
    support::assert_root();
    let rt = runtime();
    let Stack {
        sim: _sim,
        nginx: _nginx,
        gateway,
        ports,
    } = Stack::start_with(NginxOptions {
        worker_connections: 1024,
    });
    let daemon = start_daemon(ports, &["--ring-bytes", SMALL_RING]);
    let idle = Memory::of(&daemon);

    // The flood: `GET /api/version` on 64 keep-alive connections as fast as nginx answers,
    // until the daemon reports losses (it reads the kernel's counters every second).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|_| {
            let stop = stop.clone();
            rt.spawn(async move {
                let mut sent = 0u64;
                let mut conn = HttpConn::connect(gateway).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let record = conn.exchange(&version()).await;
                    assert!(record.is_ok(), "{record:?}");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let lost = wait_for("events lost in the flood", SETTLE, || {
        match events_lost(&daemon.scrape()) {
            0.0 => Err("nothing lost yet".to_owned()),
            lost => Ok(lost),
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = flood.into_iter().map(|t| rt.block_on(t).unwrap()).sum();
    let s = daemon.scrape();
    eprintln!(
        "flood: {sent} exchanges sent; {lost} events lost ({} data, {} open/close); \
         {} gateway and {} upstream exchanges counted",
        s.value("observer_ebpf_events_lost_total", &[("kind", "data")]),
        s.value("observer_ebpf_events_lost_total", &[("kind", "conn")]),
        s.value(REQUESTS, &[("role", "gateway")]),
        s.value(REQUESTS, &[("role", "upstream")]),
    );
    assert_eq!(daemon.get("/readyz").0, 200);

    // Recovery: the sweep after the flood (once a second) closes the connections whose close
    // was lost, puts those that lost bytes back in step and takes up those whose every event
    // was lost; the gauges then match what is open. Fresh exchanges are counted from then on.
    let settled = await_gauges_settled(&daemon, ports);
    assert_eq!(settled.active[0], 0.0, "{settled:?}");

    // Fresh exchanges, one at a time on new connections (another route, so that whatever the
    // flood's lost events still make the daemon count later cannot be mistaken for them):
    // each counted exactly once per role.
    let mut fresh = Expected::default();
    rt.block_on(async {
        for _ in 0..FRESH {
            let record = HttpConn::connect(gateway).await.exchange(&chat("")).await;
            assert!(record.is_ok(), "{record:?}");
            fresh.both(&record);
        }
    });
    await_requests_with(&daemon, &[("route", "/api/chat")], &fresh);

    // Recovery: with every flood connection closed, nothing is in flight and the connections
    // active are those really open (nginx's kept-alive ones to the simulator), although the
    // events that would have said so were lost.
    let settled = await_gauges_settled(&daemon, ports);
    assert_eq!(settled.active[0], 0.0, "{settled:?}");
    assert_fine(&daemon, idle, 32, 16);
    daemon.stop();
}
