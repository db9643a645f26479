//! End to end, as root on the real kernel: the official `ollama`, `openai` and `anthropic`
//! Python clients through nginx (the gateway) to `observer sim` configured the way an operator
//! configures Ollama, through its environment: one parallel slot (`OLLAMA_NUM_PARALLEL=1`), a
//! queue of one (`OLLAMA_MAX_QUEUE=1`), a context of 64 tokens (`OLLAMA_CONTEXT_LENGTH=64`).
//! `observer run` watches both ports; the probe reads `/api/ps` every second.
//!
//! Each scenario of tests/python/llm_clients_driver.py runs between two scrapes, and every
//! figure the observer adds is checked against what the clients recorded: the final lines'
//! durations (the simulator's own timeline, which the queue, load, prefill and decode phases
//! must add up to exactly), status codes, usage objects, chunk and tool call counts.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, Samples, Sim};
use support::nginx::Nginx;

const MODEL: &str = "llama3.2:1b";
const UPSTREAM: (&str, &str) = ("role", "upstream");
const GATEWAY: (&str, &str) = ("role", "gateway");

struct Driver {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Driver {
    fn start(host: &str) -> Driver {
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/python/llm_clients_driver.py"
        );
        let mut child = Command::new(python)
            .arg(script)
            .arg(host)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the Python driver (run scripts/setup.sh for .venv)");
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        Driver { child, to, from }
    }

