//! Process resources of the watched listeners' owners (docs/DESIGN.md#gpu-and-process-resources):
//! which processes they are (the holders of a listening socket on a watched port, plus their
//! descendants, such as Ollama's model runner under `ollama serve`) and what `/proc` says they use:
//! CPU seconds, resident memory, open fds, threads.
//!
//! Owns discovery ([`discover`], [`Targets`]), the parsing of `/proc/<pid>/stat` and `statm`,
//! and the `target_process_*` families ([`TargetProcesses`]). Blocking and read-only: it never
//! signals or traces a process, and a process that vanishes mid-scan is skipped, not an error.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus::{
    CounterVec, GaugeVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::base::{Role, WatchedPort};
pub mod sockets;

use self::sockets as seed;

/// Most processes watched at once; past it, descendants with the highest pids are left out.
pub const MAX_TARGETS: usize = 64;

const LABELS: [&str; 3] = ["role", "pid", "comm"];

/// A process whose resources are exported, and the role of the listener it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
}

/// The result of one discovery: listener owners first, then their descendants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets(pub Vec<Target>);

impl Targets {
    /// The role a process is labelled with (e.g. Ollama's runner pid → upstream), for the GPU
    /// collector's per-process memory.
    pub fn role_of(&self, pid: u32) -> Option<Role> {
        self.0.iter().find(|t| t.pid == pid).map(|t| t.role)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Target> {
        self.0.iter()
    }
}

/// What `/proc/<pid>/stat` says that is of use here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
}

/// One target's resources at one refresh.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessReading {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

/// `pid (comm) state ppid …`: the comm may hold spaces and `)`, so the fields start after the
/// last `)`. Field n (1-based, as in proc(5)) is `rest[n - 3]`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        comm,
        ppid: u32::try_from(field(4)?).ok()?,
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)?,
    })
}

/// `size resident shared text lib data dt`, in pages: the resident page count.
pub fn parse_statm_resident(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The processes holding a listener on a watched port, then their descendants (found through
/// the ppid of every process), each with the role of its listener's port. A pid holding
/// listeners of two roles keeps the role of the first in `watch` order; a descendant takes its
/// parent's. At most [`MAX_TARGETS`], owners first, each group in pid order. The observer's
/// own process is never a target, and init's children are not descendants: when pid 1 holds a
/// socket-activated listener, every orphan on the host would otherwise become one.
pub fn discover(proc_root: &Path, watch: &[WatchedPort]) -> std::io::Result<Vec<Target>> {
    let me = std::process::id();
    let ports: Vec<u16> = watch.iter().map(|w| w.port).collect();
    let listeners = seed::listeners(proc_root, &ports)?;
    let mut owners: BTreeMap<u32, Target> = BTreeMap::new();
    for watched in watch {
        for listener in listeners.iter().filter(|l| l.addr.port() == watched.port) {
            for holder in listener.holders.iter().filter(|h| h.pid != me) {
                owners.entry(holder.pid).or_insert_with(|| Target {
                    pid: holder.pid,
                    comm: holder.comm.clone(),
                    role: watched.role,
                });
            }
        }
    }
    let mut targets: Vec<Target> = owners.values().cloned().collect();
    if !owners.is_empty() {
        let mut children: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
        for (pid, stat) in all_stats(proc_root)? {
            children
                .entry(stat.ppid)
                .or_default()
                .push((pid, stat.comm));
        }
        let mut descendants: BTreeMap<u32, Target> = BTreeMap::new();
        let mut parents: Vec<Target> = targets.iter().filter(|t| t.pid != 1).cloned().collect();
        while let Some(parent) = parents.pop() {
            for (pid, comm) in children.remove(&parent.pid).unwrap_or_default() {
                if pid == me || owners.contains_key(&pid) {
                    continue;
                }
                let child = Target {
                    pid,
                    comm,
                    role: parent.role,
                };
                descendants.insert(pid, child.clone());
                parents.push(child);
            }
        }
        targets.extend(descendants.into_values());
    }
    if targets.len() > MAX_TARGETS {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                found = targets.len(),
                kept = MAX_TARGETS,
                "too many processes own or descend from the watched listeners: exporting the first {MAX_TARGETS}"
            );
        }
        targets.truncate(MAX_TARGETS);
    }
    Ok(targets)
}

