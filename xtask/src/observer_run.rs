//! The daemon under measurement: `observer run` (release build) as a child process watching
//! the benchmark's ports, with its admin server on a free port; readings of its `/metrics`
//! (a small reader of the Prometheus text format) and of its memory. Used by the overhead,
//! loss, accuracy and soak tasks. It stops the daemon when dropped, on error too.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::common::{
    http::{free_port, http_get, stop_child},
    machine,
};

/// Flags for a daemon that only watches traffic: no probe of an upstream model server, no
/// GPU library (the benchmarks' upstream is not Ollama).
pub const WATCH_ONLY: [&str; 3] = ["--no-probe", "--gpu", "off"];

/// How long `observer run` may take to answer `/readyz` with 200 (loading and attaching the
/// kernel programs takes a few seconds; more on a busy machine).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// [`settled`]: the pause between two readings, and the most time it waits.
pub const SETTLE_STEP: Duration = Duration::from_millis(250);
pub const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// Builds `observer` with the release profile (`cargo build --release --locked -p observer
/// --bin observer`) and returns `target/release/observer`.
pub fn release_binary(workspace: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "observer",
            "--bin",
            "observer",
        ])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building observer (release) failed ({status})");
    }
    Ok(workspace.join("target/release/observer"))
}

/// `observer run` (release binary) watching the given ports, admin server on a free port.
pub struct ObserverRun {
    /// The admin server: `/metrics`, `/readyz`, `/status`.
    pub metrics: SocketAddr,
    child: Option<Child>,
    /// Its stderr (the log), removed when it stops cleanly.
    log: PathBuf,
}

impl ObserverRun {
    /// Spawns `binary run --watch P=role ... --metrics-addr 127.0.0.1:FREE --log warn <extra>`,
    /// waits (bounded, with the log in the error) until /readyz answers 200.
    pub fn start(
        binary: &Path,
        watch: &[(u16, &str)],
        extra: &[&str],
    ) -> anyhow::Result<ObserverRun> {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::env::temp_dir().join(format!(
            "observer-bench-run-{}-{}.log",
            std::process::id(),
            metrics.port()
        ));
        let mut cmd = Command::new(binary);
        cmd.arg("run");
        for (port, role) in watch {
            cmd.arg("--watch").arg(format!("{port}={role}"));
        }
        cmd.arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(["--log", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} run", binary.display()))?;
        // The guard first, so the daemon is stopped if it never gets ready.
        let mut run = ObserverRun {
            metrics,
            child: Some(child),
            log,
        };
        let started = Instant::now();
        while !http_get(metrics, "/readyz").is_ok_and(|(code, _)| code == 200) {
            let child = run.child.as_mut().expect("running until stopped");
            if let Some(status) = child.try_wait()? {
                bail!(
                    "observer run exited with {status} before it was ready:\n{}",
                    run.log()
                );
            }
            if started.elapsed() > READY_WITHIN {
                bail!(
                    "observer run's /readyz on {metrics} is not 200 after {} s:\n{}",
                    READY_WITHIN.as_secs(),
                    run.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(run)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running until stopped").id()
    }

    /// The body of `GET /metrics`.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        let (code, body) = http_get(self.metrics, "/metrics")
            .with_context(|| format!("scraping {}", self.metrics))?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        Ok(body)
    }

    /// Resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        machine::proc_kib(self.pid(), "status", "VmRSS:")
    }

    /// What it logged so far (stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, a bounded wait, SIGKILL if it did not exit; an error (with the log) unless it
    /// exited cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("running until stopped");
        match stop_child(&mut child, STOP_WITHIN) {
            Some(status) if status.success() => {
                let _ = fs::remove_file(&self.log);
                Ok(())
            }
            Some(status) => bail!("observer run exited with {status}:\n{}", self.log()),
            None => bail!(
                "observer run did not exit within {} s of SIGTERM; killed:\n{}",
                STOP_WITHIN.as_secs(),
                self.log()
            ),
        }
    }
}

impl Drop for ObserverRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, STOP_WITHIN);
        }
    }
}

