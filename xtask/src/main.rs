//! Developer tasks, run as `cargo xtask <task>`.
//!
//! - `build-ebpf [--release]`: build the kernel programs with the nightly toolchain and
//!   `bpf-linker`, and leave the object where `observer/build.rs` embeds it.
//! - `clippy-ebpf`: clippy on the kernel programs (they build for the BPF target only, so the
//!   workspace's plain `cargo clippy` does not see them).
//! - `bench [NAME] [-- ARGS]`: the benchmarks in [`BENCHES`], all of them or the one named;
//!   `ARGS` go to the benchmark binary (criterion's options, e.g. `--save-baseline main`), or
//!   to `proxy` (`--rounds N`, `--no-doc`, ...: [`proxy_bench`]).

mod ebpf_object;
mod proxy_bench;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

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
    /// Run the benchmarks (release build): all of them, or the one named.
    Bench {
        /// Which benchmark (default: every one, in order).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(BENCHES.iter().map(|b| b.name)))]
        name: Option<String>,
        /// Passed to the benchmark binary (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// A benchmark `cargo xtask bench` runs: a `[[bench]]` target of the `observer` package, or
/// the proxy comparison this crate drives itself.
struct Bench {
    /// The name on the command line.
    name: &'static str,
    /// The `[[bench]]` target in `observer/Cargo.toml`; `None` for [`proxy_bench`].
    target: Option<&'static str>,
}

/// Every benchmark, in the order `cargo xtask bench` runs them.
const BENCHES: &[Bench] = &[
    // Capture events per second through one engine (criterion).
    Bench {
        name: "engine",
        target: Some("engine"),
    },
    // Resident memory of `observer run` with many open connections (needs root).
    Bench {
        name: "daemon-memory",
        target: Some("daemon_memory"),
    },
    // `observer proxy` against nginx under wrk, and memory with 1,000 connections.
    Bench {
        name: "proxy",
        target: None,
    },
];

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf { release } => build_ebpf(release),
        Task::ClippyEbpf => clippy_ebpf(),
        Task::Bench { name, args } => bench(name.as_deref(), &args),
    }
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

/// `cargo bench -p observer --bench <target> -- <args>` for the named benchmark, or for each.
fn bench(name: Option<&str>, args: &[String]) -> anyhow::Result<()> {
    // Benchmarks build with the release profile, which embeds the release kernel object.
    build_ebpf(true)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for bench in BENCHES
        .iter()
        .filter(|b| name.is_none_or(|name| b.name == name))
    {
        let Some(target) = bench.target else {
            proxy_bench::run(&workspace_root(), args)?;
            continue;
        };
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace_root())
            .args(["bench", "--package", "observer", "--bench", target])
            .arg("--")
            .args(args);
        let status = cmd
            .status()
            .with_context(|| format!("benchmark {}: cannot run cargo", bench.name))?;
        if !status.success() {
            bail!("benchmark {} failed ({status})", bench.name);
        }
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
