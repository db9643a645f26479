//! Developer tasks, run as `cargo xtask <task>`.
//!
//! - `build-ebpf [--release]`: build the kernel programs with the nightly toolchain and
//!   `bpf-linker`, and leave the object where `observer/build.rs` embeds it.

mod ebpf_object;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf { release } => build_ebpf(release),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Builds `observer-ebpf` for `bpfel-unknown-none` into its own target dir (so the nightly
/// build never invalidates the stable one), then copies the object and writes its stamp.
fn build_ebpf(release: bool) -> anyhow::Result<()> {
    let workspace = workspace_root();
    let profile = if release { "release" } else { "debug" };
    let fingerprint =
        ebpf_object::fingerprint(&workspace).context("fingerprinting the kernel sources")?;
    let target_dir = ebpf_object::ebpf_dir(&workspace).join("cargo");

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&workspace)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "observer-ebpf",
            "--bin",
            "observer",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
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

    let status = cmd.status().context(
        "running `rustup run nightly cargo build` (is rustup installed? run scripts/setup.sh)",
    )?;
    if !status.success() {
        bail!(
            "building the kernel programs failed ({status}); scripts/setup.sh installs nightly, rust-src and bpf-linker"
        );
    }

    let built = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("observer");
    let object = ebpf_object::object_path(&workspace, profile);
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    std::fs::write(ebpf_object::stamp_path(&workspace, profile), &fingerprint)
        .context("writing the object's stamp")?;
    println!("kernel object: {} (inputs {fingerprint})", object.display());
    Ok(())
}
