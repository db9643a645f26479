//! Fault of load, as root on the real kernel: nginx in front of `observer sim`, `observer run`
//! watching both ports, and 5,000 concurrent client connections, each with one exchange, all
//! held open at once and then closed: every exchange counted, `tcp_connections_active`
//! following the real count up and back down, memory back within bounds. (The flood that
//! overruns the ring buffer is `faults_ring.rs`, in its own binary so that the two never run
//! at once.)

mod support;

use std::time::Instant;

use support::faults::*;
use support::nginx::NginxOptions;

/// Client connections held open at once.
const CONNECTIONS: usize = 5000;
/// Connections opened at a time (each does its exchange, then waits with the others). A wave
/// makes ~16 ring buffer events of ~1.4 KiB per exchange, 4.5 MiB in all: it fits the default
/// 8 MiB ring even if the daemon reads nothing until the wave is over.
const WAVE: usize = 200;

/// Raises this process's open-file limit to `want` (or its hard limit if lower); the children
/// it starts (the simulator) inherit it. Returns the soft limit now.
fn raise_nofile(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write `limit`, alive for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_max < want {
            // Root may raise the hard limit too.
            limit.rlim_max = want;
        }
        limit.rlim_cur = limit.rlim_cur.max(want);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn five_thousand_concurrent_connections() {
    support::assert_root();
    let nofile = raise_nofile(3 * CONNECTIONS as u64);
    assert!(
        nofile >= CONNECTIONS as u64 + 1000,
        "RLIMIT_NOFILE {nofile} is too low for {CONNECTIONS} connections"
    );
    let rt = runtime();
    // One worker may take every client connection and an upstream one for each.
    let Stack {
        sim: _sim,
        nginx: _nginx,
        gateway,
        ports,
    } = Stack::start_with(NginxOptions {
        worker_connections: 2 * CONNECTIONS as u32 + 1000,
    });
    let daemon = start_daemon(ports, &[]);
    let idle = Memory::of(&daemon);

    let start = Instant::now();
    let mut held = Vec::with_capacity(CONNECTIONS);
    while held.len() < CONNECTIONS {
        rt.block_on(async {
            let wave: Vec<_> = (0..WAVE.min(CONNECTIONS - held.len()))
                .map(|_| {
                    tokio::spawn(async move {
                        let mut conn = HttpConn::connect(gateway).await;
                        let record = conn.exchange(&version()).await;
                        (record, conn)
                    })
                })
                .collect();
            for task in wave {
                let (record, conn) = task.await.unwrap();
                assert!(record.is_ok(), "{record:?}");
                held.push(conn);
            }
        });
        // The next wave once this one is counted: a debug build of the daemon reads the ring
        // more slowly than nginx and the simulator fill it, and the point here is many
        // connections open at once, not a flood (faults_ring.rs is the flood).
        let sent = held.len() as f64;
        wait_for("the wave counted", SETTLE, || {
            let s = daemon.scrape();
            let counted = s.value(REQUESTS, &[("role", "gateway")]);
            let lost = events_lost(&s);
            assert_eq!(lost, 0.0, "events lost at {sent} connections");
            match counted == sent {
                true => Ok(()),
                false => Err(format!("{counted} of {sent} counted")),
            }
        });
    }
    eprintln!(
        "{CONNECTIONS} connections, one exchange each, in {:?}",
        start.elapsed()
    );
    let mut want = Expected::default();
    want.gateway.add("200", CONNECTIONS as u64);
    want.upstream.add("200", CONNECTIONS as u64);
    await_requests(&daemon, &want);
    // All of them open at once, and active.
    let open = await_gauges_settled(&daemon, ports);
    assert_eq!(open.active[0], CONNECTIONS as f64, "{open:?}");
    let peak = Memory::of(&daemon);
    eprintln!(
        "daemon memory with {CONNECTIONS} connections open: {:.1} MiB (anonymous {:.1} MiB)",
        peak.rss as f64 / (1 << 20) as f64,
        peak.anon as f64 / (1 << 20) as f64
    );

    drop(held);
    let closed = await_gauges_settled(&daemon, ports);
    assert_eq!(closed.active[0], 0.0, "{closed:?}");
    let s = daemon.scrape();
    assert_eq!(events_lost(&s), 0.0);
    for role in ["gateway", "upstream"] {
        assert!(
            parse_errors(&s, role).is_empty(),
            "{role}: {:?}",
            parse_errors(&s, role)
        );
    }
    await_requests(&daemon, &want);
    assert_fine(&daemon, idle, 48, 32);
    daemon.stop();
}
