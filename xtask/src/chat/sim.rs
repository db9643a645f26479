//! `observer sim` (the simulated Ollama) as a child process on a port of the caller's
//! choosing, so that it can be killed and started again on the same port. Stopped (SIGKILL)
//! when dropped.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How long `observer sim` may take to print its listening line.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub struct Sim {
    binary: PathBuf,
    flags: Vec<String>,
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Sim {
    /// `binary sim --listen 127.0.0.1:PORT <flags>` (port 0: a free one), once it listens.
    pub fn start(binary: &Path, port: u16, flags: &[&str]) -> anyhow::Result<Sim> {
        let mut sim = Sim {
            binary: binary.to_owned(),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        sim.spawn()?;
        Ok(sim)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would: open connections are reset by the kernel, nothing is
    /// flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, retrying while the port is not free yet.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(&self.binary)
            .args(["sim", "--listen", &self.addr.to_string()])
            .args(&self.flags)
            // Load generators send requests at once and mean them to run at once (Ollama's
            // default of one slot would queue them), unless the caller sets the slots.
            .args(if self.flags.iter().any(|f| f == "--num-parallel") {
                &[][..]
            } else {
                &["--num-parallel", "256"][..]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} sim", self.binary.display()))?;
        // Read stdout on a thread that keeps draining it, so that the simulator never blocks
        // on (or dies of) a full or closed pipe.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(READY_WITHIN);
        let addr = line.as_ref().ok().and_then(|l| {
            l.strip_prefix("observer sim listening on ")
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        });
        let Some(addr) = addr else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!(
                "observer sim did not start on {} ({status}): {line:?}",
                self.addr
            );
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
