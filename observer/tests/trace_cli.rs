//! `observer trace`, the binary (root, real kernel for the first test): with nginx proxying to
//! the simulated upstream, it prints a ready line, the connections it seeded, then a curl
//! request through nginx as it happens, one JSON line per event; SIGTERM stops it with a
//! summary and exit 0. Bad flags are one-line errors.

mod support;

use std::{process::Stdio, time::Duration};

use observer::capture::program_count;
use serde_json::Value;
use support::sim_client;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout, Command},
};

const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
/// Loading and attaching every program takes a few seconds in a debug build.
const READY_WAIT: Duration = Duration::from_secs(20);
const EVENT_WAIT: Duration = Duration::from_secs(5);

/// Whether a trace line is one a test waits for.
type LinePredicate<'a> = dyn Fn(&Value) -> bool + 'a;

const DATA_KEYS: &[&str] = &[
    "time",
    "ts_ns",
    "event",
    "conn_id",
    "role",
    "side",
    "tgid",
    "pid",
    "comm",
    "fd",
    "port",
    "direction",
    "len",
    "head_len",
    "tail_len",
    "preview",
];
const CONN_KEYS: &[&str] = &[
    "time", "ts_ns", "event", "conn_id", "role", "side", "tgid", "pid", "comm", "fd", "port",
    "local", "remote", "seeded",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn trace_shows_a_curl_request_through_nginx_as_it_happens() {
    support::assert_root();
    let me = std::process::id();
    let (sim, nginx) = support::nginx::in_front_of_sim().await;
    let sim_addr = sim.local_addr();
    let workers = nginx.worker_pids();
    // A keep-alive connection straight to the simulator, open before the trace starts: both
    // of its ends (this process) are seeded.
    let mut early = sim_client::Client::connect(sim_addr).await;
    early.send(&sim_client::get("/api/version")).await;
    assert!(early.reply().await.head.starts_with("HTTP/1.1 200 OK"));

    let start = wall_now();
    let (mut trace, mut stdout, mut stderr) = start_trace(&[], nginx.port, sim_addr.port());
    let ready = ready_line(&mut stderr, &mut trace).await;
    assert_eq!(
        ready,
        format!(
            "observer trace: watching {}=gateway, {}=upstream ({} programs attached, 2 connections seeded)",
            nginx.port,
            sim_addr.port(),
            program_count()
        )
    );

    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.push(next_line(&mut stdout).await.expect("a seeded open line"));
    }
    let mut sides: Vec<&str> = lines
        .iter()
        .map(|l| {
            assert_eq!(
                (
                    &l["event"],
                    &l["seeded"],
                    &l["role"],
                    &l["port"],
                    &l["tgid"]
                ),
                (
                    &Value::from("open"),
                    &Value::from(true),
                    &Value::from("upstream"),
                    &Value::from(sim_addr.port()),
                    &Value::from(me)
                ),
                "{l}"
            );
            l["side"].as_str().unwrap()
        })
        .collect();
    sides.sort();
    assert_eq!(sides, ["client", "server"]);

    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["--data-binary", sim_client::CHAT])
        .arg(format!("http://{}/api/chat", nginx.addr()))
        .output()
        .await
        .unwrap();
    assert!(curl.status.success(), "{curl:?}\n{}", nginx.error_log());
    let body = String::from_utf8(curl.stdout).unwrap();
    assert_eq!(
        body.lines().count(),
        sim_client::TOKENS as usize + 1,
        "{body}"
    );
    assert!(
        body.lines().last().unwrap().contains(r#""done":true"#),
        "{body}"
    );

    // What must show: the request at the gateway (read by a worker) and upstream (written by
    // a worker, read by the simulator), the worker's connection to the simulator, curl itself.
    let is = |l: &Value, event: &str, role: &str, side: &str| {
        l["event"] == event && l["role"] == role && l["side"] == side
    };
    // The kernel side cannot know a client's ephemeral port; trace completes it from /proc.
    let local_port = |l: &Value| {
        l["local"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
    };
    let post = |l: &Value, prefix: &str| l["preview"].as_str().unwrap().starts_with(prefix);
    let by_worker = |l: &Value| workers.contains(&(l["tgid"].as_u64().unwrap() as u32));
    let wanted: Vec<(&str, Box<LinePredicate>)> = vec![
        (
            "gateway server-side ingress of POST /api/chat by an nginx worker",
            Box::new(|l: &Value| {
                is(l, "data", "gateway", "server")
                    && l["direction"] == "ingress"
                    && l["comm"] == "nginx"
                    && by_worker(l)
                    && post(l, "POST /api/chat")
            }),
        ),
        (
            "gateway client-side egress by curl",
            Box::new(|l: &Value| {
                is(l, "data", "gateway", "client")
                    && l["direction"] == "egress"
                    && l["comm"] == "curl"
                    && post(l, "POST /api/chat HTTP/1.1\\r\\n")
            }),
        ),
        (
            "upstream client-side open by an nginx worker, with its whole 4-tuple",
            Box::new(|l: &Value| {
                is(l, "open", "upstream", "client")
                    && by_worker(l)
                    && l["remote"] == sim_addr.to_string().as_str()
                    && local_port(l).is_some_and(|port| port != 0 && port != sim_addr.port())
                    && l["seeded"] == false
            }),
        ),
        (
            "gateway client-side open by curl, with its whole 4-tuple",
            Box::new(|l: &Value| {
                is(l, "open", "gateway", "client")
                    && l["comm"] == "curl"
                    && local_port(l).is_some_and(|port| port != 0)
            }),
        ),
        (
            "upstream client-side egress of POST /api/chat by an nginx worker",
            Box::new(|l: &Value| {
                is(l, "data", "upstream", "client")
                    && l["direction"] == "egress"
                    && by_worker(l)
                    && post(l, "POST /api/chat HTTP/1.1\\r\\n")
            }),
        ),
        (
            "upstream server-side ingress of POST /api/chat by the simulator",
            Box::new(|l: &Value| {
                is(l, "data", "upstream", "server")
                    && l["direction"] == "ingress"
                    && l["tgid"] == me
                    && post(l, "POST /api/chat HTTP/1.1\\r\\n")
            }),
        ),
        (
            "the simulator's response",
            Box::new(|l: &Value| {
                is(l, "data", "upstream", "server")
                    && l["direction"] == "egress"
                    && l["tgid"] == me
                    && l["len"].as_u64().unwrap() > 0
            }),
        ),
    ];
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let missing: Vec<&str> = wanted
            .iter()
            .filter(|(_, found)| !lines.iter().any(found))
            .map(|(what, _)| *what)
            .collect();
        if missing.is_empty() {
            break;
        }
        let line = tokio::time::timeout_at(deadline, next_line(&mut stdout))
            .await
            .unwrap_or_else(|_| panic!("missing after 5 s: {missing:?}\n{}", dump(&lines)))
            .unwrap_or_else(|| panic!("stdout ended; missing {missing:?}\n{}", dump(&lines)));
        lines.push(line);
    }

    // Stop it; everything it printed, and nothing else, is counted in its summary.
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    unsafe { libc::kill(trace.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(EVENT_WAIT, trace.wait())
        .await
        .expect("exits within 5 s of SIGTERM")
        .unwrap();
    while let Some(line) = next_line(&mut stdout).await {
        lines.push(line);
    }
    let mut rest = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(status.success(), "{status:?}; stderr: {rest:?}");
    let summary = rest.last().expect("a summary line");
    assert!(
        summary.starts_with(&format!(
            "observer trace: stopped; {} events printed; lost 0 data and 0 connection events, ",
            lines.len()
        )),
        "{summary}"
    );
    assert!(summary.ends_with(" 0 decode errors"), "{summary}");

    for line in &lines {
        check_shape(line);
    }
    // Kernel timestamps turned into wall-clock times that fall within this test (fixed-width
    // RFC 3339 UTC strings compare as the instants do).
    let end = wall_now();
    for line in &lines {
        let time = line["time"].as_str().unwrap();
        assert!(
            start.as_str() <= time && time <= end.as_str(),
            "{start} {time} {end}"
        );
    }
    drop(nginx);
    let mut early = early;
    early.stream.shutdown().await.unwrap();
    sim.shutdown().await.unwrap();
}

#[test]
fn bad_flags_are_one_line_errors() {
    for (args, code, expect) in [
        (
            &["trace", "--watch", "80=proxy"][..],
            2,
            "neither gateway nor upstream",
        ),
        (&["trace", "--ring-bytes", "lots"][..], 2, "--ring-bytes"),
        (&["trace", "--preview"][..], 2, "--preview"),
        // Values that parse but cannot work are usage errors too (exit 2), found before the
        // capture loads (docs/OPERATIONS.md).
        (
            &["trace", "--ring-bytes", "5000"][..],
            2,
            "ring buffer size 5000 is not a power of two",
        ),
        (
            &["trace", "--head-bytes", "2000"][..],
            2,
            "head capture of 2000 bytes exceeds the maximum of 1024",
        ),
    ] {
        let output = std::process::Command::new(OBSERVER)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr:?}");
        assert!(stderr.contains(expect), "{args:?}: {stderr:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

/// `--exchanges`: one line per finished exchange instead of raw events; a streamed chat
/// through nginx shows up once per end that was watched (curl's client side and nginx's server
/// side of the gateway port, nginx's client side and the simulator's server side of the
/// upstream port), each with the model, status and tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(root), ignore = "needs root")]
async fn trace_exchanges_prints_finished_exchanges() {
    support::assert_root();
    let (sim, nginx) = support::nginx::in_front_of_sim().await;
    let sim_addr = sim.local_addr();
    let (mut trace, mut stdout, mut stderr) =
        start_trace(&["--exchanges"], nginx.port, sim_addr.port());
    ready_line(&mut stderr, &mut trace).await;
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--data-binary", sim_client::CHAT])
        .arg(format!("http://{}/api/chat", nginx.addr()))
        .output()
        .await
        .unwrap();
    assert!(curl.status.success());
    let mut ends = Vec::new();
    for _ in 0..4 {
        let line = tokio::time::timeout(EVENT_WAIT, next_line(&mut stdout))
            .await
            .expect("an exchange line in time")
            .expect("an exchange line");
        assert_eq!(
            (
                &line["method"],
                &line["path"],
                &line["status"],
                &line["outcome"],
                &line["exact"]
            ),
            (
                &Value::from("POST"),
                &Value::from("/api/chat"),
                &Value::from(200),
                &Value::from("complete"),
                &Value::from(true)
            ),
            "{line}"
        );
        assert_eq!(
            line["llm"]["completion_tokens"],
            Value::from(sim_client::TOKENS),
            "{line}"
        );
        assert!(line["llm"]["model"].is_string(), "{line}");
        assert!(
            line["duration_s"].as_f64().unwrap() >= line["time_to_first_chunk_s"].as_f64().unwrap()
        );
        ends.push(format!(
            "{}/{}",
            line["conn"]["role"].as_str().unwrap(),
            line["conn"]["side"].as_str().unwrap()
        ));
    }
    ends.sort();
    assert_eq!(
        ends,
        [
            "gateway/client",
            "gateway/server",
            "upstream/client",
            "upstream/server"
        ]
    );
    // SAFETY: kill with our own child's pid.
    unsafe { libc::kill(trace.id().unwrap() as i32, libc::SIGTERM) };
    assert!(trace.wait().await.unwrap().success());
    let mut rest = Vec::new();
    while let Some(line) = next_line(&mut stdout).await {
        rest.push(line);
    }
    let mut summary = String::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        summary = line;
    }
    assert!(
        summary.starts_with("observer trace: stopped; 4 exchanges printed;"),
        "{summary} {rest:?}"
    );
}

/// `observer trace` watching the gateway and upstream ports, with its output as lines.
fn start_trace(
    extra: &[&str],
    gateway: u16,
    upstream: u16,
) -> (
    Child,
    Lines<BufReader<ChildStdout>>,
    Lines<BufReader<ChildStderr>>,
) {
    let mut trace = Command::new(OBSERVER)
        .arg("trace")
        .args(extra)
        .arg("--watch")
        .arg(format!("{gateway}=gateway"))
        .arg("--watch")
        .arg(format!("{upstream}=upstream"))
        .env("OBSERVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = BufReader::new(trace.stdout.take().unwrap()).lines();
    let stderr = BufReader::new(trace.stderr.take().unwrap()).lines();
    (trace, stdout, stderr)
}

/// Waits for the ready line on stderr (log lines may come first).
async fn ready_line(stderr: &mut Lines<BufReader<ChildStderr>>, trace: &mut Child) -> String {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(READY_WAIT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("observer trace: watching") {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    match found {
        Ok(Some(line)) => line,
        other => panic!(
            "no ready line ({other:?}); exit {:?}; stderr: {seen:#?}",
            trace.try_wait()
        ),
    }
}

/// The next stdout line as JSON; `None` at the end.
async fn next_line(stdout: &mut Lines<BufReader<ChildStdout>>) -> Option<Value> {
    let line = stdout.next_line().await.unwrap()?;
    Some(serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}")))
}

/// Every line has exactly the fields of its kind, in order, with sane values.
fn check_shape(line: &Value) {
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected: Vec<&str> = match line["event"].as_str().unwrap() {
        "data" => DATA_KEYS.to_vec(),
        "open" | "close" => CONN_KEYS.to_vec(),
        other => panic!("unknown event {other}: {line}"),
    };
    // serde_json's map sorts keys; the order on the wire is checked by the unit tests.
    let mut sorted = keys.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "{line}");
    let time = line["time"].as_str().unwrap();
    assert_eq!(time.len(), "2024-01-01T00:00:00.000000000Z".len(), "{time}");
    assert!(
        time.ends_with('Z') && &time[10..11] == "T" && &time[19..20] == ".",
        "{time}"
    );
    assert!(["gateway", "upstream"].contains(&line["role"].as_str().unwrap()));
    assert!(["server", "client"].contains(&line["side"].as_str().unwrap()));
    if line["event"] == "data" {
        assert!(["ingress", "egress"].contains(&line["direction"].as_str().unwrap()));
        let len = line["len"].as_u64().unwrap();
        let head = line["head_len"].as_u64().unwrap();
        let tail = line["tail_len"].as_u64().unwrap();
        assert!(head + tail <= len && head <= 1024 && tail <= 256, "{line}");
    }
}

fn wall_now() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    observer::base::clock::rfc3339_nanos(since_epoch.as_nanos() as i128)
}

fn dump(lines: &[Value]) -> String {
    lines.iter().map(|l| format!("  {l}\n")).collect::<String>()
}
