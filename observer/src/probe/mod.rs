//! The model readiness probe (docs/DESIGN.md#readiness-probe): "the port answers" is not "the model
//! can answer". Three stages check the upstream the way a user's client would, each on its own
//! interval: `tcp` (a connection opens), `api` (`/api/tags` lists the model), `generate` (a
//! streamed chat returns a first chunk in time). The daemon runs them forever ([`spawn`]) and
//! exports readiness as metrics and on `/ready/model`; `observer probe` runs each once ([`run`]).
//!
//! Owns the schedule and the wiring: checks live in `check`, verdicts in `state`, metric
//! families in `metrics`, the exec hook in `hook`. The probe's own connections come from the
//! daemon's process, which the kernel capture excludes, so they never reach request metrics.

pub mod check;
pub mod hook;
pub mod metrics;
pub mod state;

use std::{
    fmt,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::Serialize;
use tokio::task::JoinSet;

use self::{
    check::{CheckError, Client, ModelList, Upstream, Version},
    hook::{Hook, Unready},
    metrics::ProbeMetrics,
    state::{CheckResult, ModelHealth, ProbeState, Thresholds, Verdict, probed_names},
};
use crate::base::{Role, WatchedPort, clock::parse_duration};
use crate::{metrics::Metrics, pipeline::own_ports::OwnPorts};

/// One of the three stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Tcp,
    Api,
    Generate,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp",
            Stage::Api => "api",
            Stage::Generate => "generate",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flags of the probe, shared by `observer run`, `observer proxy` and `observer probe`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Readiness probe")]
pub struct ProbeArgs {
    /// The Ollama server to probe: host:port or http://host:port. Default: 127.0.0.1:11434,
    /// except that `observer run` probes 127.0.0.1 on its first `--watch PORT=upstream` port.
    // No clap default: `observer run` must tell "not given" (anywhere: flag, variable, config
    // file) from "given as 127.0.0.1:11434"; `upstream()` and `probe_watched_upstream` resolve.
    #[arg(long, value_name = "ADDR", env = "OBSERVER_UPSTREAM")]
    pub upstream: Option<Upstream>,
    /// A model that must be able to answer (repeatable; the environment takes a comma list).
    /// Without one, only the tcp and api stages run.
    #[arg(
        long = "model",
        value_name = "NAME",
        env = "OBSERVER_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Interval of the tcp stage (a connection opens).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub probe_tcp_interval: Duration,
    /// Interval of the api stage (/api/tags lists the model; /api/ps and /api/version are read
    /// too).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub probe_api_interval: Duration,
    /// Interval of the generate stage (a streamed chat answers); 0 disables it.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub probe_generate_interval: Duration,
    /// Timeout of the tcp stage.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub probe_tcp_timeout: Duration,
    /// Timeout of the api stage.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub probe_api_timeout: Duration,
    /// The generate stage fails when no first chunk arrives within this.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub probe_first_chunk_timeout: Duration,
    /// The generate stage fails when its one-token reply is not finished within this.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub probe_generate_timeout: Duration,
    /// Consecutive failures of a stage that make a model not ready.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub probe_failures: u32,
    /// Consecutive successes of a stage that make a model ready again.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub probe_successes: u32,
}

/// Flags only a long-running daemon has.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Readiness probe")]
pub struct DaemonProbeArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Do not probe the upstream (no model_* or probe_* metrics; /ready/model answers 404).
    #[arg(long)]
    pub no_probe: bool,
    /// A command run through `sh -c` when a model turns not ready (OBSERVER_MODEL and
    /// OBSERVER_REASON in its environment), e.g. "systemctl restart ollama".
    #[arg(long, value_name = "CMD", env = "OBSERVER_ON_UNREADY_EXEC")]
    pub on_unready_exec: Option<String>,
    /// Least time between two runs of --on-unready-exec; a run still going then is killed.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub exec_cooldown: Duration,
}

