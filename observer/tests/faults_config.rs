//! Faults: a malformed config file and malformed flags (docs/DESIGN.md#bad-input-and-faults).
//! `observer run` and `observer proxy` given a bad `--config` file or a bad flag stop at once with
//! exit code 2 (1 for a port already in use, found when binding) and one line on stderr naming the
//! problem, and leave no listener behind; a good file takes effect, and a flag or an `OBSERVER_*`
//! variable wins over it.
//!
//! The bad cases fail while parsing, before anything is loaded, so they need no root; the one
//! test that starts `observer run` for real does.

mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::capture::free_port;
use support::daemon::{OBSERVER, Samples, http_get, wait_ready};
use support::proxy::FakeUpstream;

/// A bad configuration must end the process well within this; past it the test fails.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// A temporary directory holding config files, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "observer-faults-config-{test}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a process that had to refuse its configuration did.
struct Refusal {
    status: ExitStatus,
    stderr: String,
}

/// Runs `observer ARGS` (with `env`), requiring it to exit within [`EXIT_WITHIN`].
fn refuse(args: &[&str], env: &[(&str, &str)]) -> Refusal {
    let mut child = Command::new(OBSERVER)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting observer");
    let deadline = Instant::now() + EXIT_WITHIN;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("observer {args:?} still running {EXIT_WITHIN:?} after it started");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    Refusal { status, stderr }
}

impl Refusal {
    /// Exit `code`, and one line on stderr that starts with `error: ` and contains each of
    /// `expect`.
    fn assert(&self, code: i32, expect: &[&str], case: &str) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "{case}: exit status {:?}, stderr {:?}",
            self.status,
            self.stderr
        );
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "{case}: stderr should be one line: {:?}",
            self.stderr
        );
        assert!(
            self.stderr.starts_with("error: "),
            "{case}: {:?}",
            self.stderr
        );
        for expect in expect {
            assert!(
                self.stderr.contains(expect),
                "{case}: expected {expect:?} in {:?}",
                self.stderr
            );
        }
    }
}

/// Nothing listens on `port` any more (the refused process opened nothing, or closed it).
fn assert_not_listening(port: u16, case: &str) {
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "{case}: something still listens on port {port}"
    );
}

/// The ports one refused start would have used.
struct Ports {
    metrics: u16,
    listen: u16,
    gateway: u16,
    upstream: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            metrics: free_port(),
            listen: free_port(),
            gateway: free_port(),
            upstream: free_port(),
        }
    }

    /// Settings that would start `sub` quietly on these ports, less the keys `case` sets, so
    /// that only the case's line is wrong.
    fn base(&self, sub: &str, case: &str) -> String {
        let mut lines = vec![
            format!("metrics-addr = \"127.0.0.1:{}\"", self.metrics),
            "no-probe = true".to_owned(),
            "gpu = \"off\"".to_owned(),
            "log = \"warn\"".to_owned(),
        ];
        match sub {
            "run" => lines.push(format!(
                "watch = [\"{}=gateway\", \"{}=upstream\"]",
                self.gateway, self.upstream
            )),
            _ => {
                lines.push(format!("listen = \"127.0.0.1:{}\"", self.listen));
                lines.push(format!("upstream = \"127.0.0.1:{}\"", self.upstream));
            }
        }
        lines.retain(|line| {
            let key = line.split(' ').next().unwrap();
            !case.lines().any(|l| l.starts_with(&format!("{key} ")))
        });
        lines.join("\n") + "\n"
    }

    /// The flags of [`Ports::base`], for cases without a file.
    fn flags(&self, sub: &str) -> Vec<String> {
        let mut flags = vec![
            sub.to_owned(),
            format!("--metrics-addr=127.0.0.1:{}", self.metrics),
            "--no-probe".into(),
            "--gpu=off".into(),
            "--log=warn".into(),
        ];
        if sub == "run" {
            flags.push(format!("--watch={}=gateway", self.gateway));
            flags.push(format!("--watch={}=upstream", self.upstream));
        } else {
            flags.push(format!("--listen=127.0.0.1:{}", self.listen));
            flags.push(format!("--upstream=127.0.0.1:{}", self.upstream));
        }
        flags
    }

    fn assert_unused(&self, case: &str) {
        for port in [self.metrics, self.listen, self.gateway] {
            assert_not_listening(port, case);
        }
    }
}

