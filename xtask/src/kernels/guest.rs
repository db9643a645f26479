//! The guest side of `cargo xtask kernels`: this binary runs as `/init` (process 1) of the VM.
//!
//! It mounts what a host has (proc, sysfs, devtmpfs, securityfs; tracefs is left for
//! `observer` to mount, as on a fresh host), brings loopback up and turns on the kernel's BPF
//! run counters, then:
//!
//! 1. runs `observer check` (printed for the log; its JSON gives the programs to expect);
//! 2. starts `observer run` watching 18789 (gateway) and 11434 (upstream), then `observer sim`
//!    on 11434 (both with testkit's launchers, as the benchmarks start them) and a relay of its
//!    own on 18789 (both listen after the capture started: the listen tracepoint marks them);
//! 3. starts a client process (fork and exec of a watched process: the task and exec
//!    tracepoints) that sends one streamed `/api/generate` through the relay with each pair of
//!    data system calls (`write`/`read`, `sendto`/`recvfrom`, `writev`/`readv`,
//!    `sendmsg`/`recvmsg`) and exits (the process exit tracepoint);
//! 4. reads `/metrics` (requests per role, tokens, gateway pairing, lost events, parse errors
//!    must equal what the client did) and each program's run count, stops `observer run`;
//! 5. prints one result line ([`RESULT_PREFIX`] + JSON) and powers the VM off.
//!
//! Whatever fails, the result line is printed and the VM powered off: a failure is reported,
//! never a hang.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use testkit::{
    ledger::{Check, REQUESTS, ROLES, mismatches},
    observer::Sim,
    socket_io::{Api, recv_once, send_all},
};

use crate::observer_run::{self, ObserverRun, WATCH_ONLY, settled};

/// The line the host looks for on the serial console.
pub const RESULT_PREFIX: &str = "observer-kernels-result: ";
/// Progress lines, for the log.
const SAY: &str = "observer-kernels:";

const OBSERVER: &str = "/bin/observer";
const GATEWAY: u16 = 18789;
const UPSTREAM: u16 = 11434;
/// Tokens per reply (`observer sim --tokens`).
const TOKENS: u64 = 8;
/// The kernel's numbers for the program types (`enum bpf_prog_type`).
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
/// A program's name as the kernel keeps it (`BPF_OBJ_NAME_LEN` less its NUL).
const KERNEL_NAME_LEN: usize = 15;

/// What the guest found; printed as JSON on the result line.
#[derive(Default)]
struct Report {
    kernel: String,
    /// (name, kind, loaded, runs) of every program `observer check` lists.
    programs: Vec<(String, String, bool, u64)>,
    /// The most instructions the verifier went through for one program, and which (Linux
    /// 5.16 and newer report it).
    most_verified: Option<(String, u64)>,
    /// Exchanges `observer run` counted, per role.
    exchanges: (u64, u64),
    failures: Vec<String>,
}

impl Report {
    fn to_json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "programs": self.programs.iter().map(|(name, kind, loaded, runs)| json!({
                "name": name, "kind": kind, "loaded": loaded, "runs": runs,
            })).collect::<Vec<_>>(),
            "exchanges": { "sent": Api::ALL.len(), "gateway": self.exchanges.0, "upstream": self.exchanges.1 },
            "most_verified": self.most_verified.as_ref().map(|(name, n)| json!({"program": name, "instructions": n})),
            "failures": self.failures,
        })
    }
}

