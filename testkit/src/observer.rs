//! The `observer` binary's long-running subcommands as child processes, each launched one way
//! for every test, bench and xtask task:
//!
//! - [`Run`]: `observer run` watching the given ports, its admin server on a free port,
//!   waited for until `/readyz` says 200, stopped with SIGTERM and required to exit 0; its
//!   stderr (the log) in a file, for failure messages.
//! - [`Sim`]: `observer sim` (a simulated Ollama) on an address of the caller's choosing, or a
//!   free one, in a network namespace or not; waited for until it says where it listens; it
//!   can be killed (a crash) and started again on the same port.
//! - [`Proxy`]: `observer proxy` in front of an upstream, waited for until it announces its
//!   address and `/readyz` says 200; what it writes on stdout after that is kept (nothing is
//!   expected).
//!
//! Each is stopped when dropped: `observer run` with SIGTERM (SIGKILL after a grace period),
//! the simulator and the proxy with SIGKILL.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{http, metrics, net::free_port, process};

/// How long `observer run` may take to answer `/readyz` with 200 (loading and attaching the
/// kernel programs takes a few seconds; more on a busy machine or in an emulated VM).
pub const RUN_READY_WITHIN: Duration = Duration::from_secs(60);
/// How long `observer run` may take to exit after SIGTERM before it is killed.
pub const RUN_STOP_WITHIN: Duration = Duration::from_secs(10);
/// How long the simulator and the proxy may take to say where they listen, and the proxy to
/// be ready.
pub const START_WITHIN: Duration = Duration::from_secs(30);

const SIM_READY: &str = "observer sim listening on ";
const PROXY_READY: &str = "observer proxy listening on ";

/// Waits until the admin server at `admin` answers `/readyz` with 200, failing with the
/// process's log (`log`, its stderr file) if it exits first or takes longer than `within`.
pub fn wait_ready(
    child: &mut Child,
    admin: SocketAddr,
    what: &str,
    log: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let log = || fs::read_to_string(log).unwrap_or_default();
    let started = Instant::now();
    while !http::get(admin, "/readyz").is_ok_and(|(status, _)| status == 200) {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited with {status} before it was ready:\n{}",
                log()
            );
        }
        if started.elapsed() > within {
            bail!(
                "{what}'s /readyz on {admin} is not 200 after {} s:\n{}",
                within.as_secs(),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A file in the temporary directory for a child's stderr, named after it and its port.
fn log_file(what: &str, port: u16) -> anyhow::Result<(PathBuf, fs::File)> {
    let path =
        std::env::temp_dir().join(format!("observer-{what}-{}-{port}.log", std::process::id()));
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok((path, file))
}

/// Reads `stdout` on a thread that keeps draining it (so that the child never blocks on, or
/// dies of, a full or closed pipe): its first line comes through the receiver, everything
/// after it is appended to `rest`, and `done` is set at its end.
fn read_stdout(
    stdout: ChildStdout,
    rest: Arc<Mutex<String>>,
    done: Arc<AtomicBool>,
) -> mpsc::Receiver<String> {
    let (first, line) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut text = String::new();
        let _ = reader.read_line(&mut text);
        let _ = first.send(text);
        let mut more = String::new();
        let _ = reader.read_to_string(&mut more);
        rest.lock().unwrap().push_str(&more);
        done.store(true, Ordering::Release);
    });
    line
}

/// The address announced on `line` after `prefix`.
fn announced(line: &str, prefix: &str) -> Option<SocketAddr> {
    line.trim_end().strip_prefix(prefix)?.trim().parse().ok()
}

/// `observer run` watching the given ports, its admin server on a free port.
pub struct Run {
    /// The admin server: `/metrics`, `/readyz`, `/status`.
    pub metrics: SocketAddr,
    child: Option<Child>,
    /// Its stderr (the log), removed when it is stopped or dropped.
    log: PathBuf,
}