impl DaemonProbeArgs {
    /// The probe's settings, unless the probe is off.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.no_probe {
            return Ok(());
        }
        self.probe.validate()
    }
}

impl ProbeArgs {
    /// The upstream to probe: `--upstream` from the command line, `OBSERVER_UPSTREAM` or the
    /// config file, else Ollama's own default address on this host.
    pub fn upstream(&self) -> Upstream {
        self.upstream
            .clone()
            .unwrap_or_else(|| Upstream::loopback(check::DEFAULT_PORT))
    }

    /// For a daemon that watches ports (`observer run`): without `--upstream`, probe the
    /// upstream whose traffic it measures, the first port watched as `upstream`, on loopback
    /// (the probe calls the Ollama of this host). With no upstream watched, [`Self::upstream`]'s
    /// default stays. An `--upstream` given anywhere always wins.
    pub fn probe_watched_upstream(&mut self, watch: &[WatchedPort]) {
        if self.upstream.is_none() {
            self.upstream = watch
                .iter()
                .find(|w| w.role == Role::Upstream)
                .map(|w| Upstream::loopback(w.port));
        }
    }

    /// The stages that run, in order.
    pub fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::Tcp, Stage::Api];
        if !self.models.is_empty() && !self.probe_generate_interval.is_zero() {
            stages.push(Stage::Generate);
        }
        stages
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            failures: self.probe_failures,
            successes: self.probe_successes,
        }
    }

    fn interval(&self, stage: Stage) -> Duration {
        match stage {
            Stage::Tcp => self.probe_tcp_interval,
            Stage::Api => self.probe_api_interval,
            Stage::Generate => self.probe_generate_interval,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for stage in [Stage::Tcp, Stage::Api] {
            anyhow::ensure!(
                !self.interval(stage).is_zero(),
                "--probe-{stage}-interval must be more than 0 (only the generate stage can be disabled)"
            );
        }
        if let Some(empty) = self.models.iter().find(|m| m.trim().is_empty()) {
            anyhow::bail!("--model {empty:?}: a model name cannot be empty");
        }
        Ok(())
    }
}

/// The last verdicts, shared with the admin server's `/ready/model`.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<ProbeState>>);

/// What `/ready/model` answers.
#[derive(Debug, Clone, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub upstream: String,
    pub models: Vec<ModelHealth>,
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        // Every update is a whole record() call; a panic cannot leave half of one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict on `model`; without `--model`, the verdict on the upstream. None when the
    /// model is not probed.
    pub fn verdict(&self, model: &str) -> Option<Verdict> {
        let state = self.lock();
        let models = state.models();
        match models {
            [only] if only.model.is_empty() => Some(only.verdict),
            _ => models.iter().find(|m| m.model == model).map(|m| m.verdict),
        }
    }

    /// All models, or just `model` (None when it is not probed).
    pub fn report(&self, upstream: &str, model: Option<&str>) -> Option<ReadinessReport> {
        let state = self.lock();
        let models: Vec<ModelHealth> = state
            .models()
            .iter()
            .filter(|m| model.is_none_or(|wanted| m.model == wanted))
            .cloned()
            .collect();
        if models.is_empty() {
            return None;
        }
        Some(ReadinessReport {
            ready: models.iter().all(|m| m.verdict == Verdict::Ready),
            upstream: upstream.to_owned(),
            models,
        })
    }
}

/// The running probe: its tasks stop when this is dropped.
pub struct Prober {
    readiness: Readiness,
    upstream: String,
    _tasks: JoinSet<()>,
}

