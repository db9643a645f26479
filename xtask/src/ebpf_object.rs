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

/// The release object as committed to the repository, so that a fresh clone builds `observer`
/// without the kernel toolchain (nightly, bpf-linker, LLVM), as bpf2go users such as Beyla
/// commit theirs. `cargo xtask build-ebpf --release` rewrites it; a test fails when its stamp
/// no longer matches the sources.
pub fn committed_object(workspace: &Path) -> PathBuf {
    workspace.join("observer/bpf/observer.bpf.o")
}

/// The committed object's stamp.
pub fn committed_stamp(workspace: &Path) -> PathBuf {
    workspace.join("observer/bpf/observer.bpf.o.inputs")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh clone builds with the committed object: it must be the one the kernel sources
    /// on disk make.
    #[test]
    fn committed_object_matches_the_kernel_sources() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let stamp = fs::read_to_string(committed_stamp(workspace)).unwrap_or_default();
        assert!(
            committed_object(workspace).is_file()
                && stamp.trim() == fingerprint(workspace).unwrap(),
            "observer/bpf/observer.bpf.o is missing or stale: run `cargo xtask build-ebpf \
             --release` and commit observer/bpf/"
        );
    }

    fn workspace(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ebpf-object-test-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = fs::remove_dir_all(&dir);
        for (path, contents) in files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
        dir
    }

    const LOCK: &str = "version = 4\n\n[[package]]\nname = \"aya-ebpf\"\nversion = \"0.2.1\"\ndependencies = [\n \"libc\",\n]\n\n[[package]]\nname = \"tokio\"\nversion = \"1.0.0\"\n";

    #[test]
    fn fingerprint_follows_kernel_sources_and_ignores_userspace_locks() {
        let base = workspace(&[
            ("observer-ebpf/src/main.rs", "fn a() {}"),
            ("Cargo.lock", LOCK),
        ]);
        let first = fingerprint(&base).unwrap();
        assert_eq!(first, fingerprint(&base).unwrap(), "deterministic");

        fs::write(
            base.join("Cargo.lock"),
            LOCK.replace("1.0.0", "1.1.0")
                .replace("\"libc\"", "\"libc 0.2\""),
        )
        .unwrap();
        assert_eq!(
            first,
            fingerprint(&base).unwrap(),
            "userspace lock changes are not kernel inputs"
        );

        fs::write(base.join("Cargo.lock"), LOCK.replace("0.2.1", "0.2.2")).unwrap();
        let bumped = fingerprint(&base).unwrap();
        assert_ne!(first, bumped, "a kernel-side crate version is an input");

        fs::write(base.join("observer-ebpf/src/main.rs"), "fn b() {}").unwrap();
        assert_ne!(
            bumped,
            fingerprint(&base).unwrap(),
            "kernel source is an input"
        );
        fs::remove_dir_all(base).unwrap();
    }

    /// aya's newer releases need rustc 1.98: the lockfile must keep the pinned ones.
    #[test]
    fn lockfile_keeps_the_pinned_aya_versions() {
        let lock = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
            .unwrap();
        for (name, version) in [
            ("aya", "0.14.0"),
            ("aya-ebpf", "0.2.1"),
            ("aya-log", "0.3.0"),
            ("aya-log-ebpf", "0.2.0"),
            ("aya-build", "0.2.0"),
        ] {
            let entry = format!("name = \"{name}\"\nversion = \"{version}\"\n");
            assert!(
                lock.contains(&entry),
                "Cargo.lock should pin {name} {version}"
            );
        }
    }
}
