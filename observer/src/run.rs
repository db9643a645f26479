//! `observer run`: the production daemon. Starts the admin server, loads and attaches the
//! kernel capture, seeds what is already open, then moves every ring buffer batch through the
//! [`Pipeline`] (engine → metrics) until SIGINT or SIGTERM, when it detaches and exits 0.
//!
//! It owns the daemon's wiring and its periodic chores (sweeping the connections of exited
//! processes, reading the kernel's loss counters); the work itself lives in the modules it
//! calls. The admin server answers from the start (`/readyz` says 503 until the programs are
//! attached and the pipeline runs).

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;

use crate::base::{Side, clock::monotonic_ns, watch_list};
use crate::capture::{CaptureArgs, decode::Event, feed::KernelFeed};
use crate::collectors::ResourceArgs;
use crate::daemon::{Kernel, MetricsArgs, Serving, ServingConfig, Signals};
use crate::engine::EngineConfig;
use crate::pipeline::{Pipeline, Totals, own_ports::OwnPorts};
use crate::probe::DaemonProbeArgs;

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

/// How often exited processes are swept and kernel counters read.
const CHORE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::listen()?;
    args.validate()?;
    let config = args.capture.to_config();
    let own_ports = OwnPorts::default();
    let serving = Serving::start(ServingConfig {
        mode: "ebpf",
        watch: &config.watch,
        metrics: &args.metrics,
        probe: &args.probe_args(),
        resources: &args.resources,
        own_ports: own_ports.clone(),
    })
    .await?;
    let (metrics, status) = (serving.metrics.clone(), serving.status.clone());
    let mut kernel = Kernel::start(&config).await?;
    let Kernel {
        capture, events, ..
    } = &mut kernel;

    let mut pipeline = Pipeline::new(
        metrics.clone(),
        EngineConfig {
            max_conns: config.max_conns as usize,
        },
    );
    let mut feed = KernelFeed::new();
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
        Ok(counters) => feed.kernel_counters(&metrics, &counters, 0),
        Err(err) => tracing::warn!("reading the kernel counters: {err:#}"),
    }
    status.set_programs_attached(capture.attached().len());
    status.set_ready(true);
    tracing::info!(
        "observer run: watching {} ({} programs attached, {} connections seeded); metrics on http://{}/metrics",
        watch_list(&config.watch),
        capture.attached().len(),
        capture.seeded().len(),
        serving.admin_addr
    );

    let mut reported_events = 0;
    let mut reported = Totals::default();
    let mut chores = tokio::time::interval(CHORE_INTERVAL);
    chores.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            () = signals.recv() => break Ok(()),
            ready = events.ready() => {
                if let Err(err) = ready {
                    break Err(err).context("reading the ring buffer");
                }
            }
            _ = chores.tick() => {
                match capture.sweep() {
                    Ok(sweep) => {
                        let settled = feed.reconcile(&mut pipeline, &sweep);
                        if settled.any() {
                            tracing::debug!(?settled, "connections put in step with the kernel's table after lost events");
                        }
                        for conn in sweep.closed {
                            feed.on_event(&mut pipeline, &Event::Close(conn));
                        }
                    }
                    Err(err) => tracing::warn!("sweeping connections of exited processes: {err:#}"),
                }
                status.set_hops(pipeline.hops());
                match capture.counters() {
                    Ok(counters) => {
                        let undecodable = events.decode_errors().values().sum();
                        feed.kernel_counters(&metrics, &counters, undecodable);
                    }
                    Err(err) => tracing::warn!("reading the kernel counters: {err:#}"),
                }
            }
        }
        // Each event borrowed from the ring buffer, its bytes never copied.
        events.drain(|event| feed.on_event(&mut pipeline, &event));
        pipeline.flush(monotonic_ns(), |_| {});
        feed.publish(&metrics);
        let totals = pipeline.totals();
        status.add_events(feed.events() - reported_events);
        status.add_exchanges(totals.exchanges - reported.exchanges);
        status.set_connections_open(totals.connections as u64);
        reported_events = feed.events();
        reported = totals;
    };

    status.set_ready(false);
    kernel.stop()?;
    serving.stop().await;
    result?;
    tracing::info!(
        "observer run: stopped after {} events and {} exchanges",
        feed.events(),
        pipeline.totals().exchanges
    );
    Ok(ExitCode::SUCCESS)
}