    fn run(&mut self, scenario: &str) -> Value {
        writeln!(self.to, "{}", json!({ "scenario": scenario })).unwrap();
        let mut line = String::new();
        self.from.read_line(&mut line).unwrap();
        let result: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("driver said {line:?}"));
        assert!(
            result.get("exception").is_none(),
            "{scenario}: the client failed: {result}"
        );
        result
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrapes until the upstream has counted `upstream` requests and the gateway `gateway`, and two
/// scrapes in a row agree (one exchange is recorded in several families).
fn settle(daemon: &Daemon, upstream: f64, gateway: f64) -> Samples {
    let start = Instant::now();
    let mut previous: Option<String> = None;
    loop {
        let text = daemon.get("/metrics").1;
        let s = Samples::parse(&text);
        let counted = (
            s.value("observer_http_requests_total", &[UPSTREAM]),
            s.value("observer_http_requests_total", &[GATEWAY]),
        );
        // Gauges move with each scrape's in-flight count; compare the counters and histograms.
        let stable: String = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("in_flight") && !l.contains("process_"))
            .filter(|l| !l.contains("_waiting") && !l.contains("probe_") && !l.contains("target_"))
            .collect::<Vec<_>>()
            .join("\n");
        if counted.0 >= upstream && counted.1 >= gateway && previous.as_ref() == Some(&stable) {
            return s;
        }
        previous = Some(stable);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "want {upstream} upstream and {gateway} gateway requests, counted {counted:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds from an Ollama duration in nanoseconds.
fn secs(result: &Value, field: &str) -> f64 {
    result[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no {field} in {result}"))
        / 1e9
}

/// The wait for a slot in a final line: what load, prompt eval and eval leave of the total.
fn queue_of(fin: &Value) -> f64 {
    secs(fin, "total_duration")
        - secs(fin, "load_duration")
        - secs(fin, "prompt_eval_duration")
        - secs(fin, "eval_duration")
}

fn close(observed: f64, expected: f64, what: &str) {
    // Nanoseconds become seconds on both sides: only float rounding separates them.
    assert!(
        (observed - expected).abs() < 1e-6,
        "{what}: observer {observed:.9}, clients {expected:.9}"
    );
}

struct Run {
    daemon: Daemon,
    driver: Driver,
    before: Samples,
    upstream: f64,
    gateway: f64,
}

impl Run {
    /// Runs `scenario`, which makes `requests` requests (each through the gateway), and
    /// returns what the clients saw and the observer's deltas.
    fn scenario(&mut self, scenario: &str, requests: f64) -> (Value, Delta) {
        let result = self.driver.run(scenario);
        self.upstream += requests;
        self.gateway += requests;
        let after = settle(&self.daemon, self.upstream, self.gateway);
        let delta = Delta {
            before: std::mem::replace(&mut self.before, after.clone()),
            after,
        };
        (result, delta)
    }
}

struct Delta {
    before: Samples,
    after: Samples,
}

impl Delta {
    fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.after.value(name, labels) - self.before.value(name, labels)
    }

    fn phase(&self, phase: &str, suffix: &str) -> f64 {
        self.of(
            &format!("observer_llm_request_phase_seconds_{suffix}"),
            &[("model", MODEL), ("phase", phase)],
        )
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn llm_clients_through_nginx_to_a_one_slot_server() {
    support::assert_root();
    let sim = Sim::start_with_env(
        None,
        "127.0.0.1:0",
        &[
            "--load-ms",
            "30",
            "--first-token-ms",
            "40",
            "--token-ms",
            "20",
            "--tokens",
            "8",
            "--seed",
            "5",
            "--model",
            "llama3.2:1b",
            "--model",
            "qwen2.5:0.5b",
        ],
        &[
            ("OLLAMA_NUM_PARALLEL", "1"),
            ("OLLAMA_MAX_QUEUE", "1"),
            ("OLLAMA_CONTEXT_LENGTH", "64"),
        ],
    );
    let nginx = Nginx::start(sim.addr);
    let daemon = Daemon::start_with(
        &[(nginx.port, "gateway"), (sim.addr.port(), "upstream")],
        &["--probe-api-interval", "1s", "--resources-interval", "1s"],
    );
    let driver = Driver::start(&format!("http://127.0.0.1:{}", nginx.port));
    let before = settle(&daemon, 0.0, 0.0);
    let mut run = Run {
        daemon,
        driver,
        before,
        upstream: 0.0,
        gateway: 0.0,
    };

    // The server's settings, read from its environment.
    let (_, _) = run.scenario("warm", 1.0);
    let pid = sim.pid().to_string();
    let info = [
        ("pid", pid.as_str()),
        ("num_parallel", "1"),
        ("max_queue", "1"),
        ("max_loaded_models", "auto"),
        ("context_length", "64"),
        ("keep_alive", "300s"),
    ];
    assert_eq!(
        run.before.value("observer_llm_server_info", &info),
        1.0,
        "the sim's OLLAMA_* settings"
    );
    assert_eq!(run.before.value("observer_llm_slots", &[]), 1.0);

    // Two chats on one slot: the second waits. The phases add up to each final line's total.
    let (queue, d) = run.scenario("queue", 2.0);
    let (first, second) = (&queue["first"], &queue["second"]);
    assert!(
        queue_of(second) > 0.05,
        "the second request waited for the first's slot: {second}"
    );
    close(
        d.phase("queue", "sum"),
        queue_of(first) + queue_of(second),
        "queue",
    );
    for (phase, field) in [
        ("load", "load_duration"),
        ("prefill", "prompt_eval_duration"),
        ("decode", "eval_duration"),
    ] {
        close(
            d.phase(phase, "sum"),
            secs(first, field) + secs(second, field),
            phase,
        );
        assert_eq!(d.phase(phase, "count"), 2.0, "{phase}");
    }
    let split: f64 = ["queue", "load", "prefill", "decode"]
        .iter()
        .map(|p| d.phase(p, "sum"))
        .sum();
    close(
        split,
        secs(first, "total_duration") + secs(second, "total_duration"),
        "queue + load + prefill + decode = total_duration",
    );
    let outside = d.phase("outside", "sum");
    assert!(
        (0.0..0.02).contains(&outside),
        "outside Ollama, on its own socket: {outside}"
    );

    // Three requests for a cold model while it loads: one loading it, one in the scheduler's
    // queue of one, the third refused with Ollama's 503.
    let (busy, d) = run.scenario("busy", 3.0);
    assert_eq!(busy["refused"]["status"], 503, "{busy}");
    for role in [UPSTREAM, GATEWAY] {
        assert_eq!(
            d.of(
                "observer_llm_rejected_requests_total",
                &[role, ("reason", "server_busy")]
            ),
            1.0,
            "{role:?}: {busy}"
        );
    }

    // A stream the client cancels; the request behind it reports its wait.
    let (cancel, d) = run.scenario("cancel", 2.0);
    assert_eq!(cancel["cancelled_after"], 2, "{cancel}");
    assert_eq!(
        d.of(
            "observer_llm_requests_total",
            &[UPSTREAM, ("done_reason", "incomplete")]
        ),
        1.0
    );
    assert_eq!(
        d.of(
            "observer_llm_wait_after_cancel_seconds_count",
            &[("model", MODEL)]
        ),
        1.0
    );
    close(
        d.of(
            "observer_llm_wait_after_cancel_seconds_sum",
            &[("model", MODEL)],
        ),
        queue_of(&cancel["next"]),
        "the wait after the cancellation",
    );

    // A prompt over the context: truncated by /api/generate (counted), refused by /api/embed.
    let (long, d) = run.scenario("too_long", 2.0);
    assert_eq!(long["embed"]["status"], 400, "{long}");
    let prompt = long["generate"]["prompt_eval_count"].as_f64().unwrap();
    // Ollama cuts it to num_ctx − (num_ctx − num_keep − 1) / 2 tokens: about half.
    assert!(
        (32.0..64.0).contains(&prompt),
        "truncated to about half the context: {long}"
    );
    assert_eq!(
        d.of("observer_llm_prompts_at_context_total", &[("model", MODEL)]),
        1.0
    );
    assert_eq!(
        d.of(
            "observer_llm_rejected_requests_total",
            &[UPSTREAM, ("reason", "context_exceeded")]
        ),
        1.0
    );

    // A stream without usage: completion tokens estimated from its chunks, apart.
    let (no_usage, d) = run.scenario("openai_no_usage", 1.0);
    assert_eq!(no_usage["usage"], false);
    assert_eq!(
        d.of(
            "observer_llm_estimated_completion_tokens_total",
            &[UPSTREAM, ("model", MODEL)]
        ),
        no_usage["content_chunks"].as_f64().unwrap()
    );
    assert_eq!(
        d.of(
            "gen_ai_client_token_usage_count",
            &[UPSTREAM, ("gen_ai_token_type", "output")]
        ),
        0.0,
        "never mixed with reported tokens"
    );

    // Reported usage, every API: the token histograms add exactly what the clients read.
    for (scenario, provider, input, output) in [
        (
            "openai_usage",
            "openai",
            "prompt_tokens",
            "completion_tokens",
        ),
        ("responses", "openai", "input_tokens", "output_tokens"),
        (
            "anthropic_messages",
            "anthropic",
            "input_tokens",
            "output_tokens",
        ),
    ] {
        let (usage, d) = run.scenario(scenario, 1.0);
        for (kind, field) in [("input", input), ("output", output)] {
            for role in [UPSTREAM, GATEWAY] {
                assert_eq!(
                    d.of(
                        "gen_ai_client_token_usage_sum",
                        &[
                            role,
                            ("gen_ai_provider_name", provider),
                            ("gen_ai_token_type", kind)
                        ]
                    ),
                    usage[field].as_f64().unwrap(),
                    "{scenario} {role:?} {kind}: {usage}"
                );
            }
        }
        assert_eq!(
            d.of(
                "gen_ai_server_time_to_first_token_seconds_count",
                &[UPSTREAM, ("gen_ai_provider_name", provider)]
            ),
            1.0,
            "{scenario}"
        );
    }

    // Embeddings, native and OpenAI-style: input tokens, no time to first token.
    let (embeddings, d) = run.scenario("embeddings", 2.0);
    assert_eq!(
        d.of(
            "gen_ai_client_token_usage_sum",
            &[
                UPSTREAM,
                ("gen_ai_operation_name", "embeddings"),
                ("gen_ai_token_type", "input")
            ]
        ),
        embeddings["embed_prompt_eval_count"].as_f64().unwrap()
            + embeddings["openai_prompt_tokens"].as_f64().unwrap()
    );
    assert_eq!(
        d.of(
            "gen_ai_server_time_to_first_token_seconds_count",
            &[UPSTREAM]
        ),
        0.0
    );

    // Reasoning, then a tool call: the three thinking tokens the scenario forces
    // (`think=3`), one chunk each, and the one call the simulator makes when tools are offered.
    let (tools, d) = run.scenario("think_and_tools", 1.0);
    assert_eq!(tools["thinking_chunks"], 3, "{tools}");
    assert_eq!(tools["tool_calls"], 1, "{tools}");
    assert_eq!(
        d.of(
            "observer_llm_tool_calls_total",
            &[UPSTREAM, ("model", MODEL)]
        ),
        tools["tool_calls"].as_f64().unwrap()
    );
    assert_eq!(
        d.of(
            "observer_llm_time_to_first_answer_seconds_count",
            &[("model", MODEL)]
        ),
        1.0
    );
    drop(run);
    drop(nginx);
}
