//! Kernel capture: load the embedded kernel object, configure it, attach its programs (raw
//! tracepoints on system call exit and process exit, and the TCP state, process creation and
//! exec tracepoints), seed it with what `/proc` shows, and hand out the ring buffer of events.
//!
//! Owns the `aya::Ebpf` instance and therefore the programs' lifetime: dropping a [`Capture`]
//! (or calling [`Capture::detach`]) detaches every program. Configuration lives in [`config`],
//! decoding in [`decode`], the asynchronous ring buffer reader in [`reader`], `/proc` socket
//! discovery in [`seed`].

pub mod btf;
pub mod config;
pub mod decode;
pub mod endpoints;
pub mod feed;
pub mod kernel;
pub mod reader;
pub mod seed;
pub mod syscalls;
pub mod tracefs;

use std::path::Path;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        RawTracePoint, TracePoint, raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
    },
};
use observer_common::{ConnInfo, ListenInfo, SockKey, counter, names};

use crate::base::{ConnRecord, Role, clock::monotonic_ns};
pub use config::{CaptureArgs, CaptureConfig};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OBSERVER_BPF_OBJECT"));

/// The raw tracepoints the kernel object's programs attach to; each program is named after
/// its tracepoint. `sys_exit` sees every system call of every process (its cost for a process
/// that holds no watched socket is one bit test).
pub const RAW_TRACEPOINTS: &[&str] = &["sys_exit", "sched_process_exit"];

/// The (category, name) tracepoints the kernel object's other programs attach to: TCP state
/// changes (a connect or listen on a watched port marks the process), process creation and
/// exec. Rare events, each.
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("sock", "inet_sock_set_state"),
    ("task", "task_newtask"),
    ("sched", "sched_process_exec"),
];

/// One program of the kernel object and the tracepoint it attaches to (each program is named
/// after its tracepoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A raw tracepoint ([`RAW_TRACEPOINTS`]).
    Raw(&'static str),
    /// A tracepoint, `(category, name)` ([`TRACEPOINTS`]).
    Tracepoint(&'static str, &'static str),
}

impl Hook {
    /// The program's name in the object.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Raw(name) | Hook::Tracepoint(_, name) => name,
        }
    }

    /// `raw_tracepoint` or `tracepoint`.
    pub fn kind(self) -> &'static str {
        match self {
            Hook::Raw(_) => "raw_tracepoint",
            Hook::Tracepoint(..) => "tracepoint",
        }
    }

    /// Where it attaches: `sys_exit`, `sock:inet_sock_set_state`.
    pub fn attach_to(self) -> String {
        match self {
            Hook::Raw(name) => name.to_string(),
            Hook::Tracepoint(category, name) => format!("{category}:{name}"),
        }
    }
}

/// Every program of the kernel object, in the order they are attached.
pub fn hooks() -> impl Iterator<Item = Hook> {
    RAW_TRACEPOINTS.iter().map(|&name| Hook::Raw(name)).chain(
        TRACEPOINTS
            .iter()
            .map(|&(category, name)| Hook::Tracepoint(category, name)),
    )
}

/// Every program of the kernel object.
pub fn program_count() -> usize {
    hooks().count()
}

/// Tracepoints the capture needs, as tracefs lists them: the raw ones are the `raw_syscalls`
/// and `sched` events. `observer check` reports each.
pub const REQUIRED_TRACEPOINTS: &[(&str, &str)] = &[
    ("raw_syscalls", "sys_exit"),
    ("sched", "sched_process_exit"),
    ("sock", "inet_sock_set_state"),
    ("task", "task_newtask"),
    ("sched", "sched_process_exec"),
];

/// An attached program's link, of either kind.
enum Link {
    Raw(RawTracePointLinkId),
    Tracepoint(TracePointLinkId),
}

