//! `observer demo`: the whole product on a machine with nothing else. It starts a simulated
//! Ollama (`observer sim`), a gateway in front of it (nginx when installed, else `observer
//! proxy`), the observer (eBPF mode when `observer check` passes, else proxy mode, saying which
//! and why), and simulated chat users; then shows a live summary read from the observer's own
//! `/metrics` every second, until Ctrl-C or `--duration`. Everything it started stops with it.
//!
//! Owns the orchestration only. The processes are the real binaries with their real flags, so
//! what the demo shows is what a host running them would show.

mod children;
mod nginx;
pub mod summary;
mod traffic;

use std::{
    io::{IsTerminal as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    signal::unix::{SignalKind, signal},
};

use self::{
    children::{Child, Stdout},
    summary::{History, View},
    traffic::Traffic,
};
use observer::base::{Role, WatchedPort};
use observer::{check, metrics::scrape::Scrape};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (`20s`, `5m`); without it, run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// `auto`: eBPF mode when `observer check` passes, else proxy mode; or force one.
    #[arg(long, value_enum, default_value_t = DemoMode::Auto)]
    pub mode: DemoMode,
    /// Simulated chat users.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub users: u16,
    /// The simulated Ollama's address (a free port on the same address if this one is taken).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:11434")]
    pub upstream: SocketAddr,
    /// The gateway's address (a free port if taken).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18789")]
    pub gateway: SocketAddr,
    /// The observer's admin server, with `/metrics` (a free port if taken).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Models the simulator serves, the users ask for and the probe checks (repeatable).
    #[arg(long = "model", value_name = "NAME", default_values = ["llama3.2:1b", "qwen2.5:0.5b"])]
    pub models: Vec<String>,
    /// Also write the final summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoMode {
    Auto,
    Ebpf,
    Proxy,
}

/// What was started, for the banner and the JSON summary.
#[derive(Debug, serde::Serialize)]
struct Setup {
    mode: &'static str,
    why: String,
    gateway: String,
    gateway_addr: SocketAddr,
    upstream_addr: SocketAddr,
    metrics_url: String,
}

#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    setup: &'a Setup,
    client_sent: u64,
    client_succeeded: u64,
    all_models_ready: bool,
    observer: &'a View,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("observer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut demo = Demo {
        children: Vec::new(),
        dir,
        started: Instant::now(),
    };
    let result = demo.run(&args).await;
    demo.stop_children();
    match &result {
        // Logs are only worth keeping when something went wrong.
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&demo.dir);
        }
        Err(_) => eprintln!("logs of the demo's processes: {}", demo.dir.display()),
    }
    result
}

struct Demo {
    /// In start order; stopped in reverse.
    children: Vec<Child>,
    dir: PathBuf,
    started: Instant,
}

