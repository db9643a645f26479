//! `cargo xtask kernels`: the capture proven on other kernels than this machine's, in VMs.
//!
//! Each kernel (a Debian series, fetched by [`debian`], or a `vmlinuz` given by path) boots
//! under qemu with KVM, with an initramfs ([`initramfs`]) whose `/init` is this very binary:
//! [`guest`] runs `observer check` and a capture test that exercises every program, prints one
//! result line on the serial console and powers off. The host prints one line per kernel
//! (release, programs loaded and run, exchanges counted, result) and fails when any kernel
//! fails. A VM that prints no result within `--timeout` is stopped and reported as hung; the
//! console of each boot is kept under `target/kernels/`.

mod debian;
pub mod guest;
mod initramfs;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct KernelsArgs {
    /// Kernels to boot: a Debian series (`6.1`, `6.12`, `5.10`: the newest package of it) or
    /// the path of a `vmlinuz`.
    #[arg(default_values = ["6.1", "6.12"])]
    kernels: Vec<String>,
    /// More kernel command line for every boot (`lockdown=confidentiality`).
    #[arg(long, default_value = "")]
    append: String,
    /// Seconds one VM may take from boot to power-off before it is stopped and reported hung.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Where downloaded kernels are kept [default: $XDG_CACHE_HOME/observer/kernels, else
    /// ~/.cache/observer/kernels].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Succeed only when every kernel fails with TEXT in its reason: a negative control (CI
    /// boots a kernel that cannot load the programs and expects exactly that to be reported).
    #[arg(long, value_name = "TEXT")]
    expect_failure: Option<String>,
}

/// How one kernel did.
struct Outcome {
    label: String,
    release: String,
    /// Programs loaded (by `observer run`, or by `observer check` when it stopped there), and
    /// how many `observer check` lists.
    loaded: usize,
    expected: usize,
    ran: usize,
    /// Exchanges counted per role, and sent.
    exchanges: Option<(u64, u64, u64)>,
    /// The program the verifier worked hardest on, and how many instructions it went through.
    most_verified: Option<(String, u64)>,
    failures: Vec<String>,
    took: Duration,
}