/// `/init`: runs the checks, prints the result line, powers off. Never returns.
pub fn init() -> ! {
    let mut report = Report::default();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drive(&mut report)));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(err)) => report.failures.push(format!("{err:#}")),
        Err(panic) => report.failures.push(format!(
            "the guest agent panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        )),
    }
    println!("{RESULT_PREFIX}{}", report.to_json());
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot have no memory preconditions; this is the VM's init.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn drive(report: &mut Report) -> anyhow::Result<()> {
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    mount("devtmpfs", "/dev", "devtmpfs")?;
    mount("tmpfs", "/tmp", "tmpfs")?;
    mount("tmpfs", "/run", "tmpfs")?;
    // Where the lockdown mode is read; a kernel without securityfs simply has none.
    let _ = mount("securityfs", "/sys/kernel/security", "securityfs");
    loopback_up()?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("turning on the kernel's BPF run counters (kernel.bpf_stats_enabled)")?;
    report.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    say(&format!("kernel {}", report.kernel));

    // Once (loading every program is slow in an emulated CPU); printed whole for the log.
    let output = Command::new(OBSERVER).args(["check", "--json"]).output()?;
    let check: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "reading `observer check --json`: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    say(&format!("observer check --json:\n{check:#}"));
    report.programs = check["programs"]
        .as_array()
        .context("`observer check --json` lists no programs")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["kind"].as_str().unwrap_or_default().to_string(),
                p["result"].get("Ok").is_some(),
                0,
            )
        })
        .collect();
    report.most_verified = check["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["verified_instructions"].as_u64()?,
            ))
        })
        .max_by_key(|(_, n)| *n);
    if check["mode"] != "ebpf" {
        let problems: Vec<&str> = check["problems"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        bail!("observer check: {}", problems.join("; "));
    }

    // testkit's launcher: ready when /readyz says 200, its log in the error otherwise.
    let run = ObserverRun::start(
        Path::new(OBSERVER),
        &[(GATEWAY, "gateway"), (UPSTREAM, "upstream")],
        &WATCH_ONLY,
    )?;
    let result = exchange_and_count(report, &run);
    if let Err(err) = run.stop() {
        report.failures.push(format!("{err:#}"));
    }
    result
}

/// Steps 2 to 4, with `observer run` ready.
fn exchange_and_count(report: &mut Report, run: &ObserverRun) -> anyhow::Result<()> {
    let tokens = TOKENS.to_string();
    let timing = ["--load-ms", "0", "--first-token-ms", "2", "--token-ms", "1"];
    let flags = [&timing[..], &["--tokens", &tokens]].concat();
    let mut sim = Sim::start(
        Path::new(OBSERVER),
        &format!("127.0.0.1:{UPSTREAM}"),
        &flags,
    )?;
    let upstream = sim.addr;
    let relay = TcpListener::bind(("127.0.0.1", GATEWAY)).context("the relay's listener")?;
    std::thread::spawn(move || {
        for client in relay.incoming().flatten() {
            std::thread::spawn(move || relay_one(client, upstream));
        }
    });
    let client = Command::new("/init")
        .arg("kernels-guest-client")
        .status()
        .context("starting the client")?;
    if !client.success() {
        report
            .failures
            .push(format!("the client failed ({client})"));
    }

    let sent = Api::ALL.len() as u64;
    let _ = wait_for("the exchanges on /metrics", Duration::from_secs(20), || {
        let counts = observer_run::counts(run)?;
        Ok(counts.gateway >= sent && counts.upstream >= sent)
    });
    let counts = settled(|| observer_run::counts(run))?;
    let scrape = run.scrape()?;
    report.exchanges = (counts.gateway, counts.upstream);
    // What the client did, as /metrics must show it.
    let mut checks = Vec::new();
    for role in ROLES {
        let answered = [("role", role), ("route", "/api/generate"), ("code", "200")];
        checks.push(
            Check::new(REQUESTS, &answered, sent as f64)
                .described(format!("{role} /api/generate exchanges answered 200")),
        );
        let output = [("role", role), ("gen_ai_token_type", "output")];
        checks.push(
            Check::new(
                "gen_ai_client_token_usage_sum",
                &output,
                (sent * TOKENS) as f64,
            )
            .described(format!("{role} output tokens")),
        );
    }
    checks.push(
        Check::new("observer_gateway_overhead_seconds_count", &[], sent as f64)
            .described("gateway requests paired with their upstream request"),
    );
    report.failures.extend(mismatches(&checks, &scrape));
    if counts.lost_total() != 0 {
        report
            .failures
            .push(format!("events lost: {}, expected 0", counts.lost_total()));
    }
    if !counts.parse_errors.is_empty() {
        report
            .failures
            .push(format!("parse errors: {:?}", counts.parse_errors));
    }
    count_runs(report);
    sim.stop(Duration::from_secs(5));
    Ok(())
}

