//! The processes the bench runs: Debian's nginx (as the upstream, and as the reverse proxy
//! the observer proxy is measured against) and `observer proxy`, plus the small HTTP client
//! that checks they answer. Each process is owned by a guard that stops it when dropped.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::PATH;

pub const NGINX: &str = "/usr/sbin/nginx";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

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
pub fn proxy_conf(port: u16, upstream: SocketAddr) -> String {
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
        if !Path::new(NGINX).exists() {
            bail!("{NGINX} is missing: run scripts/setup.sh");
        }
        let dir =
            std::env::temp_dir().join(format!("observer-bench-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{}",
            http(port).replace(
                "http {\n",
                &format!(
                    "http {{\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    \
                     fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
                )
            )
        );
        fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let mut nginx = Nginx {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_ok(nginx.addr).is_err() {
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
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM, then SIGKILL after five seconds.
fn stop(child: &mut Child) {
    // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `observer proxy` on a free port with its admin listener on another; dropping it stops it.
pub struct ObserverProxy {
    child: Child,
    pub addr: SocketAddr,
    admin: SocketAddr,
}

impl ObserverProxy {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(binary: &Path, upstream: SocketAddr) -> anyhow::Result<ObserverProxy> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut child = Command::new(binary)
            .args(["proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .arg("--metrics-addr")
            .arg(admin.to_string())
            .args(["--no-probe", "--gpu", "off", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        // Read stdout on a thread that keeps draining it, so a full pipe never blocks the proxy.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The guard first, so the proxy is stopped if it never says where it listens.
        let mut proxy = ObserverProxy {
            child,
            addr: admin,
            admin,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .context("observer proxy printed no listening address")?;
        proxy.addr = line
            .strip_prefix("observer proxy listening on ")
            .and_then(|a| a.trim().parse().ok())
            .with_context(|| format!("unexpected first line from observer proxy: {line:?}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !http_get(admin, "/readyz").is_ok_and(|(code, _)| code == 200) {
            if let Some(status) = proxy.child.try_wait()? {
                bail!("observer proxy exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("observer proxy's /readyz on {admin} is not 200 after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    /// The sum of `observer_http_requests_total{role="gateway"}` over its series.
    pub fn gateway_requests(&self) -> anyhow::Result<u64> {
        let (code, body) = http_get(self.admin, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        let values: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.starts_with("observer_http_requests_total{") && l.contains(r#"role="gateway""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if values.is_empty() {
            bail!("/metrics has no observer_http_requests_total{{role=\"gateway\"}} series");
        }
        Ok(values.iter().sum::<f64>() as u64)
    }

    /// The count once two scrapes 200 ms apart agree: the engine may still be finishing the
    /// last exchanges when wrk exits.
    pub fn settled_gateway_requests(&self) -> anyhow::Result<u64> {
        let mut last = self.gateway_requests()?;
        for _ in 0..25 {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.gateway_requests()?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(last)
    }
}

impl Drop for ObserverProxy {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// One HTTP/1.0 request on a fresh connection: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of head")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    Ok((code, body.to_owned()))
}

fn get_ok(addr: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    keep_alive_request(&mut stream)
}

/// Sends one keep-alive request for [`PATH`] and reads its whole response (Content-Length),
/// leaving the connection open.
pub fn keep_alive_request(stream: &mut TcpStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {PATH} HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the whole response");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("unexpected response: {head}");
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .context("no content-length")?
            .trim()
            .parse()?;
        if buf.len() >= end + 4 + length {
            return Ok(());
        }
    }
}