pub fn run(args: &KernelsArgs, workspace: &Path) -> anyhow::Result<()> {
    let qemu = which("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found: `apt-get install qemu-system-x86` (scripts/setup.sh installs it)",
    )?;
    let kvm = match hardware_kvm() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("kernels: {why}: emulating the CPU (qemu's TCG), slower");
            false
        }
    };
    let observer = crate::observer_run::release_binary(workspace)?;
    let agent = std::env::current_exe().context("the path of this binary")?;
    let work = workspace.join("target/kernels");
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    initramfs::build(&agent, &observer, &initrd)?;
    let cache = match &args.cache {
        Some(cache) => cache.clone(),
        None => default_cache()?,
    };

    let mut outcomes = Vec::new();
    for label in &args.kernels {
        let started = Instant::now();
        let outcome = kernel_of(label, &cache)
            .and_then(|kernel| {
                let log = work.join(log_name(label, &args.append));
                let booted = boot(&qemu, kvm, &kernel.vmlinuz, &initrd, args, &log);
                // A VM that gave no result under KVM is tried once more with an emulated CPU:
                // a host's KVM can refuse what qemu asks of it (CPU features, MSRs), and that
                // is the host's limit, not the kernel's.
                let booted = match booted {
                    Err(err) if kvm => {
                        eprintln!(
                            "kernels: {label} under KVM: {err:#}; again with an emulated CPU"
                        );
                        boot(&qemu, false, &kernel.vmlinuz, &initrd, args, &log)
                    }
                    other => other,
                };
                booted.map(|result| outcome_of(label, &result, &log))
            })
            .unwrap_or_else(|err| Outcome {
                label: label.clone(),
                release: "-".into(),
                loaded: 0,
                expected: 0,
                ran: 0,
                exchanges: None,
                most_verified: None,
                failures: vec![format!("{err:#}")],
                took: Duration::ZERO,
            });
        let outcome = Outcome {
            took: started.elapsed(),
            ..outcome
        };
        println!("{}", line(&outcome));
        outcomes.push(outcome);
    }

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.failures.is_empty()).collect();
    match &args.expect_failure {
        None if failed.is_empty() => Ok(()),
        None => bail!(
            "{} of {} kernels failed: {}",
            failed.len(),
            outcomes.len(),
            failed
                .iter()
                .map(|o| o.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(text) => {
            let unexpected: Vec<&str> = outcomes
                .iter()
                .filter(|o| !o.failures.iter().any(|f| f.contains(text.as_str())))
                .map(|o| o.label.as_str())
                .collect();
            if unexpected.is_empty() {
                println!("kernels: each failed as expected ({text:?} in its reason)");
                Ok(())
            } else {
                bail!(
                    "expected every kernel to fail with {text:?} in its reason; these did not: {}",
                    unexpected.join(", ")
                )
            }
        }
    }
}

fn kernel_of(label: &str, cache: &Path) -> anyhow::Result<debian::Kernel> {
    let path = Path::new(label);
    if path.is_file() {
        return Ok(debian::Kernel {
            label: label.to_string(),
            package: None,
            vmlinuz: path.to_path_buf(),
        });
    }
    let kernel = debian::kernel(label, cache)?;
    if let Some(package) = &kernel.package {
        eprintln!("kernels: {} is {package}", kernel.label);
    }
    Ok(kernel)
}

/// Boots `vmlinuz` with the initramfs and returns the guest's result line, parsed. Every
/// console line goes to `log`.
fn boot(
    qemu: &Path,
    kvm: bool,
    vmlinuz: &Path,
    initrd: &Path,
    args: &KernelsArgs,
    log: &Path,
) -> anyhow::Result<Value> {
    let mut command = Command::new(qemu);
    command
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-m", "1024", "-smp", "2"])
        .args(if kvm {
            // IA32_ARCH_CAPABILITIES cannot be set by qemu 7.2 on some hosts: not needed.
            ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
        } else {
            // One host thread for both vCPUs: with one each, a guest once took the int3 the
            // kernel plants while patching a tracepoint's jump (emulated cross-modifying code).
            ["-accel", "tcg,thread=single", "-cpu", "max"]
        })
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 oops=panic loglevel=4 {}",
            args.append
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("starting qemu")?;
    let (lines, console) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(lines);

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut kept = Vec::new();
    let mut result = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left) {
            Ok(line) => {
                if let Some(json) = line.strip_prefix(guest::RESULT_PREFIX) {
                    result = Some(serde_json::from_str::<Value>(json).context("the result line")?);
                }
                kept.push(line);
            }
            // Both streams ended: qemu exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait()?;
    std::fs::write(log, kept.join("\n") + "\n")?;
    if let Some(result) = result {
        return Ok(result);
    }
    let tail: Vec<&str> = kept
        .iter()
        .rev()
        .take(8)
        .rev()
        .map(String::as_str)
        .collect();
    if Instant::now() >= deadline {
        bail!(
            "no result within {} s: the VM was stopped (hung?); its console's last lines: {} (all in {})",
            args.timeout,
            tail.join(" | "),
            log.display()
        );
    }
    if let Some(crash) = crash_of(&kept) {
        bail!(
            "the guest kernel crashed: {crash} (all in {})",
            log.display()
        );
    }
    bail!(
        "the VM ended ({status}) without a result; its console's last lines: {} (all in {})",
        tail.join(" | "),
        log.display()
    )
}

/// The first oops of a console (`Oops: …`, `BUG: …`, or the panic line) and where it happened
/// (its `RIP:` line), `None` when the kernel did not crash.
fn crash_of(console: &[String]) -> Option<String> {
    let at = console
        .iter()
        .position(|l| l.contains("Oops:") || l.contains("BUG:") || l.contains("Kernel panic"))?;
    // After the timestamp (`[    7.926348] `), if there is one.
    let line = console[at].as_str();
    let what = match line.split_once("] ") {
        Some((stamp, rest)) if stamp.trim_start().starts_with('[') => rest,
        _ => line,
    }
    .trim();
    let rip = console[at..]
        .iter()
        .find_map(|l| l.split_once("RIP: ").map(|(_, rip)| rip.trim()));
    Some(match rip {
        Some(rip) => format!("{what} at {rip}"),
        None => what.to_string(),
    })
}

fn outcome_of(label: &str, result: &Value, log: &Path) -> Outcome {
    let programs = result["programs"].as_array().cloned().unwrap_or_default();
    let mut failures: Vec<String> = result["failures"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if programs.is_empty() && failures.is_empty() {
        failures.push("the guest reported no programs".into());
    }
    if !failures.is_empty() {
        failures.push(format!("console: {}", log.display()));
    }
    let exchanges = &result["exchanges"];
    Outcome {
        label: label.to_string(),
        release: result["kernel"].as_str().unwrap_or("?").to_string(),
        loaded: programs.iter().filter(|p| p["loaded"] == true).count(),
        expected: programs.len(),
        ran: programs
            .iter()
            .filter(|p| p["runs"].as_u64().unwrap_or(0) > 0)
            .count(),
        exchanges: exchanges["sent"].as_u64().map(|sent| {
            (
                exchanges["gateway"].as_u64().unwrap_or(0),
                exchanges["upstream"].as_u64().unwrap_or(0),
                sent,
            )
        }),
        most_verified: result["most_verified"]["program"]
            .as_str()
            .zip(result["most_verified"]["instructions"].as_u64())
            .map(|(name, n)| (name.to_string(), n)),
        failures,
        took: Duration::ZERO,
    }
}

/// `6.1   6.1.0-57-amd64   programs 5/5 loaded, 5 ran   exchanges 4/4 gateway, 4/4 upstream
/// sys_exit verified in 490000 instructions   PASS   42.7 s`
fn line(o: &Outcome) -> String {
    let exchanges = match o.exchanges {
        Some((gateway, upstream, sent)) if gateway + upstream > 0 => {
            format!("exchanges {gateway}/{sent} gateway, {upstream}/{sent} upstream")
        }
        _ => "exchanges -".into(),
    };
    let verified = match &o.most_verified {
        Some((name, n)) => format!("   {name} verified in {n} instructions"),
        None => String::new(),
    };
    let mut text = format!(
        "{:<6} {:<24} programs {}/{} loaded, {} ran   {exchanges}{verified}   {}   {:.1} s",
        o.label,
        o.release,
        o.loaded,
        o.expected,
        o.ran,
        if o.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        },
        o.took.as_secs_f64()
    );
    for failure in &o.failures {
        text.push_str(&format!("\n       - {failure}"));
    }
    text
}

/// Whether qemu can run a stock kernel with KVM here: `/dev/kvm` opens, and it is hardware
/// virtualisation (`kvm_intel`, `kvm_amd`), not PVM (`kvm_pvm`, the paravirtual KVM of some
/// nested clouds, which boots only kernels built as PVM guests).
fn hardware_kvm() -> Result<(), String> {
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm cannot be opened ({err})"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "/dev/kvm here is PVM (kvm_pvm), which boots only kernels built as PVM guests".into(),
        );
    }
    Ok(())
}

