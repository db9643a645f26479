//! Developer tasks, run as `cargo xtask <task>`.
//!
//! - `build-ebpf [--release]`: build the kernel programs with the nightly toolchain and
//!   `bpf-linker`, and leave the object where `observer/build.rs` embeds it.
//! - `clippy-ebpf`: clippy on the kernel programs (they build for the BPF target only, so the
//!   workspace's plain `cargo clippy` does not see them).
//! - `bench [NAME] [--no-doc | --doc PATH] [-- ARGS]`: the benchmarks in [`BENCHES`], all of
//!   them in order or the one named; each rewrites its own section of `docs/BENCHMARKS.md`
//!   (or of `--doc PATH`; `--no-doc`: none). `ARGS` (with a name only) go to that benchmark:
//!   criterion's options for `engine`, `--rounds N`, `--seconds S`, ... for the others.
//! - `soak [--duration 10m] [-- ARGS]`: a steady chat workload with a fault every minute
//!   ([`soak`]).
//! - `kernels [SERIES|VMLINUZ ...]`: `observer check` and a capture test in a VM on each kernel
//!   (Debian's 6.1 and 6.12 by default; [`kernels`]). In that VM this binary is `/init`.
//!
//! - `layers`: each module of the daemon's library uses only layers below it ([`layers`]).
//!
//! The benchmarks' shared parts are in [`common`]; [`observer_run`] runs the daemon under
//! measurement, [`rate`] is the fixed-rate load generator.

mod accuracy_bench;
mod bystander_bench;
mod chat;
mod common;
mod criterion_bench;
mod ebpf_object;
mod kernels;
mod layers;
mod loss_bench;
mod observer_run;
mod overhead_bench;
mod proxy_bench;
mod rate;
mod soak;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use common::report::DocArgs;

#[derive(Parser)]
#[command(name = "xtask", about = "observer developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel object embedded by the `observer` binary.
    BuildEbpf {
        /// Build the object the release build of `observer` embeds.
        #[arg(long)]
        release: bool,
    },
    /// Run clippy (warnings denied) on the kernel programs.
    ClippyEbpf,
    /// Run the benchmarks (release build) and write their sections of docs/BENCHMARKS.md: all
    /// of them in order, or the one named.
    Bench {
        /// Which benchmark (default: every one, in order).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(BENCHES.iter().map(|b| b.name)))]
        name: Option<String>,
        #[command(flatten)]
        doc: DocArgs,
        /// Passed to the named benchmark (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A steady chat workload through nginx with `observer run` attached and a fault every
    /// minute: memory over time and exact counts.
    Soak {
        /// How long: `10m`, `90s`, `1h`.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        duration: Duration,
        /// Passed to the soak (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot kernels in VMs (qemu, KVM) and run `observer check` and a capture test on each:
    /// one line per kernel; fails when any kernel fails.
    Kernels(kernels::KernelsArgs),
    /// Check that each module of the daemon's library uses only the layers below it.
    Layers,
    /// Inside the VM of `kernels`: the client process of the capture test.
    #[command(hide = true)]
    KernelsGuestClient,
}

/// A benchmark `cargo xtask bench` runs.
struct Bench {
    /// The name on the command line.
    name: &'static str,
    runner: Runner,
}

enum Runner {
    /// A `[[bench]]` target of the `observer` package (`cargo bench`), whose results this crate
    /// then reads and writes into its section: `section(workspace, results, doc)`.
    Cargo {
        target: &'static str,
        section: fn(&Path, &Path, &DocArgs) -> anyhow::Result<()>,
    },
    /// A benchmark this crate drives itself: `run(workspace, args)`, the doc flags in `args`.
    Xtask(fn(&Path, &[String]) -> anyhow::Result<()>),
}

/// Every benchmark, in the order `cargo xtask bench` runs them: the quick in-memory one first,
/// then those that start servers, the longest (loss) near the end.
const BENCHES: &[Bench] = &[
    // Capture events per second through one engine (criterion).
    Bench {
        name: "engine",
        runner: Runner::Cargo {
            target: "engine",
            section: criterion_bench::engine_section,
        },
    },
    // Resident memory of `observer run` with 10,000 open connections (needs root).
    Bench {
        name: "daemon-memory",
        runner: Runner::Cargo {
            target: "daemon_memory",
            section: criterion_bench::daemon_memory_section,
        },
    },
    // `observer proxy` against nginx under wrk, and memory with 1,000 connections.
    Bench {
        name: "proxy",
        runner: Runner::Xtask(proxy_bench::run),
    },
    // A process the observer does not watch (dd), with and without it attached.
    Bench {
        name: "bystander",
        runner: Runner::Xtask(bystander_bench::run),
    },
    // nginx with and without `observer run` attached: wrk, then a fixed rate.
    Bench {
        name: "overhead",
        runner: Runner::Xtask(overhead_bench::run),
    },
    // 10,000 requests/s for 60 s: no event lost, exact counts.
    Bench {
        name: "loss",
        runner: Runner::Xtask(loss_bench::run),
    },
    // The observer's per-request timings against the client's own.
    Bench {
        name: "accuracy",
        runner: Runner::Xtask(accuracy_bench::run),
    },
];

fn main() -> anyhow::Result<()> {
    // The VM of `cargo xtask kernels` starts this binary as its init, with no arguments.
    if std::process::id() == 1 {
        kernels::guest::init();
    }
    match Cli::parse().task {
        Task::BuildEbpf { release } => build_ebpf(release),
        Task::ClippyEbpf => clippy_ebpf(),
        Task::Bench { name, doc, args } => bench(name.as_deref(), &doc, &args),
        Task::Soak { duration, args } => soak::run(&workspace_root(), duration, &args),
        Task::Kernels(args) => kernels::run(&args, &workspace_root()),
        Task::Layers => layers::run(&workspace_root()),
        Task::KernelsGuestClient => kernels::guest::client(),
    }
}

/// `10m`, `90s`, `1h`, `1h30m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("not a duration: {text:?} (e.g. 10m, 90s, 1h)");
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let scale = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total += n * scale;
        number.clear();
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `cargo <subcommand>` on the kernel crate with the nightly toolchain, for the BPF target,
/// in its own target dir (so the nightly build never invalidates the stable one).
fn nightly_cargo(workspace: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace)
        .args([
            "run",
            "nightly",
            "cargo",
            subcommand,
            "--package",
            "observer-ebpf",
            "--bin",
            "observer",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(ebpf_object::ebpf_dir(workspace).join("cargo"));
    let arch = std::env::consts::ARCH;
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".into(),
            "-Clink-arg=--btf".into(),
        ]
        .join("\x1f"),
    );
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    // bpf-linker is built against Debian's LLVM 22 (scripts/setup.sh).
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/lib/llvm-22/bin"));
    cmd
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| {
        format!("{what}: cannot run `rustup run nightly cargo` (run scripts/setup.sh)")
    })?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); scripts/setup.sh installs nightly, rust-src and bpf-linker"
        );
    }
    Ok(())
}

