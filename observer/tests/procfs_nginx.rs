//! Process resources from the real `/proc` (root): a real nginx (master and two workers) on a
//! port watched as the gateway, and `observer sim` with a child process on a port watched as the
//! upstream, are found with their roles and plausible readings, and are gone after they exit.

mod support;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use observer::base::{Role, WatchedPort};
use observer::procfs::{ProcessReading, TargetProcesses};
use support::nginx::Nginx;

const PROC: &str = "/proc";

fn refreshed(collector: &TargetProcesses, watch: &[WatchedPort]) -> Vec<ProcessReading> {
    collector.refresh(Path::new(PROC), watch);
    collector.readings()
}

fn pids(readings: &[ProcessReading]) -> Vec<u32> {
    let mut pids: Vec<u32> = readings.iter().map(|r| r.pid).collect();
    pids.sort();
    pids
}

/// Field `n` (1-based, as proc(5) numbers them, `n` > 2) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(')').unwrap().1;
    after_comm
        .split_whitespace()
        .nth(n - 3)
        .unwrap()
        .parse()
        .unwrap()
}

/// `/proc/<pid>/stat`'s ppid (field 4).
fn ppid(pid: u32) -> u32 {
    stat_field(pid, 4) as u32
}

/// utime + stime (fields 14 and 15) of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (stat_field(pid, 14) + stat_field(pid, 15)) as f64 / ticks_per_second
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn nginx_master_and_workers_are_gateway_targets_until_they_exit() {
    support::assert_root();
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nginx = Nginx::start(upstream.local_addr().unwrap());
    let (master, workers) = (nginx.master_pid(), nginx.worker_pids());
    assert_eq!(workers.len(), support::nginx::WORKERS);
    assert!(workers.iter().all(|&w| ppid(w) == master), "{workers:?}");
    let watch = [WatchedPort {
        port: nginx.port,
        role: Role::Gateway,
    }];
    let collector = TargetProcesses::new("observer").unwrap();
    let mut expected = [vec![master], workers.clone()].concat();
    expected.sort();
    // Each process's CPU time read here just before and just after the refresh brackets the
    // one the refresh read.
    let cpu_before: Vec<f64> = expected.iter().map(|&pid| cpu_seconds(pid)).collect();
    let readings = refreshed(&collector, &watch);
    let cpu_after: Vec<f64> = expected.iter().map(|&pid| cpu_seconds(pid)).collect();
    assert_eq!(pids(&readings), expected, "{readings:?}");
    for r in &readings {
        assert_eq!((r.comm.as_str(), r.role), ("nginx", Role::Gateway), "{r:?}");
        let i = expected.iter().position(|&pid| pid == r.pid).unwrap();
        assert!(
            (cpu_before[i]..=cpu_after[i]).contains(&r.cpu_seconds),
            "{r:?}: CPU {} s before the refresh, {} s after",
            cpu_before[i],
            cpu_after[i]
        );
        assert!((1 << 20..1 << 30).contains(&r.resident_bytes), "{r:?}");
        assert!(r.open_fds >= 3 && r.threads >= 1, "{r:?}");
    }
    let targets = collector.targets();
    assert!(
        expected
            .iter()
            .all(|&pid| targets.role_of(pid) == Some(Role::Gateway))
    );

    drop(nginx);
    let readings = refreshed(&collector, &watch);
    assert!(
        readings.iter().all(|r| !expected.contains(&r.pid)),
        "{readings:?}"
    );
    assert!(
        expected
            .iter()
            .all(|&pid| collector.targets().role_of(pid).is_none())
    );
}

/// `observer sim` on a free port, with a `sleep` child as a stand-in for Ollama's runner.
struct SimWithChild {
    sim: Child,
    port: u16,
}

impl SimWithChild {
    fn start() -> SimWithChild {
        let script = format!(
            "sleep 60 </dev/null >/dev/null 2>&1 & exec {} sim --listen 127.0.0.1:0",
            env!("CARGO_BIN_EXE_observer")
        );
        let mut sim = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(sim.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: std::net::SocketAddr = line
            .trim()
            .strip_prefix("observer sim listening on ")
            .expect(&line)
            .parse()
            .unwrap();
        SimWithChild {
            sim,
            port: addr.port(),
        }
    }

    fn children(&self) -> Vec<u32> {
        let pid = self.sim.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    /// Kills the child, then the simulator, and waits until both are gone.
    fn stop(mut self) {
        for child in self.children() {
            // SAFETY: kill(2) on a process this test started (the simulator's `sleep`).
            unsafe { libc::kill(child as i32, libc::SIGKILL) };
        }
        let _ = self.sim.kill();
        let _ = self.sim.wait();
    }
}

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn an_upstream_listener_and_its_child_are_upstream_targets_until_they_exit() {
    support::assert_root();
    let sim = SimWithChild::start();
    let sim_pid = sim.sim.id();
    let children = sim.children();
    assert_eq!(children.len(), 1, "{children:?}");
    let watch = [WatchedPort {
        port: sim.port,
        role: Role::Upstream,
    }];
    let collector = TargetProcesses::new("").unwrap();
    let readings = refreshed(&collector, &watch);
    let found: Vec<(u32, &str, Role)> = readings
        .iter()
        .map(|r| (r.pid, r.comm.as_str(), r.role))
        .collect();
    assert_eq!(
        found,
        [
            (sim_pid, "observer", Role::Upstream),
            (children[0], "sleep", Role::Upstream)
        ]
    );
    assert_eq!(
        collector.targets().role_of(children[0]),
        Some(Role::Upstream)
    );

    sim.stop();
    // The listener's inode can linger a moment after SIGKILL while the kernel tears it down.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let readings = refreshed(&collector, &watch);
        if readings.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{readings:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(collector.targets().0.is_empty());
}
