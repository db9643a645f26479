//! Debian's Prometheus scrapes `observer run` (root, real kernel) while requests reach `observer
//! sim`, and the runbook PromQL of docs/DESIGN.md#metrics-runbook-queries answers what the traffic
//! was: a request rate, the success ratio, a p95 latency, nothing in flight. `promtool check
//! metrics` accepts a live scrape.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, Sim, http_get};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", support::capture::free_port())
            .parse()
            .unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus { child, addr, dir };
        let start = Instant::now();
        while http_get(addr, "/-/ready").0 != 200 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// The result vector of an instant query.
    fn query(&self, promql: &str) -> Vec<Value> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(status, 200, "{promql}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {body}");
        v["data"]["result"].as_array().unwrap().clone()
    }

    /// The single value of a query returning one sample.
    fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        assert!(result.len() <= 1, "{promql}: {result:?}");
        result
            .first()
            .map(|s| s["value"][1].as_str().unwrap().parse().unwrap())
    }

    fn wait_for(&self, promql: &str, want: f64) {
        self.wait_until(promql, &format!("{want}"), |v| v == want);
    }

    /// Polls `promql` until its value passes `ok` (`what` says what is expected); 20 s bound a
    /// failure only.
    fn wait_until(&self, promql: &str, what: &str, ok: impl Fn(f64) -> bool) {
        let start = Instant::now();
        while !self.scalar(promql).is_some_and(&ok) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{promql} is {:?}, expected {what}",
                self.scalar(promql)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One request on its own connection; returns the status.
fn request(sim: SocketAddr, raw: &str) -> u16 {
    let mut stream = TcpStream::connect(sim).unwrap();
    let response = testkit::http::exchange(&mut stream, raw.as_bytes()).unwrap();
    response.status.expect("a status line")
}

const TAGS: &str = "GET /api/tags HTTP/1.1\r\nHost: sim\r\nConnection: close\r\n\r\n";
const MISSING: &str = "POST /api/chat HTTP/1.1\r\nHost: sim\r\nConnection: close\r\nContent-Length: 30\r\n\r\n{\"model\":\"nope\",\"messages\":[]}";

#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn prometheus_answers_the_runbook_queries() {
    support::assert_root();
    if !std::path::Path::new(PROMETHEUS).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{PROMETHEUS} is missing: scripts/setup.sh installs it"
        );
        eprintln!("SKIPPED: {PROMETHEUS} is missing (run scripts/setup.sh)");
        return;
    }
    let sim = Sim::start(&[
        "--load-ms",
        "5",
        "--first-token-ms",
        "5",
        "--token-ms",
        "1",
        "--tokens",
        "4",
    ]);
    let daemon = Daemon::start(&[(sim.addr.port(), "upstream")]);

    // Both series exist before Prometheus first scrapes, so they share every sample time and
    // rate() extrapolates them alike: the window starts long before the first sample, so each
    // is extrapolated by half a scrape interval, unless a counter would reach zero sooner
    // (first value / increase × sampled interval), which first values of 4 and 1 against
    // increases of 7 and 1 over several seconds rule out. The ratio of the two rates is then
    // exactly the ratio of the increases that followed: 7 of 8.
    // Each request as the client timed it, from before its connect to the end of the reply.
    let mut client_times = Vec::new();
    let mut send = |raw: &str| {
        let start = Instant::now();
        let status = request(sim.addr, raw);
        client_times.push(start.elapsed().as_secs_f64());
        status
    };
    for _ in 0..4 {
        assert_eq!(send(TAGS), 200);
    }
    assert_eq!(send(MISSING), 404);
    let start = Instant::now();
    while daemon.scrape().value("observer_http_requests_total", &[]) < 5.0 {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let prometheus = Prometheus::start(daemon.metrics);
    let total = "sum(observer_http_requests_total)";
    prometheus.wait_for(total, 5.0);
    // Samples enough before the increases for the extrapolation above: the sampled interval
    // must exceed 1.1 scrape intervals × 7/4 (and × 1/1), so three samples of each series; four
    // are waited for.
    prometheus.wait_until(
        "min(count_over_time(observer_http_requests_total[5m]))",
        "at least 4 samples of each series",
        |n| n >= 4.0,
    );
    for _ in 0..7 {
        assert_eq!(send(TAGS), 200);
    }
    assert_eq!(send(MISSING), 404);
    prometheus.wait_for(total, 13.0);
    // The histogram has counted every request too (one scrape holds both).
    prometheus.wait_for("sum(observer_http_request_duration_seconds_count)", 13.0);

    // The two rates, extrapolated alike, stand as their increases: 7 to 1.
    let rates = prometheus.query("rate(observer_http_requests_total[1m])");
    assert_eq!(rates.len(), 2, "{rates:?}");
    let rate_of = |code: &str| -> f64 {
        let r = rates
            .iter()
            .find(|r| r["metric"]["code"] == code)
            .unwrap_or_else(|| panic!("no code {code} in {rates:?}"));
        r["value"][1].as_str().unwrap().parse().unwrap()
    };
    let (ok, missing) = (rate_of("200"), rate_of("404"));
    assert!(
        missing > 0.0 && (ok / missing - 7.0).abs() < 1e-9,
        "rates {ok} and {missing}"
    );
    let ratio = prometheus
        .scalar(
            r#"sum(rate(observer_http_requests_total{code=~"2.."}[5m])) / sum(rate(observer_http_requests_total[5m]))"#,
        )
        .unwrap();
    assert!((ratio - 7.0 / 8.0).abs() < 1e-9, "success ratio {ratio}");
    // Each exchange the daemon timed (the sim's read of the request to its last write) lies
    // within the client's own time for it, on the same monotonic clock: the sum is at most the
    // client's, and the p95 at most the bound of the bucket that holds the client's slowest.
    // How fast they were is for the benchmarks (`cargo xtask bench accuracy`, `overhead`).
    let sum = prometheus
        .scalar("sum(observer_http_request_duration_seconds_sum)")
        .unwrap();
    let client_sum: f64 = client_times.iter().sum();
    assert!(
        sum > 0.0 && sum <= client_sum,
        "the daemon timed {sum} s in all, the client {client_sum} s"
    );
    let slowest = client_times.iter().copied().fold(0.0, f64::max);
    let bound = observer::metrics::families::DURATION_BUCKETS
        .iter()
        .copied()
        .find(|&le| le >= slowest)
        .unwrap_or(f64::INFINITY);
    let p95 = prometheus
        .scalar("histogram_quantile(0.95, sum by (le) (rate(observer_http_request_duration_seconds_bucket[5m])))")
        .unwrap();
    assert!(
        (0.0..=bound).contains(&p95),
        "p95 {p95}, the client's slowest {slowest} s"
    );
    assert_eq!(
        prometheus.scalar("sum(observer_http_requests_in_flight)"),
        Some(0.0)
    );
    assert_eq!(prometheus.scalar(r#"up{job="observer"}"#), Some(1.0));

    // promtool accepts a live scrape and has nothing to say about it.
    let (status, body) = daemon.get("/metrics");
    assert_eq!(status, 200);
    let mut promtool = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    daemon.stop();
}
