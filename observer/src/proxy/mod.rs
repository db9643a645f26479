//! `observer proxy` (SPEC §8): for hosts without eBPF, the observer takes the gateway's place
//! and forwards its traffic itself. Each client connection gets its own upstream connection;
//! bytes pass unchanged and unbuffered both ways, and the same bytes feed the same pipeline as
//! kernel events do, so `/metrics` is the same as in `observer run` (`gateway` for the client
//! side, `upstream` for the upstream side). It also runs the readiness probe (and turns away
//! requests for a model that is not ready), the resource collectors and the admin server.
//!
//! Owns the listener, the connection limit and the drain on SIGTERM; a connection's life is
//! `conn.rs`, the tap into the pipeline `feed.rs`, request parsing `request.rs`, the proxy's
//! own answers `reply.rs`.

pub mod conn;
pub mod feed;
pub mod reply;
pub mod request;

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use self::{
    conn::{Connection, Settings},
    feed::Pair,
    reply::Reply,
};
use crate::{
    admin::StatusBoard,
    capture::{Role, WatchedPort, own_ports::OwnPorts},
    collectors::{self, ResourceArgs},
    engine::EngineConfig,
    metrics::Metrics,
    pipeline::Pipeline,
    probe::{DaemonProbeArgs, parse_duration},
    run::{MetricsArgs, start_probe},
};

/// Connections over `--max-conns` that are still answered 503 at once; beyond, they are closed.
const MAX_REJECTING: usize = 64;

/// Flags of `observer proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to accept clients on (the gateway's).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "0.0.0.0:18789",
        env = "OBSERVER_LISTEN"
    )]
    pub listen: SocketAddr,
    /// Most client connections open at once; more are answered 503.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conns: u32,
    /// A request head must arrive within this once it started (slow clients get 408).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub head_timeout: Duration,
    /// A keep-alive connection without a request for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// An exchange must finish within this: 504 if nothing was answered yet, else the
    /// connection is closed.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Connecting to the upstream must succeed within this (else 502).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Largest request body forwarded; larger ones are answered 413, never cut.
    #[arg(long, value_name = "BYTES", default_value_t = 100 << 20)]
    pub max_body_bytes: u64,
    /// Add `X-Forwarded-For: <client address>` to each forwarded request.
    #[arg(long)]
    pub forwarded_for: bool,
    /// Forward requests for a model the probe finds not ready (default: answer 503).
    #[arg(long)]
    pub no_readiness_gate: bool,
    /// On SIGTERM, how long open exchanges may still take.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub probe: DaemonProbeArgs,
    #[command(flatten)]
    pub resources: ResourceArgs,
}

impl ProxyArgs {
    fn validate(&self) -> anyhow::Result<()> {
        for (flag, value) in [
            ("--head-timeout", self.head_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--timeout", self.timeout),
            ("--connect-timeout", self.connect_timeout),
        ] {
            anyhow::ensure!(!value.is_zero(), "{flag} must be more than 0");
        }
        Ok(())
    }
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let upstream = args.probe.probe.upstream.clone();
    let watch = vec![
        WatchedPort {
            port: args.listen.port(),
            role: Role::Gateway,
        },
        WatchedPort {
            port: upstream.port(),
            role: Role::Upstream,
        },
    ];
    let metrics = Arc::new(Metrics::new(args.metrics.metrics_config("proxy", &watch))?);
    let status = Arc::new(StatusBoard::new(
        "proxy",
        watch.iter().map(|w| (w.port, w.role)).collect(),
    ));
    let admin = args.metrics.start_admin(&metrics, &status).await?;
    let admin_addr = admin.addr;
    let prober = start_probe(&args.probe, &metrics, &status, OwnPorts::default())?;
    let _collectors = collectors::start(&args.resources, &metrics, &watch)?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let mut pipeline = Pipeline::new(metrics.clone(), EngineConfig::default());
    pipeline.mark_local(local.port(), Role::Gateway);
    let (feed, pipeline_task) = feed::spawn(pipeline, status.clone());
    let gate = match (&prober, args.no_readiness_gate) {
        (Some(prober), false) => Some((prober.readiness(), args.probe.probe.probe_api_interval)),
        _ => None,
    };
    let settings = Arc::new(Settings {
        upstream: upstream.clone(),
        head_timeout: args.head_timeout,
        idle_timeout: args.idle_timeout,
        exchange_timeout: args.timeout,
        connect_timeout: args.connect_timeout,
        max_body_bytes: args.max_body_bytes,
        forwarded_for: args.forwarded_for,
        gate,
    });
    status.set_ready(true);
    tracing::info!("observer proxy: {local} → {upstream}; metrics on http://{admin_addr}/metrics");
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "observer proxy listening on {local}").context("writing to stdout")?;
        stdout.flush().context("writing to stdout")?;
    }

    let slots = Arc::new(Semaphore::new(args.max_conns as usize));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut next_pair = 1u64;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let pair = Pair::new(next_pair, local.port(), upstream.port());
                next_pair += 1;
                let connection = Connection::new(
                    settings.clone(), feed.clone(), pair, client, peer, draining.clone(),
                );
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        connections.spawn(async move {
                            connection.serve(None).await;
                            drop(slot);
                        });
                    }
                    Err(_) => {
                        let Ok(rejecting) = rejecting.clone().try_acquire_owned() else {
                            continue;
                        };
                        let reply = Reply::new(
                            503,
                            format!("too many connections (--max-conns {})", args.max_conns),
                        )
                        .retry_after(Duration::from_secs(1));
                        connections.spawn(async move {
                            connection.serve(Some(reply)).await;
                            drop(rejecting);
                        });
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }

    // Drain: no new connections, idle ones close, open exchanges may finish.
    drop(listener);
    status.set_not_ready("draining after SIGTERM");
    let _ = drain.send(true);
    let open = connections.len();
    tracing::info!(
        "observer proxy: stopping; {open} connections may finish within {}",
        humantime::format_duration(args.drain_timeout)
    );
    let drained = tokio::time::timeout(args.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "observer proxy: {} connections still open after the drain timeout; closing them",
            connections.len()
        );
        connections.shutdown().await;
    }
    drop(feed);
    drop(settings);
    let _ = pipeline_task.await;
    drop(prober);
    admin.stop().await;
    Ok(ExitCode::SUCCESS)
}
