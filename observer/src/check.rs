//! `observer check`: what this host supports and which mode will work.
//!
//! Gathers facts (kernel and its minimum, BTF, lockdown, the BPF features and helpers the
//! capture uses, tracefs, privileges, tracepoints, a real load and attach of every program of
//! the embedded object, NVML, listeners on the watched ports) into a [`CheckReport`], then
//! prints it for a person or as JSON. Exit 0 only when eBPF mode can run. It changes nothing on the
//! host except mounting tracefs when it is missing (as the daemon would).

use std::{path::Path, process::ExitCode};

use crate::base::WatchedPort;
use crate::{
    capture::{Capture, CaptureConfig, Hook, REQUIRED_TRACEPOINTS, hooks, kernel, tracefs},
    gpu::{self, GpuPresence},
    procfs::sockets,
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

impl CheckArgs {
    /// The watch list, as `observer run` would check it.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::capture::CaptureConfig {
            watch: self.watch.clone(),
            ..Default::default()
        }
        .validate()
    }
}

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// What the capture loses on a kernel without BTF (the layouts `capture::btf` reads).
const WITHOUT_BTF: &str = "without BTF the capture runs with less: connections are not followed into forked children, a process's exit is taken from its first thread's, and a process calling its own watched port may be taken for a relay";

#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    pub kernel: String,
    /// The oldest kernel the capture runs on (`5.8`).
    pub minimum_kernel: String,
    pub btf: bool,
    /// `none`, `integrity` or `confidentiality`; `None` where the kernel has no lockdown.
    pub lockdown: Option<String>,
    /// The map type, program types and helpers the capture uses, probed on this kernel.
    pub features: Vec<kernel::Feature>,
    pub tracefs: Result<tracefs::Tracefs, String>,
    pub privileges: Privileges,
    pub tracepoints: Vec<TracepointCheck>,
    /// Every program of the embedded object, loaded and attached for real (then detached).
    pub programs: Vec<ProgramCheck>,
    pub nvml: GpuPresence,
    pub listeners: Vec<PortListeners>,
    /// `ebpf` when `observer run` will work, else `proxy`.
    pub mode: &'static str,
    /// Why eBPF mode will not work (empty when it will).
    pub problems: Vec<String>,
    /// What works less well on this kernel, though eBPF mode works.
    pub warnings: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct ProgramCheck {
    /// The program's name in the object (its tracepoint's name).
    pub name: &'static str,
    /// `raw_tracepoint` or `tracepoint`.
    pub kind: &'static str,
    /// Where it attaches: `sys_exit`, `sock:inet_sock_set_state`.
    pub attach_to: String,
    /// `Ok` when it loaded and attached; else why not.
    pub result: Result<(), String>,
    /// Instructions the verifier went through to accept it, of its limit of 1,000,000 (Linux
    /// 5.16 and newer report it).
    pub verified_instructions: Option<u32>,
}

impl ProgramCheck {
    fn of(hook: Hook, result: Result<(), String>, verified_instructions: Option<u32>) -> Self {
        ProgramCheck {
            name: hook.program(),
            kind: hook.kind(),
            attach_to: hook.attach_to(),
            result,
            verified_instructions,
        }
    }
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
    pub role: crate::base::Role,
    pub listeners: Vec<sockets::Listener>,
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
    let programs = match &tracefs {
        Ok(_) => load_and_attach_each(watch),
        Err(_) => hooks()
            .map(|hook| {
                ProgramCheck::of(
                    hook,
                    Err("not attempted: tracefs is unavailable".into()),
                    None,
                )
            })
            .collect(),
    };
    let features = kernel::probe_features();
    let kernel = kernel::release();
    let lockdown = kernel::lockdown();
    let listeners = watch
        .iter()
        .map(|w| PortListeners {
            port: w.port,
            role: w.role,
            listeners: sockets::listeners(Path::new("/proc"), &[w.port]).unwrap_or_default(),
        })
        .collect();

