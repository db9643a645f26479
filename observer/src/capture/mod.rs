//! Kernel capture: load the embedded kernel object, configure it, attach its tracepoint
//! programs, and hand out the ring buffer of events.
//!
//! Owns the `aya::Ebpf` instance and therefore the programs' lifetime: dropping a [`Capture`]
//! (or calling [`Capture::detach`]) detaches every program. Decoding lives in [`decode`], the
//! asynchronous ring buffer reader in [`reader`], `/proc` socket discovery in [`seed`].

pub mod decode;
pub mod reader;
pub mod seed;

use std::{fmt, str::FromStr};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, trace_point::TracePointLinkId},
};
use observer_common::{HEAD_MAX, TAIL_MAX, counter, names, role};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OBSERVER_BPF_OBJECT"));

/// Every tracepoint a full capture attaches to, as (category, name, program).
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("syscalls", "sys_enter_connect", "sys_enter_connect"),
    ("syscalls", "sys_exit_connect", "sys_exit_connect"),
    ("syscalls", "sys_enter_write", "sys_enter_write"),
    ("syscalls", "sys_exit_write", "sys_exit_write"),
    ("syscalls", "sys_enter_close", "sys_enter_close"),
];

/// Tracepoints the complete capture design relies on (SPEC §3); `observer check` reports each.
pub const REQUIRED_TRACEPOINTS: &[(&str, &str)] = &[
    ("syscalls", "sys_enter_read"),
    ("syscalls", "sys_exit_read"),
    ("syscalls", "sys_enter_readv"),
    ("syscalls", "sys_exit_readv"),
    ("syscalls", "sys_enter_recvfrom"),
    ("syscalls", "sys_exit_recvfrom"),
    ("syscalls", "sys_enter_recvmsg"),
    ("syscalls", "sys_exit_recvmsg"),
    ("syscalls", "sys_enter_write"),
    ("syscalls", "sys_exit_write"),
    ("syscalls", "sys_enter_writev"),
    ("syscalls", "sys_exit_writev"),
    ("syscalls", "sys_enter_sendto"),
    ("syscalls", "sys_exit_sendto"),
    ("syscalls", "sys_enter_sendmsg"),
    ("syscalls", "sys_exit_sendmsg"),
    ("syscalls", "sys_enter_accept"),
    ("syscalls", "sys_exit_accept"),
    ("syscalls", "sys_enter_accept4"),
    ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_enter_connect"),
    ("syscalls", "sys_exit_connect"),
    ("syscalls", "sys_enter_close"),
    ("syscalls", "sys_exit_close"),
    ("sched", "sched_process_fork"),
];

/// What a watched port is to this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Upstream,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Upstream => "upstream",
        }
    }

    pub fn to_kernel(self) -> u32 {
        match self {
            Role::Gateway => role::GATEWAY,
            Role::Upstream => role::UPSTREAM,
        }
    }

    pub fn from_kernel(value: u32) -> Option<Role> {
        match value {
            role::GATEWAY => Some(Role::Gateway),
            role::UPSTREAM => Some(Role::Upstream),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--watch PORT=ROLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WatchedPort {
    pub port: u16,
    pub role: Role,
}

impl WatchedPort {
    /// The product's defaults: the gateway on 18789, Ollama on 11434.
    pub fn defaults() -> Vec<WatchedPort> {
        vec![
            WatchedPort {
                port: 18789,
                role: Role::Gateway,
            },
            WatchedPort {
                port: 11434,
                role: Role::Upstream,
            },
        ]
    }
}

impl FromStr for WatchedPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, role) = s
            .split_once('=')
            .ok_or_else(|| format!("expected PORT=ROLE, got {s:?}"))?;
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| format!("{port:?} is not a port number"))?;
        if port == 0 {
            return Err("port 0 cannot be watched".into());
        }
        let role = match role.trim() {
            "gateway" => Role::Gateway,
            "upstream" => Role::Upstream,
            other => return Err(format!("role {other:?} is neither gateway nor upstream")),
        };
        Ok(WatchedPort { port, role })
    }
}

/// How the kernel side is sized and what it watches.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub watch: Vec<WatchedPort>,
    /// Bytes captured from the start of each buffer (≤ HEAD_MAX).
    pub head_bytes: u32,
    /// Bytes captured from the end of each buffer (≤ TAIL_MAX).
    pub tail_bytes: u32,
    /// Ring buffer size in bytes: a power of two, at least a page.
    pub ring_bytes: u32,
    /// Most connections tracked at once.
    pub max_conns: u32,
    /// Leave this process's own sockets (the readiness probe) out.
    pub exclude_self: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            watch: WatchedPort::defaults(),
            head_bytes: HEAD_MAX as u32,
            tail_bytes: TAIL_MAX as u32,
            ring_bytes: 8 * 1024 * 1024,
            max_conns: 65_536,
            exclude_self: true,
        }
    }
}

