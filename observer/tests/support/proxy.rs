//! `observer proxy` as a child process, for black-box tests of the forwarder: started on
//! `127.0.0.1:0` with its admin server on a free port, waited for until it announces its
//! address on stdout and `/readyz` says 200, stopped with SIGTERM and required to exit 0
//! within its drain; killed on drop. Also a fake upstream that records what reaches it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::daemon::{OBSERVER, Samples, http_get, wait_ready};

const READY_PREFIX: &str = "observer proxy listening on ";
/// How long `stop` waits beyond the drain for the process to be gone.
const EXIT_MARGIN: Duration = Duration::from_secs(5);
/// How long a test polls `/metrics` for counts to land.
pub const METRICS_WAIT: Duration = Duration::from_secs(5);

/// One `observer proxy` process.
pub struct Proxy {
    child: Option<Child>,
    /// The client-facing address it announced.
    pub addr: SocketAddr,
    /// Its admin server (`/metrics`, `/readyz`, `/ready/model`).
    pub metrics: SocketAddr,
    /// `--drain-timeout` as given, else its default.
    drain: Duration,
    /// What it wrote on stdout after the ready line (nothing is expected).
    stdout_rest: Arc<Mutex<String>>,
    stderr: std::path::PathBuf,
}

impl Proxy {
    /// `observer proxy --listen 127.0.0.1:0 --upstream UPSTREAM` with `flags`, quiet logs and
    /// no GPU collector; returns once it accepts and `/readyz` answers 200.
    pub fn start(upstream: SocketAddr, flags: &[&str]) -> Proxy {
        let metrics: SocketAddr = format!("127.0.0.1:{}", super::capture::free_port())
            .parse()
            .unwrap();
        let stderr = std::env::temp_dir().join(format!(
            "observer-proxy-{}-{}.log",
            std::process::id(),
            metrics.port()
        ));
        let drain = flags
            .iter()
            .position(|f| *f == "--drain-timeout")
            .map(|i| observer::base::clock::parse_duration(flags[i + 1]).unwrap())
            .unwrap_or(Duration::from_secs(30));
        let mut child = Command::new(OBSERVER)
            .args(["--log", "warn", "proxy", "--listen", "127.0.0.1:0"])
            .arg("--upstream")
            .arg(upstream.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(["--gpu", "off"])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting observer proxy");

        // The first line announces the address; whatever follows is kept, to check there is none.
        let (line_tx, line_rx) = mpsc::channel();
        let stdout_rest = Arc::new(Mutex::new(String::new()));
        let rest = stdout_rest.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = line_tx.send(line);
            let mut more = String::new();
            let _ = reader.read_to_string(&mut more);
            rest.lock().unwrap().push_str(&more);
        });
        let mut proxy = Proxy {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            metrics,
            drain,
            stdout_rest,
            stderr,
        };
        let line = line_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("observer proxy printed no line in 30 s: {}", proxy.log()));
        proxy.addr = line
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix(READY_PREFIX))
            .unwrap_or_else(|| {
                panic!(
                    "first line of observer proxy is {line:?}, not {READY_PREFIX:?}ADDR: {}",
                    proxy.log()
                )
            })
            .parse()
            .unwrap();
        let log = proxy.stderr.clone();
        wait_ready(
            proxy.child.as_mut().unwrap(),
            metrics,
            "observer proxy",
            &log,
        );
        proxy
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy already stopped").id()
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `(status, body)` of a GET on the admin server; status 0 when it does not answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    pub fn scrape(&self) -> Samples {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}\n{}", self.log());
        Samples::parse(&body)
    }

    /// Sends `signal` to the proxy.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits up to `within` for the process to exit; its status, `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the proxy with SIGTERM and requires exit status 0 within its drain, and nothing
    /// on stdout beyond the ready line.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let within = self.drain + EXIT_MARGIN;
        let status = self.wait_exit(within);
        assert!(
            status.is_some_and(|s| s.success()),
            "observer proxy exited with {status:?} (None: still running {within:?} after SIGTERM): {}",
            self.log()
        );
        self.assert_quiet_stdout();
    }

    /// Nothing came on stdout after the ready line (call once the process has exited).
    pub fn assert_quiet_stdout(&self) {
        // The reader thread sees EOF shortly after the exit.
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline && self.stdout_rest.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            self.stdout_rest.lock().unwrap().as_str(),
            "",
            "observer proxy wrote more than its ready line on stdout"
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// One connection a [`FakeUpstream`] accepted: the bytes it read before `answer` was due.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub head: Vec<u8>,
}

/// A plain TCP listener standing in for Ollama: it records the request head of every
/// connection it accepts and answers a head matching `answer_to` (a request-line prefix) with
/// `answer`; other connections (the proxy's readiness probe) are read and dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Accepted>>>,
}

impl FakeUpstream {
    pub fn start(answer_to: &'static str, answer: &'static [u8]) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let record = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let record = record.clone();
                std::thread::spawn(move || serve(stream, answer_to, answer, &record));
            }
        });
        FakeUpstream { addr, accepted }
    }

    /// The heads read so far (a connection that sent nothing shows an empty head).
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().unwrap().clone()
    }

    /// The heads whose request line starts with `prefix`.
    pub fn heads_starting(&self, prefix: &str) -> Vec<Vec<u8>> {
        self.accepted()
            .into_iter()
            .filter(|a| a.head.starts_with(prefix.as_bytes()))
            .map(|a| a.head)
            .collect()
    }
}

fn serve(mut stream: TcpStream, answer_to: &str, answer: &[u8], record: &Mutex<Vec<Accepted>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let index = {
        let mut record = record.lock().unwrap();
        record.push(Accepted { head: Vec::new() });
        record.len() - 1
    };
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        record.lock().unwrap()[index].head = head.clone();
    }
    if head.starts_with(answer_to.as_bytes()) {
        let _ = stream.write_all(answer);
        // Hold the connection until the peer closes it, as a keep-alive server would.
        let _ = stream.read_to_end(&mut Vec::new());
    }
}
