//! [`GpuMonitor`]: the GPU side of the daemon, a [`GpuSource`] paired with the
//! [`GpuCollector`] it feeds.
//!
//! Owns start-up (NVML, or on a host without the driver the reason, which the caller reports
//! as its `--gpu` mode asks) and
//! the failure policy of the periodic read: a failed read clears every GPU sample, since no
//! value is better than a stale one, and is reported once per run of failures. It does not
//! schedule itself; the daemon calls [`GpuMonitor::refresh`] from a blocking thread.

use super::{collector::GpuCollector, nvml::NvmlSource, open, reading::GpuSource};
use crate::base::Role;

/// `/proc/<pid>/comm` without its newline; empty if the process is gone.
pub fn process_comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

pub struct GpuMonitor {
    source: Box<dyn GpuSource>,
    collector: GpuCollector,
    /// The last read failed; the next failure is not reported again.
    failing: bool,
}

impl GpuMonitor {
    /// NVML and a collector for the `gpu_*` families named with `prefix`; `Ok(Err(reason))`
    /// where NVML cannot be loaded (no driver), for the caller to report as its `--gpu` mode
    /// asks. The outer error is only an invalid `prefix`.
    pub fn open(prefix: &str) -> anyhow::Result<Result<GpuMonitor, String>> {
        let collector = GpuCollector::new(prefix)?;
        let nvml = match open() {
            Ok(nvml) => nvml,
            Err(reason) => return Ok(Err(reason)),
        };
        let source = NvmlSource::new(nvml);
        match source.gpu_count() {
            Ok(count) => tracing::info!(
                "GPU metrics are on: {count} GPU(s), NVIDIA driver {}",
                source.driver_version()
            ),
            // Reported again, once, by the first refresh if it lasts.
            Err(reason) => tracing::info!("GPU metrics are on, but {reason}"),
        }
        Ok(Ok(GpuMonitor::new(Box::new(source), collector)))
    }

    /// A monitor over any source (a fake one in tests).
    pub fn new(source: Box<dyn GpuSource>, collector: GpuCollector) -> GpuMonitor {
        GpuMonitor {
            source,
            collector,
            failing: false,
        }
    }

    /// The collector to register on the metrics registry; it shares this monitor's samples.
    pub fn collector(&self) -> GpuCollector {
        self.collector.clone()
    }

    /// Reads the GPUs and replaces the exported samples. `role_of` is the role of a process
    /// (the daemon passes [`crate::procfs::Targets::role_of`]: the owners of watched listeners
    /// and their descendants, so that Ollama's model runner counts as upstream).
    /// Blocks on NVML: call it from a blocking thread.
    pub fn refresh(&mut self, role_of: &dyn Fn(u32) -> Option<Role>) {
        match self.source.read() {
            Ok(snapshot) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("GPU metrics are back");
                }
                self.collector.update(&snapshot, &process_comm, role_of);
            }
            Err(reason) => {
                self.collector.clear();
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        "reading the GPUs failed, GPU metrics are left out until it works: {reason}"
                    );
                }
            }
        }
    }
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMonitor")
            .field("collector", &self.collector)
            .field("failing", &self.failing)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use prometheus::Registry;

    use super::*;
    use crate::gpu::{
        GpuProcess,
        fixtures::{FakeSource, exported, role_of, text, two_gpus},
    };

    fn monitor(readings: Vec<Result<super::super::GpuSnapshot, String>>) -> (GpuMonitor, Registry) {
        let monitor = GpuMonitor::new(
            Box::new(FakeSource(VecDeque::from(readings))),
            GpuCollector::new("observer").unwrap(),
        );
        let registry = Registry::new();
        registry.register(Box::new(monitor.collector())).unwrap();
        (monitor, registry)
    }

    #[test]
    fn a_failed_read_clears_and_the_next_good_one_restores() {
        let (mut monitor, registry) = monitor(vec![
            Ok(two_gpus()),
            Err("GPU is lost".into()),
            Err("GPU is lost".into()),
            Ok(two_gpus()),
        ]);
        monitor.refresh(&role_of);
        assert_eq!(exported(&registry).len(), 15);
        monitor.refresh(&role_of);
        assert!(monitor.failing);
        assert_eq!(text(&registry), "", "no stale values after a failed read");
        monitor.refresh(&role_of);
        assert_eq!(text(&registry), "");
        monitor.refresh(&role_of);
        assert!(!monitor.failing);
        assert_eq!(exported(&registry).len(), 15);
    }

    #[test]
    fn process_names_come_from_proc() {
        let own_pid = std::process::id();
        let mut snapshot = two_gpus();
        snapshot.gpus[0].processes = vec![GpuProcess {
            pid: own_pid,
            memory_bytes: Some(4096),
        }];
        let (mut monitor, registry) = monitor(vec![Ok(snapshot)]);
        monitor.refresh(&|pid| (pid == own_pid).then_some(Role::Gateway));
        let comm = process_comm(own_pid);
        assert!(!comm.is_empty());
        assert!(exported(&registry).contains(&format!(
            r#"observer_gpu_process_memory_bytes{{comm="{comm}",gpu="0",pid="{own_pid}",role="gateway"}} 4096"#
        )));
    }

    #[test]
    fn without_a_driver_there_is_no_monitor_and_no_error() {
        if open().is_ok() {
            eprintln!("skipped: an NVIDIA driver is installed on this host");
            return;
        }
        let reason = GpuMonitor::open("observer").unwrap().err().unwrap();
        assert!(reason.contains("libnvidia-ml.so.1"), "{reason}");
    }

    #[test]
    fn the_monitor_can_move_to_a_blocking_thread() {
        fn is_send<T: Send + 'static>() {}
        is_send::<GpuMonitor>();
        is_send::<NvmlSource>();
    }

    #[test]
    fn an_invalid_prefix_is_an_error_even_without_a_driver() {
        assert!(GpuMonitor::open("not a prefix").is_err());
    }
}