/// Loaded and attached kernel programs.
pub struct Capture {
    ebpf: Ebpf,
    links: Vec<(&'static str, Link)>,
    logger: Option<KernelLogger>,
    seeded: Vec<ConnRecord>,
    /// The watched ports found listening in `/proc` at start, with their roles.
    seeded_listeners: Vec<(u16, Role)>,
    /// `REFS` entries without a key at the last sweep.
    orphan_refs: std::collections::HashSet<u64>,
    /// The loss count of each marked key at the last sweep, with its connection.
    lost_seen: std::collections::HashMap<SockKey, (u64, u32)>,
    /// The processes userspace marked in `SEEDED_MARKS` (seeded from `/proc`), until they exit.
    seeded_tgids: std::collections::BTreeSet<u32>,
}

/// Forwards `aya-log-ebpf` records to this process's `log`/`tracing` output.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Capture {
    /// Loads the embedded object with `config`, attaches every program ([`hooks`]), then seeds the listeners and established connections found in `/proc` (after
    /// attaching, so that nothing opened in between is missed).
    pub fn start(config: &CaptureConfig) -> anyhow::Result<Capture> {
        let mut capture = Capture::load(config)?;
        for hook in hooks() {
            capture.attach_hook(hook)?;
        }
        capture
            .seed(config)
            .context("seeding watched sockets from /proc")?;
        Ok(capture)
    }