impl Run {
    /// `binary run --watch PORT=ROLE ... --metrics-addr 127.0.0.1:FREE <flags>`, once
    /// `/readyz` answers 200 (within [`RUN_READY_WITHIN`]; its log in the error otherwise).
    pub fn start(binary: &Path, watch: &[(u16, &str)], flags: &[&str]) -> anyhow::Result<Run> {
        Run::start_within(binary, watch, flags, RUN_READY_WITHIN)
    }

    /// [`Run::start`], ready within `within`.
    pub fn start_within(
        binary: &Path,
        watch: &[(u16, &str)],
        flags: &[&str],
        within: Duration,
    ) -> anyhow::Result<Run> {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (log, stderr) = log_file("run", metrics.port())?;
        let mut cmd = Command::new(binary);
        cmd.arg("run");
        for (port, role) in watch {
            cmd.arg("--watch").arg(format!("{port}={role}"));
        }
        cmd.arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} run", binary.display()))?;
        // The guard first, so the daemon is stopped if it never gets ready.
        let mut run = Run {
            metrics,
            child: Some(child),
            log,
        };
        let child = run.child.as_mut().expect("just started");
        wait_ready(child, metrics, "observer run", &run.log, within)?;
        Ok(run)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running until stopped").id()
    }

    /// What it logged so far (stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(status, body)` of a GET on the admin server.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http::get(self.metrics, path)
    }

    /// The body of `GET /metrics`, answered 200.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        metrics::fetch_text(self.metrics)
    }

    /// `/metrics`, read strictly.
    pub fn scrape(&self) -> anyhow::Result<metrics::Scrape> {
        metrics::fetch(self.metrics)
    }

    /// SIGTERM, a bounded wait ([`RUN_STOP_WITHIN`]), SIGKILL if it did not exit; an error
    /// (with the log) unless it exited cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("running until stopped");
        match process::stop(&mut child, RUN_STOP_WITHIN) {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("observer run exited with {status}:\n{}", self.log()),
            None => bail!(
                "observer run did not exit within {} s of SIGTERM; killed:\n{}",
                RUN_STOP_WITHIN.as_secs(),
                self.log()
            ),
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop(&mut child, RUN_STOP_WITHIN);
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// `--num-parallel N` unless `flags` or `env` (`OLLAMA_NUM_PARALLEL`) set the simulator's
/// parallel slots: clients that send requests at once mean them to run at once, where
/// Ollama's default (one slot) would queue them.
pub fn parallel_unless_set(flags: &[&str], env: &[(&str, &str)], n: u32) -> Vec<String> {
    let set = flags.contains(&"--num-parallel")
        || env.iter().any(|(name, _)| *name == "OLLAMA_NUM_PARALLEL");
    match set {
        true => Vec::new(),
        false => vec!["--num-parallel".to_owned(), n.to_string()],
    }
}

/// `observer sim` on an address of the caller's choosing.
pub struct Sim {
    binary: PathBuf,
    netns: Option<String>,
    flags: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Sim {
    /// `binary sim --listen LISTEN <flags>` (port 0: a free one), once it says where it
    /// listens.
    pub fn start(binary: &Path, listen: &str, flags: &[&str]) -> anyhow::Result<Sim> {
        Sim::start_in(binary, None, listen, flags, &[])
    }

    /// [`Sim::start`] in network namespace `netns` (`None`: the host's), as a container would
    /// run it, with environment variables `env` (as an operator sets Ollama's).
    pub fn start_in(
        binary: &Path,
        netns: Option<&str>,
        listen: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Sim> {
        let mut sim = Sim {
            binary: binary.to_owned(),
            netns: netns.map(str::to_owned),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        sim.spawn(listen)?;
        Ok(sim)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (SIGUSR1 stalls inference, SIGUSR2 resumes it).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| std::io::Error::other("observer sim is not running"))?;
        process::signal(pid, signal)
    }

    /// SIGKILL, as a crash would: open connections are reset by the kernel, nothing is
    /// flushed. Returns once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        process::stop(&mut child, grace)
    }

    /// Starts it again on the same address, retrying while the port is not free yet.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + START_WITHIN;
        loop {
            match self.spawn(&listen) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn spawn(&mut self, listen: &str) -> anyhow::Result<()> {
        let mut child = process::command_in(self.netns.as_deref(), &self.binary.to_string_lossy())
            .args(["sim", "--listen", listen])
            .args(&self.flags)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} sim", self.binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let line = read_stdout(stdout, Arc::default(), Arc::default()).recv_timeout(START_WITHIN);
        let Some(addr) = line.as_deref().ok().and_then(|l| announced(l, SIM_READY)) else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("observer sim did not start on {listen} ({status}): {line:?}");
        };
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `observer proxy` on a free port, in front of an upstream, its admin server on another.
pub struct Proxy {
    child: Option<Child>,
    /// The client-facing address it announced.
    pub addr: SocketAddr,
    /// Its admin server (`/metrics`, `/readyz`, `/ready/model`).
    pub metrics: SocketAddr,
    /// What it wrote on stdout after the ready line, and whether stdout has ended.
    stdout_rest: Arc<Mutex<String>>,
    stdout_done: Arc<AtomicBool>,
    log: PathBuf,
}

impl Proxy {
    /// `binary proxy --listen 127.0.0.1:0 --upstream UPSTREAM --metrics-addr 127.0.0.1:FREE
    /// <flags>`; returns once it announced its address and `/readyz` answers 200.
    pub fn start(binary: &Path, upstream: SocketAddr, flags: &[&str]) -> anyhow::Result<Proxy> {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (log, stderr) = log_file("proxy", metrics.port())?;
        let mut child = Command::new(binary)
            .args(["proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} proxy", binary.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (stdout_rest, stdout_done) = (Arc::default(), Arc::default());
        let first = read_stdout(stdout, Arc::clone(&stdout_rest), Arc::clone(&stdout_done));
        // The guard first, so the proxy is stopped if it never gets ready.
        let mut proxy = Proxy {
            child: Some(child),
            addr: metrics,
            metrics,
            stdout_rest,
            stdout_done,
            log,
        };
        let line = first.recv_timeout(START_WITHIN).map_err(|_| {
            anyhow::anyhow!(
                "observer proxy printed no line in {} s: {}",
                START_WITHIN.as_secs(),
                proxy.log()
            )
        })?;
        proxy.addr = announced(&line, PROXY_READY).with_context(|| {
            format!(
                "first line of observer proxy is {line:?}, not {PROXY_READY:?}ADDR: {}",
                proxy.log()
            )
        })?;
        let child = proxy.child.as_mut().expect("just started");
        wait_ready(child, metrics, "observer proxy", &proxy.log, START_WITHIN)?;
        Ok(proxy)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy already stopped").id()
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(status, body)` of a GET on the admin server.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http::get(self.metrics, path)
    }

    /// `/metrics`, read strictly.
    pub fn scrape(&self) -> anyhow::Result<metrics::Scrape> {
        metrics::fetch(self.metrics)
    }

    /// Sends `signal` to the proxy.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        process::signal(self.pid(), signal)
    }

    /// Waits up to `within` for the process to exit; its status, `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let status = process::wait_exit(self.child.as_mut()?, within)?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM, and the exit status if it exited within `within` (killed otherwise: `None`).
    pub fn stop(&mut self, within: Duration) -> Option<ExitStatus> {
        process::stop(&mut self.child.take()?, within)
    }

    /// What it wrote on stdout after its ready line, once stdout has ended (or 200 ms have
    /// passed: call it once the process has exited).
    pub fn stdout_after_ready(&self) -> String {
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline && !self.stdout_done.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stdout_rest.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_announcements_and_parallel_slots() {
        assert_eq!(
            announced("observer sim listening on 127.0.0.1:5\n", SIM_READY),
            Some("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(announced("something else\n", SIM_READY), None);
        assert_eq!(
            parallel_unless_set(&["--seed", "7"], &[], 64),
            ["--num-parallel", "64"]
        );
        assert!(parallel_unless_set(&["--num-parallel", "2"], &[], 64).is_empty());
        assert!(parallel_unless_set(&[], &[("OLLAMA_NUM_PARALLEL", "2")], 64).is_empty());
    }
}
