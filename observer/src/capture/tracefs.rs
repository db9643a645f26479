//! tracefs: where it is, mounting it when it is missing, and which tracepoints exist.
//!
//! aya reads tracepoint ids from tracefs when it attaches, so the capture calls
//! [`ensure_mounted`] first. Mounting needs root (CAP_SYS_ADMIN); without it the error says
//! exactly what is missing.
//!
//! Several processes (or threads) may start at once on a host where tracefs is not mounted
//! yet: each looks, one mounts, and the others must then use that mount rather than fail. So a
//! mount that `/proc/self/mounts` lists, or that makes our own mount(2) fail with EBUSY, is
//! waited for (up to [`SETTLE`]) until its `events/` can be seen, and "not readable" is said
//! only on an actual permission error, never merely because `events/` was not there yet.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where tracefs lives on current kernels, and the older debugfs location. aya looks in these
/// two places only, so a tracefs mounted anywhere else is of no use to the capture.
const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How long a tracefs that another process has just mounted may take to show `events/` to
/// this one. The mount itself is instant; this bounds the wait when something else is wrong.
const SETTLE: Duration = Duration::from_secs(2);

/// How often `events/` is looked at while waiting for it.
const POLL: Duration = Duration::from_millis(5);

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

/// Where tracefs is mounted according to `/proc/self/mounts`, readable or not, among the
/// places aya looks.
fn mount_point() -> Option<PathBuf> {
    listed_mount_point(&std::fs::read_to_string("/proc/self/mounts").ok()?)
}

/// The first tracefs mount of a mount table (`/proc/self/mounts`) at one of [`CANDIDATES`].
fn listed_mount_point(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "tracefs" && CANDIDATES.contains(&target)).then(|| PathBuf::from(target))
    })
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is missing. Safe to call from
/// several processes or threads at once: all of them succeed when one of them can mount it.
pub fn ensure_mounted() -> anyhow::Result<Tracefs> {
    if let Some(path) = find() {
        return Ok(found(path));
    }
    // Listed but not seen: either another process mounted it between `find` and the read of
    // the mount table (its `events/` is there by now, or is about to be), or this process may
    // not read it. Only the directory's own answer tells the two apart.
    if let Some(path) = mount_point() {
        return match wait_for_dir(&path.join("events"), SETTLE) {
            Ok(()) => Ok(found(path)),
            Err(Unseen::Denied(err)) => Err(unreadable(&path, &err, euid())),
            Err(Unseen::TimedOut(last)) => Err(no_events(&path, last.as_ref())),
        };
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
        let err = io::Error::last_os_error();
        // Another process (or thread) may have mounted it between our look and our mount:
        // EBUSY says something is being mounted there, so give it the time to settle; any
        // other error gets one more look only (EPERM will not go away by waiting).
        let settle = if err.raw_os_error() == Some(libc::EBUSY) {
            SETTLE
        } else {
            Duration::ZERO
        };
        if wait_for_dir(&target.join("events"), settle).is_ok() {
            return Ok(found(target.to_path_buf()));
        }
        if let Some(path) = find() {
            return Ok(found(path));
        }
        return Err(err).with_context(|| {
            format!(
                "tracefs is not mounted and mounting it at {} failed (needs root / CAP_SYS_ADMIN)",
                target.display()
            )
        });
    }
    tracing::info!("mounted tracefs at {}", target.display());
    match wait_for_dir(&target.join("events"), SETTLE) {
        Ok(()) => {}
        Err(Unseen::Denied(err)) => return Err(unreadable(target, &err, euid())),
        Err(Unseen::TimedOut(last)) => return Err(no_events(target, last.as_ref())),
    }
    Ok(Tracefs {
        path: target.to_path_buf(),
        mounted_now: true,
    })
}

/// tracefs is mounted at `path`, but without its `events` directory: the kernel is locked
/// down (confidentiality keeps tracefs empty), or was built without event tracing.
fn no_events(path: &Path, last: Option<&io::Error>) -> anyhow::Error {
    let why = if crate::capture::kernel::lockdown().as_deref() == Some("confidentiality") {
        "the kernel is locked down (lockdown=confidentiality), which keeps tracefs empty"
    } else {
        "a kernel without CONFIG_EVENT_TRACING?"
    };
    anyhow::anyhow!(
        "tracefs is mounted at {} but {}/events did not appear within {} ({}); {why}",
        path.display(),
        path.display(),
        humantime::format_duration(SETTLE),
        describe(last),
    )
}

fn found(path: PathBuf) -> Tracefs {
    Tracefs {
        path,
        mounted_now: false,
    }
}

