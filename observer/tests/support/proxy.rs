//! `observer proxy` as a child process (testkit's launcher), for black-box tests of the
//! forwarder: started on `127.0.0.1:0` with its admin server on a free port, waited for until
//! it announces its address on stdout and `/readyz` says 200, stopped with SIGTERM and required
//! to exit 0 within its drain; killed on drop. Also a fake upstream that records what reaches
//! it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::observer;

use super::daemon::{OBSERVER, Samples, http_get};

/// How long `stop` waits beyond the drain for the process to be gone.
const EXIT_MARGIN: Duration = Duration::from_secs(5);
/// How long a test polls `/metrics` for counts to land.
pub const METRICS_WAIT: Duration = Duration::from_secs(5);

/// One `observer proxy` process.
pub struct Proxy {
    inner: observer::Proxy,
    /// `--drain-timeout` as given, else its default.
    drain: Duration,
}

impl Deref for Proxy {
    type Target = observer::Proxy;

    fn deref(&self) -> &observer::Proxy {
        &self.inner
    }
}

impl Proxy {
    /// `observer proxy --listen 127.0.0.1:0 --upstream UPSTREAM` with `flags`, quiet logs and
    /// no GPU collector; returns once it accepts and `/readyz` answers 200.
    pub fn start(upstream: SocketAddr, flags: &[&str]) -> Proxy {
        let drain = flags
            .iter()
            .position(|f| *f == "--drain-timeout")
            .map(|i| ::observer::base::clock::parse_duration(flags[i + 1]).unwrap())
            .unwrap_or(Duration::from_secs(30));
        let flags = [&["--log", "warn", "--gpu", "off"], flags].concat();
        let inner = observer::Proxy::start(Path::new(OBSERVER), upstream, &flags)
            .unwrap_or_else(|err| panic!("{err:#}"));
        Proxy { inner, drain }
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
        self.inner.signal(signal).unwrap();
    }

    /// Waits up to `within` for the process to exit; its status, `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.inner.wait_exit(within)
    }

    /// Stops the proxy with SIGTERM and requires exit status 0 within its drain, and nothing
    /// on stdout beyond the ready line.
    pub fn stop(mut self) {
        let within = self.drain + EXIT_MARGIN;
        let status = self.inner.stop(within);
        assert!(
            status.is_some_and(|s| s.success()),
            "observer proxy exited with {status:?} (None: still running {within:?} after SIGTERM): {}",
            self.log()
        );
        self.assert_quiet_stdout();
    }

    /// Nothing came on stdout after the ready line (call once the process has exited).
    pub fn assert_quiet_stdout(&self) {
        assert_eq!(
            self.inner.stdout_after_ready(),
            "",
            "observer proxy wrote more than its ready line on stdout"
        );
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