/// Every malformed file: refused with exit 2 and a message naming the file, the line and the
/// key, for both daemons. The wrong lines come after settings that are right (`@1` in an
/// expectation is the first wrong line's number, `@2` the second's).
#[test]
fn a_malformed_config_file_stops_run_and_proxy_before_anything_starts() {
    let dir = Dir::new("malformed");
    // (subcommands, the wrong line(s), what the message must say)
    let cases: &[(&[&str], &str, &[&str])] = &[
        (
            &["run", "proxy"],
            "metrics-addr = 127.0.0.1:9",
            &[":@1:21: invalid TOML"],
        ),
        (
            &["run", "proxy"],
            "[run\nno-probe = true",
            &[":@1:", "invalid TOML"],
        ),
        (
            &["run", "proxy"],
            "metrics-address = \"127.0.0.1:9\"",
            &[
                ":@1: unknown key `metrics-address`",
                "did you mean `metrics-addr`?",
            ],
        ),
        (
            &["run", "proxy"],
            "[probe]\nfrobnicate = 1",
            &[":@2: unknown key `frobnicate` in [probe]"],
        ),
        (
            &["proxy"],
            "watch = [\"1=gateway\"]",
            &[
                "unknown key `watch` for `observer proxy`",
                "put it in a [check], [run] or [trace] table",
            ],
        ),
        (
            &["run", "proxy"],
            "no-probe = \"yes\"",
            &[":@1: `no-probe` is a switch: true or false, not a string"],
        ),
        (
            &["run", "proxy"],
            "metrics-addr = [\"127.0.0.1:9\"]",
            &[":@1: `metrics-addr` takes one value, not an array"],
        ),
        (
            &["run", "proxy"],
            "metrics-addr = \"nope\"",
            &[":@1: `metrics-addr`: invalid value 'nope' for '--metrics-addr <ADDR>'"],
        ),
        (
            &["run"],
            "ring-bytes = -1",
            &[":@1: `ring-bytes`: invalid value '-1' for '--ring-bytes <N>'"],
        ),
        (
            &["proxy"],
            "max-conns = -1",
            &[":@1: `max-conns`: invalid value '-1' for '--max-conns <N>'"],
        ),
        (
            &["run"],
            "watch = [\"x=y\"]",
            &[
                ":@1: `watch`: invalid value 'x=y' for '--watch <PORT=ROLE>'",
                "not a port number",
            ],
        ),
        (
            &["run", "proxy"],
            "exec-cooldown = \"soon\"",
            &[":@1: `exec-cooldown`: invalid value 'soon'", "e.g. 5s"],
        ),
        (
            &["run", "proxy"],
            "config = \"other.toml\"",
            &[":@1: `config` cannot be set in a config file"],
        ),
        // Parses, but does not fit: refused before the kernel programs load.
        (
            &["run"],
            "ring-bytes = 3",
            &["ring buffer size 3 is not a power of two"],
        ),
    ];
    for (subs, wrong, expect) in cases {
        for sub in *subs {
            let ports = Ports::free();
            let case = format!("observer {sub} with {wrong:?}");
            let base = ports.base(sub, wrong);
            let first = base.lines().count() + 1;
            let path = dir.file(&format!("{sub}.toml"), &format!("{base}{wrong}\n"));
            let path = path.to_str().unwrap();
            let refusal = refuse(&[sub, "--config", path], &[]);
            let mut expect: Vec<String> = expect
                .iter()
                .map(|e| {
                    e.replace("@1", &first.to_string())
                        .replace("@2", &(first + 1).to_string())
                })
                .collect();
            if !wrong.starts_with("ring-bytes = 3") {
                expect.insert(0, format!("config file {path}:"));
            }
            let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
            refusal.assert(2, &expect, &case);
            ports.assert_unused(&case);
        }
    }
}

#[test]
fn a_missing_or_unreadable_config_file_is_refused() {
    let dir = Dir::new("missing");
    let missing = dir.0.join("absent.toml");
    let missing = missing.to_str().unwrap();
    for sub in ["run", "proxy"] {
        let ports = Ports::free();
        let flags = ports.flags(sub);
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(["--config", missing]);
        let case = format!("observer {sub} --config {missing}");
        refuse(&args, &[]).assert(
            2,
            &[
                &format!("cannot read config file {missing}"),
                "No such file",
            ],
            &case,
        );
        ports.assert_unused(&case);
        // The same through the environment; and a directory is no file either.
        let dir_path = dir.0.to_str().unwrap();
        refuse(&args[..flags.len()], &[("OBSERVER_CONFIG", dir_path)]).assert(
            2,
            &[&format!("cannot read config file {dir_path}")],
            &format!("observer {sub} with OBSERVER_CONFIG={dir_path}"),
        );
        ports.assert_unused(&case);
    }
}

