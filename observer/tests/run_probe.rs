//! As root on the real kernel: `observer run --model qwen3:0.6b` probing `observer sim` while
//! watching the sim's port. The model shows ready on `/metrics` after the first checks, all of
//! them passed, and not ready after three generate checks failed in a row once the simulator
//! is told to stall (SIGUSR1); it is ready again after one passed, after SIGUSR2. (That the
//! checks run on their intervals is `probe_sim.rs`'s `thresholds_and_intervals_are_honoured`,
//! on tokio's paused clock; here the waits are bounded only to end a failure.)
//!
//! Meanwhile the probe's own requests, which the kernel sees on the sim's side of each
//! connection, never reach the request metrics; one request from this test does, exactly once.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, Samples, Sim};

const MODEL: &str = "qwen3:0.6b";
const GENERATE_INTERVAL: Duration = Duration::from_secs(4);
const FIRST_CHUNK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a wait may take before it fails: never waited out by a test that passes.
const WAIT: Duration = Duration::from_secs(60);

fn ready(s: &Samples) -> f64 {
    s.value("observer_model_ready", &[("model", MODEL)])
}

/// Scrapes until `want(scrape)`, failing after `within`.
fn until(daemon: &Daemon, within: Duration, want: impl Fn(&Samples) -> bool) {
    support::wait_until(within, || want(&daemon.scrape()).then_some(()))
        .unwrap_or_else(|| panic!("not within {within:?}: {}", daemon.get("/ready/model").1));
}

/// Waits until `/metrics` and `/ready/model/MODEL` both say the model is `is_ready`; the
/// report's stages then, by name.
fn until_verdict(daemon: &Daemon, is_ready: bool) -> Vec<(String, Value)> {
    let want = if is_ready { 1.0 } else { 0.0 };
    let stages = support::wait_until(WAIT, || {
        let (_, body) = daemon.get(&format!("/ready/model/{MODEL}"));
        let report: Value = serde_json::from_str(&body).ok()?;
        (ready(&daemon.scrape()) == want && report["ready"] == is_ready)
            .then(|| report["models"][0]["stages"].as_array().unwrap().clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "{MODEL} not {} within {WAIT:?}: {}",
            if is_ready { "ready" } else { "not ready" },
            daemon.get("/ready/model").1
        )
    });
    stages
        .into_iter()
        .map(|s| (s["stage"].as_str().unwrap().to_owned(), s))
        .collect()
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
    // Ready on the first checks: each stage passed and none failed.
    let stages = until_verdict(&daemon, true);
    let became_ready = started.elapsed();
    assert_eq!(stages.len(), 3, "{stages:?}");
    for (stage, health) in &stages {
        assert!(
            health["passes_in_a_row"].as_u64().unwrap() >= 1 && health["failures_in_a_row"] == 0,
            "{stage}: {health}"
        );
    }
    let (code, body) = daemon.get("/ready/model");
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.get(&format!("/ready/model/{MODEL}")).0, 200);

    sim.signal(libc::SIGUSR1);
    let stalled = Instant::now();
    // Not ready once the generate stage failed three times in a row (the threshold), not
    // before; the other stages still pass.
    let stages = until_verdict(&daemon, false);
    let took = stalled.elapsed();
    eprintln!("ready {became_ready:?} after start; not ready {took:?} after the stall");
    for (stage, health) in &stages {
        if stage == "generate" {
            assert!(
                health["failures_in_a_row"].as_u64().unwrap() >= 3,
                "{stage}: {health}"
            );
        } else {
            assert_eq!(health["failures_in_a_row"], 0, "{stage}: {health}");
        }
    }
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
    // Ready again after one generate check passed (the default threshold).
    let stages = until_verdict(&daemon, true);
    let generate = &stages
        .iter()
        .find(|(stage, _)| stage == "generate")
        .unwrap()
        .1;
    assert!(
        generate["passes_in_a_row"].as_u64().unwrap() >= 1,
        "{generate}"
    );

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
