//! `observer run`: the production daemon. Starts the admin server, loads and attaches the
//! kernel capture, seeds what is already open, then moves every ring buffer batch through the
//! [`Pipeline`] (engine → metrics) until SIGINT or SIGTERM, when it detaches and exits 0.
//!
//! It owns the daemon's wiring and its periodic chores (sweeping the connections of exited
//! processes, reading the kernel's loss counters); the work itself lives in the modules it
//! calls. The admin server answers from the start (`/readyz` says 503 until the programs are
//! attached and the pipeline runs).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin::{self, AdminConfig, AdminServer, StatusBoard};
use crate::base::{Role, Side, clock::monotonic_ns, watch_list};
use crate::capture::{
    Capture,
    decode::Event,
    own_ports::OwnPorts,
    reader::{self, EventReader},
};
use crate::collectors::{self, ResourceArgs};
use crate::engine::EngineConfig;
use crate::metrics::{Metrics, MetricsConfig};
use crate::pipeline::Pipeline;
use crate::probe::{self, DaemonProbeArgs};
use crate::trace::CaptureArgs;

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
    pub fn metrics_config(
        &self,
        mode: &'static str,
        watch: &[crate::base::WatchedPort],
    ) -> MetricsConfig {
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
    pub async fn start_admin(
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

/// Flags of `observer run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub probe: DaemonProbeArgs,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

impl RunArgs {
    /// Every setting of `observer run` that parsed but does not fit with the others.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.capture.to_config().validate()?;
        self.probe.validate()?;
        self.resources.validate()
    }

    /// The probe's settings, its upstream resolved: without `--upstream` (on the command line,
    /// in `OBSERVER_UPSTREAM` or in the config file), the Ollama whose port is watched, not a
    /// fixed 11434 that may be nothing, or another server, on this host.
    pub fn probe_args(&self) -> DaemonProbeArgs {
        let mut args = self.probe.clone();
        args.probe.probe_watched_upstream(&self.capture.watch);
        args
    }
}

/// Starts the readiness probe unless `--no-probe`, with `/ready/model` answering from it. The
/// caller resolves the upstream's default (`observer run`: [`RunArgs::probe_args`]).
pub fn start_probe(
    args: &DaemonProbeArgs,
    metrics: &Metrics,
    status: &StatusBoard,
    own_ports: OwnPorts,
) -> anyhow::Result<Option<probe::Prober>> {
    if args.no_probe {
        return Ok(None);
    }
    let prober = probe::spawn(args, metrics, own_ports)?;
    status.attach_probe(prober.readiness(), prober.upstream().to_owned());
    Ok(Some(prober))
}

/// How often exited processes are swept and kernel counters read.
const CHORE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;

    args.validate()?;
    let config = args.capture.to_config();
    let metrics = Arc::new(Metrics::new(
        args.metrics.metrics_config("ebpf", &config.watch),
    )?);
    let status = Arc::new(StatusBoard::new(
        "ebpf",
        config.watch.iter().map(|w| (w.port, w.role)).collect(),
    ));
    let admin = args.metrics.start_admin(&metrics, &status).await?;
    let admin_addr = admin.addr;

    let own_ports = OwnPorts::default();
    let _prober = start_probe(&args.probe_args(), &metrics, &status, own_ports.clone())?;
    let _collectors = collectors::start(&args.resources, &metrics, &config.watch)?;

    // Loading and verifying the programs takes seconds: off the async threads.
    let mut capture = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Capture::start(&config)).await??
    };
    let mut events = EventReader::new(capture.take_events()?)
        .context("registering the ring buffer with the runtime")?;
    let kernel_logs = match capture.take_logger() {
        Some(logger) => Some(reader::forward_kernel_logs(logger)?),
        None => None,
    };

    let mut pipeline = Pipeline::new(
        metrics.clone(),
        EngineConfig {
            max_conns: config.max_conns as usize,
        },
    );
    pipeline.ignore_peers(own_ports);
    for &(port, role) in capture.seeded_listeners() {
        pipeline.mark_local(port, role);
    }
    for conn in capture.seeded() {
        if conn.side == Side::Server {
            pipeline.mark_local(conn.port, conn.role);
        }
    }
    for conn in capture.seeded() {
        pipeline.on_conn_open(conn);
    }
    pipeline.flush(monotonic_ns(), |_| {});
    // Every loss series exists (at 0) before /readyz says 200: a scrape right after readiness
    // sees them, not only one after the first chore.
    match capture.counters() {
        Ok(counters) => pipeline.kernel_counters(&counters, 0),
        Err(err) => tracing::warn!("reading the kernel counters: {err:#}"),
    }
    status.set_programs_attached(capture.attached().len());
    status.set_ready(true);
    tracing::info!(
        "observer run: watching {} ({} programs attached, {} connections seeded); metrics on http://{admin_addr}/metrics",
        watch_list(&config.watch),
        capture.attached().len(),
        capture.seeded().len()
    );

    let mut reported = crate::pipeline::Totals::default();
    let mut chores = tokio::time::interval(CHORE_INTERVAL);
    chores.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
            ready = events.ready() => {
                if let Err(err) = ready {
                    break Err(err).context("reading the ring buffer");
                }
            }
            _ = chores.tick() => {
                match capture.sweep() {
                    Ok(sweep) => {
                        let settled = pipeline.reconcile(&sweep);
                        if settled.any() {
                            tracing::debug!(?settled, "connections put in step with the kernel's table after lost events");
                        }
                        for conn in sweep.closed {
                            pipeline.on_event(&Event::Close(conn));
                        }
                    }
                    Err(err) => tracing::warn!("sweeping connections of exited processes: {err:#}"),
                }
                status.set_hops(pipeline.hops());
                match capture.counters() {
                    Ok(counters) => {
                        let undecodable = events.decode_errors().values().sum();
                        pipeline.kernel_counters(&counters, undecodable);
                    }
                    Err(err) => tracing::warn!("reading the kernel counters: {err:#}"),
                }
            }
        }
        // Each event borrowed from the ring buffer, its bytes never copied.
        events.drain(|event| pipeline.on_event(&event));
        pipeline.flush(monotonic_ns(), |_| {});
        let totals = pipeline.totals();
        status.add_events(totals.events - reported.events);
        status.add_exchanges(totals.exchanges - reported.exchanges);
        status.set_connections_open(totals.connections as u64);
        reported = totals;
    };

    status.set_ready(false);
    capture.detach()?;
    if let Some(task) = kernel_logs {
        task.abort();
    }
    admin.stop().await;
    result?;
    let totals = pipeline.totals();
    tracing::info!(
        "observer run: stopped after {} events and {} exchanges",
        totals.events,
        totals.exchanges
    );
    Ok(ExitCode::SUCCESS)
}