impl Prober {
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

/// Where one stage's results go: verdicts, metrics, logs and the hook.
#[derive(Clone)]
struct Sink {
    readiness: Readiness,
    metrics: ProbeMetrics,
    hook: Option<Hook>,
}

impl Sink {
    fn record(&self, model: &str, stage: Stage, result: CheckResult) {
        self.metrics.record(model, stage, &result);
        let Some(change) = self.readiness.lock().record(model, stage, result) else {
            return;
        };
        let name = if change.model.is_empty() {
            "the upstream"
        } else {
            change.model.as_str()
        };
        self.metrics.set_verdict(&change.model, change.to);
        match change.to {
            Verdict::Ready => tracing::info!("probe: {name} is ready"),
            Verdict::NotReady => {
                tracing::warn!("probe: {name} is not ready ({})", change.reason);
                if let Some(hook) = &self.hook {
                    hook.trigger(Unready {
                        model: change.model,
                        reason: change.reason,
                    });
                }
            }
            Verdict::Unknown => {}
        }
    }
}

/// Starts the probe's stage loops (and the exec hook's task) on the current runtime. Its
/// connections' ports are listed in `own_ports` for the pipeline to ignore.
pub fn spawn(
    args: &DaemonProbeArgs,
    metrics: &Metrics,
    own_ports: OwnPorts,
) -> anyhow::Result<Prober> {
    let probe = Arc::new(args.probe.clone());
    probe.validate()?;
    let upstream = probe.upstream();
    let client = Client::new(upstream.clone(), own_ports);
    let stages = probe.stages();
    let readiness = Readiness(Arc::new(Mutex::new(ProbeState::new(
        &probe.models,
        &stages,
        probe.thresholds(),
    ))));
    let probe_metrics = ProbeMetrics::register(metrics, &probe.models)?;
    for model in probed_names(&probe.models) {
        probe_metrics.set_verdict(&model, Verdict::Unknown);
    }
    let sink = Sink {
        readiness: readiness.clone(),
        metrics: probe_metrics,
        hook: args
            .on_unready_exec
            .clone()
            .map(|command| Hook::spawn(command, args.exec_cooldown)),
    };
    let mut tasks = JoinSet::new();
    for stage in stages {
        let (probe, sink, client) = (probe.clone(), sink.clone(), client.clone());
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval(probe.interval(stage));
            // A slow check delays the next one instead of firing a burst after it.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                for (model, result) in run_stage(&probe, &client, stage, Some(&sink.metrics)).await
                {
                    sink.record(&model, stage, result);
                }
            }
        });
    }
    tracing::info!(
        "probe: checking {} every {} (tcp), {} (api){}",
        upstream,
        humantime::format_duration(probe.probe_tcp_interval),
        humantime::format_duration(probe.probe_api_interval),
        if probe.stages().contains(&Stage::Generate) {
            format!(
                ", {} (generate: {})",
                humantime::format_duration(probe.probe_generate_interval),
                probe.models.join(", ")
            )
        } else {
            String::new()
        }
    );
    Ok(Prober {
        readiness,
        upstream: upstream.to_string(),
        _tasks: tasks,
    })
}

