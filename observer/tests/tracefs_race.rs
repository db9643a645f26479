//! As root: captures that start at the same moment on a host where tracefs is not mounted yet
//! all get it. Eight threads call `tracefs::ensure_mounted` together (a barrier releases them),
//! round after round, with tracefs unmounted before each round: one of them mounts it, and
//! every other one must use that mount, whether it looks before, during or after it, rather
//! than fail with "not readable (needs root)" while running as root.
//!
//! Unmounting tracefs on the host would pull it from under whatever else uses it (another
//! test binary attaching its programs, a daemon), so the rounds run in a child process of this
//! binary in a mount namespace of its own, private, where unmounting and mounting touch nothing
//! outside it. The host's tracefs is left mounted at the end, as the other tests expect.

mod support;

use std::{
    ffi::CStr,
    io,
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
    sync::{Arc, Barrier},
    time::Duration,
};

use observer::capture::tracefs::{self, Tracefs};

/// Set (to the parent's mount namespace) in the child's environment: the rounds run only there.
const CHILD_ENV: &str = "OBSERVER_TRACEFS_RACE_PARENT_NS";
/// The test the child runs.
const CHILD_TEST: &str = "rounds_of_simultaneous_starts_in_a_private_mount_namespace";
const THREADS: usize = 8;
const ROUNDS: usize = 20;
/// Where the capture mounts tracefs, and where every thread must find it.
const TRACEFS: &str = "/sys/kernel/tracing";

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn simultaneous_starts_all_find_or_mount_tracefs() {
    support::assert_root();
    let mut child = Command::new(std::env::current_exe().expect("the test binary's path"));
    child
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, mount_namespace());
    // SAFETY: the closure runs between fork and exec and makes only two system calls (no
    // allocation, no lock): async-signal-safe, as pre_exec requires.
    unsafe {
        child.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // `/` is usually a shared mount (systemd makes it so): without this, the child's
            // unmounts would propagate back to the host's namespace.
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = child
        .output()
        .expect("running the rounds in a new mount namespace (needs CAP_SYS_ADMIN)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the rounds failed:\n{said}");
    eprint!("{said}");
    // A child that passed without its rounds (it did not see a namespace of its own) is no pass.
    assert!(
        said.contains(&format!("round {ROUNDS}: {THREADS} starts succeeded")),
        "the rounds did not run:\n{said}"
    );

    // The host keeps (or gets) a mounted tracefs, which the other kernel tests look for.
    let host = tracefs::ensure_mounted().expect("tracefs on the host");
    assert!(host.path.join("events").is_dir(), "{host:?}");
}

#[test]
#[ignore = "run by simultaneous_starts_all_find_or_mount_tracefs in a mount namespace of its own"]
fn rounds_of_simultaneous_starts_in_a_private_mount_namespace() {
    // Run directly (`--ignored`), this would unmount the host's tracefs: only the parent's
    // child, in a namespace other than the parent's, may go on.
    match std::env::var(CHILD_ENV) {
        Ok(parent) if parent != mount_namespace() => {}
        _ => {
            eprintln!("{CHILD_TEST}: runs only as the child of the test above; nothing done");
            return;
        }
    }
    for round in 1..=ROUNDS {
        unmount_tracefs();
        assert_eq!(
            tracefs::find(),
            None,
            "round {round}: tracefs still visible"
        );
        let barrier = Arc::new(Barrier::new(THREADS));
        let starts: Vec<_> = (0..THREADS)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    tracefs::ensure_mounted().map_err(|err| format!("{err:#}"))
                })
            })
            .collect();
        let results: Vec<Result<Tracefs, String>> = starts
            .into_iter()
            .map(|start| start.join().expect("a start panicked"))
            .collect();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} of {THREADS} starts failed: {failed:#?}",
            failed.len()
        );
        let found: Vec<&Tracefs> = results.iter().flatten().collect();
        assert!(
            found.iter().all(|t| t.path == Path::new(TRACEFS)),
            "round {round}: {found:?}"
        );
        // Nobody else mounts anything in this namespace: one of the starts did.
        assert!(
            found.iter().any(|t| t.mounted_now),
            "round {round}: no start says it mounted tracefs: {found:?}"
        );
        assert!(
            tracefs::tracepoint_exists(&found[0].path, "syscalls", "sys_enter_close"),
            "round {round}: the mounted tracefs has no tracepoints"
        );
        eprintln!(
            "round {round}: {THREADS} starts succeeded, {} of them mounted tracefs",
            found.iter().filter(|t| t.mounted_now).count()
        );
    }
}

/// This process's mount namespace, as `mnt:[4026531841]`.
fn mount_namespace() -> String {
    std::fs::read_link("/proc/self/ns/mnt")
        .expect("reading /proc/self/ns/mnt")
        .to_string_lossy()
        .into_owned()
}

/// Unmounts every tracefs where the capture could find one, and debugfs, which mounts one at
/// `/sys/kernel/debug/tracing` when looked at. Starts may have stacked several mounts on one
/// place (two that both found nothing both mount), so it goes on until none is listed.
fn unmount_tracefs() {
    let mut attempts = 0;
    loop {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("reading the mounts");
        let targets: Vec<String> = mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                let ours =
                    matches!(fstype, "tracefs" | "debugfs") && target.starts_with("/sys/kernel/");
                ours.then(|| target.to_owned())
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        attempts += 1;
        assert!(attempts <= 64, "tracefs keeps coming back: {targets:?}");
        // The last mounts first: those on top, and those below others.
        for target in targets.iter().rev() {
            let path = std::ffi::CString::new(target.as_str()).unwrap();
            umount(&path);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn umount(path: &CStr) {
    // SAFETY: `path` is a valid NUL-terminated string. MNT_DETACH cannot fail with EBUSY, and
    // in this private namespace nothing else uses these mounts.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // Gone already (detached with the mount it was stacked on, or below debugfs).
        if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOENT) {
            panic!("umount {path:?}: {err}");
        }
    }
}
