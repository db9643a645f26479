//! The real daemon and simulator as child processes, for end-to-end tests, with testkit's
//! launchers: `observer run` (waited for until `/readyz` says 200, stopped with SIGTERM and
//! required to exit 0), `observer sim` on a free port, scrapes read strictly for exact
//! comparisons, and real-time priority for the processes whose timing a test compares.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use testkit::metrics::Scrape;
use testkit::observer::{self, Run};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");
/// How long a daemon or a proxy may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// `observer run` watching the given ports.
pub struct Daemon(Run);

impl Deref for Daemon {
    type Target = Run;

    fn deref(&self) -> &Run {
        &self.0
    }
}

impl Daemon {
    pub fn start(watch: &[(u16, &str)]) -> Daemon {
        Daemon::start_with(watch, &[])
    }

    /// `observer run` with more flags.
    pub fn start_with(watch: &[(u16, &str)], flags: &[&str]) -> Daemon {
        let run = Run::start_within(Path::new(OBSERVER), watch, flags, READY_WITHIN);
        Daemon(run.unwrap_or_else(|err| panic!("{err:#}")))
    }

    /// `(status, body)` of a GET on the admin server; status 0 when it does not answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    pub fn scrape(&self) -> Samples {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Samples::parse(&body)
    }

    /// Stops the daemon with SIGTERM and requires a clean exit (status 0 within 10 s).
    pub fn stop(self) {
        self.0.stop().unwrap_or_else(|err| panic!("{err:#}"));
    }
}

/// Waits until the admin server at `admin` answers `/readyz` with 200, failing with the
/// process's log (`log`, its stderr file) if it exits first or takes over 30 s.
pub fn wait_ready(child: &mut Child, admin: SocketAddr, what: &str, log: &Path) {
    observer::wait_ready(child, admin, what, log, READY_WITHIN)
        .unwrap_or_else(|err| panic!("{err:#}"));
}

/// `(status, body)` of a GET; status 0 when nothing answers whole.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    testkit::http::get(addr, path).unwrap_or((0, String::new()))
}

/// `observer sim` replying in milliseconds: tiny delays, four tokens, seeded ids.
pub const FAST_SIM: &[&str] = &[
    "--load-ms",
    "5",
    "--first-token-ms",
    "5",
    "--token-ms",
    "1",
    "--tokens",
    "4",
    "--seed",
    "7",
];
/// `observer sim` in its own process on a free port.
pub struct Sim(observer::Sim);

impl Deref for Sim {
    type Target = observer::Sim;

    fn deref(&self) -> &observer::Sim {
        &self.0
    }
}

/// The simulators' parallel slots where a test does not set them.
pub const PARALLEL: u32 = 64;

impl Sim {
    pub fn start(flags: &[&str]) -> Sim {
        Sim::start_on("127.0.0.1:0", flags)
    }

    /// `observer sim --listen LISTEN`: a given address, e.g. the port of a simulator that was
    /// killed, to restart it where its clients expect it.
    pub fn start_on(listen: &str, flags: &[&str]) -> Sim {
        Sim::start_in(None, listen, flags)
    }

    /// [`Sim::start_on`] in network namespace `netns` (`None`: the host's), as a container
    /// would run it.
    pub fn start_in(netns: Option<&str>, listen: &str, flags: &[&str]) -> Sim {
        Sim::start_with_env(netns, listen, flags, &[])
    }

    /// [`Sim::start_in`] with environment variables, as an operator sets Ollama's
    /// (`OLLAMA_NUM_PARALLEL`, …). Unless the test sets the parallel slots (flag or variable),
    /// the simulator has [`PARALLEL`] of them: tests that send requests at once mean them to
    /// run at once, where Ollama's default (one) would queue them.
    pub fn start_with_env(
        netns: Option<&str>,
        listen: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Sim {
        let parallel = observer::parallel_unless_set(flags, env, PARALLEL);
        let flags: Vec<&str> = flags
            .iter()
            .copied()
            .chain(parallel.iter().map(String::as_str))
            .collect();
        let sim = observer::Sim::start_in(Path::new(OBSERVER), netns, listen, &flags, env);
        Sim(sim.unwrap_or_else(|err| panic!("{err:#}")))
    }

    /// Sends `signal` to the simulator (SIGUSR1 stalls inference, SIGUSR2 resumes it).
    pub fn signal(&self, signal: i32) {
        self.0.signal(signal).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.0.pid().expect("observer sim runs")
    }

    /// SIGKILL, and waits until the process is gone (its sockets closed by the kernel).
    pub fn kill(mut self) {
        self.0.kill();
    }
}

/// A scrape in the text format: every sample by name and labels, read by the library's
/// parser; a line it cannot read fails the test.
#[derive(Debug, Clone, Default)]
pub struct Samples(Scrape);

impl Samples {
    pub fn parse(text: &str) -> Samples {
        Samples(Scrape::parse_strict(text).unwrap_or_else(|err| panic!("{err}\n{text}")))
    }

    /// The sum of every sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.sum(name, labels)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }

    /// The parsed page.
    pub fn scrape(&self) -> &Scrape {
        &self.0
    }
}

/// How long the threads of `pids` waited, runnable, for a CPU (nanoseconds, schedstat), and
/// the time the hypervisor took the host's CPUs away (steal, in clock ticks): what a timing
/// comparison reports when it fails, to tell the scheduler's latency from the observer's.
pub fn scheduling_delay(pids: &[u32]) -> (u64, u64) {
    let waited = pids
        .iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    let steal = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let cpu = stat.lines().next()?.to_owned();
            cpu.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0);
    (waited, steal)
}

/// Puts every thread of `pid` in `SCHED_FIFO` at `priority` (1 is the lowest real-time one) on
/// CPU 0 only, so that on a machine busy with other tests it runs as soon as it is woken, and
/// is woken on the CPU of whoever woke it: a timing test then compares the observer with the
/// client, not with the scheduler's latency. On a virtual machine a wake-up sent to another
/// CPU waits for that virtual CPU to run again, milliseconds where the host steals time, and
/// the bytes then wait in the socket, unseen by any system call. Returns whether it worked for
/// every thread (it needs `CAP_SYS_NICE`; callers go on without it).
pub fn realtime(pid: u32, priority: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    tasks.flatten().all(|task| {
        let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
        let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(0, &mut cpus) };
        // SAFETY: both calls read what they are given, which outlives them.
        unsafe {
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &cpus) == 0
                && libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) == 0
        }
    })
}
