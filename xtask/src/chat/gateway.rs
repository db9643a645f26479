//! nginx as the gateway of an Ollama host, in front of `observer sim`: a reverse proxy with
//! upstream keep-alive and unbuffered responses (so streams reach the client line by line),
//! two workers, run from a temporary directory of its own on a port chosen by the caller. It
//! can be reloaded (`nginx -s reload`: new workers, old ones finish their requests) and
//! stopped and started again on the same port. Stopped when dropped.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::common::{http::stop_child, nginx};

pub const WORKERS: usize = 2;
/// How long nginx may take to listen with all its workers.
const READY_WITHIN: Duration = Duration::from_secs(10);

pub struct Gateway {
    dir: PathBuf,
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl Gateway {
    /// nginx on `127.0.0.1:port` proxying to `upstream`.
    pub fn start(name: &str, port: u16, upstream: SocketAddr) -> anyhow::Result<Gateway> {
        let dir = nginx::prepare(name, &conf(port, upstream))?;
        let mut gateway = Gateway {
            dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        gateway.spawn()?;
        Ok(gateway)
    }

    pub fn master_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The master's children: its workers (during a reload, old ones still finishing too).
    pub fn worker_pids(&self) -> Vec<u32> {
        let Some(pid) = self.master_pid() else {
            return Vec::new();
        };
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// `nginx -s reload`, then waits until new workers run (the old ones close their idle
    /// connections and exit once their requests are done).
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let old = self.worker_pids();
        let status = self
            .nginx()
            .args(["-s", "reload"])
            .status()
            .context("running nginx -s reload")?;
        if !status.success() {
            bail!("nginx -s reload failed ({status}): {}", self.error_log());
        }
        let deadline = Instant::now() + READY_WITHIN;
        while self
            .worker_pids()
            .iter()
            .filter(|p| !old.contains(p))
            .count()
            < WORKERS
        {
            if Instant::now() > deadline {
                bail!("no new nginx workers after a reload: {}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops nginx (SIGTERM, as `nginx -s stop`: open connections are closed at once).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(5));
        }
    }

    /// Stops nginx and starts it again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn nginx(&self) -> Command {
        nginx::command(&self.dir)
    }

    /// Starts the master and waits until its workers run and the port accepts.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = self.nginx().spawn().context("starting nginx")?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("nginx exited with {status}: {}", self.error_log());
            }
            if self.worker_pids().len() >= WORKERS
                && TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nginx is not ready on {}: {}", self.addr, self.error_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn error_log(&self) -> String {
        nginx::error_log(&self.dir)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The gateway's configuration: nginx's defaults where an Ollama host would keep them
/// (keep-alive timeouts and request limits), streaming unbuffered, as Ollama's docs advise.
fn conf(port: u16, upstream: SocketAddr) -> String {
    format!(
        r#"worker_processes {WORKERS};
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream ollama {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}