/// The named benchmark, or every one in order. Each writes its section as it ends; one that
/// fails does not stop the others, and the command then fails naming it.
fn bench(name: Option<&str>, doc: &DocArgs, args: &[String]) -> anyhow::Result<()> {
    if name.is_none() && !args.is_empty() {
        bail!("arguments after `--` go to one benchmark: name it (cargo xtask bench NAME -- ...)");
    }
    let workspace = workspace_root();
    // Benchmarks build with the release profile, which embeds the release kernel object.
    build_ebpf(true)?;
    let mut failed = Vec::new();
    for bench in BENCHES
        .iter()
        .filter(|b| name.is_none_or(|name| b.name == name))
    {
        println!("\n=== benchmark {} ===", bench.name);
        let result = match bench.runner {
            Runner::Xtask(run) => run(&workspace, &[args, &doc.to_args()].concat()),
            Runner::Cargo { target, section } => {
                cargo_bench(&workspace, target, args, section, doc)
            }
        };
        if let Err(err) = result {
            eprintln!("benchmark {} failed: {err:#}", bench.name);
            failed.push(bench.name);
        }
    }
    if !failed.is_empty() {
        bail!("benchmarks that failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo bench -p observer --bench <target> -- <args>`, then its section from the results it
/// left, written even when the benchmark exits with a failure (`daemon_memory` does over its
/// target) as long as it left them.
fn cargo_bench(
    workspace: &Path,
    target: &str,
    args: &[String],
    section: fn(&Path, &Path, &DocArgs) -> anyhow::Result<()>,
    doc: &DocArgs,
) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let results = criterion_bench::results_path(workspace, target);
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "bench",
            "--locked",
            "--package",
            "observer",
            "--bench",
            target,
        ])
        .env(criterion_bench::RESULTS_ENV, &results)
        .arg("--")
        .args(args)
        .status()
        .context("cannot run cargo")?;
    if results.exists() {
        section(workspace, &results, doc)?;
    }
    if !status.success() {
        bail!("cargo bench --bench {target} exited with {status}");
    }
    Ok(())
}

fn clippy_ebpf() -> anyhow::Result<()> {
    let mut cmd = nightly_cargo(&workspace_root(), "clippy");
    cmd.args(["--release", "--", "-D", "warnings"]);
    run(cmd, "clippy on the kernel programs")
}

/// Builds `observer-ebpf` for `bpfel-unknown-none`, then copies the object beside the stamp
/// of the sources it was built from.
fn build_ebpf(release: bool) -> anyhow::Result<()> {
    let workspace = workspace_root();
    let profile = if release { "release" } else { "debug" };
    let fingerprint =
        ebpf_object::fingerprint(&workspace).context("fingerprinting the kernel sources")?;
    let mut cmd = nightly_cargo(&workspace, "build");
    if release {
        cmd.arg("--release");
    } else {
        // The verifier needs optimised code; a "debug" kernel object differs only in name.
        for setting in [
            "opt-level=3",
            "debug-assertions=false",
            "overflow-checks=false",
            "incremental=false",
            "codegen-units=1",
        ] {
            cmd.args(["--config", &format!("profile.dev.{setting}")]);
        }
    }
    run(cmd, "building the kernel programs")?;

    let target_dir = ebpf_object::ebpf_dir(&workspace).join("cargo");
    let built = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("observer");
    let object = ebpf_object::object_path(&workspace, profile);
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    std::fs::write(ebpf_object::stamp_path(&workspace, profile), &fingerprint)
        .context("writing the object's stamp")?;
    if release {
        let committed = ebpf_object::committed_object(&workspace);
        std::fs::create_dir_all(committed.parent().expect("a file path has a parent"))?;
        std::fs::copy(&built, &committed)
            .with_context(|| format!("copying {} to {}", built.display(), committed.display()))?;
        std::fs::write(ebpf_object::committed_stamp(&workspace), &fingerprint)
            .context("writing the committed object's stamp")?;
        println!(
            "committed copy: {} (commit it with the kernel sources)",
            committed.display()
        );
    }
    println!("kernel object: {} (inputs {fingerprint})", object.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "m", "10x", "10m5", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_benchmark_has_a_distinct_name_and_the_cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let mut names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BENCHES.len());
    }
}
