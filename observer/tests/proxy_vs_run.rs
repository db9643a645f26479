//! The same traffic, observed twice: through nginx with `observer run` attached (root, real
//! kernel), then through `observer proxy`, in front of the same `observer sim`. The two
//! `/metrics` must agree on what they count: requests by role, route and code; generations by
//! model and how they ended; prompt and completion tokens; request body sizes.

mod support;

use std::time::{Duration, Instant};

use support::daemon::{Daemon, Samples, Sim};
use support::nginx::Nginx;
use support::proxy::Proxy;
use support::sim_client::{CHAT, exchange, get, post, post_with};

const MODEL: &str = "llama3.2:1b";
const REQUESTS: f64 = 9.0;

/// The traffic: streamed and not, both APIs, listings, a 404 model, a mid-stream error, a
/// 404 path.
fn requests() -> Vec<Vec<u8>> {
    vec![
        post("/api/chat", CHAT),
        post(
            "/api/chat",
            r#"{"model":"llama3.2:1b","stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        post(
            "/api/generate",
            r#"{"model":"llama3.2:1b","prompt":"Why is the sky blue?"}"#,
        ),
        post(
            "/v1/chat/completions",
            r#"{"model":"llama3.2:1b","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        post(
            "/v1/chat/completions",
            r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        get("/api/tags"),
        post(
            "/api/chat",
            r#"{"model":"nope:1b","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        post_with("/api/chat", "X-Sim-Fault: error-after=2\r\n", CHAT),
        get("/nope"),
    ]
}

async fn send_all(addr: std::net::SocketAddr) {
    for request in requests() {
        let reply = exchange(addr, &request).await;
        assert!(reply.head.starts_with("HTTP/1.1 "), "{}", reply.head);
    }
}

fn wait_for_requests(scrape: impl Fn() -> Samples) -> Samples {
    let start = Instant::now();
    loop {
        let s = scrape();
        let counted = |role| s.value("observer_http_requests_total", &[("role", role)]);
        if counted("gateway") == REQUESTS && counted("upstream") == REQUESTS {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gateway {} upstream {} of {REQUESTS}",
            counted("gateway"),
            counted("upstream")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What both must agree on, as (series, value).
fn counted(s: &Samples) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for role in ["gateway", "upstream"] {
        for (route, code) in [
            ("/api/chat", "200"),
            ("/api/chat", "404"),
            ("/api/generate", "200"),
            ("/v1/chat/completions", "200"),
            ("/api/tags", "200"),
            ("other", "404"),
        ] {
            let labels = [("role", role), ("route", route), ("code", code)];
            out.push((
                format!("requests {role} {route} {code}"),
                s.value("observer_http_requests_total", &labels),
            ));
            out.push((
                format!("durations {role} {route} {code}"),
                s.value("observer_http_request_duration_seconds_count", &labels),
            ));
        }
        for reason in ["stop", "error", "length"] {
            out.push((
                format!("generations {role} {reason}"),
                s.value(
                    "observer_llm_requests_total",
                    &[("role", role), ("model", MODEL), ("done_reason", reason)],
                ),
            ));
        }
        for kind in ["input", "output"] {
            out.push((
                format!("tokens {role} {kind}"),
                s.value(
                    "gen_ai_client_token_usage_sum",
                    &[
                        ("role", role),
                        ("gen_ai_request_model", MODEL),
                        ("gen_ai_token_type", kind),
                    ],
                ),
            ));
        }
        // Response sizes are left out: the sim's bodies carry timestamps and measured
        // durations, whose digits vary from run to run (Go trims trailing zeros).
        for family in [
            "observer_http_request_size_bytes_sum",
            "observer_http_response_size_bytes_count",
            "gen_ai_server_time_to_first_token_seconds_count",
        ] {
            out.push((
                format!("{family} {role}"),
                s.value(family, &[("role", role)]),
            ));
        }
    }
    out.push((
        "overheads".into(),
        s.value("observer_gateway_overhead_seconds_count", &[]),
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn the_proxy_counts_what_observer_run_counts() {
    support::assert_root();
    let sim = Sim::start(&["--load-ms", "5", "--first-token-ms", "5", "--token-ms", "1"]);

    let nginx = Nginx::start(sim.addr);
    let daemon = Daemon::start_with(
        &[(nginx.port, "gateway"), (sim.addr.port(), "upstream")],
        &["--no-probe", "--gpu", "off"],
    );
    send_all(format!("127.0.0.1:{}", nginx.port).parse().unwrap()).await;
    let ebpf = tokio::task::block_in_place(|| wait_for_requests(|| daemon.scrape()));
    daemon.stop();
    drop(nginx);

    let proxy = Proxy::start(sim.addr, &["--no-probe"]);
    send_all(proxy.addr).await;
    let proxied = tokio::task::block_in_place(|| wait_for_requests(|| proxy.scrape()));
    proxy.stop();

    let (ebpf, proxied) = (counted(&ebpf), counted(&proxied));
    let differences: Vec<String> = ebpf
        .iter()
        .zip(&proxied)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((name, a), (_, b))| format!("{name}: observer run {a}, observer proxy {b}"))
        .collect();
    assert!(differences.is_empty(), "{differences:#?}");
    // The comparison is not vacuous.
    let total = |name: &str| {
        ebpf.iter()
            .filter(|(n, _)| n.starts_with(name))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    assert_eq!(total("requests gateway"), REQUESTS);
    // Five replies finish, each with the simulator's default reply length; the one cut by its
    // error line reports no tokens.
    let per_reply = f64::from(observer_sim::Timing::default().tokens_per_reply);
    assert_eq!(total("generations upstream stop"), 5.0);
    assert_eq!(total("generations upstream error"), 1.0);
    assert_eq!(total("tokens upstream output"), 5.0 * per_reply);
}
