//! Child processes: stopping one (SIGTERM, then SIGKILL after a grace period), waiting for an
//! exit under a deadline, starting a program in a network namespace, and reading what
//! `/proc` says of a process (its name, its children). Standard library and libc only.

use std::{
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

/// How often the waits look at the child.
const POLL: Duration = Duration::from_millis(10);

/// Stops `child`: SIGTERM, then SIGKILL once `grace` has passed; reaps it either way. The exit
/// status when it exited by itself within `grace` (or had already), `None` when it had to be
/// killed.
pub fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // Our own child, not yet reaped: its pid is still its own.
    let _ = signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_exit(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Waits up to `within` for `child` to exit; its status, `None` if it still runs.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to process `pid`.
pub fn signal(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `program` in network namespace `netns` (`ip netns exec`, which execs it: the child's pid is
/// the program's), or on the host for `None`.
pub fn command_in(netns: Option<&str>, program: &str) -> Command {
    match netns {
        None => Command::new(program),
        Some(name) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", name, program]);
            cmd
        }
    }
}

/// The children of process `pid` (those of its main thread), from `/proc`; none when it is gone.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A process's name (`/proc/<pid>/comm`), empty when it is gone.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text` (a log), for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        process::Stdio,
    };

    use super::*;

    /// `sh -c script`, returned once the script has printed its first line (its traps set).
    fn spawn(script: &str) -> Child {
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        child
    }

    /// What `comm` says of `pid` once it is `want`, or after 5 s (a child's name changes at its
    /// exec, a moment after the spawn returns).
    fn comm_once(pid: u32, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let name = comm(pid);
            if name == want || Instant::now() > deadline {
                return name;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_process_that_exits_on_sigterm_gives_its_status() {
        let mut child = spawn("trap 'exit 3' TERM; echo ready; while :; do sleep 0.01; done");
        let status = stop(&mut child, Duration::from_secs(5)).expect("exited by itself");
        assert_eq!(status.code(), Some(3));
        assert_eq!(stop(&mut child, Duration::from_secs(5)), Some(status));
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let mut child = spawn("trap '' TERM; echo ready; while :; do sleep 0.01; done");
        let started = Instant::now();
        assert_eq!(stop(&mut child, Duration::from_millis(300)), None);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_some(), "reaped");
    }

    #[test]
    fn reads_names_children_and_tails() {
        let me = std::process::id();
        assert!(!comm(me).is_empty());
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        assert_eq!(comm_once(child.id(), "sleep"), "sleep");
        assert_eq!(children(child.id()), Vec::<u32>::new());
        stop(&mut child, Duration::from_secs(1));
        assert_eq!(comm(u32::MAX), "");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        let cmd = command_in(Some("ns"), "nginx");
        assert_eq!(cmd.get_program(), "ip");
        assert_eq!(
            cmd.get_args().collect::<Vec<_>>(),
            ["netns", "exec", "ns", "nginx"]
        );
    }
}