impl CaptureConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.watch.is_empty() {
            bail!("no port to watch");
        }
        if self.head_bytes as usize > HEAD_MAX {
            bail!(
                "head capture of {} bytes exceeds the maximum of {HEAD_MAX}",
                self.head_bytes
            );
        }
        if self.tail_bytes as usize > TAIL_MAX {
            bail!(
                "tail capture of {} bytes exceeds the maximum of {TAIL_MAX}",
                self.tail_bytes
            );
        }
        if !self.ring_bytes.is_power_of_two() || self.ring_bytes < 4096 {
            bail!(
                "ring buffer size {} is not a power of two of at least 4096",
                self.ring_bytes
            );
        }
        if self.max_conns == 0 {
            bail!("the connection table needs at least one entry");
        }
        Ok(())
    }
}

/// Loaded and attached kernel programs.
pub struct Capture {
    ebpf: Ebpf,
    links: Vec<(&'static str, TracePointLinkId)>,
    logger: Option<KernelLogger>,
}

/// Forwards `aya-log-ebpf` records to this process's `log`/`tracing` output.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Capture {
    /// Loads the embedded object with `config` and attaches every program of [`TRACEPOINTS`].
    pub fn start(config: &CaptureConfig) -> anyhow::Result<Capture> {
        let mut capture = Capture::load(config)?;
        for &(category, name, program) in TRACEPOINTS {
            capture.attach(program, category, name)?;
        }
        Ok(capture)
    }

    /// Loads the embedded object into the kernel and configures it, attaching nothing.
    pub fn load(config: &CaptureConfig) -> anyhow::Result<Capture> {
        config.validate()?;
        crate::tracefs::ensure_mounted()?;
        raise_memlock_limit();
        let self_tgid = if config.exclude_self {
            std::process::id()
        } else {
            0
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::HEAD_BYTES, &config.head_bytes, true)
            .override_global(names::TAIL_BYTES, &config.tail_bytes, true)
            .override_global(names::SELF_TGID, &self_tgid, true)
            .map_max_entries(names::EVENTS, config.ring_bytes)
            .map_max_entries(names::CONNS, config.max_conns)
            .load(BPF_OBJECT)
            .context("loading the kernel object (are you root, with BPF allowed?)")?;
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
        Ok(Capture {
            ebpf,
            links: Vec::new(),
            logger,
        })
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
                .with_context(|| format!("verifier rejected {program}"))?;
        }
        let link = tracepoint
            .attach(category, name)
            .with_context(|| format!("attaching {program} to {category}:{name}"))?;
        self.links.push((program, link));
        Ok(())
    }

    /// Names of the attached programs.
    pub fn attached(&self) -> Vec<&'static str> {
        self.links.iter().map(|(program, _)| *program).collect()
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

    /// Sums the kernel-side counters over CPUs, in [`counter`] slot order.
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
            read_user_failed: sum(counter::READ_USER_FAILED)?,
        })
    }

    /// Detaches every program, reporting the first failure.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        for (program, link) in self.links.drain(..) {
            let tracepoint: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .with_context(|| format!("program {program} missing"))?
                .try_into()?;
            tracepoint
                .detach(link)
                .with_context(|| format!("detaching {program}"))?;
        }
        Ok(())
    }
}

/// Conditions the kernel programs counted instead of reporting one by one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelCounters {
    pub lost_data: u64,
    pub lost_conn: u64,
    pub conns_full: u64,
    pub read_user_failed: u64,
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
    use super::*;

    #[test]
    fn watch_flag_parses_port_and_role() {
        assert_eq!(
            "18789=gateway".parse(),
            Ok(WatchedPort {
                port: 18789,
                role: Role::Gateway
            })
        );
        assert_eq!(
            "11434=upstream".parse(),
            Ok(WatchedPort {
                port: 11434,
                role: Role::Upstream
            })
        );
    }

    #[test]
    fn watch_flag_rejects_bad_input() {
        assert!(
            "18789"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("PORT=ROLE")
        );
        assert!(
            "http=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            "0=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            "70000=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            "80=proxy"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn config_validation_catches_bad_sizes() {
        let ok = CaptureConfig::default();
        assert!(ok.validate().is_ok());
        let head = CaptureConfig {
            head_bytes: HEAD_MAX as u32 + 1,
            ..ok.clone()
        };
        assert!(head.validate().is_err());
        let ring = CaptureConfig {
            ring_bytes: 5000,
            ..ok.clone()
        };
        assert!(ring.validate().is_err());
        let none = CaptureConfig {
            watch: vec![],
            ..ok
        };
        assert!(none.validate().is_err());
    }
}
