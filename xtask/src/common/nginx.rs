//! Debian's nginx as the benchmarks run it: the fast upstream (one worker answering every
//! request at once) and the gateway (a plain reverse proxy with upstream keep-alive, as on an
//! Ollama host), each from a temporary directory of its own and stopped when its guard drops.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::http::{free_port, keep_alive_request, stop_child};

pub const NGINX: &str = "/usr/sbin/nginx";

/// The fast upstream: one worker answering every request at once, and never closing a
/// keep-alive connection on its own (as Ollama's Go server does not).
pub fn upstream_conf(port: u16) -> String {
    format!(
        r#"worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    server {{
        listen 127.0.0.1:{port};
        default_type application/json;
        location / {{ return 200 '{{"status":"ok"}}'; }}
    }}
}}
"#
    )
}

/// nginx as a plain reverse proxy with upstream keep-alive, one worker per core. The request
/// limits are lifted so that nginx, like the observer proxy, never closes a connection itself.
pub fn gateway_conf(port: u16, upstream: SocketAddr) -> String {
    format!(
        r#"worker_processes 2;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    upstream u {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

/// Debian's nginx run from a temporary directory of its own (config, pid, logs, temp files),
/// in the foreground; dropping it stops nginx and removes the directory.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl Nginx {
    pub fn start(name: &str, http: impl FnOnce(u16) -> String) -> anyhow::Result<Nginx> {
        let port = free_port()?;
        let dir = prepare(name, &http(port))?;
        let child = command(&dir).spawn().context("starting nginx")?;
        let mut nginx = Nginx {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_ok(nginx.addr, super::PATH).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!("nginx ({name}) exited with {status}: {}", nginx.error_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx ({name}) does not answer on {}: {}",
                    nginx.addr,
                    nginx.error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }

    fn error_log(&self) -> String {
        error_log(&self.dir)
    }
}

/// A fresh temporary directory for one nginx, holding `nginx.conf`: `conf` (a configuration
/// with an `http {` block) completed with what keeps nginx in the foreground and inside the
/// directory (pid, error log, temp paths).
pub fn prepare(name: &str, conf: &str) -> anyhow::Result<PathBuf> {
    if !Path::new(NGINX).exists() {
        bail!("{NGINX} is missing: run scripts/setup.sh");
    }
    let dir = std::env::temp_dir().join(format!("observer-bench-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{}",
        conf.replace(
            "http {\n",
            &format!(
                "http {{\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    \
                 fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
            )
        )
    );
    fs::write(dir.join("nginx.conf"), conf)?;
    Ok(dir)
}

/// nginx with its prefix, configuration and error log in `dir` (see [`prepare`]), quiet.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(NGINX);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// What the nginx of `dir` logged.
pub fn error_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One keep-alive request for `path` on a fresh connection, answered 200.
fn get_ok(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    keep_alive_request(&mut stream, path)
}

/// The Ollama host's shape: nginx as the gateway (2 workers, upstream keep-alive) in front of
/// the fast upstream, each on a free port. Both stop when it drops.
pub struct Gateway {
    pub upstream: Nginx,
    pub gateway: Nginx,
}

impl Gateway {
    /// Starts both and says where they listen.
    pub fn start() -> anyhow::Result<Gateway> {
        let upstream = Nginx::start("upstream", upstream_conf)?;
        let upstream_addr = upstream.addr;
        let gateway = Nginx::start("gateway", |port| gateway_conf(port, upstream_addr))?;
        println!(
            "gateway nginx {} → upstream nginx {upstream_addr}",
            gateway.addr
        );
        Ok(Gateway { upstream, gateway })
    }

    /// The ports and roles for `observer run --watch`.
    pub fn watch(&self) -> [(u16, &'static str); 2] {
        [
            (self.gateway.addr.port(), "gateway"),
            (self.upstream.addr.port(), "upstream"),
        ]
    }

    /// Every nginx process: both masters and their workers.
    pub fn pids(&self) -> Vec<u32> {
        [self.gateway.pids(), self.upstream.pids()].concat()
    }
}