/// The console log's file name: the kernel, and the extra command line if any
/// (`6.1.log`, `6.1-lockdown=confidentiality.log`).
fn log_name(label: &str, append: &str) -> String {
    let mut name = label.replace('/', "_");
    for word in append.split_whitespace() {
        name.push('-');
        name.extend(word.chars().map(|c| {
            if c.is_ascii_alphanumeric() || "=.,_".contains(c) {
                c
            } else {
                '_'
            }
        }));
    }
    name + ".log"
}

fn default_cache() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("observer/kernels"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passing_guest_gives_one_line() {
        let result = serde_json::json!({
            "kernel": "6.1.0-57-amd64",
            "programs": [
                {"name": "sys_exit", "kind": "raw_tracepoint", "loaded": true, "runs": 5679},
                {"name": "task_newtask", "kind": "tracepoint", "loaded": true, "runs": 0},
            ],
            "exchanges": {"sent": 4, "gateway": 4, "upstream": 3},
            "most_verified": {"program": "sys_exit", "instructions": 495899},
            "failures": [],
        });
        let outcome = outcome_of("6.1", &result, Path::new("/tmp/6.1.log"));
        assert_eq!((outcome.loaded, outcome.expected, outcome.ran), (2, 2, 1));
        assert_eq!(outcome.exchanges, Some((4, 3, 4)));
        assert!(outcome.failures.is_empty());
        let text = line(&outcome);
        assert!(text.starts_with("6.1    6.1.0-57-amd64"), "{text}");
        assert!(
            text.contains("programs 2/2 loaded, 1 ran   exchanges 4/4 gateway, 3/4 upstream"),
            "{text}"
        );
        assert!(
            text.contains("sys_exit verified in 495899 instructions   PASS"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn a_failing_guest_lists_its_reasons_and_the_console() {
        let result = serde_json::json!({
            "kernel": "6.1.0-57-amd64",
            "programs": [{"name": "sys_exit", "kind": "raw_tracepoint", "loaded": false, "runs": 0}],
            "exchanges": {"sent": 4, "gateway": 0, "upstream": 0},
            "failures": ["observer check: the kernel is locked down"],
        });
        let outcome = outcome_of("6.1", &result, Path::new("/tmp/6.1.log"));
        let text = line(&outcome);
        assert!(
            text.lines().next().unwrap().contains("exchanges -"),
            "{text}"
        );
        assert!(text.lines().next().unwrap().contains("FAIL"), "{text}");
        assert_eq!(
            text.lines().skip(1).collect::<Vec<_>>(),
            [
                "       - observer check: the kernel is locked down",
                "       - console: /tmp/6.1.log"
            ]
        );
        // A guest that names no program did not get as far as the check.
        let outcome = outcome_of("6.1", &serde_json::json!({"failures": []}), Path::new("x"));
        assert!(!outcome.failures.is_empty());
    }

    #[test]
    fn a_crashed_kernel_is_named_by_its_oops() {
        let console: Vec<String> = [
            "observer-kernels: [5.86 s] observer check --json:",
            "[    7.926348] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
            "[    7.927000] CPU: 1 PID: 80 Comm: observer",
            "[    7.927093] RIP: 0010:inet_sk_state_store+0x15/0x70",
            "[    7.931683] Kernel panic - not syncing: Fatal exception in interrupt",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            crash_of(&console).as_deref(),
            Some("Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at 0010:inet_sk_state_store+0x15/0x70")
        );
        assert_eq!(crash_of(&console[..1]), None);
    }

    #[test]
    fn logs_are_named_after_the_kernel_and_the_extra_command_line() {
        assert_eq!(log_name("6.1", ""), "6.1.log");
        assert_eq!(
            log_name("6.1", "lockdown=confidentiality"),
            "6.1-lockdown=confidentiality.log"
        );
        assert_eq!(
            log_name("/boot/vmlinuz-6.18", "a b/c"),
            "_boot_vmlinuz-6.18-a-b_c.log"
        );
    }
}