/// Every process's stat; those gone or unreadable meanwhile are left out.
fn all_stats(proc_root: &Path) -> std::io::Result<Vec<(u32, ProcStat)>> {
    let mut stats = Vec::new();
    for entry in fs::read_dir(proc_root)?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some(stat) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|text| parse_stat(&text))
        {
            stats.push((pid, stat));
        }
    }
    Ok(stats)
}

/// The resources of each target; a process whose files cannot be read (gone, or not ours to
/// read) is left out rather than reported with made-up zeros.
pub fn read_resources(proc_root: &Path, targets: &Targets) -> Vec<ProcessReading> {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (ticks, page) = (ticks.max(1) as f64, page.max(1) as u64);
    targets
        .iter()
        .filter_map(|target| {
            let dir = proc_root.join(target.pid.to_string());
            let stat = parse_stat(&fs::read_to_string(dir.join("stat")).ok()?)?;
            let resident = parse_statm_resident(&fs::read_to_string(dir.join("statm")).ok()?)?;
            let open_fds = fs::read_dir(dir.join("fd")).ok()?.count() as u64;
            Some(ProcessReading {
                pid: target.pid,
                comm: target.comm.clone(),
                role: target.role,
                cpu_seconds: stat.cpu_ticks as f64 / ticks,
                resident_bytes: resident * page,
                open_fds,
                threads: stat.threads,
            })
        })
        .collect()
}

/// The `target_process_*` families, rendered from the latest refresh: a process that exited
/// is gone from the scrape after the next one. Clones share everything, like prometheus's own
/// metric handles: register one, refresh through another.
#[derive(Debug, Clone)]
pub struct TargetProcesses {
    cpu_seconds: CounterVec,
    resident_bytes: GaugeVec,
    open_fds: GaugeVec,
    threads: GaugeVec,
    /// Held while the families are rewritten or collected, so a scrape never sees half of a
    /// refresh; holds the discovery the families were written from.
    snapshot: Arc<Mutex<Snapshot>>,
    /// Whether the last refresh failed, so a lasting failure is logged once.
    failing: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Snapshot {
    targets: Targets,
    readings: Vec<ProcessReading>,
}

impl TargetProcesses {
    pub fn new(prefix: &str) -> anyhow::Result<TargetProcesses> {
        let opts = |name: &str, what: &str| {
            let help =
                format!("{what} of a process owning a watched listener, or descending from one.");
            Opts::new(name, help).namespace(prefix)
        };
        Ok(TargetProcesses {
            cpu_seconds: CounterVec::new(
                opts(
                    "target_process_cpu_seconds_total",
                    "User plus system CPU seconds",
                ),
                &LABELS,
            )?,
            resident_bytes: GaugeVec::new(
                opts(
                    "target_process_resident_memory_bytes",
                    "Resident memory in bytes",
                ),
                &LABELS,
            )?,
            open_fds: GaugeVec::new(
                opts("target_process_open_fds", "Open file descriptors"),
                &LABELS,
            )?,
            threads: GaugeVec::new(opts("target_process_threads", "Threads"), &LABELS)?,
            snapshot: Arc::default(),
            failing: Arc::default(),
        })
    }