    /// Loads the embedded object into the kernel and configures it, attaching nothing.
    pub fn load(config: &CaptureConfig) -> anyhow::Result<Capture> {
        config.validate()?;
        let tracefs = crate::capture::tracefs::ensure_mounted()?;
        raise_memlock_limit();
        let self_tgid = if config.exclude_self {
            std::process::id()
        } else {
            0
        };
        // Past an eighth of the ring, a submit wakes the reader; below, its timer finds them.
        let wakeup_bytes = u64::from(config.ring_bytes / 8);
        let newtask_offset = |field: &str| {
            crate::capture::tracefs::field_offset(&tracefs.path, "task", "task_newtask", field)
                .map(|offset| offset as u32)
                .unwrap_or(0)
        };
        let (newtask_pid, newtask_flags) = (newtask_offset("pid"), newtask_offset("clone_flags"));
        let state_offset = |field: &str| {
            crate::capture::tracefs::field_offset(&tracefs.path, "sock", "inet_sock_set_state", field)
                .map(|offset| offset as u32)
                .with_context(|| {
                    format!(
                        "the tracepoint sock:inet_sock_set_state has no field {field}: connects and listens on the watched ports cannot be seen"
                    )
                })
        };
        let (state_newstate, state_sport, state_dport) = (
            state_offset("newstate")?,
            state_offset("sport")?,
            state_offset("dport")?,
        );
        let (state_family, state_protocol, state_saddr, state_saddr_v6) = (
            state_offset("family")?,
            state_offset("protocol")?,
            state_offset("saddr")?,
            state_offset("saddr_v6")?,
        );
        if newtask_pid == 0 || newtask_flags == 0 {
            tracing::warn!(
                "task_newtask has no pid or clone_flags field: forked processes are not followed"
            );
        }
        let regs = syscalls::regs_layout()?;
        let layouts = btf::running_kernel_layouts();
        let task = match layouts.task {
            Ok(task) => Some(task),
            Err(err) => {
                tracing::warn!(
                    "tasks cannot be read ({err:#}): a process's exit is taken from its first thread's, and 32-bit system calls are not told apart"
                );
                None
            }
        };
        let exit_known = u32::from(task.is_some());
        let (task_signal, signal_live, compat_status) = match task {
            Some(task) => (
                task.task_signal,
                task.signal_live,
                task.compat_status.unwrap_or(0),
            ),
            None => (0, 0, 0),
        };
        let mark_words = mark_words(pid_max());
        let layout = match layouts.fd {
            Ok(layout) => Some(layout),
            Err(err) => {
                tracing::warn!(
                    "descriptor tables cannot be read ({err:#}): connections are not followed into forked children, and a descriptor reused after close_range or exec is not told apart"
                );
                None
            }
        };
        let sock = match layouts.sock {
            Ok(sock) => Some(sock),
            Err(err) => {
                tracing::warn!(
                    "sockets' ports cannot be read ({err:#}): a process calling its own watched port may be taken for a relay"
                );
                None
            }
        };
        let offsets = layout.unwrap_or(btf::FdLayout {
            task_files: 0,
            files_fdt: 0,
            fdt_max_fds: 0,
            fdt_fd: 0,
        });
        let sock_offsets = sock.unwrap_or(btf::SockLayout {
            file_private_data: 0,
            socket_sk: 0,
            sock_num: 0,
            sock_dport: 0,
        });
        let sock_known = u32::from(sock.is_some() && layout.is_some());
        let layout_known = u32::from(layout.is_some());
        let mut ebpf = EbpfLoader::new()
            .override_global(names::HEAD_BYTES, &config.head_bytes, true)
            .override_global(names::TAIL_BYTES, &config.tail_bytes, true)
            .override_global(names::SELF_TGID, &self_tgid, true)
            .override_global(names::WAKEUP_BYTES, &wakeup_bytes, true)
            .override_global(names::NEWTASK_PID_OFFSET, &newtask_pid, true)
            .override_global(names::NEWTASK_FLAGS_OFFSET, &newtask_flags, true)
            .override_global(names::FD_LAYOUT_KNOWN, &layout_known, true)
            .override_global(names::TASK_FILES_OFFSET, &offsets.task_files, true)
            .override_global(names::FILES_FDT_OFFSET, &offsets.files_fdt, true)
            .override_global(names::FDT_MAX_FDS_OFFSET, &offsets.fdt_max_fds, true)
            .override_global(names::FDT_FD_OFFSET, &offsets.fdt_fd, true)
            .override_global(names::SOCK_LAYOUT_KNOWN, &sock_known, true)
            .override_global(
                names::FILE_PRIVATE_DATA_OFFSET,
                &sock_offsets.file_private_data,
                true,
            )
            .override_global(names::SOCKET_SK_OFFSET, &sock_offsets.socket_sk, true)
            .override_global(names::SOCK_NUM_OFFSET, &sock_offsets.sock_num, true)
            .override_global(names::SOCK_DPORT_OFFSET, &sock_offsets.sock_dport, true)
            .override_global(names::STATE_NEWSTATE_OFFSET, &state_newstate, true)
            .override_global(names::STATE_SPORT_OFFSET, &state_sport, true)
            .override_global(names::STATE_DPORT_OFFSET, &state_dport, true)
            .override_global(names::STATE_FAMILY_OFFSET, &state_family, true)
            .override_global(names::STATE_PROTOCOL_OFFSET, &state_protocol, true)
            .override_global(names::STATE_SADDR_OFFSET, &state_saddr, true)
            .override_global(names::STATE_SADDR_V6_OFFSET, &state_saddr_v6, true)
            .override_global(names::REGS_ARG0_OFFSET, &regs.arg0, true)
            .override_global(names::REGS_ARG1_OFFSET, &regs.arg1, true)
            .override_global(names::REGS_ARG2_OFFSET, &regs.arg2, true)
            .override_global(names::REGS_NR_OFFSET, &regs.nr, true)
            .override_global(names::COMPAT_STATUS_OFFSET, &compat_status, true)
            .override_global(names::EXIT_LAYOUT_KNOWN, &exit_known, true)
            .override_global(names::TASK_SIGNAL_OFFSET, &task_signal, true)
            .override_global(names::SIGNAL_LIVE_OFFSET, &signal_live, true)
            .map_max_entries(names::MARKS, mark_words)
            .map_max_entries(names::SEEDED_MARKS, mark_words)
            .map_max_entries(names::EVENTS, config.ring_bytes)
            .map_max_entries(names::CONNS, config.max_conns)
            .map_max_entries(names::REFS, config.max_conns)
            .map_max_entries(names::LISTENERS, config.max_listeners)
            .load(BPF_OBJECT)
            .map_err(kernel::object_failure)?;
        // The logger owns the log map: it must outlive the programs that write to it.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                tracing::debug!("kernel-side logging unavailable: {err}");
                None
            }
        };
        let mut ports: HashMap<_, u16, u32> = HashMap::try_from(
            ebpf.map_mut(names::WATCHED_PORTS)
                .context("WATCHED_PORTS map missing")?,
        )?;
        for watched in &config.watch {
            ports
                .insert(watched.port, watched.role.to_kernel(), 0)
                .with_context(|| format!("configuring watched port {}", watched.port))?;
        }
        let mut calls: Array<_, u32> = Array::try_from(
            ebpf.map_mut(names::SYSCALLS)
                .context("SYSCALLS map missing")?,
        )?;
        for (nr, kind) in syscalls::table() {
            calls
                .set(nr, kind, 0)
                .with_context(|| format!("configuring system call {nr}"))?;
        }
        Ok(Capture {
            ebpf,
            links: Vec::new(),
            logger,
            seeded: Vec::new(),
            seeded_listeners: Vec::new(),
            orphan_refs: std::collections::HashSet::new(),
            lost_seen: std::collections::HashMap::new(),
            seeded_tgids: std::collections::BTreeSet::new(),
        })
    }

    /// Puts the watched listeners and established connections that `/proc` shows into the
    /// kernel maps: every process that holds one, under every fd it holds it as.
    fn seed(&mut self, config: &CaptureConfig) -> anyhow::Result<()> {
        let self_tgid = config.exclude_self.then(std::process::id);
        let found = seed::scan(Path::new("/proc"), &config.watch, self_tgid)?;
        // Marked first: until its mark is set, the kernel side does not look at a process's
        // calls, and the entries below would miss the accepts and closes in between.
        self.seeded_tgids.extend(
            found.listeners.iter().map(|(key, _)| key.tgid).chain(
                found
                    .conns
                    .iter()
                    .flat_map(|conn| conn.holders.iter().map(|key| key.tgid)),
            ),
        );
        self.write_seeded_marks(&std::collections::BTreeSet::new())?;
        let mut listeners: HashMap<_, SockKey, ListenInfo> = HashMap::try_from(
            self.ebpf
                .map_mut(names::LISTENERS)
                .context("LISTENERS map missing")?,
        )?;
        for (key, listener) in &found.listeners {
            listeners
                .insert(key, listener, 0)
                .context("the listener table is full")?;
        }
        for (_, listener) in &found.listeners {
            if let (Ok(port), Some(role)) = (
                u16::try_from(listener.port),
                Role::from_kernel(listener.role),
            ) && !self.seeded_listeners.contains(&(port, role))
            {
                self.seeded_listeners.push((port, role));
            }
        }
        let mut conns: HashMap<_, SockKey, ConnInfo> = HashMap::try_from(
            self.ebpf
                .map_mut(names::CONNS)
                .context("CONNS map missing")?,
        )?;
        let mut fresh = Vec::new();
        for mut conn in found.conns {
            // A connection the kernel already saw opening (between attach and this scan) keeps
            // its entry.
            if conn.holders.iter().any(|key| conns.get(key, 0).is_ok()) {
                continue;
            }
            // Only where the kernel made no entry since (BPF_NOEXIST), and only while the fd
            // still names the socket: one closed between the scan and the insert (its close
            // found no entry) is taken out again, before its number can be reused unseen.
            conn.holders.retain(|key| {
                if conns.insert(key, conn.info, BPF_NOEXIST).is_err() {
                    return false;
                }
                if seed::holds_inode(Path::new("/proc"), *key, conn.inode) {
                    return true;
                }
                let _ = conns.remove(key);
                false
            });
            if conn.holders.is_empty() {
                continue;
            }
            fresh.push(conn);
        }
        let mut refs: HashMap<_, u64, u64> =
            HashMap::try_from(self.ebpf.map_mut(names::REFS).context("REFS map missing")?)?;
        for conn in &fresh {
            refs.insert(conn.conn_id, conn.holders.len() as u64, 0)
                .context("the connection table is full")?;
        }
        self.seeded
            .extend(fresh.into_iter().map(|conn| conn.record));
        tracing::debug!(
            listeners = found.listeners.len(),
            connections = self.seeded.len(),
            "seeded from /proc"
        );
        Ok(())
    }

    /// Writes the words of `SEEDED_MARKS` that hold a bit of [`Self::seeded_tgids`] or of
    /// `cleared` (processes no longer marked). Only userspace writes that map.
    fn write_seeded_marks(
        &mut self,
        cleared: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        let mut words: std::collections::BTreeMap<u32, u64> =
            cleared.iter().map(|&tgid| (tgid / 64, 0)).collect();
        for &tgid in &self.seeded_tgids {
            *words.entry(tgid / 64).or_default() |= 1 << (tgid % 64);
        }
        let mut marks: Array<_, u64> = Array::try_from(
            self.ebpf
                .map_mut(names::SEEDED_MARKS)
                .context("SEEDED_MARKS map missing")?,
        )?;
        let len = marks.len();
        for (word, bits) in words {
            // A tgid beyond the bitmap (pid_max raised since the load) counts as marked anyway.
            if word < len {
                marks.set(word, bits, 0)?;
            }
        }
        Ok(())
    }

    /// Loads (once) and attaches the program of `hook` to its tracepoint.
    pub fn attach_hook(&mut self, hook: Hook) -> anyhow::Result<()> {
        match hook {
            Hook::Raw(name) => self.attach_raw(name),
            Hook::Tracepoint(category, name) => self.attach(name, category, name),
        }
    }

    /// Loads (once) and attaches one program to the raw tracepoint of the same name.
    pub fn attach_raw(&mut self, name: &'static str) -> anyhow::Result<()> {
        let program: &mut RawTracePoint = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the kernel object"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|err| kernel::load_failure(name, err))?;
        }
        let link = program
            .attach(name)
            .with_context(|| format!("attaching {name} to the raw tracepoint {name}"))?;
        self.links.push((name, Link::Raw(link)));
        Ok(())
    }

    /// Loads (once) and attaches one program to `category:name`.
    pub fn attach(
        &mut self,
        program: &'static str,
        category: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let tracepoint: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("program {program} missing from the kernel object"))?
            .try_into()?;
        if tracepoint.fd().is_err() {
            tracepoint
                .load()
                .map_err(|err| kernel::load_failure(program, err))?;
        }
        let link = tracepoint
            .attach(category, name)
            .with_context(|| format!("attaching {program} to {category}:{name}"))?;
        self.links.push((program, Link::Tracepoint(link)));
        Ok(())
    }

    /// How many instructions the verifier went through to accept the program `name` (the
    /// kernel's limit is 1,000,000): how close a program is to being rejected. `None` before
    /// Linux 5.16, which does not report it, or for a program not loaded.
    pub fn verified_instructions(&self, name: &str) -> Option<u32> {
        self.ebpf
            .program(name)?
            .info()
            .ok()?
            .verified_instruction_count()
    }

    /// Names of the attached programs.
    pub fn attached(&self) -> Vec<&'static str> {
        self.links.iter().map(|(program, _)| *program).collect()
    }

    /// Connections that were already open when the capture started (found in `/proc`); the
    /// kernel sends no open event for them.
    pub fn seeded(&self) -> &[ConnRecord] {
        &self.seeded
    }

    /// The watched ports that had a listener on this host at start, with their roles.
    pub fn seeded_listeners(&self) -> &[(u16, Role)] {
        &self.seeded_listeners
    }

    /// Forgets the connections and listeners of processes that have exited: their fds closed
    /// without `close(2)`, so the kernel side never saw it. Returns a close record for each
    /// connection forgotten. Run it every few seconds; the cost is one walk of the tables.
    pub fn sweep_exited(&mut self) -> anyhow::Result<Vec<ConnRecord>> {
        Ok(self.sweep()?.closed)
    }

    /// [`Capture::sweep_exited`], and the ids of the connections the kernel still tracks,
    /// gathered in the same walk of its table (see [`Sweep::live`]).
    pub fn sweep(&mut self) -> anyhow::Result<Sweep> {
        // One look at /proc per process, however many sockets it held.
        let mut known: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
        let mut alive = |tgid: u32| {
            *known
                .entry(tgid)
                .or_insert_with(|| Path::new("/proc").join(tgid.to_string()).exists())
        };
        let mut sweep = Sweep::default();
        let mut conns: HashMap<_, SockKey, ConnInfo> = HashMap::try_from(
            self.ebpf
                .map_mut(names::CONNS)
                .context("CONNS map missing")?,
        )?;
        let now = monotonic_ns();
        let mut gone: Vec<(SockKey, ConnInfo)> = Vec::new();
        // Each marked key's loss count now; keys no longer marked are forgotten.
        let mut lost_seen = std::collections::HashMap::new();
        for (key, conn) in conns.iter().filter_map(Result::ok) {
            if !alive(key.tgid) {
                gone.push((key, conn));
                continue;
            }
            if conn.lost != 0 {
                // A count that changed since the last sweep (or a key first seen with one):
                // that connection is put back in step.
                let mark = (conn.conn_id, conn.lost);
                if self.lost_seen.get(&key) != Some(&mark) {
                    sweep.lost.push(conn.conn_id);
                }
                lost_seen.insert(key, mark);
            }
            if let Ok(mut record) = decode::conn_record(now, key, &conn) {
                record.seeded = true;
                sweep.live.insert(conn.conn_id, record);
            }
        }
        self.lost_seen = lost_seen;
        // Already removed (closed for real) since the walk: nothing to report.
        gone.retain(|(key, _)| conns.remove(key).is_ok());
        let mut refs: HashMap<_, u64, u64> =
            HashMap::try_from(self.ebpf.map_mut(names::REFS).context("REFS map missing")?)?;
        let mut reported = std::collections::HashSet::new();
        for (key, conn) in gone {
            if sweep.live.contains_key(&conn.conn_id) {
                // Another holder lives on (a forked child, a dup2 copy): one holder fewer.
                if let Ok(n) = refs.get(&conn.conn_id, 0) {
                    let _ = refs.insert(conn.conn_id, n.saturating_sub(1), BPF_EXIST);
                }
                continue;
            }
            let _ = refs.remove(&conn.conn_id);
            if reported.insert(conn.conn_id) {
                sweep.closed.push(decode::conn_record(now, key, &conn)?);
            }
        }
        // A holder count left over with no key (two holders closing at the same instant on two
        // CPUs leave it one too high): gone when it had no key at two sweeps in a row.
        let orphans: std::collections::HashSet<u64> = refs
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !sweep.live.contains_key(id))
            .collect();
        for id in orphans.intersection(&self.orphan_refs) {
            let _ = refs.remove(id);
        }
        self.orphan_refs = orphans;
        let mut listeners: HashMap<_, SockKey, ListenInfo> = HashMap::try_from(
            self.ebpf
                .map_mut(names::LISTENERS)
                .context("LISTENERS map missing")?,
        )?;
        let gone: Vec<SockKey> = listeners
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !alive(key.tgid))
            .collect();
        for key in gone {
            let _ = listeners.remove(&key);
        }
        let exited: std::collections::BTreeSet<u32> = self
            .seeded_tgids
            .iter()
            .copied()
            .filter(|&tgid| !alive(tgid))
            .collect();
        if !exited.is_empty() {
            self.seeded_tgids.retain(|tgid| !exited.contains(tgid));
            self.write_seeded_marks(&exited)?;
        }
        Ok(sweep)
    }

    /// Takes the ring buffer of events (once).
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .context("the event ring buffer was already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the kernel-side logger, for [`reader::forward_kernel_logs`]. Until it is taken it
    /// lives (unread) as long as the capture.
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Whether the kernel side looks at `tgid`'s system calls now: marked by the kernel (it
    /// connected to or listens on a watched port, or descends from a process that did) or by
    /// the seeding. Every other process costs the kernel side one bit test per call.
    pub fn marked(&self, tgid: u32) -> anyhow::Result<bool> {
        let (word, bit) = (tgid / 64, 1u64 << (tgid % 64));
        for name in [names::MARKS, names::SEEDED_MARKS] {
            let marks: Array<_, u64> = Array::try_from(
                self.ebpf
                    .map(name)
                    .with_context(|| format!("{name} map missing"))?,
            )?;
            if word >= marks.len() {
                // Beyond the bitmap: the kernel side looks at every such process.
                return Ok(true);
            }
            if marks.get(&word, 0)? & bit != 0 {
                return Ok(true);
            }
        }
        let off: Array<_, u32> = Array::try_from(
            self.ebpf
                .map(names::FILTER_OFF)
                .context("FILTER_OFF map missing")?,
        )?;
        Ok(off.get(&0, 0)? != 0)
    }

    /// Sums the kernel-side counters over CPUs.
    pub fn counters(&self) -> anyhow::Result<KernelCounters> {
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(names::COUNTERS)
                .context("COUNTERS map missing")?,
        )?;
        let sum = |slot: u32| -> anyhow::Result<u64> { Ok(array.get(&slot, 0)?.iter().sum()) };
        Ok(KernelCounters {
            lost_data: sum(counter::LOST_DATA)?,
            lost_conn: sum(counter::LOST_CONN)?,
            conns_full: sum(counter::CONNS_FULL)?,
            listeners_full: sum(counter::LISTENERS_FULL)?,
            read_user_failed: sum(counter::READ_USER_FAILED)?,
            tgids_full: sum(counter::TGIDS_FULL)?,
            read_kernel_failed: sum(counter::READ_KERNEL_FAILED)?,
            map_update_failed: sum(counter::MAP_UPDATE_FAILED)?,
        })
    }

    /// Detaches every program, reporting the first failure.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        for (program, link) in self.links.drain(..) {
            let found = self
                .ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing"))?;
            match link {
                Link::Raw(link) => {
                    let raw: &mut RawTracePoint = found.try_into()?;
                    raw.detach(link)
                }
                Link::Tracepoint(link) => {
                    let tracepoint: &mut TracePoint = found.try_into()?;
                    tracepoint.detach(link)
                }
            }
            .with_context(|| format!("detaching {program}"))?;
        }
        Ok(())
    }
}

