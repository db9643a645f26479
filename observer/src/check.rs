//! `observer check`: what this host supports and which mode will work.
//!
//! Gathers facts (kernel, BTF, tracefs, privileges, tracepoints, a real load and attach of the
//! embedded object, NVML, listeners on the watched ports) into a [`CheckReport`], then prints
//! it for a person or as JSON. Exit 0 only when eBPF mode can run. It changes nothing on the
//! host except mounting tracefs when it is missing (as the daemon would).

use std::{path::Path, process::ExitCode};

use crate::{
    capture::{self, Capture, CaptureConfig, REQUIRED_TRACEPOINTS, WatchedPort, seed},
    gpu::{self, GpuPresence},
    tracefs,
};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A watched port and its role (`gateway` or `upstream`); repeatable.
    #[arg(long = "watch", value_name = "PORT=ROLE", default_values = ["18789=gateway", "11434=upstream"])]
    pub watch: Vec<WatchedPort>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
/// The program `check` attaches to prove that attaching works: the raw tracepoint on every
/// system call's exit (the kind of program, and the tracepoint, the capture depends on).
const PROBE_PROGRAM: &str = "sys_exit";

#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    pub kernel: String,
    pub btf: bool,
    pub tracefs: Result<tracefs::Tracefs, String>,
    pub privileges: Privileges,
    pub tracepoints: Vec<TracepointCheck>,
    pub program: Result<String, String>,
    pub nvml: GpuPresence,
    pub listeners: Vec<PortListeners>,
    /// `ebpf` when `observer run` will work, else `proxy`.
    pub mode: &'static str,
    /// Why eBPF mode will not work (empty when it will).
    pub problems: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct Privileges {
    pub euid: u32,
    /// Capabilities that matter for loading and attaching, from `/proc/self/status`.
    pub capabilities: Vec<&'static str>,
}

#[derive(Debug, serde::Serialize)]
pub struct TracepointCheck {
    pub name: String,
    /// `None` when tracefs is unavailable and the tracepoint could not be looked up.
    pub found: Option<bool>,
}

#[derive(Debug, serde::Serialize)]
pub struct PortListeners {
    pub port: u16,
    pub role: capture::Role,
    pub listeners: Vec<seed::Listener>,
}

pub async fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    // A mistake in the flags is the operator's, not the host's: say so before checking.
    CaptureConfig {
        watch: args.watch.clone(),
        ..CaptureConfig::default()
    }
    .validate()?;
    let report = tokio::task::spawn_blocking(move || gather(&args.watch)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.mode == "ebpf" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn gather(watch: &[WatchedPort]) -> CheckReport {
    let tracefs = tracefs::ensure_mounted().map_err(|err| format!("{err:#}"));
    let tracepoints: Vec<TracepointCheck> = REQUIRED_TRACEPOINTS
        .iter()
        .map(|(category, name)| TracepointCheck {
            name: format!("{category}:{name}"),
            found: tracefs
                .as_ref()
                .ok()
                .map(|t| tracefs::tracepoint_exists(&t.path, category, name)),
        })
        .collect();
    // Attaching needs tracefs; without it the load would only repeat the tracefs problem.
    let program = match &tracefs {
        Ok(_) => try_load_and_attach(watch),
        Err(_) => Err("not attempted: tracefs is unavailable".to_string()),
    };
    let listeners = watch
        .iter()
        .map(|w| PortListeners {
            port: w.port,
            role: w.role,
            listeners: seed::listeners(Path::new("/proc"), &[w.port]).unwrap_or_default(),
        })
        .collect();

    let btf = Path::new(BTF_PATH).is_file();
    let mut problems = Vec::new();
    if let Err(err) = &tracefs {
        problems.push(format!("tracefs: {err}"));
    }
    let missing: Vec<&str> = tracepoints
        .iter()
        .filter(|t| t.found == Some(false))
        .map(|t| t.name.as_str())
        .collect();
    if !missing.is_empty() {
        problems.push(format!("missing tracepoints: {}", missing.join(", ")));
    }
    if let (Ok(_), Err(err)) = (&tracefs, &program) {
        problems.push(format!("eBPF program: {err}"));
    }
    CheckReport {
        kernel: kernel_release(),
        btf,
        tracefs,
        privileges: privileges(),
        tracepoints,
        program,
        nvml: gpu::detect(),
        listeners,
        mode: if problems.is_empty() { "ebpf" } else { "proxy" },
        problems,
    }
}

/// Loads the embedded object for real and attaches one program, then detaches it.
fn try_load_and_attach(watch: &[WatchedPort]) -> Result<String, String> {
    let config = CaptureConfig {
        watch: watch.to_vec(),
        ..CaptureConfig::default()
    };
    let mut capture = Capture::load(&config).map_err(|err| format!("{err:#}"))?;
    capture
        .attach_raw(PROBE_PROGRAM)
        .map_err(|err| format!("{err:#}"))?;
    capture.detach().map_err(|err| format!("{err:#}"))?;
    Ok(format!(
        "loaded the embedded object, attached {PROBE_PROGRAM} to the raw tracepoint {PROBE_PROGRAM} and detached it; ring buffer {} MiB",
        config.ring_bytes >> 20
    ))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|err| format!("unknown ({err})"))
}

