//! Black-box tests of the `observer` binary: `observer check` on this host, and bad input on
//! the command line (each a one-line error and a non-zero exit).

mod support;

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

fn observer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_observer"))
        .args(args)
        .output()
        .expect("run observer")
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A usage error is exactly one line on stderr, nothing on stdout, and a non-zero exit.
fn assert_one_line_error(output: &std::process::Output, expect: &str) {
    let stderr = stderr_of(output);
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert_eq!(
        stderr.lines().count(),
        1,
        "stderr should be one line: {stderr:?}"
    );
    assert!(stderr.starts_with("error: "), "{stderr:?}");
    assert!(stderr.contains(expect), "expected {expect:?} in {stderr:?}");
    assert!(
        output.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn check_reports_ebpf_mode_with_tracepoints_and_listeners() {
    support::assert_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let output = observer(&["check", "--json", "--watch", &format!("{port}=gateway")]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&output.stdout)));
    assert!(output.status.success(), "check failed: {report:#}");
    assert_eq!(report["mode"], "ebpf");
    assert_eq!(report["problems"], serde_json::json!([]));
    assert_eq!(report["btf"], true);
    // Every program of the object loaded and attached, each named with its tracepoint.
    let programs = report["programs"].as_array().unwrap();
    assert_eq!(programs.len(), observer::capture::program_count());
    assert!(
        programs
            .iter()
            .all(|p| p["result"] == serde_json::json!({"Ok": null})),
        "{programs:#?}"
    );
    assert!(
        programs
            .iter()
            .any(|p| p["name"] == "sys_exit" && p["kind"] == "raw_tracepoint"),
        "{programs:#?}"
    );
    assert!(
        programs
            .iter()
            .any(|p| p["attach_to"] == "sock:inet_sock_set_state" && p["kind"] == "tracepoint"),
        "{programs:#?}"
    );
    // The floor and every feature the capture uses, each available on this kernel.
    assert_eq!(report["minimum_kernel"], "5.8");
    let features = report["features"].as_array().unwrap();
    assert_eq!(
        features.len(),
        3 + observer::capture::kernel::HELPERS.len(),
        "{features:#?}"
    );
    assert!(
        features.iter().all(|f| f["available"] == true),
        "{features:#?}"
    );
    assert_eq!(report["warnings"], serde_json::json!([]));
    let tracepoints = report["tracepoints"].as_array().unwrap();
    assert_eq!(
        tracepoints.len(),
        observer::capture::REQUIRED_TRACEPOINTS.len()
    );
    assert!(
        tracepoints.len() >= 5,
        "every hook of the capture is checked"
    );
    assert!(
        tracepoints.iter().all(|t| t["found"] == true),
        "{tracepoints:#?}"
    );
    assert!(
        tracepoints
            .iter()
            .any(|t| t["name"] == "raw_syscalls:sys_exit")
    );
    // The listener this test holds is found, with this process as its holder.
    let ports = report["listeners"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], port);
    assert_eq!(ports[0]["role"], "gateway");
    let holders = ports[0]["listeners"][0]["holders"].as_array().unwrap();
    assert!(
        holders.iter().any(|h| h["pid"] == std::process::id()),
        "{holders:#?}"
    );
    // No NVIDIA driver on CI machines: reported, not fatal.
    assert!(report["nvml"]["status"] == "available" || report["nvml"]["reason"].as_str().is_some());
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn check_human_output_names_the_mode_and_each_tracepoint() {
    support::assert_root();
    let output = observer(&["check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", stderr_of(&output));
    assert!(stdout.contains("eBPF mode works"), "{stdout}");
    assert!(stdout.contains("found   raw_syscalls:sys_exit"), "{stdout}");
    assert!(
        stdout.contains("(the capture needs 5.8 or newer)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("5 of 5 loaded and attached")
            && stdout.contains("ok      task_newtask (tracepoint task:task_newtask)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("18789 (gateway)") && stdout.contains("11434 (upstream)"),
        "{stdout}"
    );
}

#[test]
fn unknown_flag_is_a_one_line_error() {
    assert_one_line_error(&observer(&["check", "--no-such-flag"]), "--no-such-flag");
    assert_one_line_error(&observer(&["frobnicate"]), "frobnicate");
}

#[test]
fn bad_watch_flag_is_a_one_line_error() {
    assert_one_line_error(
        &observer(&["check", "--watch", "80=gateway", "--watch", "80=upstream"]),
        "port 80 is watched twice",
    );
    assert_one_line_error(
        &observer(&["check", "--watch", "99999=gateway"]),
        "not a port",
    );
    assert_one_line_error(
        &observer(&["check", "--watch", "80=proxy"]),
        "neither gateway nor upstream",
    );
}

#[test]
fn bad_listen_address_is_a_one_line_error() {
    assert_one_line_error(&observer(&["sim", "--listen", "nonsense"]), "nonsense");
    assert_one_line_error(
        &observer(&["sim", "--listen", "127.0.0.1:99999"]),
        "127.0.0.1:99999",
    );
}

#[test]
fn port_in_use_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = observer(&["sim", "--listen", &addr]);
    assert_one_line_error(&output, &format!("cannot listen on {addr}"));
    assert!(
        stderr_of(&output).contains("in use"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn help_and_version_succeed() {
    let help = observer(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("check"));
    let version = observer(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("observer "));
}

/// Without the NVIDIA driver (this machine), `observer check` says NVML is unavailable and why,
/// and that is not a problem for either mode.
#[test]
fn check_says_when_nvml_is_unavailable() {
    if observer::gpu::open().is_ok() {
        eprintln!("SKIPPED check_says_when_nvml_is_unavailable: an NVIDIA driver is installed");
        return;
    }
    let output = observer(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["nvml"]["status"], "unavailable", "{report:#}");
    let reason = report["nvml"]["reason"].as_str().unwrap();
    assert!(reason.contains("libnvidia-ml.so.1"), "{reason}");
    let problems = report["problems"].to_string();
    assert!(!problems.contains("NVML"), "{problems}");
    let human = observer(&["check"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("NVML") && l.contains("not available: no usable NVIDIA driver")),
        "{text}"
    );
}

/// Bad probe and resource flags of `observer run` stop it before anything is loaded.
#[test]
fn bad_probe_and_resource_flags_of_run_are_one_line_errors() {
    let run = |flags: &[&str]| {
        let mut args = vec!["run", "--log", "error", "--metrics-addr", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        observer(&args)
    };
    assert_one_line_error(
        &run(&["--probe-api-interval", "0s"]),
        "--probe-api-interval must be more than 0",
    );
    assert_one_line_error(
        &run(&["--no-probe", "--resources-interval", "0s"]),
        "--resources-interval must be more than 0",
    );
    assert_one_line_error(&run(&["--probe-tcp-timeout", "soon"]), "e.g. 5s");
    assert_one_line_error(&run(&["--upstream", "https://h"]), "https is not supported");
    if observer::gpu::open().is_err() {
        assert_one_line_error(
            &run(&["--no-probe", "--gpu", "on"]),
            "--gpu on, but NVML cannot be used",
        );
    }
}

/// What `observer run FLAGS` probes, with `OBSERVER_UPSTREAM` set to `env` and `--config` naming
/// `config` when given: the address of the probe's first log line. That line comes before the
/// kernel programs load, so the daemon is killed as soon as it is there (as root it would go on
/// to load them; as another user it stops after the line on its own).
fn probed_by_run(flags: &[&str], env: Option<&str>, config: Option<&Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_observer"));
    cmd.args(["run", "--log", "info", "--metrics-addr", "127.0.0.1:0"])
        .args(["--gpu", "off"])
        .args(flags)
        // The settings of whoever runs the tests are not the case's.
        .env_remove("OBSERVER_UPSTREAM")
        .env_remove("OBSERVER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(env) = env {
        cmd.env("OBSERVER_UPSTREAM", env);
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut child = cmd.spawn().expect("starting observer run");
    let (lines, read) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut said = Vec::new();
    let probed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match read.recv_timeout(left) {
            Ok(line) => {
                let probed = line
                    .split_once("probe: checking ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .map(str::to_owned);
                said.push(line);
                if let Some(probed) = probed {
                    break Some(probed);
                }
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    probed.unwrap_or_else(|| panic!("observer run {flags:?}: no probe line in {said:#?}"))
}

/// Without `--upstream`, `observer run` probes the upstream it watches (on loopback), or
/// Ollama's default address when it watches none; `--upstream`, `OBSERVER_UPSTREAM` and the
/// config file's `upstream` each win over the watched port.
#[test]
fn run_probes_the_watched_upstream_unless_told_otherwise() {
    let watch = ["--watch", "18789=gateway", "--watch", "11500=upstream"];
    assert_eq!(probed_by_run(&watch, None, None), "127.0.0.1:11500");
    assert_eq!(
        probed_by_run(&["--watch", "18789=gateway"], None, None),
        "127.0.0.1:11434"
    );
    let flag = [&watch[..], &["--upstream", "127.0.0.1:11600"]].concat();
    assert_eq!(probed_by_run(&flag, None, None), "127.0.0.1:11600");
    assert_eq!(
        probed_by_run(&watch, Some("127.0.0.1:11700"), None),
        "127.0.0.1:11700"
    );
    let file =
        std::env::temp_dir().join(format!("observer-cli-upstream-{}.toml", std::process::id()));
    std::fs::write(&file, "upstream = \"127.0.0.1:11800\"\n").unwrap();
    let from_file = probed_by_run(&watch, None, Some(&file));
    let _ = std::fs::remove_file(&file);
    assert_eq!(from_file, "127.0.0.1:11800");
}
