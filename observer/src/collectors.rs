//! The collectors beside the traffic pipeline (docs/DESIGN.md#gpu-and-process-resources): the
//! resources of the processes that own the watched listeners ([`crate::procfs`]), the model
//! server's settings ([`crate::server_settings`]) and the GPUs ([`crate::gpu`]), read on one
//! blocking thread every `--resources-interval` and rendered at scrape time.
//!
//! Owns their flags, start-up and schedule. Reads of `/proc` and NVML block, so they never run
//! on the async threads; a scrape only reads the last snapshot.

use std::{
    path::Path,
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::base::WatchedPort;
use crate::{
    gpu::GpuMonitor,
    metrics::Metrics,
    procfs::{TargetProcesses, Targets},
    server_settings,
};

/// Whether to read GPUs through NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuMode {
    /// Use NVML when the NVIDIA driver is there; without it, one log line and no GPU series.
    Auto,
    /// Require NVML: fail at start-up without the driver.
    On,
    /// Never load NVML.
    Off,
}

/// Flags of the resource collectors, shared by `observer run` and `observer proxy`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Resources")]
pub struct ResourceArgs {
    /// GPU metrics through NVML.
    #[arg(long, value_enum, default_value_t = GpuMode::Auto, env = "OBSERVER_GPU")]
    pub gpu: GpuMode,
    /// How often process resources and GPUs are read.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = crate::base::clock::parse_duration)]
    pub resources_interval: Duration,
}

impl ResourceArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.resources_interval.is_zero(),
            "--resources-interval must be more than 0"
        );
        Ok(())
    }
}

/// The sampling thread; it stops when this is dropped.
pub struct Collectors {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Collectors {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Registers the collectors on `metrics` and starts reading them (the first read happens
/// before this returns, so the first scrape already has values).
pub fn start(
    args: &ResourceArgs,
    metrics: &Metrics,
    watch: &[WatchedPort],
) -> anyhow::Result<Collectors> {
    args.validate()?;
    let processes = TargetProcesses::new(metrics.prefix())?;
    metrics.register(Box::new(processes.clone()))?;
    let mut gpu = match args.gpu {
        GpuMode::Off => None,
        mode => match GpuMonitor::open(metrics.prefix())? {
            Ok(gpu) => Some(gpu),
            Err(reason) if mode == GpuMode::On => {
                anyhow::bail!("--gpu on, but NVML cannot be used: {reason}")
            }
            Err(reason) => {
                tracing::info!("GPU metrics are off: {reason}");
                None
            }
        },
    };
    if let Some(gpu) = &gpu {
        metrics.register(Box::new(gpu.collector()))?;
    }
    let watch = watch.to_vec();
    let capacity = metrics.capacity();
    let mut sample = move || {
        processes.refresh(Path::new("/proc"), &watch);
        let targets: Targets = processes.targets();
        capacity.set_servers(&server_settings::read(Path::new("/proc"), &targets));
        if let Some(gpu) = gpu.as_mut() {
            gpu.refresh(&|pid| targets.role_of(pid));
        }
    };
    sample();
    let (stop, stopped) = mpsc::channel::<()>();
    let interval = args.resources_interval;
    let thread = std::thread::Builder::new()
        .name("observer-resources".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                sample();
            }
        })
        .context("starting the resource collector thread")?;
    Ok(Collectors {
        stop: Some(stop),
        thread: Some(thread),
    })
}
