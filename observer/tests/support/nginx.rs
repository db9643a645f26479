//! A real nginx (Debian's `/usr/sbin/nginx`, testkit's launcher) as the gateway for the capture
//! tests: a reverse proxy on a free loopback port (or, for the deployment tests, an address in
//! a network namespace) to one upstream, with upstream keep-alive, unbuffered responses and
//! two worker processes. Everything it writes (config, pid, logs, temp files) lives in its own
//! temporary directory, so it runs as root without touching `/etc/nginx`. Dropping it stops
//! nginx (SIGTERM, then SIGKILL) and removes the directory. The fault tests reload it (`nginx
//! -s reload`: new workers) and restart it on the same port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use testkit::nginx::{self, Config, Serve};

#[allow(unused_imports, reason = "each test binary uses a part of support")]
pub use testkit::{nginx::NGINX, process::comm};

pub const WORKERS: usize = 2;

pub struct Nginx {
    inner: nginx::Nginx,
    /// The port nginx listens on (on `ip`).
    pub port: u16,
    /// The address nginx listens on: 127.0.0.1 unless started with [`Nginx::start_in`].
    pub ip: IpAddr,
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
        let NginxOptions { worker_connections } = options;
        let config = Config {
            listen,
            workers: WORKERS,
            worker_connections,
            // Each connection is an fd; beyond the usual limit the workers raise theirs (as root).
            worker_rlimit_nofile: (worker_connections > 512)
                .then(|| u64::from(worker_connections) * 2 + 64),
            error_log_level: "info",
            access_log: true,
            client_keepalive: None,
            serve: Serve::Proxy {
                upstream,
                keepalive: 8,
                keepalive_requests: None,
                buffering: false,
                read_timeout: None,
            },
        };
        let inner =
            nginx::Nginx::start_in("test", config, netns).unwrap_or_else(|err| panic!("{err:#}"));
        Nginx {
            port: inner.addr.port(),
            ip: inner.addr.ip(),
            inner,
        }
    }

    /// `nginx -s reload`: the master re-reads its configuration and starts new workers; the old
    /// ones stop accepting and exit once their requests are done. Returns once the master
    /// has signalled (the new workers may not be running yet).
    pub fn reload(&self) {
        self.inner.reload().unwrap_or_else(|err| panic!("{err:#}"));
    }

    /// Stops nginx (SIGTERM: fast shutdown, open connections are cut) and starts it again on
    /// the same port with the same configuration; returns once the new workers run.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap_or_else(|err| panic!("{err:#}"));
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn master_pid(&self) -> u32 {
        self.inner.master_pid().expect("nginx runs")
    }

    /// The master's children: its worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.inner.worker_pids()
    }

    pub fn error_log(&self) -> String {
        self.inner.error_log()
    }
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
