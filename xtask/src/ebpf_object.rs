//! Where the kernel object lives and what it was built from.
//!
//! Shared, by `#[path]`, between `cargo xtask build-ebpf` (which writes the object and its
//! stamp) and `observer/build.rs` (which embeds the object only when the stamp matches the
//! sources now on disk). A plain function of file contents: no dependencies, no clock.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// Directory (under the workspace target dir) holding the kernel build and its outputs.
pub fn ebpf_dir(workspace: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_absolute() {
                dir
            } else {
                workspace.join(dir)
            }
        })
        .unwrap_or_else(|| workspace.join("target"));
    target.join("ebpf")
}

/// The object for a profile (`debug` or `release`).
pub fn object_path(workspace: &Path, profile: &str) -> PathBuf {
    ebpf_dir(workspace).join(format!("observer-{profile}.bpf.o"))
}

/// The stamp beside the object: the inputs' fingerprint when it was built.
pub fn stamp_path(workspace: &Path, profile: &str) -> PathBuf {
    ebpf_dir(workspace).join(format!("observer-{profile}.bpf.o.inputs"))
}

/// Paths whose change makes the object stale (directories are walked).
pub fn input_roots(workspace: &Path) -> Vec<PathBuf> {
    [
        "observer-ebpf",
        "observer-common",
        "Cargo.toml",
        "Cargo.lock",
    ]
    .iter()
    .map(|p| workspace.join(p))
    .collect()
}

/// Fingerprint of everything the object is built from: file paths and contents (FNV-1a, 64
/// bit), of the kernel and shared crates, the workspace manifest, and the versions of the kernel-side
/// crates in the lockfile.
pub fn fingerprint(workspace: &Path) -> std::io::Result<String> {
    let mut files = Vec::new();
    for root in input_roots(workspace) {
        collect_files(&root, &mut files)?;
    }
    files.sort();
    let mut hash = Fnv::new();
    for file in &files {
        let relative = file.strip_prefix(workspace).unwrap_or(file);
        hash.write(relative.to_string_lossy().as_bytes());
        hash.write(&[0]);
        let contents = fs::read(file)?;
        if file.file_name().is_some_and(|n| n == "Cargo.lock") {
            hash.write(aya_lock_entries(&String::from_utf8_lossy(&contents)).as_bytes());
        } else {
            hash.write(&contents);
        }
        hash.write(&[0]);
    }
    Ok(format!("{:016x}", hash.0))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if meta.is_file() {
        out.push(path.to_path_buf());
    } else if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            let name = entry.file_name();
            // Editor droppings and nested build dirs are not inputs.
            if name.to_string_lossy().starts_with('.') || name == "target" {
                continue;
            }
            collect_files(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// Name and version of the lockfile's packages that are compiled into the kernel object.
/// Only those: a userspace dependency change must not make the object look stale.
fn aya_lock_entries(lock: &str) -> String {
    const KERNEL_SIDE: &[&str] = &[
        "aya-ebpf",
        "aya-log-ebpf",
        "aya-log-common",
        "aya-log-parser",
        "aya-build",
    ];
    let mut entries = String::new();
    for block in lock.split("[[package]]") {
        let mut lines = block.trim_start().lines();
        let (Some(name), Some(version)) = (lines.next(), lines.next()) else {
            continue;
        };
        let package = name.trim_start_matches("name = \"").trim_end_matches('"');
        if KERNEL_SIDE.iter().any(|prefix| package.starts_with(prefix)) {
            entries.push_str(name);
            entries.push_str(version);
            entries.push('\n');
        }
    }
    entries
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