    let btf = Path::new(BTF_PATH).is_file();
    let mut problems = Vec::new();
    if kernel::older_than_minimum(&kernel) == Some(true) {
        problems.push(format!(
            "kernel {kernel} is older than {}.{}, the first with BPF ring buffers (a vendor kernel may carry them back-ported: see the features below)",
            kernel::MINIMUM.0,
            kernel::MINIMUM.1
        ));
    }
    let lacking: Vec<String> = features
        .iter()
        .filter(|f| f.available == Some(false))
        .map(|f| format!("{} (Linux {})", f.name, f.since))
        .collect();
    if !lacking.is_empty() {
        let mut text = format!("this kernel lacks {}", lacking.join(", "));
        if lockdown.as_deref() == Some("confidentiality") {
            text.push_str(
                "; the kernel is locked down (lockdown=confidentiality), which withholds the helpers that read kernel memory",
            );
        }
        problems.push(text);
    }
    let mut warnings = Vec::new();
    if !btf {
        warnings.push(format!("{BTF_PATH} is missing: {WITHOUT_BTF}"));
    }
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
    if tracefs.is_ok() {
        // One line per distinct error, naming the programs it stopped (a kernel that cannot
        // load the object stops them all with the same).
        let mut failed: Vec<(&str, Vec<&str>)> = Vec::new();
        for p in &programs {
            if let Err(err) = &p.result {
                match failed.iter_mut().find(|(e, _)| e == err) {
                    Some((_, names)) => names.push(p.name),
                    None => failed.push((err, vec![p.name])),
                }
            }
        }
        problems.extend(failed.into_iter().map(|(err, names)| {
            let label = if names.len() == 1 {
                "program"
            } else {
                "programs"
            };
            format!("eBPF {label} {}: {err}", names.join(", "))
        }));
    }
    CheckReport {
        kernel,
        minimum_kernel: format!("{}.{}", kernel::MINIMUM.0, kernel::MINIMUM.1),
        btf,
        lockdown,
        features,
        tracefs,
        privileges: privileges(),
        tracepoints,
        programs,
        nvml: gpu::detect(),
        listeners,
        mode: if problems.is_empty() { "ebpf" } else { "proxy" },
        problems,
        warnings,
    }
}

/// Loads the embedded object for real, loads and attaches each program, then detaches them
/// all. One that fails does not stop the others: each is reported.
fn load_and_attach_each(watch: &[WatchedPort]) -> Vec<ProgramCheck> {
    let config = CaptureConfig {
        watch: watch.to_vec(),
        ..CaptureConfig::default()
    };
    let mut capture = match Capture::load(&config) {
        Ok(capture) => capture,
        Err(err) => {
            let err = format!("{err:#}");
            return hooks()
                .map(|hook| ProgramCheck::of(hook, Err(err.clone()), None))
                .collect();
        }
    };
    let checks = hooks()
        .map(|hook| {
            let attached = capture.attach_hook(hook).map_err(|err| format!("{err:#}"));
            ProgramCheck::of(
                hook,
                attached,
                capture.verified_instructions(hook.program()),
            )
        })
        .collect();
    if let Err(err) = capture.detach() {
        tracing::warn!("detaching the programs check attached: {err:#}");
    }
    checks
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
    line(
        "kernel",
        &format!(
            "{} (the capture needs {} or newer)",
            report.kernel, report.minimum_kernel
        ),
    );
    line(
        "BTF",
        if report.btf {
            "yes (/sys/kernel/btf/vmlinux)"
        } else {
            "no (/sys/kernel/btf/vmlinux missing)"
        },
    );
    line(
        "lockdown",
        report
            .lockdown
            .as_deref()
            .unwrap_or("not reported (no securityfs, or no lockdown in this kernel)"),
    );
    let available = report
        .features
        .iter()
        .filter(|f| f.available == Some(true))
        .count();
    line(
        "BPF features",
        &format!("{available} of {} available", report.features.len()),
    );
    for f in report.features.iter().filter(|f| f.available != Some(true)) {
        let status = match f.available {
            Some(false) => "MISSING",
            _ => "UNKNOWN",
        };
        line("", &format!("{status} {} (Linux {})", f.name, f.since));
    }
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
    let loaded = report.programs.iter().filter(|p| p.result.is_ok()).count();
    line(
        "programs",
        &format!(
            "{loaded} of {} loaded and attached (then detached)",
            report.programs.len()
        ),
    );
    for p in &report.programs {
        match &p.result {
            Ok(()) => line(
                "",
                &format!(
                    "ok      {} ({} {}){}",
                    p.name,
                    p.kind,
                    p.attach_to,
                    p.verified_instructions
                        .map(|n| format!(", {n} instructions verified"))
                        .unwrap_or_default()
                ),
            ),
            Err(err) => line(
                "",
                &format!("FAILED  {} ({} {}): {err}", p.name, p.kind, p.attach_to),
            ),
        }
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
    for warning in &report.warnings {
        let _ = writeln!(out, "\nnote: {warning}");
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