impl Demo {
    async fn run(&mut self, args: &DemoArgs) -> anyhow::Result<ExitCode> {
        let upstream = available(args.upstream, "the simulated Ollama")?;
        let gateway = available(args.gateway, "the gateway")?;
        let metrics = available(args.metrics_addr, "the observer's /metrics")?;
        let (mode, why) = choose_mode(args.mode, gateway.port(), upstream.port()).await?;
        let setup = self
            .start(args, mode, why, upstream, gateway, metrics)
            .await?;
        println!(
            "observer demo: {} mode ({})\n  \
             simulated Ollama  http://{}   (observer sim, {})\n  \
             gateway           http://{}   ({})\n  \
             metrics           {}\n  \
             {} simulated chat users; {}",
            setup.mode,
            setup.why,
            setup.upstream_addr,
            SIM_SETTINGS.map(|(k, v)| format!("{k}={v}")).join(" "),
            setup.gateway_addr,
            setup.gateway,
            setup.metrics_url,
            args.users,
            match args.duration {
                Some(d) => format!("stopping after {}", humantime::format_duration(d)),
                None => "Ctrl-C stops everything".into(),
            }
        );
        let traffic = Traffic::start(gateway, &args.models, args.users.into(), seed());
        let history = self.watch(args, metrics, &traffic).await;
        let stats = traffic.stats.clone();
        traffic.stop(Duration::from_secs(10)).await;
        let mut history = history?;
        let client_sent = stats.sent.load(Ordering::Relaxed);
        let client_succeeded = stats.succeeded.load(Ordering::Relaxed);
        // The observer reports what it has seen once its pipeline has caught up: wait for the
        // last exchanges to reach /metrics, briefly.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(3);
        let total = loop {
            let page = fetch_metrics(metrics).await?;
            history.push(self.elapsed(), page);
            let total = history.total().context("no scrape of /metrics")?;
            if total.requests >= client_sent || Instant::now() >= deadline {
                break total;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        print!(
            "{}",
            summary::render_total(&total, client_sent, client_succeeded)
        );
        if let Some(path) = &args.summary_json {
            let report = Report {
                setup: &setup,
                client_sent,
                client_succeeded,
                all_models_ready: summary::all_ready(&total),
                observer: &total,
            };
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(ExitCode::SUCCESS)
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts the simulator, the gateway and the observer, and waits until each is ready.
    async fn start(
        &mut self,
        args: &DemoArgs,
        mode: &'static str,
        why: String,
        upstream: SocketAddr,
        gateway: SocketAddr,
        metrics: SocketAddr,
    ) -> anyhow::Result<Setup> {
        let exe = std::env::current_exe().context("finding the observer binary")?;
        let models = args
            .models
            .iter()
            .flat_map(|m| ["--model".to_owned(), m.clone()]);

        let mut sim = observer(&exe, ["sim", "--listen", &upstream.to_string()]);
        sim.args(models.clone());
        // Set the way an operator sets Ollama's: the observer reads them from its environment.
        sim.envs(SIM_SETTINGS);
        let sim = self.spawn("observer sim", sim, Stdout::Piped)?;
        tokio::task::block_in_place(|| sim.ready_line("observer sim listening on ", SIM_START))?;

        let gateway_name;
        if mode == "proxy" {
            // In proxy mode the observer is the gateway.
            let mut proxy = proxy_command(&exe, gateway, upstream, &metrics.to_string());
            proxy.args(models);
            self.spawn("observer proxy", proxy, Stdout::Logged)?;
            gateway_name = "observer proxy: the gateway and the observer in one".to_owned();
        } else {
            if nginx::installed() {
                let child = nginx::start(&self.dir, gateway, upstream)?;
                self.children.push(child);
                gateway_name = "nginx".to_owned();
            } else {
                // A plain forwarder to observe: its own metrics go to a port nobody reads.
                let mut proxy = proxy_command(&exe, gateway, upstream, "127.0.0.1:0");
                proxy.arg("--no-probe");
                self.spawn("observer proxy (gateway)", proxy, Stdout::Logged)?;
                gateway_name = "observer proxy as the gateway: nginx is not installed".to_owned();
            }
            let mut run = observer(
                &exe,
                [
                    "run",
                    "--watch",
                    &format!("{}=gateway", gateway.port()),
                    "--watch",
                    &format!("{}=upstream", upstream.port()),
                    "--upstream",
                    &upstream.to_string(),
                    "--metrics-addr",
                    &metrics.to_string(),
                ],
            );
            run.args(models);
            self.spawn("observer run", run, Stdout::Logged)?;
        }
        self.wait_until_serving(gateway, metrics).await?;
        Ok(Setup {
            mode,
            why,
            gateway: gateway_name,
            gateway_addr: gateway,
            upstream_addr: upstream,
            metrics_url: format!("http://{metrics}/metrics"),
        })
    }

    fn spawn(
        &mut self,
        name: &str,
        command: Command,
        stdout: Stdout,
    ) -> anyhow::Result<&mut Child> {
        let log = self.dir.join(format!("{}.log", name.replace(' ', "-")));
        self.children
            .push(Child::spawn(name, command, &log, stdout)?);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// Waits for the gateway to accept connections and the observer to answer `/readyz`.
    async fn wait_until_serving(
        &mut self,
        gateway: SocketAddr,
        metrics: SocketAddr,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            self.ensure_running()?;
            let gateway_up = TcpStream::connect(gateway).await.is_ok();
            let observer_ready = matches!(http_get(metrics, "/readyz").await, Ok((200, _)));
            if gateway_up && observer_ready {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not ready after {}s: gateway {}, observer {}",
                READY_WITHIN.as_secs(),
                if gateway_up { "up" } else { "not accepting" },
                if observer_ready {
                    "ready"
                } else {
                    "not ready (/readyz)"
                },
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.children.iter_mut().try_for_each(Child::ensure_running)
    }

    /// The live summary: one scrape a second until the duration ends or a signal comes.
    async fn watch(
        &mut self,
        args: &DemoArgs,
        metrics: SocketAddr,
        traffic: &Traffic,
    ) -> anyhow::Result<History> {
        let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let end = args.duration.map(|d| tokio::time::Instant::now() + d);
        let until_end = async {
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(until_end);
        let terminal = std::io::stdout().is_terminal();
        let mut history = History::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut drawn = 0;
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                () = &mut until_end => break,
            }
            self.ensure_running()?;
            history.push(self.elapsed(), fetch_metrics(metrics).await?);
            let Some(view) = history.live() else { continue };
            let sent = traffic.stats.sent.load(Ordering::Relaxed);
            let lines = summary::render_live(&view, self.elapsed(), sent);
            ticks += 1;
            let mut out = std::io::stdout().lock();
            if terminal {
                // Redraw in place: up over the last block, clearing each line.
                if drawn > 0 {
                    let _ = write!(out, "\x1b[{drawn}A");
                }
                for line in &lines {
                    let _ = writeln!(out, "\x1b[2K{line}");
                }
                drawn = lines.len();
            } else if ticks.is_multiple_of(5) {
                // Logs and pipes get a block every 5 s rather than a redraw every second.
                for line in &lines {
                    let _ = writeln!(out, "{line}");
                }
            }
            let _ = out.flush();
        }
        Ok(history)
    }

    fn stop_children(&mut self) {
        while let Some(mut child) = self.children.pop() {
            child.stop(Duration::from_secs(5));
        }
    }
}

/// The simulated Ollama's capacity: fewer slots than users, so that requests queue.
const SIM_SETTINGS: [(&str, &str); 3] = [
    ("OLLAMA_NUM_PARALLEL", "2"),
    ("OLLAMA_MAX_QUEUE", "64"),
    ("OLLAMA_CONTEXT_LENGTH", "4096"),
];

/// How long the simulator may take to print its address.
const SIM_START: Duration = Duration::from_secs(10);
/// How long the gateway and the observer may take to serve.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn observer<'a>(exe: &Path, args: impl IntoIterator<Item = &'a str>) -> Command {
    let mut command = Command::new(exe);
    command.args(args);
    command
}

/// `observer proxy` from `gateway` to `upstream`, its admin server on `metrics`.
fn proxy_command(exe: &Path, gateway: SocketAddr, upstream: SocketAddr, metrics: &str) -> Command {
    observer(
        exe,
        [
            "proxy",
            "--listen",
            &gateway.to_string(),
            "--upstream",
            &upstream.to_string(),
            "--metrics-addr",
            metrics,
        ],
    )
}

/// `wanted`, or a free port on the same address when `wanted`'s port is taken (said once).
fn available(wanted: SocketAddr, what: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(listener) = TcpListener::bind(wanted) {
        drop(listener);
        return Ok(wanted);
    }
    let free = TcpListener::bind(SocketAddr::new(wanted.ip(), 0))
        .and_then(|listener| listener.local_addr())
        .with_context(|| format!("finding a free port for {what} on {}", wanted.ip()))?;
    println!(
        "port {} is taken: {what} uses {} instead",
        wanted.port(),
        free.port()
    );
    Ok(free)
}

/// eBPF mode when asked for or when `observer check`'s tests pass; proxy mode otherwise.
async fn choose_mode(
    mode: DemoMode,
    gateway: u16,
    upstream: u16,
) -> anyhow::Result<(&'static str, String)> {
    if mode == DemoMode::Proxy {
        return Ok(("proxy", "--mode proxy".into()));
    }
    let watch = vec![
        WatchedPort {
            port: gateway,
            role: Role::Gateway,
        },
        WatchedPort {
            port: upstream,
            role: Role::Upstream,
        },
    ];
    let report = tokio::task::spawn_blocking(move || check::gather(&watch)).await?;
    match (report.mode, mode) {
        ("ebpf", _) => Ok(("eBPF", "observer check passed".into())),
        (_, DemoMode::Ebpf) => anyhow::bail!(
            "--mode ebpf, but eBPF mode cannot run here: {}",
            report.problems.join("; ")
        ),
        _ => Ok((
            "proxy",
            format!(
                "eBPF mode cannot run here: {}; see `observer check`",
                report.problems.join("; ")
            ),
        )),
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

async fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<Scrape> {
    match http_get(addr, "/metrics").await {
        Ok((200, body)) => Ok(Scrape::parse(&body)),
        Ok((status, _)) => anyhow::bail!("the observer's /metrics answered {status}"),
        Err(err) => Err(err).context("scraping the observer's /metrics"),
    }
}

/// A one-shot HTTP/1.0 GET on the loopback admin server: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("no answer within 5s")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("a response without a complete head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("a response without a status")?;
    Ok((status, body.to_owned()))
}