/// The daemon's counters that the benchmarks compare with their clients' records, at one
/// moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// `observer_http_requests_total{role="gateway"}`, every series.
    pub gateway: u64,
    /// `observer_http_requests_total{role="upstream"}`, every series.
    pub upstream: u64,
    /// `observer_ebpf_events_lost_total` by kind.
    pub lost: Vec<(String, u64)>,
    /// `observer_http_parse_errors_total` by `role/reason`, those above 0.
    pub parse_errors: Vec<(String, u64)>,
    /// `observer_ebpf_events_total`, every kind.
    pub events: u64,
}

impl Counts {
    pub fn read(run: &ObserverRun) -> anyhow::Result<Counts> {
        Counts::parse(&run.metrics_text()?)
    }

    /// Reads them from a scrape; an error when the lost-events family is missing (the daemon
    /// exports every kind from the start).
    pub fn parse(text: &str) -> anyhow::Result<Counts> {
        let requests =
            |role| metric_sum(text, "observer_http_requests_total", &[("role", role)]) as u64;
        let by = |name: &str, keys: &[&str]| -> Vec<(String, u64)> {
            metric_series(text, name)
                .into_iter()
                .map(|(labels, v)| {
                    let key: Vec<&str> = keys
                        .iter()
                        .filter_map(|k| {
                            labels
                                .iter()
                                .find(|(lk, _)| lk == k)
                                .map(|(_, v)| v.as_str())
                        })
                        .collect();
                    (key.join("/"), v as u64)
                })
                .collect()
        };
        let lost = by("observer_ebpf_events_lost_total", &["kind"]);
        if lost.is_empty() {
            bail!("/metrics has no observer_ebpf_events_lost_total series");
        }
        Ok(Counts {
            gateway: requests("gateway"),
            upstream: requests("upstream"),
            lost,
            parse_errors: by("observer_http_parse_errors_total", &["role", "reason"])
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .collect(),
            events: metric_sum(text, "observer_ebpf_events_total", &[]) as u64,
        })
    }

    /// Every kind of lost event, summed.
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().map(|(_, v)| v).sum()
    }
}

