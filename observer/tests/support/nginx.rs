//! A real nginx (Debian's `/usr/sbin/nginx`) as the gateway for the capture tests: a reverse
//! proxy on a free loopback port (or, for the deployment tests, an address in a network
//! namespace) to one upstream, with upstream keep-alive, unbuffered responses and two worker
//! processes. Everything it writes (config, pid, logs, temp files) lives in its own temporary
//! directory, so it runs as root without touching `/etc/nginx`. Dropping it stops nginx
//! (SIGTERM, then SIGKILL) and removes the directory. The fault tests reload it (`nginx -s
//! reload`: new workers) and restart it on the same port.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const NGINX: &str = "/usr/sbin/nginx";
pub const WORKERS: usize = 2;

pub struct Nginx {
    child: Child,
    dir: PathBuf,
    /// The port nginx listens on (on `ip`).
    pub port: u16,
    /// The address nginx listens on: 127.0.0.1 unless started with [`Nginx::start_in`].
    pub ip: IpAddr,
    /// Its network namespace (`None`: the host's).
    netns: Option<String>,
}

/// What a test may change in the gateway's configuration.
#[derive(Debug, Clone, Copy)]
pub struct NginxOptions {
    /// `worker_connections` of each worker (client and upstream connections together); the
    /// workers' fd limit is raised to match.
    pub worker_connections: u32,
}

impl Default for NginxOptions {
    fn default() -> Self {
        NginxOptions {
            worker_connections: 64,
        }
    }
}

impl Nginx {
    /// Starts nginx proxying `127.0.0.1:<free port>` to `upstream`, and waits until its
    /// workers are running.
    pub fn start(upstream: SocketAddr) -> Nginx {
        Nginx::start_with(upstream, NginxOptions::default())
    }

    /// [`Nginx::start`] with `options`.
    pub fn start_with(upstream: SocketAddr, options: NginxOptions) -> Nginx {
        let listen = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0);
        Nginx::start_in(upstream, options, None, listen)
    }

    /// [`Nginx::start_with`] in network namespace `netns` (`None`: the host's), listening on
    /// `listen` (an address of that namespace; port 0: a port free on the host), as a gateway
    /// in a container or pod.
    pub fn start_in(
        upstream: SocketAddr,
        options: NginxOptions,
        netns: Option<&str>,
        listen: SocketAddr,
    ) -> Nginx {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "{NGINX} is missing: run scripts/setup.sh"
        );
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "observer-nginx-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A port free on the host, also in a namespace: the daemon watches ports in every one.
        let port = match listen.port() {
            0 => super::capture::free_port(),
            port => port,
        };
        let (ip, listen) = (listen.ip(), SocketAddr::new(listen.ip(), port));
        let d = dir.display();
        let NginxOptions { worker_connections } = options;
        // Each connection is an fd; beyond the usual limit the workers raise theirs (as root).
        let nofile = match worker_connections > 512 {
            true => format!("worker_rlimit_nofile {};\n", worker_connections * 2 + 64),
            false => String::new(),
        };
        let conf = format!(
            r#"worker_processes {WORKERS};
{nofile}daemon off;
master_process on;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream u {{
        server {upstream};
        keepalive 8;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let netns = netns.map(str::to_owned);
        let child = spawn(netns.as_deref(), &dir, &[]);
        let mut nginx = Nginx {
            child,
            dir,
            port,
            ip,
            netns,
        };
        nginx.wait_for_workers();
        nginx
    }

    /// `nginx -s reload`: the master re-reads its configuration and starts new workers; the old
    /// ones stop accepting and exit once their requests are done. Returns once the master
    /// has signalled (the new workers may not be running yet).
    pub fn reload(&self) {
        let status = spawn(self.netns.as_deref(), &self.dir, &["-s", "reload"])
            .wait()
            .unwrap();
        assert!(status.success(), "nginx -s reload: {}", self.error_log());
    }

    /// Stops nginx (SIGTERM: fast shutdown, open connections are cut) and starts it again on
    /// the same port with the same configuration; returns once the new workers run.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.netns.as_deref(), &self.dir, &[]);
        self.wait_for_workers();
    }

    /// SIGTERM to the master, then SIGKILL after 5 s; waits until it has exited.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_workers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited with {status}: {}", self.error_log());
            }
            let workers = self.worker_pids();
            if workers.len() == WORKERS && workers.iter().all(|&pid| comm(pid) == "nginx") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx workers did not start ({workers:?}): {}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    pub fn master_pid(&self) -> u32 {
        self.child.id()
    }

    /// The master's children: its worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        let pid = self.master_pid();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// A process's name (`/proc/<pid>/comm`), empty when it is gone.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_default()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `nginx` with the configuration in `dir` (and `args`, e.g. `-s reload`), in network
/// namespace `netns` (`None`: the host's).
fn spawn(netns: Option<&str>, dir: &std::path::Path, args: &[&str]) -> Child {
    super::netns::command(netns, NGINX)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx")
}

/// A fast in-process `observer sim` with nginx in front of it (needs a multi-thread runtime:
/// nginx is started off the async threads).
pub async fn in_front_of_sim() -> (observer_sim::SimServer, Nginx) {
    let sim = super::sim_client::start(super::sim_client::fast_config()).await;
    let sim_addr = sim.local_addr();
    let nginx = tokio::task::spawn_blocking(move || Nginx::start(sim_addr))
        .await
        .unwrap();
    (sim, nginx)
}
