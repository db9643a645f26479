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
pub mod daemon;
pub mod deploy;
pub mod faults;
pub mod netns;
pub mod nginx;
pub mod proxy;
pub mod sim_client;
// Not every test binary drives sockets by hand.
#[allow(unused_imports)]
pub use testkit::socket_io;

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use observer::base::clock::monotonic_ns;
