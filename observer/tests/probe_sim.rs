//! The readiness probe against `observer sim` (in process, short intervals): each stage's
//! failure, the thresholds, recovery, the metrics it writes, and the exec hook's cooldown.
//!
//! Verdicts are read from the probe's shared state at every poll: the invariant "not ready
//! exactly when a stage has failed N times in a row" is checked at each look, not timed.

mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use observer::{
    metrics::{ExpositionFormat, Metrics, MetricsConfig},
    probe::{self, DaemonProbeArgs, Readiness, Stage, state::Verdict},
};
use support::sim_client::{fast_config, start};

const MODEL: &str = "llama3.2:1b";

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    probe: DaemonProbeArgs,
}

fn flags(upstream: &str, extra: &[&str]) -> DaemonProbeArgs {
    let defaults = [
        ("--probe-tcp-interval", "100ms"),
        ("--probe-api-interval", "100ms"),
        ("--probe-generate-interval", "100ms"),
        ("--probe-first-chunk-timeout", "300ms"),
        ("--probe-generate-timeout", "2s"),
    ];
    let mut argv = vec!["probe", "--upstream", upstream];
    argv.extend_from_slice(extra);
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            argv.extend([flag, value]);
        }
    }
    Flags::parse_from(argv).probe
}

fn metrics() -> Metrics {
    Metrics::new(MetricsConfig::default()).unwrap()
}

fn scrape(metrics: &Metrics) -> String {
    String::from_utf8(metrics.encode(ExpositionFormat::Text).1).unwrap()
}