fn result_of<T>(started: tokio::time::Instant, outcome: &Result<T, CheckError>) -> CheckResult {
    CheckResult {
        ok: outcome.is_ok(),
        duration_s: started.elapsed().as_secs_f64(),
        first_chunk_s: None,
        error: outcome
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// Runs one stage once and returns a result per probed name. The api stage also reads
/// `/api/ps` and `/api/version` into `metrics` when given.
async fn run_stage(
    probe: &ProbeArgs,
    client: &Client,
    stage: Stage,
    metrics: Option<&ProbeMetrics>,
) -> Vec<(String, CheckResult)> {
    let started = tokio::time::Instant::now();
    match stage {
        Stage::Tcp => {
            let outcome = client.tcp(probe.probe_tcp_timeout).await;
            let result = result_of(started, &outcome);
            probed_names(&probe.models)
                .into_iter()
                .map(|m| (m, result.clone()))
                .collect()
        }
        Stage::Api => {
            let outcome: Result<ModelList, _> =
                client.get_json("/api/tags", probe.probe_api_timeout).await;
            let base = result_of(started, &outcome);
            if let Some(metrics) = metrics {
                poll_loaded(probe, client, metrics).await;
            }
            probed_names(&probe.models)
                .into_iter()
                .map(|model| {
                    let mut result = base.clone();
                    if let Ok(list) = &outcome
                        && !model.is_empty()
                        && !list.models.iter().any(|m| m.is(&model))
                    {
                        result.ok = false;
                        result.error = format!("/api/tags does not list {model:?}");
                    }
                    (model, result)
                })
                .collect()
        }
        Stage::Generate => {
            let mut results = Vec::new();
            for model in &probe.models {
                let started = tokio::time::Instant::now();
                let outcome = client
                    .generate(
                        model,
                        probe.probe_first_chunk_timeout,
                        probe.probe_generate_timeout,
                    )
                    .await;
                let mut result = result_of(started, &outcome);
                result.first_chunk_s = outcome.ok().map(|g| g.first_chunk.as_secs_f64());
                results.push((model.clone(), result));
            }
            results
        }
    }
}

/// Reads `/api/ps` and `/api/version` into the metrics; failures are logged at debug (the api
/// stage already reports an unreachable upstream).
async fn poll_loaded(probe: &ProbeArgs, client: &Client, metrics: &ProbeMetrics) {
    let timeout = probe.probe_api_timeout;
    match client.get_json::<ModelList>("/api/ps", timeout).await {
        Ok(list) => metrics.set_loaded(&list.models),
        Err(err) => tracing::debug!("probe: /api/ps: {err}"),
    }
    match client.get_json::<Version>("/api/version", timeout).await {
        Ok(version) => metrics.set_version(&version.version),
        Err(err) => tracing::debug!("probe: /api/version: {err}"),
    }
}

/// Exit status of `observer probe` when the upstream cannot be reached at all.
pub const EXIT_UNREACHABLE: u8 = 3;

/// `observer probe`: each enabled stage once, a line per stage and model on stdout; exit 0
/// when ready, 1 when a stage failed, [`EXIT_UNREACHABLE`] when no connection opens.
pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    args.validate()?;
    let upstream = args.upstream();
    let client = Client::new(upstream.clone(), OwnPorts::default());
    let mut out = String::new();
    let mut all_ok = true;
    let mut unreachable = false;
    for stage in args.stages() {
        let started = tokio::time::Instant::now();
        if stage == Stage::Tcp {
            let outcome = client.tcp(args.probe_tcp_timeout).await;
            unreachable = outcome.as_ref().is_err_and(CheckError::is_unreachable);
            let result = result_of(started, &outcome);
            all_ok &= result.ok;
            out.push_str(&line(stage, &upstream.to_string(), &result));
            if unreachable {
                break;
            }
            continue;
        }
        for (model, result) in run_stage(&args, &client, stage, None).await {
            all_ok &= result.ok;
            out.push_str(&line(stage, &model, &result));
        }
    }
    out.push_str(if all_ok { "ready\n" } else { "not ready\n" });
    print!("{out}");
    Ok(match (all_ok, unreachable) {
        (true, _) => ExitCode::SUCCESS,
        (false, true) => ExitCode::from(EXIT_UNREACHABLE),
        (false, false) => ExitCode::FAILURE,
    })
}

fn line(stage: Stage, subject: &str, result: &CheckResult) -> String {
    let subject = if subject.is_empty() { "-" } else { subject };
    let verdict = if result.ok { "ok" } else { "FAIL" };
    let mut line = format!(
        "{:<9} {:<24} {:<4} {:>9.1} ms",
        stage.as_str(),
        subject,
        verdict,
        result.duration_s * 1e3
    );
    if let Some(first) = result.first_chunk_s {
        line.push_str(&format!("  first chunk {:.1} ms", first * 1e3));
    }
    if !result.error.is_empty() {
        line.push_str("  ");
        line.push_str(&result.error);
    }
    line.push('\n');
    line
}
