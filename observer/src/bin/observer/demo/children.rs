//! The processes the demo starts (the simulator, the gateway, the observer): each with its
//! output in a log file, in its own process group (so that Ctrl-C reaches the demo first and
//! the demo stops them in order), and bound to die with the demo even if it is killed.
//!
//! Owns their lifetimes: [`Child::stop`] sends SIGTERM, then SIGKILL after a grace period, and
//! dropping a `Child` that is still running kills it.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// A started process of the demo.
#[derive(Debug)]
pub struct Child {
    /// What it is, for messages: `observer sim`, `nginx`, …
    pub name: String,
    process: std::process::Child,
    log: PathBuf,
}

/// How a process is started: its stdout is piped (ready lines are read from it) or logged.
pub enum Stdout {
    Piped,
    Logged,
}

impl Child {
    /// Starts `command` with stderr (and stdout unless piped) appended to `log`.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        stdout: Stdout,
    ) -> anyhow::Result<Child> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let out = match stdout {
            Stdout::Piped => Stdio::piped(),
            Stdout::Logged => Stdio::from(file.try_clone()?),
        };
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::from(file))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Die with the demo, even when it is killed with SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Child {
            name: name.to_owned(),
            process,
            log: log.to_path_buf(),
        })
    }

    /// Reads stdout lines until one starts with `prefix` and returns the rest of that line.
    /// The reading happens on a thread, so a silent child cannot hang the demo past `timeout`.
    pub fn ready_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let stdout = self.process.stdout.take().context("stdout is not piped")?;
        let (send, receive) = std::sync::mpsc::channel();
        let log = self.log.clone();
        let prefix = prefix.to_owned();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let found = lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned));
            let _ = send.send(found);
            // Keep draining into the log so the child never blocks on a full pipe.
            if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(log) {
                for line in lines.map_while(Result::ok) {
                    let _ = std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes());
                }
            }
        });
        match receive.recv_timeout(timeout) {
            Ok(Some(rest)) => Ok(rest),
            _ => anyhow::bail!("{} did not start: {}", self.name, self.log_tail()),
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// Fails with the log's tail when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited unexpectedly ({status}): {}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        signal(self.process.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        self.process.wait().ok()
    }

    /// The last lines of the process' log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(2048)));
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().rev().take(8).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        if tail.is_empty() {
            format!("(nothing in {})", self.log.display())
        } else {
            format!("{} (log: {})", tail.join(" | "), self.log.display())
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

fn signal(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: plain syscall on a pid we own (our child, not yet reaped).
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
