//! The tests' and benchmarks' nginx: the configurations of `observer_sim::nginx` (the one
//! nginx of the project, which `observer demo` starts too), run in the foreground from a
//! directory of their own, on an address of the host or of a network namespace; stopped
//! (SIGTERM, then SIGKILL) when dropped. A running one can be reloaded (`nginx -s reload`: new
//! workers) and restarted on the same port.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use observer_sim::nginx::{ACCESS_LOG, CONF, Config, ERROR_LOG, NGINX, Serve, installed};

use crate::process;

/// How long nginx may take to run all its workers.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// nginx with its prefix, configuration and error log in `dir`, in network namespace `netns`
/// (`None`: the host's), quiet; `args` after (e.g. `-s reload`).
pub fn command(dir: &Path, netns: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = process::command_in(netns, NGINX);
    cmd.args(observer_sim::nginx::args(dir))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A running nginx; dropping it stops nginx and removes its directory.
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    netns: Option<String>,
    pub config: Config,
    /// Where it listens (the port chosen, for a configuration that left it to nginx).
    pub addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx with `config` from a fresh temporary directory (`name` in its name) and
    /// waits until its workers run.
    pub fn start(name: &str, config: Config) -> anyhow::Result<Nginx> {
        Nginx::start_in(name, config, None)
    }

    /// [`Nginx::start`] in network namespace `netns` (`None`: the host's), as a gateway in a
    /// container or pod. A port 0 in `config.listen` becomes one free on the host: the daemon
    /// watches ports in every namespace.
    pub fn start_in(name: &str, mut config: Config, netns: Option<&str>) -> anyhow::Result<Nginx> {
        if !installed() {
            bail!("{NGINX} is missing: run scripts/setup.sh");
        }
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "observer-nginx-{name}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if config.listen.port() == 0 {
            config.listen.set_port(crate::net::free_port());
        }
        fs::write(dir.join(CONF), config.render(&dir))
            .with_context(|| format!("writing {}", dir.join(CONF).display()))?;
        let mut nginx = Nginx {
            child: None,
            dir,
            netns: netns.map(str::to_owned),
            addr: config.listen,
            config,
        };
        nginx.spawn()?;
        Ok(nginx)
    }

    /// The master's pid, while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The master's children: its workers (during a reload, old ones still finishing too).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.master_pid().map(process::children).unwrap_or_default()
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        self.master_pid()
            .into_iter()
            .chain(self.worker_pids())
            .collect()
    }

    /// What it logged.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join(ERROR_LOG)).unwrap_or_default()
    }

    /// `nginx -s reload`: the master re-reads its configuration and starts new workers; the old
    /// ones stop accepting and exit once their requests are done. Returns once the master has
    /// been signalled (the new workers may not be running yet).
    pub fn reload(&self) -> anyhow::Result<()> {
        let status = command(&self.dir, self.netns.as_deref(), &["-s", "reload"])
            .status()
            .context("running nginx -s reload")?;
        if !status.success() {
            bail!("nginx -s reload failed ({status}): {}", self.error_log());
        }
        Ok(())
    }

    /// [`Nginx::reload`], then waits until new workers run.
    pub fn reload_and_wait(&mut self) -> anyhow::Result<()> {
        let old = self.worker_pids();
        self.reload()?;
        let deadline = Instant::now() + READY_WITHIN;
        let fresh = |nginx: &Nginx| {
            nginx
                .worker_pids()
                .iter()
                .filter(|p| !old.contains(p))
                .count()
        };
        while fresh(self) < self.config.workers {
            if Instant::now() > deadline {
                bail!("no new nginx workers after a reload: {}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops nginx (SIGTERM: fast shutdown, open connections are cut; SIGKILL after 5 s);
    /// returns once it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop(&mut child, STOP_WITHIN);
        }
    }

    /// Stops nginx and starts it again on the same port with the same configuration; returns
    /// once the new workers run.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts the master and waits until all its workers run.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = command(&self.dir, self.netns.as_deref(), &[])
            .spawn()
            .context("starting nginx")?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("nginx exited with {status}: {}", self.error_log());
            }
            let workers = self.worker_pids();
            if workers.len() == self.config.workers
                && workers.iter().all(|&pid| process::comm(pid) == "nginx")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx workers did not start ({workers:?}) on {}: {}",
                    self.addr,
                    self.error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http;

    /// A fixed upstream and a gateway in front of it, for real (where nginx is installed):
    /// answered through, reloaded, restarted on the same port, stopped with their directories
    /// removed.
    #[test]
    fn runs_reloads_and_restarts() {
        if !installed() {
            eprintln!("skipped: {NGINX} is missing");
            return;
        }
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let upstream = Nginx::start(
            "test-upstream",
            Config {
                workers: 1,
                serve: Serve::Json(r#"{"status":"ok"}"#.to_owned()),
                ..Config::gateway(any, any)
            },
        )
        .unwrap();
        assert_ne!(upstream.addr.port(), 0);
        assert_eq!(
            (upstream.pids().len(), upstream.worker_pids().len()),
            (2, 1)
        );
        let mut gateway =
            Nginx::start("test-gateway", Config::gateway(any, upstream.addr)).unwrap();
        let through = |gateway: &Nginx| http::get(gateway.addr, "/api/tags").unwrap();
        assert_eq!(through(&gateway), (200, r#"{"status":"ok"}"#.to_owned()));

        let old = gateway.worker_pids();
        gateway.reload_and_wait().unwrap();
        assert!(gateway.worker_pids().iter().any(|p| !old.contains(p)));
        let (addr, master) = (gateway.addr, gateway.master_pid());
        gateway.restart().unwrap();
        assert_eq!(gateway.addr, addr);
        assert_ne!(gateway.master_pid(), master);
        assert_eq!(through(&gateway).0, 200);
        gateway.stop();
        assert_eq!(gateway.master_pid(), None);
        assert!(http::get(addr, "/").is_err(), "stopped");
        let dir = gateway.dir.clone();
        drop(gateway);
        assert!(!dir.exists());
    }

    #[test]
    fn renders_a_gateway_and_a_fixed_upstream() {
        let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let upstream: SocketAddr = "127.0.0.1:11434".parse().unwrap();
        let mut gateway = Config::gateway(listen, upstream);
        if let Serve::Proxy { read_timeout, .. } = &mut gateway.serve {
            *read_timeout = Some(300);
        }
        let conf = gateway.render(Path::new("/d"));
        for line in [
            "worker_processes 2;\n",
            "daemon off;\n",
            "pid /d/nginx.pid;\n",
            "error_log /d/nginx-error.log warn;\n",
            "events { worker_connections 1024; }\n",
            "    access_log off;\n",
            "    proxy_temp_path /d/proxy;\n",
            "        server 127.0.0.1:11434;\n        keepalive 16;\n    }\n",
            "        listen 127.0.0.1:8080;\n",
            "            proxy_pass http://backend;\n            proxy_http_version 1.1;\n",
            "            proxy_set_header Connection \"\";\n            proxy_buffering off;\n",
            "            proxy_read_timeout 300s;\n",
        ] {
            assert!(conf.contains(line), "{line:?} not in:\n{conf}");
        }
        assert!(!conf.contains("worker_rlimit_nofile") && !conf.contains("keepalive_requests"));

        let fixed = Config {
            workers: 1,
            worker_connections: 4096,
            worker_rlimit_nofile: Some(9000),
            access_log: true,
            client_keepalive: Some((1_000_000, 600)),
            serve: Serve::Json(r#"{"status":"ok"}"#.to_owned()),
            ..Config::gateway(listen, upstream)
        };
        let conf = fixed.render(Path::new("/d"));
        for line in [
            "worker_processes 1;\nworker_rlimit_nofile 9000;\n",
            "    access_log /d/nginx-access.log;\n",
            "    keepalive_requests 1000000;\n    keepalive_timeout 600s;\n",
            "    default_type application/json;\n",
            "            return 200 '{\"status\":\"ok\"}';\n",
        ] {
            assert!(conf.contains(line), "{line:?} not in:\n{conf}");
        }
        assert!(!conf.contains("upstream backend"));
        let cmd = command(Path::new("/d"), None, &["-s", "reload"]);
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            [
                "-p",
                "/d",
                "-c",
                "/d/nginx.conf",
                "-e",
                "/d/nginx-error.log",
                "-s",
                "reload"
            ]
        );
    }
}
