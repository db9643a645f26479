//! `--on-unready-exec CMD`: a command (e.g. `systemctl restart ollama`) run through `sh -c`
//! when a model turns not ready, at most once per cooldown, with its exit status and output
//! logged.
//!
//! The probe hands transitions over with [`Hook::trigger`], which never waits: the command runs
//! on its own task, and a command still running when the cooldown ends is killed, so a hanging
//! hook can neither stall probing nor pile up.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    process::Command,
    sync::mpsc,
    time::Instant,
};

/// Output kept from each of stdout and stderr for the log.
const MAX_OUTPUT_BYTES: usize = 4096;
/// Transitions waiting for the hook task; more than this in one burst are dropped (the cooldown
/// would skip them anyway).
const QUEUE: usize = 16;

/// Why the hook is being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    pub model: String,
    pub reason: String,
}

/// The sending side, held by the probe.
#[derive(Debug, Clone)]
pub struct Hook {
    queue: mpsc::Sender<Unready>,
}

impl Hook {
    /// Starts the task that runs `command` (needs a Tokio runtime).
    pub fn spawn(command: String, cooldown: Duration) -> Hook {
        let (queue, requests) = mpsc::channel(QUEUE);
        tokio::spawn(run_hooks(command, cooldown, requests));
        Hook { queue }
    }

    /// Asks for the command to run; returns at once.
    pub fn trigger(&self, unready: Unready) {
        if self.queue.try_send(unready).is_err() {
            tracing::debug!("exec hook queue full; this transition is skipped");
        }
    }
}

async fn run_hooks(command: String, cooldown: Duration, mut requests: mpsc::Receiver<Unready>) {
    let mut last_run: Option<Instant> = None;
    while let Some(unready) = requests.recv().await {
        if let Some(at) = last_run.filter(|at| at.elapsed() < cooldown) {
            tracing::info!(
                model = %unready.model,
                "model not ready; --on-unready-exec skipped, cooldown ends in {}",
                humantime::format_duration(round_secs(cooldown - at.elapsed()))
            );
            continue;
        }
        last_run = Some(Instant::now());
        run_once(&command, &unready, cooldown).await;
    }
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Runs the command once, waiting at most `limit`, and logs how it went.
async fn run_once(command: &str, unready: &Unready, limit: Duration) {
    tracing::warn!(
        model = %unready.model,
        reason = %unready.reason,
        "model not ready; running --on-unready-exec: {command}"
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("OBSERVER_MODEL", &unready.model)
        .env("OBSERVER_REASON", &unready.reason)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what it started too (`sh -c` forks).
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            tracing::error!("--on-unready-exec could not start: {err}");
            return;
        }
    };
    let stdout = tokio::spawn(read_capped(child.stdout.take()));
    let stderr = tokio::spawn(read_capped(child.stderr.take()));
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(err)) => format!("unknown ({err})"),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the process group this child leads; no memory involved.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.kill().await;
            format!(
                "killed: still running after the cooldown of {}",
                humantime::format_duration(limit)
            )
        }
    };
    // A grandchild that left the group could hold the pipes open: do not wait for it.
    let output = |task: tokio::task::JoinHandle<String>| async {
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let stdout = output(stdout).await;
    let stderr = output(stderr).await;
    tracing::warn!(
        model = %unready.model,
        stdout = %stdout.trim_end(),
        stderr = %stderr.trim_end(),
        "--on-unready-exec finished: {status}"
    );
}

/// Reads a pipe to its end, keeping the first bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unready(model: &str) -> Unready {
        Unready {
            model: model.into(),
            reason: "generate: no first chunk within 3s".into(),
        }
    }

    fn lines(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = lines(path);
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn runs_once_per_cooldown_with_the_model_in_its_environment() {
        let dir = std::env::temp_dir().join(format!("observer-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("once.log");
        let _ = std::fs::remove_file(&log);
        let hook = Hook::spawn(
            format!(
                "echo \"$OBSERVER_MODEL|$OBSERVER_REASON\" >> {}",
                log.display()
            ),
            Duration::from_millis(800),
        );
        hook.trigger(unready("a"));
        assert_eq!(
            wait_for_lines(&log, 1).await,
            ["a|generate: no first chunk within 3s"]
        );
        // Within the cooldown: skipped.
        hook.trigger(unready("b"));
        hook.trigger(unready("c"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lines(&log).len(), 1);
        // After it: runs again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        hook.trigger(unready("d"));
        let found = wait_for_lines(&log, 2).await;
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[1].starts_with("d|"));
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_the_end_of_the_cooldown() {
        let dir = std::env::temp_dir().join(format!("observer-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("hang.log");
        let _ = std::fs::remove_file(&log);
        let hook = Hook::spawn(
            format!(
                "echo start >> {0}; sleep 30; echo end >> {0}",
                log.display()
            ),
            Duration::from_millis(500),
        );
        let started = Instant::now();
        hook.trigger(unready("a"));
        // trigger() returned at once although the command sleeps.
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(wait_for_lines(&log, 1).await, ["start"]);
        tokio::time::sleep(Duration::from_millis(700)).await;
        hook.trigger(unready("b"));
        assert_eq!(wait_for_lines(&log, 2).await, ["start", "start"]);
        assert!(!lines(&log).contains(&"end".to_string()));
    }
}
