//! `observer proxy` (docs/DESIGN.md#fallback-proxy): for hosts without eBPF, the observer takes the
//! gateway's place and forwards its traffic itself. Each client connection gets its own upstream
//! connection; bytes pass unchanged and unbuffered both ways, and the same bytes feed the same
//! pipeline as kernel events do, so `/metrics` is the same as in `observer run` (`gateway` for the
//! client side, `upstream` for the upstream side). It also runs the readiness probe (and turns away
//! requests for a model that is not ready), the resource collectors and the admin server.
//!
//! Owns the listener, the connection limit and the drain on SIGTERM; a connection's life is
//! `conn.rs`, the tap into the pipeline `feed.rs`, request parsing `request.rs`, the proxy's
//! own answers `reply.rs`.

pub mod conn;
pub mod feed;
pub mod reply;
pub mod request;

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::TcpSocket,
    sync::{Semaphore, watch},
    task::JoinSet,
};

use self::{
    conn::{Connection, Settings},
    feed::{Pair, Shared, Tap},
    reply::Reply,
};
use crate::base::{Role, WatchedPort, clock::parse_duration};
use crate::{
    collectors::ResourceArgs,
    daemon::{MetricsArgs, Serving, ServingConfig, Signals},
    pipeline::own_ports::OwnPorts,
    probe::DaemonProbeArgs,
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
    /// Every setting of `observer proxy` that parsed but does not fit with the others.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.probe.validate()?;
        self.resources.validate()?;
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
    let mut signals = Signals::listen()?;
    args.validate()?;
    let upstream = args.probe.probe.upstream();
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
    let serving = Serving::start(ServingConfig {
        mode: "proxy",
        watch: &watch,
        metrics: &args.metrics,
        probe: &args.probe,
        resources: &args.resources,
        own_ports: OwnPorts::default(),
    })
    .await?;
    let (metrics, status) = (serving.metrics.clone(), serving.status.clone());
    let admin_addr = serving.admin_addr;

    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners =
        bind(args.listen, workers).with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listeners[0].local_addr()?;
    let gate = match (&serving.prober, args.no_readiness_gate) {
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
    let (drain, draining) = watch::channel(false);
    let context = Arc::new(Workers {
        settings,
        shared: Shared::new(metrics.clone(), status.clone()),
        slots: Arc::new(Semaphore::new(args.max_conns as usize)),
        rejecting: Arc::new(Semaphore::new(MAX_REJECTING)),
        max_conns: args.max_conns,
        listen_port: local.port(),
        upstream_port: upstream.port(),
        next_pair: AtomicU64::new(1),
        draining,
        drain_timeout: args.drain_timeout,
    });
    let (ended, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let context = context.clone();
        let ended = ended.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                let result = worker(listener, context);
                let _ = ended.send(result);
            })
            .context("starting a proxy worker thread")?;
        threads.push(thread);
    }
    drop(ended);
    status.set_ready(true);
    tracing::info!(
        "observer proxy: {local} → {upstream} ({workers} workers); metrics on http://{admin_addr}/metrics"
    );
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "observer proxy listening on {local}").context("writing to stdout")?;
        stdout.flush().context("writing to stdout")?;
    }

    let failed = tokio::select! {
        () = signals.recv() => None,
        result = ended_rx.recv() => Some(result),
    };
    // Drain: no new connections, idle ones close, open exchanges may finish.
    status.set_not_ready("draining after SIGTERM");
    let _ = drain.send(true);
    let open = args.max_conns as usize - context.slots.available_permits();
    tracing::info!(
        "observer proxy: stopping; {open} connections may finish within {}",
        humantime::format_duration(args.drain_timeout)
    );
    let stopped_early = failed.is_some();
    let mut errors = Vec::new();
    if let Some(Some(Err(err))) = failed {
        errors.push(err);
    }
    while let Some(result) = ended_rx.recv().await {
        if let Err(err) = result {
            errors.push(err);
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
    serving.stop().await;
    if let Some(err) = errors.into_iter().next() {
        return Err(err.context("a proxy worker failed"));
    }
    if stopped_early {
        anyhow::bail!("a proxy worker stopped on its own");
    }
    Ok(ExitCode::SUCCESS)
}

/// What every worker thread shares.
struct Workers {
    settings: Arc<Settings>,
    shared: Shared,
    slots: Arc<Semaphore>,
    rejecting: Arc<Semaphore>,
    max_conns: u32,
    listen_port: u16,
    upstream_port: u16,
    next_pair: AtomicU64,
    draining: watch::Receiver<bool>,
    drain_timeout: Duration,
}

/// `n` listeners on `addr`, sharing its port (`SO_REUSEPORT`): the kernel spreads new
/// connections over them, one per worker. Port 0 picks one port for all.
fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        addr = listener.local_addr()?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

/// One worker: a single-threaded runtime accepting on its own listener and serving what it
/// accepted, every connection's pipeline inline. Nothing moves between workers: no wake-ups
/// across threads, as in nginx's worker processes. Returns after the drain.
fn worker(listener: std::net::TcpListener, context: Arc<Workers>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a proxy worker's runtime")?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).context("registering a listener")?;
        let mut draining = context.draining.clone();
        // The worker's connections wait on a signal of its own: waiting on the process-wide one
        // would touch memory every worker shares on each request.
        let (drain, worker_draining) = watch::channel(false);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = draining.wait_for(|d| *d) => break,
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
                    let n = context.next_pair.fetch_add(1, Ordering::Relaxed);
                    let pair = Pair::new(n, context.listen_port, context.upstream_port);
                    let connection = Connection::new(
                        context.settings.clone(),
                        Tap::new(&context.shared, n),
                        pair,
                        client,
                        peer,
                        worker_draining.clone(),
                    );
                    match context.slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            connections.spawn(async move {
                                connection.serve(None).await;
                                drop(slot);
                            });
                        }
                        Err(_) => {
                            let Ok(rejecting) = context.rejecting.clone().try_acquire_owned() else {
                                continue;
                            };
                            let reply = Reply::new(
                                503,
                                format!("too many connections (--max-conns {})", context.max_conns),
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
        drop(listener);
        let _ = drain.send(true);
        let drained = tokio::time::timeout(context.drain_timeout, async {
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
        Ok(())
    })
}
