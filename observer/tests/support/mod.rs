//! Helpers shared by the black-box tests.
#![allow(dead_code)]

/// Kernel tests need root. On a developer's machine without it they skip with a message; in CI
/// (`CI` set) a missing privilege is a failure, never a silent skip.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: kernel tests must run as root in CI");
    }
    eprintln!("SKIPPED {test}: needs root to load eBPF programs");
    false
}

pub mod capture;
pub mod nginx;
pub mod sim_client;
pub mod socket_io;

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