fn privileges() -> Privileges {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let capabilities = [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_PERFMON", 38),
        ("CAP_BPF", 39),
    ]
    .into_iter()
    .filter(|(_, bit)| effective & (1 << bit) != 0)
    .map(|(name, _)| name)
    .collect();
    Privileges { euid, capabilities }
}

/// The human form of the report.
pub fn render(report: &CheckReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut line = |label: &str, text: &str| {
        let _ = writeln!(out, "{label:<13} {text}");
    };
    line("kernel", &report.kernel);
    line(
        "BTF",
        if report.btf {
            "yes (/sys/kernel/btf/vmlinux)"
        } else {
            "no (/sys/kernel/btf/vmlinux missing)"
        },
    );
    match &report.tracefs {
        Ok(t) => line(
            "tracefs",
            &format!(
                "{}{}",
                t.path.display(),
                if t.mounted_now { " (mounted now)" } else { "" }
            ),
        ),
        Err(err) => line("tracefs", &format!("unavailable: {err}")),
    }
    let caps = if report.privileges.capabilities.is_empty() {
        "none".to_string()
    } else {
        report.privileges.capabilities.join(", ")
    };
    line(
        "privileges",
        &format!("euid {} ({caps})", report.privileges.euid),
    );
    if report.tracefs.is_ok() {
        let found = report
            .tracepoints
            .iter()
            .filter(|t| t.found == Some(true))
            .count();
        line(
            "tracepoints",
            &format!("{found} of {} found", report.tracepoints.len()),
        );
        for t in &report.tracepoints {
            let status = if t.found == Some(true) {
                "found  "
            } else {
                "MISSING"
            };
            line("", &format!("{status} {}", t.name));
        }
    } else {
        line("tracepoints", "not checked (tracefs unavailable)");
    }
    match &report.program {
        Ok(text) => line("eBPF program", text),
        Err(err) => line("eBPF program", &format!("FAILED: {err}")),
    }
    match &report.nvml {
        GpuPresence::Available {
            driver_version,
            gpus,
        } => line(
            "NVML",
            &format!(
                "driver {driver_version}, {} GPU(s): {}",
                gpus.len(),
                gpus.join(", ")
            ),
        ),
        GpuPresence::Unavailable { reason } => line("NVML", &format!("not available: {reason}")),
    }
    for (i, port) in report.listeners.iter().enumerate() {
        let label = if i == 0 { "listeners" } else { "" };
        if port.listeners.is_empty() {
            line(
                label,
                &format!("{} ({}): no listener", port.port, port.role),
            );
        }
        for l in &port.listeners {
            let holders: Vec<String> = l
                .holders
                .iter()
                .map(|h| format!("{}[{}] fd {}", h.comm, h.pid, h.fd))
                .collect();
            let holders = if holders.is_empty() {
                "holder not visible".to_string()
            } else {
                holders.join(", ")
            };
            line(
                label,
                &format!(
                    "{} ({}): {} held by {holders}",
                    port.port, port.role, l.addr
                ),
            );
        }
    }
    if report.mode == "ebpf" {
        let _ = writeln!(
            out,
            "\neBPF mode works: `observer run` can watch this host."
        );
    } else {
        let _ = writeln!(out, "\neBPF mode will not work here:");
        for problem in &report.problems {
            let _ = writeln!(out, "  - {problem}");
        }
        let _ = writeln!(
            out,
            "Use `observer proxy` (forwarding mode) instead, or fix the above."
        );
    }
    out
}
