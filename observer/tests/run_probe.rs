//! As root on the real kernel: `observer run --model qwen3:0.6b` probing `observer sim` while
//! watching the sim's port. The model shows ready on `/metrics` within one generate interval,
//! and not ready within three intervals (plus the last check's first-chunk timeout) after the
//! simulator is told to stall (SIGUSR1); it is ready again one interval after SIGUSR2.
//!
//! Meanwhile the probe's own requests, which the kernel sees on the sim's side of each
//! connection, never reach the request metrics; one request from this test does, exactly once.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::daemon::{Daemon, Samples, Sim};

const MODEL: &str = "qwen3:0.6b";
const GENERATE_INTERVAL: Duration = Duration::from_secs(4);
const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(1);

fn ready(s: &Samples) -> f64 {
    s.value("observer_model_ready", &[("model", MODEL)])
}

/// Scrapes until `want(scrape)` or `within` has passed; the time it took.
fn until(daemon: &Daemon, within: Duration, want: impl Fn(&Samples) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if want(&daemon.scrape()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {}",
            daemon.get("/ready/model").1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn the_model_turns_ready_and_not_ready_and_the_probe_is_never_counted() {
    support::assert_root();
    let sim = Sim::start(&[
        "--model",
        MODEL,
        "--load-ms",
        "100",
        "--first-token-ms",
        "50",
        "--token-ms",
        "5",
    ]);
    let upstream = sim.addr.to_string();
    let interval = format!("{}s", GENERATE_INTERVAL.as_secs());
    let first_chunk = format!("{}ms", FIRST_CHUNK_TIMEOUT.as_millis());
    let started = Instant::now();
    let daemon = Daemon::start_with(
        &[(sim.addr.port(), "upstream")],
        &[
            "--upstream",
            &upstream,
            "--model",
            MODEL,
            "--probe-generate-interval",
            &interval,
            "--probe-first-chunk-timeout",
            &first_chunk,
            "--probe-tcp-interval",
            "1s",
            "--probe-api-interval",
            "1s",
        ],
    );
    until(&daemon, GENERATE_INTERVAL, |s| ready(s) == 1.0);
    let became_ready = started.elapsed();
    assert!(
        became_ready <= GENERATE_INTERVAL,
        "ready after {became_ready:?}"
    );
    let (code, body) = daemon.get("/ready/model");
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.get(&format!("/ready/model/{MODEL}")).0, 200);

    sim.signal(libc::SIGUSR1);
    let limit = GENERATE_INTERVAL * 3 + FIRST_CHUNK_TIMEOUT;
    let took = until(&daemon, limit, |s| ready(s) == 0.0);
    eprintln!("ready {became_ready:?} after start; not ready {took:?} after the stall");
    let (code, body) = daemon.get("/ready/model");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no first chunk within 1s"), "{body}");
    let s = daemon.scrape();
    assert_eq!(
        s.value(
            "observer_probe_success",
            &[("model", MODEL), ("stage", "generate")]
        ),
        0.0
    );
    // Only the model's API hangs: tcp and api still pass.
    for stage in ["tcp", "api"] {
        assert_eq!(
            s.value(
                "observer_probe_success",
                &[("model", MODEL), ("stage", stage)]
            ),
            1.0,
            "{stage}"
        );
    }

    sim.signal(libc::SIGUSR2);
    until(&daemon, GENERATE_INTERVAL + FIRST_CHUNK_TIMEOUT, |s| {
        ready(s) == 1.0
    });

    // Dozens of probe connections reached the sim; the kernel saw their server side...
    let s = daemon.scrape();
    assert!(
        s.value("observer_ebpf_events_total", &[("kind", "open")]) >= 10.0,
        "the capture saw the probe's connections"
    );
    // ...and none of it became a request, a connection or bytes.
    for family in [
        "observer_http_requests_total",
        "observer_tcp_connections_opened_total",
        "observer_tcp_bytes_total",
        "observer_llm_requests_total",
    ] {
        assert!(!s.has(family), "{family} has samples from the probe");
    }

    // A request of our own is counted once.
    let mut client = TcpStream::connect(sim.addr).unwrap();
    write!(
        client,
        "GET /api/tags HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    until(&daemon, Duration::from_secs(5), |s| {
        s.value("observer_http_requests_total", &[]) == 1.0
    });
    let s = daemon.scrape();
    assert_eq!(
        s.value(
            "observer_http_requests_total",
            &[
                ("role", "upstream"),
                ("route", "/api/tags"),
                ("code", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "observer_tcp_connections_opened_total",
            &[("role", "upstream")]
        ),
        1.0
    );
    daemon.stop();
}