/// A reading once it stops changing: two readings [`SETTLE_STEP`] apart agree (the daemon may
/// still be finishing the last exchanges when the load stops). Gives the last reading after
/// [`SETTLE_WITHIN`] if it never settles.
pub fn settled<T: PartialEq>(mut read: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut last = read()?;
    while started.elapsed() < SETTLE_WITHIN {
        std::thread::sleep(SETTLE_STEP);
        let now = read()?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

/// Sum of the samples of `name` whose labels include all of `labels` (Prometheus text format).
/// `name` matches exactly: `x_total` does not match `x_total_created`, nor a histogram's
/// `x_count` its `x` (ask for `x_count`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(sample)
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
        // Folded from +0.0: `sum()` of no values is -0.0, which prints as "-0".
        .fold(0.0, |sum, v| sum + v)
}

/// Every series of `name`: its labels and value, in the order of the text.
pub fn metric_series(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    text.lines()
        .filter_map(sample)
        .filter(|s| s.name == name)
        .map(|s| {
            let labels = s
                .labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            (labels, s.value)
        })
        .collect()
}

/// One sample line of the text format.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// Reads `name{k="v",...} value [timestamp]`; `None` for comments, blank and unreadable lines.
fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let after = after.strip_prefix('"')?;
            let (value, after) = quoted(after)?;
            labels.push((key.trim(), value));
            rest = after;
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A label value after its opening quote: the unescaped value and what follows the closing
/// quote.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP observer_http_requests_total Requests.
# TYPE observer_http_requests_total counter
observer_http_requests_total{role="gateway",port="1",method="GET",route="/api/tags",code="200"} 7
observer_http_requests_total{role="gateway",port="1",method="GET",route="other",code="none"} 2
observer_http_requests_total{role="upstream",port="2",method="GET",route="/api/tags",code="200"} 9
observer_http_requests_total_created{role="gateway"} 1.7e9
observer_ebpf_events_lost_total{kind="ring_full"} 0
observer_ebpf_events_lost_total{kind="odd \"x\", y}"} 3
observer_http_request_duration_seconds_bucket{role="gateway",le="+Inf"} 9
observer_http_request_duration_seconds_sum{role="gateway"} 0.5
process_resident_memory_bytes 2.5e7 1700000000000
"#;

    #[test]
    fn sums_the_matching_series_of_one_name() {
        assert_eq!(
            metric_sum(TEXT, "observer_http_requests_total", &[("role", "gateway")]),
            9.0
        );
        assert_eq!(
            metric_sum(
                TEXT,
                "observer_http_requests_total",
                &[("role", "gateway"), ("code", "200")]
            ),
            7.0
        );
        assert_eq!(metric_sum(TEXT, "observer_http_requests_total", &[]), 18.0);
        assert_eq!(
            metric_sum(TEXT, "observer_http_requests_total", &[("role", "none")]),
            0.0
        );
        assert_eq!(metric_sum(TEXT, "observer_http_requests", &[]), 0.0);
    }

    #[test]
    fn reads_escapes_bare_names_timestamps_and_infinity() {
        assert_eq!(
            metric_sum(
                TEXT,
                "observer_ebpf_events_lost_total",
                &[("kind", "odd \"x\", y}")]
            ),
            3.0
        );
        assert_eq!(
            metric_sum(TEXT, "process_resident_memory_bytes", &[]),
            2.5e7
        );
        assert_eq!(
            metric_sum(
                TEXT,
                "observer_http_request_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            9.0
        );
        assert_eq!(
            metric_sum(TEXT, "observer_http_request_duration_seconds_sum", &[]),
            0.5
        );
    }

    #[test]
    fn reads_the_counts_the_benchmarks_compare() {
        let c = Counts::parse(&format!(
            "{TEXT}observer_http_parse_errors_total{{role=\"upstream\",reason=\"bad_head\"}} 4\n\
             observer_http_parse_errors_total{{role=\"gateway\",reason=\"mid_stream\"}} 0\n\
             observer_ebpf_events_total{{kind=\"data\"}} 10\nobserver_ebpf_events_total{{kind=\"open\"}} 2\n"
        ))
        .unwrap();
        assert_eq!((c.gateway, c.upstream, c.events), (9, 9, 12));
        assert_eq!(c.lost_total(), 3);
        assert_eq!(c.lost[0], ("ring_full".to_owned(), 0));
        assert_eq!(c.parse_errors, [("upstream/bad_head".to_owned(), 4)]);
        assert!(Counts::parse("observer_http_requests_total 1\n").is_err());
    }

    #[test]
    fn lists_the_series_of_one_name() {
        let series = metric_series(TEXT, "observer_ebpf_events_lost_total");
        let kinds: Vec<(&str, f64)> = series
            .iter()
            .map(|(labels, v)| (labels[0].1.as_str(), *v))
            .collect();
        assert_eq!(kinds, [("ring_full", 0.0), ("odd \"x\", y}", 3.0)]);
        assert_eq!(
            metric_series(TEXT, "process_resident_memory_bytes"),
            [(vec![], 2.5e7)]
        );
    }

    /// The real daemon (root; the release or the debug build of `observer`, whichever is
    /// there: CI builds the debug one before the tests): ready, scraped, stopped cleanly.
    #[test]
    #[cfg_attr(not(root), ignore = "needs root")]
    fn starts_scrapes_and_stops_the_daemon() {
        // SAFETY: geteuid reads the process's effective user id.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "this test needs root (observer run) and runs as uid {euid}: run it as root, or \
             build as this user to have it reported ignored"
        );
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let Some(binary) = ["release", "debug"]
            .into_iter()
            .map(|profile| workspace.join("target").join(profile).join("observer"))
            .find(|binary| binary.exists())
        else {
            eprintln!(
                "skipped: no target/{{release,debug}}/observer; `cargo build -p observer` first"
            );
            return;
        };
        let port = free_port().unwrap();
        let run = ObserverRun::start(&binary, &[(port, "gateway")], &WATCH_ONLY).unwrap();
        let text = run.metrics_text().unwrap();
        assert!(text.contains("observer_ebpf_events_lost_total{"), "{text}");
        assert_eq!(
            metric_sum(
                &text,
                "observer_http_requests_total",
                &[("role", "gateway")]
            ),
            0.0
        );
        let rss = run.rss_kib().unwrap();
        assert!(rss > 1024, "{rss} KiB");
        let pid = run.pid();
        run.stop().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }
}
