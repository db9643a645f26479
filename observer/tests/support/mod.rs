//! Helpers shared by the black-box tests.
#![allow(dead_code)]

/// The runtime guard of a root-only test, which is marked
/// `#[cfg_attr(not(root), ignore = "needs root")]` (see `observer/build.rs`): a build as root
/// (or in CI) runs it, and running it without root anyway (built as root and run as another
/// user, or `--ignored`) fails here, saying why, instead of passing untested.
pub fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (it loads eBPF programs or changes the host) and runs as uid \
         {euid}: run it as root, or build as this user to have it reported ignored"
    );
}

/// Polls `ready` every 10 ms until it returns `Some`, for at most `within`: the bound only
/// ends a wait that failed (a test that passes never waits it out). `None` when time ran out.
pub fn wait_until<T>(
    within: std::time::Duration,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(found) = ready() {
            return Some(found);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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