/// Malformed flags keep clap's one-line errors (exit 2); a port in use is found when binding
/// (exit 1), before anything else opens.
#[test]
fn malformed_flags_stop_run_and_proxy_before_anything_starts() {
    let cases: &[(&str, &[&str], i32, &[&str])] = &[
        (
            "run",
            &["--watch", "18789=nonsense"],
            2,
            &[
                "invalid value '18789=nonsense' for '--watch <PORT=ROLE>'",
                "neither gateway nor upstream",
            ],
        ),
        (
            "run",
            &["--ring-bytes", "3"],
            2,
            &["ring buffer size 3 is not a power of two of at least 4096"],
        ),
        (
            "run",
            &["--ring-bytes=-1"],
            2,
            &["invalid value '-1' for '--ring-bytes <N>'"],
        ),
        (
            "run",
            &["--no-such-flag"],
            2,
            &["unexpected argument '--no-such-flag'"],
        ),
        (
            "proxy",
            &["--no-such-flag"],
            2,
            &["unexpected argument '--no-such-flag'"],
        ),
        (
            "proxy",
            &["--max-conns", "0"],
            2,
            &["invalid value '0' for '--max-conns <N>'"],
        ),
        (
            "run",
            &["--metrics-addr", "nope"],
            2,
            &["invalid value 'nope' for '--metrics-addr <ADDR>'"],
        ),
        (
            "proxy",
            &["--listen", "nope"],
            2,
            &["invalid value 'nope' for '--listen <ADDR>'"],
        ),
        (
            "proxy",
            &["--log-format", "xml"],
            2,
            &["'--log-format <LOG_FORMAT>'"],
        ),
        // Values that parse but cannot work: refused before the admin server binds.
        (
            "proxy",
            &["--timeout", "0s"],
            2,
            &["--timeout must be more than 0"],
        ),
        (
            "run",
            &["--resources-interval", "0s"],
            2,
            &["--resources-interval must be more than 0"],
        ),
    ];
    for (sub, bad, code, expect) in cases {
        let ports = Ports::free();
        let mut args = ports.flags(sub);
        // The bad flag replaces the good one of the same name.
        let name = |flag: &str| flag.split('=').next().unwrap().to_owned();
        args.retain(|good| !bad.iter().any(|b| name(b) == name(good)));
        args.extend(bad.iter().map(|s| (*s).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let case = format!("observer {sub} {bad:?}");
        refuse(&args, &[]).assert(*code, expect, &case);
        ports.assert_unused(&case);
    }
    // The admin port in use: found when binding, before the capture loads or the proxy listens.
    for sub in ["run", "proxy"] {
        let ports = Ports::free();
        let taken = TcpListener::bind(("127.0.0.1", ports.metrics)).unwrap();
        let args = ports.flags(sub);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let case = format!("observer {sub} with its --metrics-addr in use");
        refuse(&args, &[]).assert(
            1,
            &[
                &format!("127.0.0.1:{}", ports.metrics),
                "Address already in use",
            ],
            &case,
        );
        drop(taken);
        ports.assert_unused(&case);
    }
}

/// A started `observer run` or `observer proxy`, killed on drop.
struct Started {
    child: std::process::Child,
    /// The address a proxy announced on stdout.
    listening: Option<SocketAddr>,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Started {
    /// `observer ARGS` (with `env`), waited for until `/readyz` answers 200 on `metrics`; a
    /// proxy also until it announces its address.
    fn start(args: &[&str], env: &[(&str, &str)], metrics: SocketAddr, dir: &Dir) -> Started {
        let log = dir.0.join(format!("observer-{}.log", metrics.port()));
        let mut child = Command::new(OBSERVER)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting observer");
        let mut listening = None;
        if args.contains(&"proxy") {
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr = line
                .trim()
                .strip_prefix("observer proxy listening on ")
                .unwrap_or_else(|| {
                    panic!(
                        "first line {line:?}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                });
            listening = Some(addr.parse().unwrap());
        }
        wait_ready(&mut child, metrics, "observer", &log);
        Started {
            child,
            listening,
            metrics,
            log,
        }
    }

    fn scrape(&self) -> Samples {
        let (status, body) = http_get(self.metrics, "/metrics");
        assert_eq!(status, 200, "{body}");
        Samples::parse(&body)
    }

    /// SIGTERM; it must exit 0.
    fn stop(mut self) {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "exit {status}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `observer proxy --config FILE` listens, forwards and serves metrics as the file says.
#[test]
fn proxy_takes_listen_upstream_and_metrics_from_the_file() {
    let dir = Dir::new("proxy");
    let upstream = FakeUpstream::start(
        "GET /api/version",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nContent-Type: application/json\r\n\r\n{\"version\":\"0.12.0\"}",
    );
    let (listen, metrics) = (free_port(), free_port());
    let path = dir.file(
        "observer.toml",
        &format!(
            "# one file for every subcommand\nlog = \"warn\"\n\n[proxy]\nlisten = \"127.0.0.1:{listen}\"\n\
             upstream = \"{}\"\nmetrics_addr = \"127.0.0.1:{metrics}\"\nmetric-prefix = \"fromfile\"\n\
             no-probe = true\ngpu = \"off\"\n\n[run]\nwatch = [\"1=gateway\"]\n",
            upstream.addr
        ),
    );
    let proxy = Started::start(
        &["proxy", "--config", path.to_str().unwrap()],
        &[],
        addr(metrics),
        &dir,
    );
    assert_eq!(proxy.listening, Some(addr(listen)));
    let mut client = TcpStream::connect(addr(listen)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client
        .write_all(b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let response = std::io::read_to_string(&client).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("{\"version\":\"0.12.0\"}"), "{response}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = |proxy: &Started| {
        proxy.scrape().value(
            "fromfile_http_requests_total",
            &[("role", "gateway"), ("code", "200")],
        )
    };
    while counted(&proxy) != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the exchange was not counted under the file's prefix: {:?}",
            http_get(proxy.metrics, "/metrics").1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!proxy.scrape().has("observer_http_requests_total"));
    proxy.stop();
}

/// A flag and an `OBSERVER_*` variable each win over the file; `OBSERVER_CONFIG` names it.
#[test]
fn a_flag_or_an_environment_variable_wins_over_the_file() {
    let dir = Dir::new("precedence");
    let upstream = free_port();
    let from_file = free_port();
    let path = dir.file(
        "observer.toml",
        &format!(
            "log = \"warn\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{upstream}\"\n\
             metrics-addr = \"127.0.0.1:{from_file}\"\nno-probe = true\ngpu = \"off\"\n"
        ),
    );
    let path = path.to_str().unwrap();

    let from_flag = free_port();
    let flag = format!("127.0.0.1:{from_flag}");
    let proxy = Started::start(
        &["proxy", "--config", path, "--metrics-addr", &flag],
        &[],
        addr(from_flag),
        &dir,
    );
    assert_not_listening(from_file, "--metrics-addr over the file");
    proxy.stop();

    let from_env = free_port();
    let env = format!("127.0.0.1:{from_env}");
    let proxy = Started::start(
        &["proxy"],
        &[("OBSERVER_CONFIG", path), ("OBSERVER_METRICS_ADDR", &env)],
        addr(from_env),
        &dir,
    );
    assert_not_listening(from_file, "OBSERVER_METRICS_ADDR over the file");
    proxy.stop();

    // And the file over the default, through OBSERVER_CONFIG alone.
    let proxy = Started::start(
        &["proxy"],
        &[("OBSERVER_CONFIG", path)],
        addr(from_file),
        &dir,
    );
    proxy.stop();
}

/// `observer run --config FILE` watches the ports, serves on the address and uses the prefix
/// the file gives (root: it loads the kernel programs).
#[test]
#[cfg_attr(not(root), ignore = "needs root")]
fn run_takes_its_watch_list_and_metrics_from_the_file() {
    support::assert_root();
    let dir = Dir::new("run");
    let (gateway, upstream, metrics) = (free_port(), free_port(), free_port());
    let path = dir.file(
        "observer.toml",
        &format!(
            "log = \"warn\"\n\n[run]\nwatch = [\"{gateway}=gateway\", \"{upstream}=upstream\"]\n\
             metrics-addr = \"127.0.0.1:{metrics}\"\nmetric_prefix = \"fromfile\"\nno-probe = true\n\
             gpu = \"off\"\nring-bytes = 65536\n\n[proxy]\nlisten = \"127.0.0.1:1\"\n"
        ),
    );
    let started = Started::start(
        &["run", "--config", path.to_str().unwrap()],
        &[],
        addr(metrics),
        &dir,
    );
    let (status, body) = http_get(addr(metrics), "/status");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["watched_ports"],
        serde_json::json!([
            {"port": gateway, "role": "gateway"},
            {"port": upstream, "role": "upstream"}
        ]),
        "{report:#}"
    );
    let scrape = started.scrape();
    assert_eq!(
        scrape.value("fromfile_build_info", &[("mode", "ebpf")]),
        1.0,
        "the file's metric prefix"
    );
    assert!(!scrape.has("observer_build_info"));
    started.stop();
}