/// Why a directory was not seen.
#[derive(Debug)]
enum Unseen {
    /// Looking at it was refused (EACCES, EPERM): waiting will not help.
    Denied(io::Error),
    /// It did not appear in time: the last look's error, or None when something that is not
    /// a directory is there.
    TimedOut(Option<io::Error>),
}

/// Waits until `dir` is a directory, looking every [`POLL`] for up to `timeout` (at least once).
/// A permission error ends the wait at once.
fn wait_for_dir(dir: &Path, timeout: Duration) -> Result<(), Unseen> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => None,
            Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
                return Err(Unseen::Denied(err));
            }
            Err(err) => Some(err),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(Unseen::TimedOut(last));
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
}

/// What the last look at a directory that never appeared found.
fn describe(last: Option<&io::Error>) -> String {
    match last {
        Some(err) => err.to_string(),
        None => "it is not a directory".to_owned(),
    }
}

/// The error for a tracefs this process may not read. Only a user other than root is told to
/// become root; root itself refused points at what can refuse root.
fn unreadable(path: &Path, err: &io::Error, euid: u32) -> anyhow::Error {
    if euid != 0 {
        anyhow::anyhow!(
            "tracefs is mounted at {} but not readable by this user (needs root)",
            path.display()
        )
    } else {
        anyhow::anyhow!(
            "tracefs is mounted at {} but reading it was refused although this process runs as \
             root ({err}): a security module (SELinux, AppArmor) or the container's restrictions?",
            path.display()
        )
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
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
        // `__u8 saddr[4]` is `saddr` (or `saddr[4]`).
        if name != field && name.split('[').next() != Some(field) {
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
        assert_eq!(parse_field_offset(old, "child_comm"), Some(28));
        assert_eq!(parse_field_offset(old, "child_comm[16]"), Some(28));
        assert_eq!(parse_field_offset(old, "no_such_field"), None);
    }

    #[test]
    fn only_tracefs_mounts_where_aya_looks_count() {
        let mounts = "sysfs /sys sysfs rw,relatime 0 0\n\
                      tracefs /mnt/elsewhere tracefs rw,relatime 0 0\n\
                      none /sys/kernel/tracing tmpfs rw 0 0\n\
                      tracefs /sys/kernel/debug/tracing tracefs rw,relatime 0 0\n";
        assert_eq!(
            listed_mount_point(mounts),
            Some(PathBuf::from("/sys/kernel/debug/tracing"))
        );
        assert_eq!(listed_mount_point("proc /proc proc rw 0 0\n"), None);
        assert_eq!(listed_mount_point(""), None);
    }

    /// A fresh directory under the temporary directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir()
                .join(format!("observer-tracefs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_directory_that_appears_while_waiting_is_seen() {
        let scratch = Scratch::new("appears");
        let events = scratch.0.join("events");
        assert!(wait_for_dir(&scratch.0, Duration::ZERO).is_ok());
        let maker = {
            let events = events.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::create_dir(&events).unwrap();
            })
        };
        let started = Instant::now();
        wait_for_dir(&events, Duration::from_secs(5)).expect("seen once created");
        assert!(started.elapsed() < Duration::from_secs(5));
        maker.join().unwrap();
    }

    #[test]
    fn a_directory_that_never_appears_times_out_with_the_last_answer() {
        let scratch = Scratch::new("never");
        let started = Instant::now();
        match wait_for_dir(&scratch.0.join("events"), Duration::from_millis(60)) {
            Err(Unseen::TimedOut(Some(err))) => assert_eq!(err.kind(), io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(60));
        // No time to wait: one look, at once.
        let started = Instant::now();
        assert!(matches!(
            wait_for_dir(&scratch.0.join("events"), Duration::ZERO),
            Err(Unseen::TimedOut(Some(_)))
        ));
        assert!(started.elapsed() < Duration::from_millis(50));
        let file = scratch.0.join("file");
        std::fs::write(&file, b"").unwrap();
        let unseen = wait_for_dir(&file, Duration::ZERO);
        assert!(matches!(unseen, Err(Unseen::TimedOut(None))), "{unseen:?}");
        assert_eq!(describe(None), "it is not a directory");
    }

    #[test]
    fn only_a_user_other_than_root_is_told_to_become_root() {
        let path = Path::new("/sys/kernel/tracing");
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            unreadable(path, &denied, 1000).to_string(),
            "tracefs is mounted at /sys/kernel/tracing but not readable by this user (needs root)"
        );
        let as_root = unreadable(path, &denied, 0).to_string();
        assert!(!as_root.contains("needs root"), "{as_root}");
        assert!(
            as_root.contains("although this process runs as root (Permission denied"),
            "{as_root}"
        );
    }
}
