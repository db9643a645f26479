//! End to end, as root on the real kernel: nginx (the gateway) in front of `observer sim`
//! (Ollama's wire format), `observer run` watching both ports, and the official `ollama`
//! Python client sending streamed and non-streamed chats, chats for a missing model (404) and
//! streams that fail mid-way. After every request the test scrapes `/metrics` and checks that
//! one exchange was added per role with the right route and code, that the gateway's duration
//! and time to first chunk are within 2 ms of what the client measured, that the token counts
//! equal the final line's, and that the gateway overhead was observed once.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, Samples, Sim};
use support::nginx::Nginx;

const TOLERANCE_S: f64 = 0.002;

/// Sums over both roles' request counter.
fn requests(s: &Samples, role: &str) -> f64 {
    s.value("observer_http_requests_total", &[("role", role)])
}

/// Scrapes until both roles have counted `want` requests (events arrive within milliseconds).
fn scrape_until(daemon: &Daemon, want: f64) -> Samples {
    let start = Instant::now();
    loop {
        let s = daemon.scrape();
        if requests(&s, "gateway") >= want && requests(&s, "upstream") >= want {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the daemon counted {} gateway and {} upstream requests, {want} sent",
            requests(&s, "gateway"),
            requests(&s, "upstream")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ollama_client_through_nginx_is_measured_exactly() {
    if !support::require_root("ollama_client_through_nginx_is_measured_exactly") {
        return;
    }
    let sim = Sim::start(&[
        "--load-ms",
        "30",
        "--first-token-ms",
        "40",
        "--token-ms",
        "5",
        "--tokens",
        "8",
        "--seed",
        "3",
    ]);
    let nginx = Nginx::start(sim.addr);
    let daemon = Daemon::start(&[(nginx.port, "gateway"), (sim.addr.port(), "upstream")]);

    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/ollama_driver.py"
    );
    let mut driver = Command::new(python)
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", nginx.port))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the Python driver (run scripts/setup.sh for .venv)");
    let mut to_driver = driver.stdin.take().unwrap();
    let mut from_driver = BufReader::new(driver.stdout.take().unwrap());

    let model = "llama3.2:1b";
    let mut commands = vec![json!({"model": model, "stream": true})]; // warm-up, counted too
    for i in 0..6 {
        commands.push(json!({"model": model, "stream": true}));
        commands.push(json!({"model": model, "stream": false}));
        if i % 2 == 0 {
            commands.push(json!({"model": "no-such-model:1b", "stream": i == 0}));
            commands.push(
                json!({"model": model, "stream": true, "fault": format!("error-after={}", 2 + i)}),
            );
        }
    }

    let mut sent = 0.0;
    let mut before = scrape_until(&daemon, 0.0);
    let mut worst = (0.0f64, 0.0f64);
    let mut by_code: std::collections::BTreeMap<&str, f64> = Default::default();
    for command in &commands {
        writeln!(to_driver, "{command}").unwrap();
        let mut line = String::new();
        from_driver.read_line(&mut line).unwrap();
        let result: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("driver said {line:?}"));
        sent += 1.0;
        let after = scrape_until(&daemon, sent);
        let what = format!("{command} -> {result}");
        // A client's first call connects and pays Python's first-call costs before the first
        // byte reaches nginx: its counts are checked, its timings are not.
        let timed = result["fresh_client"] == false;

        let missing = command["model"] != model;
        let faulty = command.get("fault").is_some();
        let code = if missing { "404" } else { "200" };
        *by_code.entry(code).or_default() += 1.0;
        for role in ["gateway", "upstream"] {
            let labels = [
                ("role", role),
                ("route", "/api/chat"),
                ("code", code),
                ("method", "POST"),
            ];
            let added = after.value("observer_http_requests_total", &labels)
                - before.value("observer_http_requests_total", &labels);
            assert_eq!(added, 1.0, "{role}: {what}");
            assert_eq!(requests(&after, role), sent, "{role}: {what}");
        }
        if missing {
            assert_eq!(result["status"], 404, "{what}");
        }

        // Duration and time to first chunk, one observation each, against the client's clock.
        let delta = |name: &str, labels: &[(&str, &str)]| {
            (
                after.value(&format!("{name}_sum"), labels)
                    - before.value(&format!("{name}_sum"), labels),
                after.value(&format!("{name}_count"), labels)
                    - before.value(&format!("{name}_count"), labels),
            )
        };
        let gw = [("role", "gateway")];
        let (duration, n) = delta("observer_http_request_duration_seconds", &gw);
        assert_eq!(n, 1.0, "{what}");
        let client_duration =
            result["t_end"].as_f64().unwrap() - result["t_start"].as_f64().unwrap();
        if timed {
            worst.0 = worst.0.max((duration - client_duration).abs());
        }
        assert!(
            !timed || (duration - client_duration).abs() <= TOLERANCE_S,
            "duration {duration:.6} s, client {client_duration:.6} s: {what}"
        );
        let (ttfc, n) = delta("observer_http_time_to_first_chunk_seconds", &gw);
        if let Some(first) = result["t_first_chunk"].as_f64() {
            assert_eq!(n, 1.0, "{what}");
            let client_ttfc = first - result["t_start"].as_f64().unwrap();
            if timed {
                worst.1 = worst.1.max((ttfc - client_ttfc).abs());
            }
            assert!(
                !timed || (ttfc - client_ttfc).abs() <= TOLERANCE_S,
                "time to first chunk {ttfc:.6} s, client {client_ttfc:.6} s: {what}"
            );
        }

        // Token counts equal the final line's, on both roles.
        for role in ["gateway", "upstream"] {
            for (kind, field) in [
                ("prompt", "prompt_eval_count"),
                ("completion", "eval_count"),
            ] {
                let labels = [("role", role), ("type", kind)];
                let added = after.value("observer_llm_tokens_total", &labels)
                    - before.value("observer_llm_tokens_total", &labels);
                assert_eq!(
                    added,
                    result[field].as_f64().unwrap_or(0.0),
                    "{role} {kind}: {what}"
                );
            }
            let labels = [("role", role), ("done_reason", "error")];
            let errors = after.value("observer_llm_requests_total", &labels)
                - before.value("observer_llm_requests_total", &labels);
            assert_eq!(
                errors,
                if missing || faulty { 1.0 } else { 0.0 },
                "{role}: {what}"
            );
        }
        // A gateway overhead observation for every gateway exchange.
        let (_, overheads) = delta("observer_gateway_overhead_seconds", &[]);
        assert_eq!(overheads, 1.0, "{what}");
        before = after;
    }
    drop(to_driver);
    assert!(driver.wait().unwrap().success());

    let last = daemon.scrape();
    for (code, n) in &by_code {
        for role in ["gateway", "upstream"] {
            assert_eq!(
                last.value(
                    "observer_http_requests_total",
                    &[("role", role), ("code", code)]
                ),
                *n,
                "{role} {code}"
            );
        }
    }
    for role in ["gateway", "upstream"] {
        assert_eq!(
            last.value("observer_http_requests_in_flight", &[("role", role)]),
            0.0
        );
        assert_eq!(
            last.value("observer_http_parse_errors_total", &[("role", role)]),
            0.0,
            "{}",
            daemon.log()
        );
    }
    assert_eq!(last.value("observer_ebpf_events_lost_total", &[]), 0.0);
    assert_eq!(
        last.value("observer_gateway_unmatched_exchanges_total", &[]),
        0.0
    );
    eprintln!(
        "{} requests; worst |observer − client|: duration {:.3} ms, time to first chunk {:.3} ms",
        commands.len(),
        worst.0 * 1e3,
        worst.1 * 1e3
    );
    daemon.stop();
}