/// What one walk of the kernel's connection table found.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Connections of exited processes, forgotten now: a close record for each.
    pub closed: Vec<ConnRecord>,
    /// The connections the kernel tracks now, by id. A connection the daemon still holds that
    /// is missing here was closed, and its close event is on its way or was lost (the ring
    /// buffer was full); one here that the daemon does not hold had its open and every later
    /// event lost. [`feed::KernelFeed::reconcile`] settles both.
    pub live: foldhash::HashMap<u64, ConnRecord>,
    /// Connections with an event lost since the last sweep (their loss count changed): their
    /// open exchanges can no longer be framed.
    pub lost: Vec<u64>,
}

/// Conditions the kernel programs counted instead of reporting one by one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelCounters {
    /// Data events lost: the ring buffer was full.
    pub lost_data: u64,
    /// Open/close events lost: the ring buffer was full.
    pub lost_conn: u64,
    /// Connections not watched: the connection table was full.
    pub conns_full: u64,
    /// Listeners not watched: the listener table was full.
    pub listeners_full: u64,
    /// Payload or sockaddr reads from user memory that failed.
    pub read_user_failed: u64,
    /// Processes not marked: the table of marked processes was full (the per-process filter
    /// is off since; nothing is missed, every process's data calls cost a lookup).
    pub tgids_full: u64,
    /// Reads of kernel memory that failed (a system call's saved registers, a tracepoint's
    /// record, the task's descriptor table, a socket's ports): what needed them was not done,
    /// or done without them.
    pub read_kernel_failed: u64,
    /// Map updates that failed other than the full tables above (a forked child's parent, a
    /// listen waiting for its exit, a connection's holder count).
    pub map_update_failed: u64,
}

