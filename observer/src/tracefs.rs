//! tracefs: where it is, mounting it when it is missing, and which tracepoints exist.
//!
//! aya reads tracepoint ids from tracefs when it attaches, so the capture calls
//! [`ensure_mounted`] first. Mounting needs root (CAP_SYS_ADMIN); without it the error says
//! exactly what is missing.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Where tracefs lives on current kernels, and the older debugfs location.
const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How tracefs was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tracefs {
    pub path: PathBuf,
    /// True when this process mounted it just now.
    pub mounted_now: bool,
}

/// The mounted tracefs, if any.
pub fn find() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Where tracefs is mounted according to `/proc/self/mounts`, readable or not.
fn mount_point() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "tracefs").then(|| PathBuf::from(target))
    })
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is missing.
pub fn ensure_mounted() -> anyhow::Result<Tracefs> {
    if let Some(path) = find() {
        return Ok(Tracefs {
            path,
            mounted_now: false,
        });
    }
    if let Some(path) = mount_point() {
        bail!(
            "tracefs is mounted at {} but not readable by this user (needs root)",
            path.display()
        );
    }
    let target = Path::new(CANDIDATES[0]);
    if !target.is_dir() {
        bail!(
            "tracefs is not mounted and {} does not exist (kernel without CONFIG_TRACING?)",
            target.display()
        );
    }
    let source = CString::new("tracefs").expect("no NUL");
    let dir = CString::new(CANDIDATES[0]).expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // Another process (or thread) may have mounted it between our look and our mount.
        if let Some(path) = find() {
            return Ok(Tracefs {
                path,
                mounted_now: false,
            });
        }
        return Err(err).with_context(|| {
            format!(
                "tracefs is not mounted and mounting it at {} failed (needs root / CAP_SYS_ADMIN)",
                target.display()
            )
        });
    }
    tracing::info!("mounted tracefs at {}", target.display());
    Ok(Tracefs {
        path: target.to_path_buf(),
        mounted_now: true,
    })
}

/// Whether `category:name` exists under the tracefs at `root`.
pub fn tracepoint_exists(root: &Path, category: &str, name: &str) -> bool {
    root.join("events")
        .join(category)
        .join(name)
        .join("id")
        .is_file()
}

/// The offset of `field` in the record of `category:name`, from its `format` file. Tracepoint
/// layouts differ between kernel versions (e.g. `sched_process_fork` once carried its comms
/// inline); reading the format keeps the kernel programs free of hard-coded offsets.
pub fn field_offset(root: &Path, category: &str, name: &str, field: &str) -> Option<usize> {
    let format =
        std::fs::read_to_string(root.join("events").join(category).join(name).join("format"))
            .ok()?;
    parse_field_offset(&format, field)
}

/// `\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;` → 20 for `child_pid`.
fn parse_field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let declaration = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = declaration.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_field_offsets_of_old_and_new_fork_formats() {
        let new = "name: sched_process_fork\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(new, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(new, "parent_pid"), Some(12));
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(old, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(old, "child_comm[16]"), Some(28));
        assert_eq!(parse_field_offset(old, "no_such_field"), None);
    }
}
