//! The daemon under measurement: `observer run` (release build) as a child process watching
//! the benchmark's ports, with testkit's launcher (admin server on a free port, ready when
//! `/readyz` says 200, stopped when dropped, on error too), and its counters read from
//! `/metrics` with the library's reader. Used by the overhead, loss, accuracy and soak tasks
//! and the kernel matrix's guest.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use testkit::{ledger::Counts, observer::Run as ObserverRun};

/// Flags for a daemon that only watches traffic: no probe of an upstream model server, no
/// GPU library (the benchmarks' upstream is not Ollama), warnings only in its log.
pub const WATCH_ONLY: [&str; 5] = ["--no-probe", "--gpu", "off", "--log", "warn"];

/// [`settled`]: the pause between two readings, and the most time it waits.
pub const SETTLE_STEP: Duration = Duration::from_millis(250);
pub const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// Builds `observer` with the release profile (`cargo build --release --locked -p observer
/// --bin observer`) and returns `target/release/observer`.
pub fn release_binary(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "observer",
            "--bin",
            "observer",
        ])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building observer (release) failed ({status})");
    }
    Ok(workspace.join("target/release/observer"))
}

/// Its resident memory (`VmRSS`), in KiB.
pub fn rss_kib(run: &ObserverRun) -> anyhow::Result<u64> {
    crate::common::machine::proc_kib(run.pid(), "status", "VmRSS:")
}

/// The daemon's counters now.
pub fn counts(run: &ObserverRun) -> anyhow::Result<Counts> {
    Counts::read(&run.scrape()?)
}

/// A reading once it stops changing: two readings [`SETTLE_STEP`] apart agree (the daemon may
/// still be finishing the last exchanges when the load stops). Gives the last reading after
/// [`SETTLE_WITHIN`] if it never settles.
pub fn settled<T: PartialEq>(mut read: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut last = read()?;
    while started.elapsed() < SETTLE_WITHIN {
        std::thread::sleep(SETTLE_STEP);
        let now = read()?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use testkit::net::free_port;

    use super::*;

    /// The real daemon (root; the release or the debug build of `observer`, whichever is
    /// there: CI builds the debug one before the tests): ready, scraped, stopped cleanly.
    #[test]
    #[cfg_attr(not(root), ignore = "needs root")]
    fn starts_scrapes_and_stops_the_daemon() {
        // SAFETY: geteuid reads the process's effective user id.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "this test needs root (observer run) and runs as uid {euid}: run it as root, or \
             build as this user to have it reported ignored"
        );
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let Some(binary) = ["release", "debug"]
            .into_iter()
            .map(|profile| workspace.join("target").join(profile).join("observer"))
            .find(|binary| binary.exists())
        else {
            eprintln!(
                "skipped: no target/{{release,debug}}/observer; `cargo build -p observer` first"
            );
            return;
        };
        let port = free_port();
        let run = ObserverRun::start(&binary, &[(port, "gateway")], &WATCH_ONLY).unwrap();
        let text = run.metrics_text().unwrap();
        assert!(text.contains("observer_ebpf_events_lost_total{"), "{text}");
        assert_eq!(
            run.scrape()
                .unwrap()
                .sum("observer_http_requests_total", &[("role", "gateway")]),
            0.0
        );
        let rss = rss_kib(&run).unwrap();
        assert!(rss > 1024, "{rss} KiB");
        let pid = run.pid();
        run.stop().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }
}