/// Fills in each expected program's run count from the kernel's list of loaded programs, and
/// reports those missing or never run.
fn count_runs(report: &mut Report) {
    let loaded: Vec<(String, u32, u64)> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| {
            (
                info.name_as_str().unwrap_or_default().to_string(),
                info.program_type() as u32,
                info.run_count(),
            )
        })
        .collect();
    for (name, kind, found, runs) in &mut report.programs {
        let wanted_type = match kind.as_str() {
            "raw_tracepoint" => BPF_PROG_TYPE_RAW_TRACEPOINT,
            _ => BPF_PROG_TYPE_TRACEPOINT,
        };
        let short = &name[..name.len().min(KERNEL_NAME_LEN)];
        let matching: Vec<u64> = loaded
            .iter()
            .filter(|(n, t, _)| n == short && *t == wanted_type)
            .map(|(_, _, runs)| *runs)
            .collect();
        *found = !matching.is_empty();
        *runs = matching.iter().sum();
        if !*found {
            report
                .failures
                .push(format!("program {name} ({kind}) is not loaded"));
        } else if *runs == 0 {
            report
                .failures
                .push(format!("program {name} ({kind}) never ran"));
        }
    }
}

/// Copies bytes both ways between a client and a new connection to `upstream`, with plain
/// `recvfrom`/`sendto` (std's), until each side ends.
fn relay_one(client: TcpStream, upstream: SocketAddr) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pump(client_in, server_out));
    pump(server, client);
    let _ = up.join();
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// The client process: one streamed `/api/generate` through the relay per pair of data
/// system calls, each on its own connection, the response read to its end.
pub fn client() -> anyhow::Result<()> {
    let body = r#"{"model":"llama3.2:1b","prompt":"Why is the sky blue?","stream":true}"#;
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{GATEWAY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    for api in Api::ALL {
        let mut stream = TcpStream::connect(("127.0.0.1", GATEWAY))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        send_all(&mut stream, api, request.as_bytes());
        let mut response = Vec::new();
        let mut buf = [0u8; 1500];
        loop {
            let n = recv_once(&mut stream, api, &mut buf);
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&response);
        if !text.starts_with("HTTP/1.1 200") || !text.contains(r#""done":true"#) {
            bail!("{api:?}: not a finished 200 stream: {text}");
        }
        println!(
            "{SAY} client {api:?}: {} bytes, 200, stream done",
            response.len()
        );
    }
    Ok(())
}

/// A progress line for the console log, with the seconds since boot.
fn say(text: &str) {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds = uptime.split(' ').next().unwrap_or("?");
    println!("{SAY} [{seconds} s] {text}");
}

/// Polls `ready` every 100 ms until it says yes, or fails after `within`.
fn wait_for(
    what: &str,
    within: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if ready()? {
            return Ok(());
        }
        if started.elapsed() > within {
            bail!("waited {within:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mount(source: &str, target: &str, fstype: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(target)?;
    let (source_c, target_c, fstype_c) = (
        CString::new(source)?,
        CString::new(target)?,
        CString::new(fstype)?,
    );
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `ip link set lo up`, with the interface ioctls.
fn loopback_up() -> anyhow::Result<()> {
    // SAFETY: a plain socket for the ioctls, closed below; `ifreq` is zeroed and names `lo`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request);
        if rc == 0 {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &request);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            bail!("bringing lo up: {err}");
        }
    }
    Ok(())
}