/// `bpf_map_update_elem` flags: make a new entry only; update an existing entry only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// The kernel's highest process id plus one (`/proc/sys/kernel/pid_max`; the 64-bit default
/// where it cannot be read).
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4_194_304)
}

/// Words of the process bitmaps for process ids below `pid_max`.
fn mark_words(pid_max: u32) -> u32 {
    pid_max.div_ceil(64).max(1)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The programs of a kernel object, as `(kind, name)`: its global functions outside
    /// `.text` (BPF-to-BPF callees live there), each in a section named for its program type
    /// (`raw_tp/<tracepoint>`, `tracepoint`).
    fn programs_in(bytes: &[u8]) -> BTreeSet<(&'static str, String)> {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
        let file = object::File::parse(bytes).unwrap();
        let mut programs = BTreeSet::new();
        for symbol in file.symbols() {
            if symbol.kind() != SymbolKind::Text || !symbol.is_global() {
                continue;
            }
            let Some(index) = symbol.section_index() else {
                continue;
            };
            let section = file.section_by_index(index).unwrap();
            let section = section.name().unwrap();
            if section == ".text" {
                continue;
            }
            let kind = match section.split('/').next().unwrap() {
                "raw_tp" | "raw_tracepoint" => "raw_tracepoint",
                "tracepoint" | "tp" => "tracepoint",
                other => panic!("program {:?} in a section of type {other}", symbol.name()),
            };
            programs.insert((kind, symbol.name().unwrap().to_string()));
        }
        programs
    }

    #[test]
    fn the_object_holds_the_programs_that_are_attached_and_no_other() {
        let in_object = programs_in(BPF_OBJECT);
        let attached: BTreeSet<(&'static str, String)> = hooks()
            .map(|hook| (hook.kind(), hook.program().to_string()))
            .collect();
        assert_eq!(attached.len(), program_count(), "a program listed twice");
        let unattached: Vec<_> = in_object.difference(&attached).collect();
        assert!(
            unattached.is_empty(),
            "programs in the kernel object that nothing attaches: {unattached:?}"
        );
        let missing: Vec<_> = attached.difference(&in_object).collect();
        assert!(
            missing.is_empty(),
            "programs attached that the kernel object does not hold: {missing:?}"
        );
    }

    #[test]
    fn every_kernel_counter_is_read() {
        let fields = serde_json::to_value(KernelCounters::default()).unwrap();
        assert_eq!(
            fields.as_object().unwrap().len(),
            counter::COUNT as usize,
            "KernelCounters should have a field for each slot of observer_common::counter"
        );
    }
}
