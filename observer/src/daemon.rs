//! The start-up and shut-down that `observer run`, `observer proxy` and `observer trace`
//! share, written once: the signals they stop on ([`Signals`]); the serving side of a daemon —
//! metrics, status board, admin server, readiness probe, resource collectors — with its flags
//! ([`Serving`], [`MetricsArgs`]); and the kernel capture started and stopped ([`Kernel`]).
//! Each command keeps only its own loop.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::admin::{self, AdminConfig, AdminServer, StatusBoard};
use crate::base::{Role, WatchedPort};
use crate::capture::{
    Capture, CaptureConfig,
    reader::{self, EventReader},
};
use crate::collectors::{self, Collectors, ResourceArgs};
use crate::metrics::{Metrics, MetricsConfig};
use crate::pipeline::own_ports::OwnPorts;
use crate::probe::{self, DaemonProbeArgs, Prober};

/// SIGINT and SIGTERM. Listened for before anything is attached or bound, so that a signal
/// during start-up stops the command through its own shut-down, not the default handler.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn listen() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// Until either arrives.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Flags of the admin server and the metrics it serves; `observer proxy` shares them.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`, `/status`).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:9464",
        env = "OBSERVER_METRICS_ADDR"
    )]
    pub metrics_addr: SocketAddr,
    /// A file holding a bearer token that `/metrics` then requires.
    #[arg(long, value_name = "PATH", env = "OBSERVER_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Prefix of every metric name.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "observer",
        env = "OBSERVER_METRIC_PREFIX"
    )]
    pub metric_prefix: String,
    /// A request path to keep as its own `route` label value (repeatable); others are `other`.
    #[arg(long = "route", value_name = "PATH")]
    pub routes: Vec<String>,
}

impl MetricsArgs {
    pub fn metrics_config(&self, mode: &'static str, watch: &[WatchedPort]) -> MetricsConfig {
        let llm_role = if watch.iter().any(|w| w.role == Role::Upstream) {
            Role::Upstream
        } else {
            Role::Gateway
        };
        MetricsConfig {
            prefix: self.metric_prefix.clone(),
            extra_routes: self.routes.clone(),
            mode,
            llm_role,
        }
    }

    pub fn admin_config(&self) -> anyhow::Result<AdminConfig> {
        let token = match &self.metrics_token_file {
            Some(path) => Some(admin::read_token_file(path)?),
            None => None,
        };
        Ok(AdminConfig { token })
    }

    /// Starts the admin server on `--metrics-addr`.
    async fn start_admin(
        &self,
        metrics: &Arc<Metrics>,
        status: &Arc<StatusBoard>,
    ) -> anyhow::Result<AdminServer> {
        AdminServer::start(
            self.metrics_addr,
            metrics.clone(),
            status.clone(),
            self.admin_config()?,
        )
        .await
    }
}

/// What a serving daemon (`run`, `proxy`) starts beside its data path.
pub struct ServingConfig<'a> {
    /// `ebpf` or `proxy`: the `mode` of `/status` and the metrics.
    pub mode: &'static str,
    pub watch: &'a [WatchedPort],
    pub metrics: &'a MetricsArgs,
    /// The probe's settings, its upstream resolved.
    pub probe: &'a DaemonProbeArgs,
    pub resources: &'a ResourceArgs,
    /// Where the probe registers its own connections for the pipeline to ignore.
    pub own_ports: OwnPorts,
}

/// The serving side of a daemon, running: the metrics and status board its data path fills,
/// the admin server answering from them, the probe and the collectors.
pub struct Serving {
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    /// Where the admin server listens (the port is known also when 0 was asked for).
    pub admin_addr: SocketAddr,
    admin: AdminServer,
    pub prober: Option<Prober>,
    collectors: Collectors,
}

impl Serving {
    /// Starts them in order: metrics, status board, admin server (`/readyz` 503 until the
    /// caller says ready), the probe unless `--no-probe` (`/ready/model` answering from it),
    /// the collectors.
    pub async fn start(config: ServingConfig<'_>) -> anyhow::Result<Serving> {
        let metrics = Arc::new(Metrics::new(
            config.metrics.metrics_config(config.mode, config.watch),
        )?);
        let status = Arc::new(StatusBoard::new(
            config.mode,
            config.watch.iter().map(|w| (w.port, w.role)).collect(),
        ));
        let admin = config.metrics.start_admin(&metrics, &status).await?;
        let prober = if config.probe.no_probe {
            None
        } else {
            let prober = probe::spawn(config.probe, &metrics, config.own_ports)?;
            status.attach_probe(prober.readiness(), prober.upstream().to_owned());
            Some(prober)
        };
        let collectors = collectors::start(config.resources, &metrics, config.watch)?;
        Ok(Serving {
            metrics,
            status,
            admin_addr: admin.addr,
            admin,
            prober,
            collectors,
        })
    }

    /// Stops the probe and the collectors, then the admin server (which answers until then).
    pub async fn stop(self) {
        drop(self.prober);
        drop(self.collectors);
        self.admin.stop().await;
    }
}

/// The kernel capture, running: programs attached, the ring buffer registered with the
/// runtime, the kernel programs' log lines forwarded (debug builds).
pub struct Kernel {
    pub capture: Capture,
    pub events: EventReader,
    kernel_logs: Option<tokio::task::JoinHandle<()>>,
}

impl Kernel {
    /// Loads and attaches the programs and seeds what is open (seconds: off the async threads).
    pub async fn start(config: &CaptureConfig) -> anyhow::Result<Kernel> {
        let mut capture = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Capture::start(&config)).await??
        };
        let events = EventReader::new(capture.take_events()?)
            .context("registering the ring buffer with the runtime")?;
        let kernel_logs = match capture.take_logger() {
            Some(logger) => Some(reader::forward_kernel_logs(logger)?),
            None => None,
        };
        Ok(Kernel {
            capture,
            events,
            kernel_logs,
        })
    }

    /// Detaches the programs; the counters and the reader's decode errors can still be read.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(task) = self.kernel_logs.take() {
            task.abort();
        }
        self.capture.detach()
    }
}
