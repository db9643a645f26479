//! `observer probe` as a health check: one line per stage, and an exit status a container or
//! systemd can act on: 0 ready, 1 not ready, 3 upstream unreachable.

mod support;

use std::process::{Command, Output};

use support::daemon::{OBSERVER, Sim};

fn probe(upstream: &str, flags: &[&str]) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(OBSERVER)
        .args(["probe", "--upstream", upstream])
        .args(flags)
        .output()
        .unwrap();
    let stdout = String::from_utf8(stdout).unwrap();
    assert!(
        status.code().is_some(),
        "killed: {}",
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap(), stdout)
}

/// The stage, subject and verdict columns of each line.
fn verdicts(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len().min(3)].join(" ")
        })
        .collect()
}

const FAST: &[&str] = &["--load-ms", "5", "--first-token-ms", "5", "--token-ms", "1"];

#[test]
fn ready_exits_0_with_a_line_per_stage() {
    let sim = Sim::start(FAST);
    let upstream = sim.addr.to_string();
    let (code, out) = probe(&upstream, &["--model", "llama3.2:1b"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        verdicts(&out),
        [
            format!("tcp {upstream} ok"),
            "api llama3.2:1b ok".into(),
            "generate llama3.2:1b ok".into(),
            "ready".into(),
        ]
    );
    assert!(out.contains("first chunk"), "{out}");

    // Without a model: the upstream answers, the generate stage does not run.
    let (code, out) = probe(&upstream, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        verdicts(&out),
        [
            format!("tcp {upstream} ok"),
            "api - ok".into(),
            "ready".into()
        ]
    );
}

#[test]
fn a_missing_model_exits_1() {
    let sim = Sim::start(FAST);
    let (code, out) = probe(&sim.addr.to_string(), &["--model", "qwen3:0.6b"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("api       qwen3:0.6b"), "{out}");
    assert!(
        out.contains("/api/tags does not list \"qwen3:0.6b\""),
        "{out}"
    );
    assert!(
        out.contains("HTTP 404: model 'qwen3:0.6b' not found"),
        "{out}"
    );
    assert!(out.ends_with("not ready\n"), "{out}");
}

#[test]
fn a_first_token_after_4s_with_a_3s_limit_exits_1() {
    let sim = Sim::start(&["--load-ms", "5", "--first-token-ms", "4000"]);
    let (code, out) = probe(
        &sim.addr.to_string(),
        &[
            "--model",
            "llama3.2:1b",
            "--probe-first-chunk-timeout",
            "3s",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let generate = out.lines().find(|l| l.starts_with("generate")).unwrap();
    assert!(generate.contains("FAIL"), "{out}");
    assert!(generate.ends_with("no first chunk within 3s"), "{out}");
}

#[test]
fn an_unreachable_upstream_exits_3_after_the_tcp_stage() {
    let port = support::capture::free_port();
    let (code, out) = probe(&format!("127.0.0.1:{port}"), &["--model", "m"]);
    assert_eq!(code, 3, "{out}");
    assert_eq!(
        verdicts(&out),
        [format!("tcp 127.0.0.1:{port} FAIL"), "not ready".into()]
    );
    assert!(out.contains("Connection refused"), "{out}");
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let output = Command::new(OBSERVER)
        .args(["probe", "--upstream", "http://h:1/api"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("without a path"), "{stderr}");
}