/// The value of one series in a text scrape, by its exact line prefix.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls the verdict of `model` until `want`, checking at every look that it agrees with the
/// stages' streaks under the thresholds (`failures`, `successes`).
fn wait_for(
    readiness: &Readiness,
    model: &str,
    want: Verdict,
    failures: u32,
    within: Duration,
) -> probe::ReadinessReport {
    let deadline = Instant::now() + within;
    loop {
        if let Some(report) = look(readiness, model, want, failures) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "{model} not {want:?} within {within:?}: {:?}",
            readiness.report("", Some(model))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// [`wait_for`] on tokio's clock (paused in a test, it moves on while every task waits), for
/// up to 10 s of it.
async fn settle(
    readiness: &Readiness,
    model: &str,
    want: Verdict,
    failures: u32,
) -> probe::ReadinessReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(report) = look(readiness, model, want, failures) {
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{model} not {want:?} within 10 s: {:?}",
            readiness.report("", Some(model))
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One look of [`wait_for`]: the report when the verdict of `model` is `want`, after checking
/// the invariant.
fn look(
    readiness: &Readiness,
    model: &str,
    want: Verdict,
    failures: u32,
) -> Option<probe::ReadinessReport> {
    let report = readiness.report("", Some(model)).expect("model is probed");
    let health = &report.models[0];
    let failing = health
        .stages
        .iter()
        .filter(|s| s.failures_in_a_row >= failures)
        .count();
    if health.verdict == Verdict::NotReady {
        // Only a stage that failed `failures` times in a row (now or earlier in its
        // streak) can have made the model not ready.
        assert!(
            health.stages.iter().any(|s| s.verdict == Verdict::NotReady),
            "{report:?}"
        );
    } else {
        assert_eq!(failing, 0, "a stage failed {failures} times: {report:?}");
    }
    (health.verdict == want).then_some(report)
}

/// A probe of `upstream` with the test flags and `extra`, writing into fresh metrics.
fn probe_of(upstream: impl ToString, extra: &[&str]) -> (Metrics, probe::Prober) {
    let metrics = metrics();
    let prober = probe::spawn(
        &flags(&upstream.to_string(), extra),
        &metrics,
        Default::default(),
    )
    .unwrap();
    (metrics, prober)
}

/// [`wait_for`] from an async test, for up to 10 s.
fn verdict(
    readiness: &Readiness,
    model: &str,
    want: Verdict,
    failures: u32,
) -> probe::ReadinessReport {
    tokio::task::block_in_place(|| {
        wait_for(readiness, model, want, failures, Duration::from_secs(10))
    })
}

fn stage(report: &probe::ReadinessReport, stage: Stage) -> &probe::state::StageHealth {
    report.models[0]
        .stages
        .iter()
        .find(|s| s.stage == stage)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_sim_is_ready_and_the_metrics_say_so() {
    let config = fast_config();
    // The simulator answers no chat before its first token, nor a probe's generate stage.
    let first_token = config.timing.first_token.as_secs_f64();
    let sim = start(config).await;
    let (metrics, prober) = probe_of(sim.local_addr(), &["--model", MODEL]);
    let report = verdict(&prober.readiness(), MODEL, Verdict::Ready, 3);
    let generate = stage(&report, Stage::Generate).last.clone().unwrap();
    assert!(generate.ok);
    let first_chunk = generate.first_chunk_s.unwrap();
    assert!(
        first_token <= first_chunk && first_chunk <= generate.duration_s,
        "{generate:?}"
    );

    // The api stage reads /api/ps: wait until it has done so after the generate stage loaded
    // the model.
    let m = format!("model=\"{MODEL}\"");
    let loaded = format!("observer_model_loaded{{{m}}}");
    let text = tokio::task::block_in_place(|| {
        support::wait_until(Duration::from_secs(10), || {
            let text = scrape(&metrics);
            (value(&text, &loaded) == Some(1.0)).then_some(text)
        })
    })
    .unwrap_or_else(|| panic!("{loaded} never 1: {}", scrape(&metrics)));
    assert_eq!(
        value(&text, &format!("observer_model_ready{{{m}}}")),
        Some(1.0)
    );
    let first = value(
        &text,
        &format!("observer_probe_first_chunk_seconds{{{m},stage=\"generate\"}}"),
    )
    .unwrap();
    // Within the first-chunk timeout of the flags (300 ms), after the first token.
    assert!(first_token <= first && first < 0.3, "{first}");
    // A check that passed took no longer than its timeout (tcp and api: the defaults, 2 s and
    // 5 s; generate: 2 s from the flags), and a generate no less than the first token.
    for (stage, least, timeout) in [
        ("tcp", 0.0, 2.0),
        ("api", 0.0, 5.0),
        ("generate", first_token, 2.0),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("observer_probe_success{{{m},stage=\"{stage}\"}}")
            ),
            Some(1.0),
            "{stage}: {text}"
        );
        let took = value(
            &text,
            &format!("observer_probe_duration_seconds{{{m},stage=\"{stage}\"}}"),
        )
        .unwrap();
        assert!(
            least <= took && took <= timeout,
            "{stage} took {took} s: {text}"
        );
    }
    // /api/ps as the simulator reports llama3.2:1b loaded (`observer-sim/src/models.rs`): its
    // 1,321,098,329 bytes on disk plus a quarter plus 256 MiB, all of it in VRAM.
    let disk: u64 = 1_321_098_329;
    let loaded_bytes = (disk + disk / 4 + 256 * 1024 * 1024) as f64;
    for family in ["observer_model_vram_bytes", "observer_model_size_bytes"] {
        assert_eq!(
            value(&text, &format!("{family}{{{m}}}")),
            Some(loaded_bytes),
            "{family}: {text}"
        );
    }
    let version = observer_sim::DEFAULT_OLLAMA_VERSION;
    assert_eq!(
        value(
            &text,
            &format!("observer_upstream_info{{version=\"{version}\"}}")
        ),
        Some(1.0)
    );
    drop(prober);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_make_the_model_not_ready_after_three_probes_and_it_recovers() {
    // A port nothing listens on yet.
    let port = support::capture::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (metrics, prober) = probe_of(&addr, &["--model", MODEL]);
    let readiness = prober.readiness();
    let report = verdict(&readiness, MODEL, Verdict::NotReady, 3);
    let tcp = stage(&report, Stage::Tcp);
    assert!(tcp.failures_in_a_row >= 3, "{report:?}");
    assert!(
        tcp.last
            .as_ref()
            .unwrap()
            .error
            .contains("Connection refused")
    );
    let text = scrape(&metrics);
    let m = format!("model=\"{MODEL}\"");
    assert_eq!(
        value(&text, &format!("observer_model_ready{{{m}}}")),
        Some(0.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("observer_probe_success{{{m},stage=\"tcp\"}}")
        ),
        Some(0.0)
    );

    // The upstream comes up on that port: one success of each stage is enough.
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let sim = observer_sim::spawn(listener, fast_config()).unwrap();
    let report = verdict(&readiness, MODEL, Verdict::Ready, 3);
    for s in [Stage::Tcp, Stage::Api, Stage::Generate] {
        assert!(stage(&report, s).passes_in_a_row >= 1);
    }
    drop(prober);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_missing_from_the_tags_fails_the_api_stage() {
    let sim = start(fast_config()).await;
    let (metrics, prober) = probe_of(sim.local_addr(), &["--model", "qwen3:0.6b"]);
    let report = verdict(&prober.readiness(), "qwen3:0.6b", Verdict::NotReady, 3);
    assert_eq!(stage(&report, Stage::Tcp).verdict, Verdict::Ready);
    let api = stage(&report, Stage::Api).last.clone().unwrap();
    assert_eq!(api.error, "/api/tags does not list \"qwen3:0.6b\"");
    let generate = stage(&report, Stage::Generate).last.clone().unwrap();
    assert_eq!(generate.error, "HTTP 404: model 'qwen3:0.6b' not found");
    // Not loaded, so the configured model reads 0 and has no size series.
    let text = scrape(&metrics);
    assert_eq!(
        value(&text, "observer_model_loaded{model=\"qwen3:0.6b\"}"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "observer_model_vram_bytes{model=\"qwen3:0.6b\"}"),
        None
    );
    drop(prober);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_token_fails_the_generate_stage() {
    let mut config = fast_config();
    config.timing.first_token = Duration::from_millis(400);
    let sim = start(config).await;
    let (metrics, prober) = probe_of(sim.local_addr(), &["--model", MODEL]);
    let report = verdict(&prober.readiness(), MODEL, Verdict::NotReady, 3);
    assert_eq!(stage(&report, Stage::Api).verdict, Verdict::Ready);
    let generate = stage(&report, Stage::Generate);
    assert_eq!(generate.verdict, Verdict::NotReady);
    assert_eq!(
        generate.last.as_ref().unwrap().error,
        "no first chunk within 300ms"
    );
    let text = scrape(&metrics);
    let m = format!("model=\"{MODEL}\"");
    assert_eq!(
        value(
            &text,
            &format!("observer_probe_success{{{m},stage=\"generate\"}}")
        ),
        Some(0.0)
    );
    // A failed generate leaves no first-chunk value behind.
    assert_eq!(
        value(
            &text,
            &format!("observer_probe_first_chunk_seconds{{{m},stage=\"generate\"}}")
        ),
        None
    );
    drop(prober);
    sim.shutdown().await.unwrap();
}

/// On tokio's paused clock, which the probe's intervals and the in-process simulator's delays
/// run on: it moves on only while every task waits, so the checks counted over 2 s of it are
/// those the intervals schedule, however busy the machine.
#[tokio::test(start_paused = true)]
async fn thresholds_and_intervals_are_honoured() {
    let sim = start(fast_config()).await;
    let control = sim.control();
    let (_metrics, prober) = probe_of(
        sim.local_addr(),
        &[
            "--model",
            MODEL,
            "--probe-failures",
            "2",
            "--probe-successes",
            "3",
            "--probe-tcp-interval",
            "200ms",
        ],
    );
    let readiness = prober.readiness();
    let report = settle(&readiness, MODEL, Verdict::Ready, 2).await;
    // Three successes in a row were needed for every stage.
    for s in [Stage::Tcp, Stage::Api, Stage::Generate] {
        assert!(stage(&report, s).passes_in_a_row >= 3, "{report:?}");
    }

    control.stall();
    let report = settle(&readiness, MODEL, Verdict::NotReady, 2).await;
    assert_eq!(stage(&report, Stage::Generate).failures_in_a_row, 2);
    control.resume();
    let report = settle(&readiness, MODEL, Verdict::Ready, 2).await;
    assert!(stage(&report, Stage::Generate).passes_in_a_row >= 3);

    // The tcp stage runs every 200 ms, the api stage every 100 ms: 2 s hold 10 and 20 of
    // their ticks, one more or one less when a tick falls on either end of the window.
    let before = readiness.report("", None).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = readiness.report("", None).unwrap();
    let checks = |r: &probe::ReadinessReport, s| stage(r, s).passes_in_a_row;
    let tcp = checks(&after, Stage::Tcp) - checks(&before, Stage::Tcp);
    let api = checks(&after, Stage::Api) - checks(&before, Stage::Api);
    assert!((9..=11).contains(&tcp), "tcp checks in 2 s: {tcp}");
    assert!((19..=21).contains(&api), "api checks in 2 s: {api}");
    drop(prober);
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_hook_runs_once_per_cooldown_and_a_hanging_hook_does_not_stall_probing() {
    let sim = start(fast_config()).await;
    let control = sim.control();
    let dir = std::env::temp_dir().join(format!("observer-probe-hook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("hook.log");
    let _ = std::fs::remove_file(&log);
    // The hook records its run, then hangs far longer than the test.
    let command = format!("echo \"$OBSERVER_MODEL\" >> {}; sleep 60", log.display());
    let (_metrics, prober) = probe_of(
        sim.local_addr(),
        &[
            "--model",
            MODEL,
            "--on-unready-exec",
            &command,
            "--exec-cooldown",
            "30s",
        ],
    );
    let readiness = prober.readiness();
    let runs = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Two flaps within the cooldown: ready, not ready, ready, not ready.
    for _ in 0..2 {
        verdict(&readiness, MODEL, Verdict::Ready, 3);
        control.stall();
        verdict(&readiness, MODEL, Verdict::NotReady, 3);
        control.resume();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The probe kept going while the hook hung: three more tcp checks pass.
    let before = readiness.report("", None).unwrap();
    let passes = |r: &probe::ReadinessReport| stage(r, Stage::Tcp).passes_in_a_row;
    tokio::task::block_in_place(|| {
        support::wait_until(Duration::from_secs(5), || {
            (passes(&readiness.report("", None).unwrap()) >= passes(&before) + 3).then_some(())
        })
    })
    .unwrap_or_else(|| {
        let after = readiness.report("", None).unwrap();
        panic!("probing stalled: {before:?} → {after:?}")
    });
    assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("{MODEL}\n"));
    drop(prober);
    sim.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_probe_flags_are_clear_errors() {
    let metrics = metrics();
    let err = probe::spawn(
        &flags("127.0.0.1:1", &["--probe-tcp-interval", "0s"]),
        &metrics,
        Default::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("--probe-tcp-interval"), "{err}");
    let parsed = Flags::try_parse_from(["probe", "--probe-api-interval", "soon"]);
    let err = parsed.err().unwrap().to_string();
    assert!(err.contains("e.g. 5s"), "{err}");
    let parsed = Flags::try_parse_from(["probe", "--upstream", "https://h:1"]);
    assert!(
        parsed
            .err()
            .unwrap()
            .to_string()
            .contains("https is not supported")
    );
    let parsed = Flags::try_parse_from(["probe", "--probe-failures", "0"]);
    assert!(parsed.is_err());
}
