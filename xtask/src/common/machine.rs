//! What the machine says about itself and the processes: memory and sockets from `/proc`,
//! CPU time (to tell whether something else ran during a round), and the open-files limit.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Lifts the soft limit on open files to the hard one: 1,000 client sockets here, and twice
/// that in the proxies, which inherit it.
pub fn raise_fd_limit() -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the call to fill and then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One `key: N kB` line of `/proc/<pid>/<file>`.
pub fn proc_kib(pid: u32, file: &str, key: &str) -> anyhow::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/{file}"))
}

/// Open sockets of a process: listeners, clients and upstream connections.
pub fn sockets(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Seconds of CPU the machine spent busy: user, nice, system, irq and softirq from
/// `/proc/stat` (without IRQ time accounting, a tick in interrupt context is charged to the
/// interrupted process too, so irq and softirq belong here).
fn machine_busy() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum::<f64>()
        / clock_ticks()
}

/// Seconds of CPU a live process used (utime + stime); 0 when it is gone.
pub fn process_busy(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which may hold spaces, start at field 3 (state).
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    (field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0)) / clock_ticks()
}

/// Seconds of CPU used by this process's reaped children (each finished `wrk`).
/// User and system time of this process's reaped children, in seconds.
pub fn children_busy() -> f64 {
    // SAFETY: `usage` is a valid rusage for the call to fill.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Measures, over a stretch of time, how much CPU went to processes other than the bench's
/// own: the servers (`pids`) and `wrk` (a child reaped within the stretch).
pub struct CpuClock {
    pids: Vec<u32>,
    started: Instant,
    machine: f64,
    ours: f64,
}

impl CpuClock {
    pub fn start(pids: &[u32]) -> CpuClock {
        let mut clock = CpuClock {
            pids: pids.to_vec(),
            started: Instant::now(),
            machine: 0.0,
            ours: 0.0,
        };
        (clock.machine, clock.ours) = clock.read();
        clock
    }

    fn read(&self) -> (f64, f64) {
        let ours = self.pids.iter().map(|&p| process_busy(p)).sum::<f64>() + children_busy();
        (machine_busy(), ours)
    }

    /// Cores' worth of CPU that others used since the start (0.5: half a core on average).
    pub fn others_cores(&self) -> f64 {
        let (machine, ours) = self.read();
        let others = (machine - self.machine) - (ours - self.ours);
        others.max(0.0) / self.started.elapsed().as_secs_f64()
    }
}

/// Waits, up to two minutes, until the machine is nearly idle (under a tenth of a core busy
/// over a second, the bench's servers idle too): other builds and tests on a shared machine
/// would otherwise land in one contender's rounds. Returns the last reading, in cores.
pub fn wait_for_quiet() -> f64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut said = false;
    loop {
        let clock = CpuClock::start(&[]);
        std::thread::sleep(Duration::from_secs(1));
        let busy = clock.others_cores();
        if busy < 0.1 || Instant::now() > deadline {
            return busy;
        }
        if !said {
            println!("waiting for the machine to quiet down ({busy:.2} cores busy)");
            said = true;
        }
    }
}