    /// Discovers the targets under `proc_root` and reads their resources. Blocking I/O.
    pub fn refresh(&self, proc_root: &Path, watch: &[WatchedPort]) {
        let targets = match discover(proc_root, watch) {
            Ok(targets) => {
                self.failing.store(false, Ordering::Relaxed);
                Targets(targets)
            }
            Err(err) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("finding the watched listeners' processes: {err}");
                }
                Targets::default()
            }
        };
        let readings = read_resources(proc_root, &targets);
        self.store(targets, readings);
    }

    /// Replaces the exported readings with `readings`, and the targets with their processes.
    pub fn update(&self, readings: Vec<ProcessReading>) {
        let targets = Targets(
            readings
                .iter()
                .map(|r| Target {
                    pid: r.pid,
                    comm: r.comm.clone(),
                    role: r.role,
                })
                .collect(),
        );
        self.store(targets, readings);
    }

    /// The processes found by the last refresh.
    pub fn targets(&self) -> Targets {
        self.lock().targets.clone()
    }

    /// The readings of the last refresh.
    pub fn readings(&self) -> Vec<ProcessReading> {
        self.lock().readings.clone()
    }

    fn store(&self, targets: Targets, readings: Vec<ProcessReading>) {
        let mut snapshot = self.lock();
        self.cpu_seconds.reset();
        for family in [&self.resident_bytes, &self.open_fds, &self.threads] {
            family.reset();
        }
        for r in &readings {
            let pid = r.pid.to_string();
            let labels = [r.role.as_str(), pid.as_str(), r.comm.as_str()];
            self.cpu_seconds
                .with_label_values(&labels)
                .inc_by(r.cpu_seconds.max(0.0));
            let gauges = [
                (&self.resident_bytes, r.resident_bytes),
                (&self.open_fds, r.open_fds),
                (&self.threads, r.threads),
            ];
            for (family, value) in gauges {
                family.with_label_values(&labels).set(value as f64);
            }
        }
        *snapshot = Snapshot { targets, readings };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        // The families are rewritten whole under the lock; a panic mid-way leaves nothing worse
        // than one odd scrape.
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for TargetProcesses {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.cpu_seconds.desc();
        for family in [&self.resident_bytes, &self.open_fds, &self.threads] {
            descs.extend(family.desc());
        }
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _snapshot = self.lock();
        let mut families = self.cpu_seconds.collect();
        for family in [&self.resident_bytes, &self.open_fds, &self.threads] {
            families.extend(family.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const GATEWAY: WatchedPort = WatchedPort {
        port: 18789,
        role: Role::Gateway,
    };
    const UPSTREAM: WatchedPort = WatchedPort {
        port: 11434,
        role: Role::Upstream,
    };

    /// A `/proc` made of plain files under a temporary directory.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> FakeProc {
            let root =
                std::env::temp_dir().join(format!("observer-procfs-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("net")).unwrap();
            fs::write(
                root.join("net/tcp"),
                "  sl  local_address rem_address   st\n",
            )
            .unwrap();
            FakeProc(root)
        }

        fn listen(&self, port: u16, inode: u64) {
            let line = format!(
                "   0: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
            );
            let mut text = fs::read_to_string(self.0.join("net/tcp")).unwrap();
            text.push_str(&line);
            fs::write(self.0.join("net/tcp"), text).unwrap();
        }

        /// A process with stdin/out/err, `sockets` from fd 3 on, 150+50 ticks of CPU, 250
        /// resident pages and `pid % 10 + 1` threads.
        fn process(&self, pid: u32, ppid: u32, comm: &str, sockets: &[u64]) {
            let dir = self.0.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            let links = ["/dev/null"; 3].map(String::from).into_iter();
            let links = links.chain(sockets.iter().map(|i| format!("socket:[{i}]")));
            for (fd, link) in links.enumerate() {
                std::os::unix::fs::symlink(link, dir.join(format!("fd/{fd}"))).unwrap();
            }
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            let threads = pid % 10 + 1;
            fs::write(dir.join("stat"), format!("{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 {threads} 0 12345 10000000 250 18446744073709551615 1 1 0 0 0\n")).unwrap();
            fs::write(dir.join("statm"), "2500 250 100 10 0 300 0\n").unwrap();
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn pids_and_roles(targets: &[Target]) -> Vec<(u32, &str, Role)> {
        targets
            .iter()
            .map(|t| (t.pid, t.comm.as_str(), t.role))
            .collect()
    }

    #[test]
    fn stat_fields_come_after_the_last_parenthesis() {
        let line = "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 7 0 12345 10000000 250 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.comm, "a) b");
        assert_eq!((stat.ppid, stat.cpu_ticks, stat.threads), (1, 200, 7));
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("1 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat("1 x S 1 1 1 0 -1 0 0 0 0 0 1 1 0 0 20 0 1"),
            None
        );
        assert_eq!(parse_statm_resident("2500 250 100 10 0 300 0\n"), Some(250));
        assert_eq!(parse_statm_resident("2500"), None);
    }

    #[test]
    fn discovery_finds_owners_then_descendants_with_their_roles() {
        let proc = FakeProc::new("discover");
        let me = std::process::id();
        proc.listen(GATEWAY.port, 11);
        proc.listen(UPSTREAM.port, 22);
        proc.listen(8080, 33);
        proc.process(1, 0, "systemd", &[22]);
        proc.process(100, 1, "nginx", &[11]);
        proc.process(101, 100, "nginx", &[11]);
        proc.process(102, 100, "nginx", &[11]);
        proc.process(401, 101, "helper", &[]);
        proc.process(200, 1, "ollama", &[22]);
        proc.process(201, 200, "ollama", &[]);
        proc.process(202, 201, "runner (x)", &[]);
        proc.process(300, 1, "both", &[22, 11]);
        proc.process(400, 1, "bash", &[33]);
        proc.process(me, 1, "observer", &[22]);
        proc.process(500, me, "probe", &[]);
        // Vanished between listing and reading.
        fs::create_dir_all(proc.0.join("700")).unwrap();
        let targets = discover(&proc.0, &[GATEWAY, UPSTREAM]).unwrap();
        use Role::{Gateway as G, Upstream as U};
        assert_eq!(
            pids_and_roles(&targets),
            [
                (1, "systemd", U),
                (100, "nginx", G),
                (101, "nginx", G),
                (102, "nginx", G),
                (200, "ollama", U),
                (300, "both", G),
                (201, "ollama", U),
                (202, "runner (x)", U),
                (401, "helper", G),
            ]
        );
        let targets = Targets(targets);
        assert_eq!(targets.role_of(202), Some(U));
        assert_eq!(targets.role_of(me), None);
        assert!(discover(&proc.0, &[]).unwrap().is_empty());
    }

    #[test]
    fn discovery_keeps_owners_first_up_to_the_cap() {
        let proc = FakeProc::new("cap");
        proc.listen(UPSTREAM.port, 22);
        proc.process(5000, 1, "ollama", &[22]);
        for pid in 10..100 {
            proc.process(pid, 5000, "runner", &[]);
        }
        let targets = discover(&proc.0, &[UPSTREAM]).unwrap();
        let pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
        let expected: Vec<u32> = [5000].into_iter().chain(10..10 + 63).collect();
        assert_eq!(pids, expected);
    }

    #[test]
    fn resources_come_from_stat_statm_and_fd() {
        let proc = FakeProc::new("read");
        proc.process(101, 100, "nginx", &[11, 12]);
        let targets = Targets(
            [101, 102]
                .map(|pid| Target {
                    pid,
                    comm: "nginx".into(),
                    role: Role::Gateway,
                })
                .to_vec(),
        );
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        assert_eq!(
            read_resources(&proc.0, &targets),
            [ProcessReading {
                pid: 101,
                comm: "nginx".into(),
                role: Role::Gateway,
                cpu_seconds: 200.0 / ticks as f64,
                resident_bytes: 250 * page as u64,
                open_fds: 5,
                threads: 2,
            }]
        );
    }

    fn reading(pid: u32, role: Role, comm: &str) -> ProcessReading {
        ProcessReading {
            pid,
            comm: comm.into(),
            role,
            cpu_seconds: 1.5,
            resident_bytes: 4 << 20,
            open_fds: 12,
            threads: 3,
        }
    }

    fn exposition(registry: &prometheus::Registry) -> Vec<String> {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

    #[test]
    fn readings_become_samples_and_leave_with_their_process() {
        let collector = TargetProcesses::new("observer").unwrap();
        assert_eq!(collector.desc().len(), 4);
        let registry = prometheus::Registry::new();
        registry.register(Box::new(collector.clone())).unwrap();
        assert!(exposition(&registry).is_empty());
        collector.update(vec![
            reading(100, Role::Gateway, "nginx"),
            reading(201, Role::Upstream, "ollama"),
        ]);
        let mut expected = Vec::new();
        for (family, value) in [
            ("observer_target_process_cpu_seconds_total", "1.5"),
            ("observer_target_process_open_fds", "12"),
            ("observer_target_process_resident_memory_bytes", "4194304"),
            ("observer_target_process_threads", "3"),
        ] {
            for labels in [
                r#"comm="nginx",pid="100",role="gateway""#,
                r#"comm="ollama",pid="201",role="upstream""#,
            ] {
                expected.push(format!("{family}{{{labels}}} {value}"));
            }
        }
        let mut got = exposition(&registry);
        got.sort();
        assert_eq!(got, expected);
        assert_eq!(collector.targets().role_of(201), Some(Role::Upstream));
        collector.update(vec![reading(100, Role::Gateway, "nginx")]);
        let got = exposition(&registry);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().all(|l| l.contains("pid=\"100\"")), "{got:?}");
        assert_eq!(collector.targets().role_of(201), None);
        collector.update(Vec::new());
        assert!(exposition(&registry).is_empty());
    }
}
