//! The gateway in front of the simulated Ollama: Debian's nginx (`/usr/sbin/nginx`) run from a
//! directory of its own. The configuration, pid, logs and temp files all live there, so it
//! touches nothing under `/etc/nginx` and runs as root (workers as root too, who can write
//! there) or as a plain user alike, in the foreground, with a master and its workers.
//!
//! What it serves is a [`Config`]: a reverse proxy to one upstream (keep-alive towards it,
//! buffering or not) or a fixed JSON answer (the benchmarks' fast upstream). This is the one
//! nginx of the project: `observer demo` starts [`Config::gateway`] with [`args`] under its own
//! process handling, and the tests' and benchmarks' launcher (`testkit::nginx`) runs, reloads
//! and restarts the same configurations.

use std::{ffi::OsString, fmt::Write as _, net::SocketAddr, path::Path};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";
/// Its files in its directory.
pub const CONF: &str = "nginx.conf";
pub const ERROR_LOG: &str = "nginx-error.log";
pub const ACCESS_LOG: &str = "nginx-access.log";

/// Whether nginx is installed.
pub fn installed() -> bool {
    Path::new(NGINX).is_file()
}

/// What nginx serves, and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it listens (port 0: a free one, chosen at start).
    pub listen: SocketAddr,
    /// `worker_processes`.
    pub workers: usize,
    /// `worker_connections` of each worker (client and upstream connections together).
    pub worker_connections: u32,
    /// `worker_rlimit_nofile`: the workers' fd limit, where the inherited one is too low.
    pub worker_rlimit_nofile: Option<u64>,
    /// The level of the error log (`warn`, `info`, ...).
    pub error_log_level: &'static str,
    /// Keep an access log.
    pub access_log: bool,
    /// `keepalive_requests` and `keepalive_timeout` (seconds) towards clients; `None`: nginx's
    /// defaults.
    pub client_keepalive: Option<(u64, u64)>,
    pub serve: Serve,
}

/// The one location's work.
#[derive(Debug, Clone)]
pub enum Serve {
    /// A reverse proxy to `upstream`, HTTP/1.1 with `keepalive` idle connections kept to it.
    Proxy {
        upstream: SocketAddr,
        keepalive: u32,
        /// `keepalive_requests` of the upstream connections; `None`: nginx's default.
        keepalive_requests: Option<u64>,
        /// `proxy_buffering`: off, streams reach the client as they come.
        buffering: bool,
        /// `proxy_read_timeout` in seconds; `None`: nginx's default (60 s).
        read_timeout: Option<u64>,
    },
    /// Every request answered 200 with this JSON body.
    Json(String),
}

impl Config {
    /// A gateway as an Ollama host would have one: `listen` → `upstream`, two workers, 1,024
    /// connections each, upstream keep-alive (16), unbuffered, no access log, warnings
    /// logged.
    pub fn gateway(listen: SocketAddr, upstream: SocketAddr) -> Config {
        Config {
            listen,
            workers: 2,
            worker_connections: 1024,
            worker_rlimit_nofile: None,
            error_log_level: "warn",
            access_log: false,
            client_keepalive: None,
            serve: Serve::Proxy {
                upstream,
                keepalive: 16,
                keepalive_requests: None,
                buffering: false,
                read_timeout: None,
            },
        }
    }

    /// The configuration file for an nginx whose files live in `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let d = dir.display();
        let mut conf = String::new();
        let _ = writeln!(conf, "worker_processes {};", self.workers);
        if let Some(nofile) = self.worker_rlimit_nofile {
            let _ = writeln!(conf, "worker_rlimit_nofile {nofile};");
        }
        conf += "daemon off;\nmaster_process on;\n";
        // As root, nginx would switch its workers to `nobody`, who cannot write to `dir`.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            conf += "user root;\n";
        }
        let _ = writeln!(conf, "pid {d}/nginx.pid;");
        let _ = writeln!(conf, "error_log {d}/{ERROR_LOG} {};", self.error_log_level);
        let _ = writeln!(
            conf,
            "events {{ worker_connections {}; }}",
            self.worker_connections
        );
        conf += "http {\n";
        if self.access_log {
            let _ = writeln!(conf, "    access_log {d}/{ACCESS_LOG};");
        } else {
            conf += "    access_log off;\n";
        }
        for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let _ = writeln!(conf, "    {temp}_temp_path {d}/{temp};");
        }
        if let Some((requests, timeout)) = self.client_keepalive {
            let _ = writeln!(conf, "    keepalive_requests {requests};");
            let _ = writeln!(conf, "    keepalive_timeout {timeout}s;");
        }
        let location = match &self.serve {
            Serve::Proxy {
                upstream,
                keepalive,
                keepalive_requests,
                buffering,
                read_timeout,
            } => {
                let _ = writeln!(conf, "    upstream backend {{");
                let _ = writeln!(conf, "        server {upstream};");
                let _ = writeln!(conf, "        keepalive {keepalive};");
                if let Some(n) = keepalive_requests {
                    let _ = writeln!(conf, "        keepalive_requests {n};");
                }
                conf += "    }\n";
                let mut location = String::new();
                for line in [
                    "proxy_pass http://backend;",
                    "proxy_http_version 1.1;",
                    "proxy_set_header Connection \"\";",
                ] {
                    let _ = writeln!(location, "            {line}");
                }
                if !buffering {
                    location += "            proxy_buffering off;\n";
                }
                if let Some(seconds) = read_timeout {
                    let _ = writeln!(location, "            proxy_read_timeout {seconds}s;");
                }
                location
            }
            Serve::Json(body) => {
                conf += "    default_type application/json;\n";
                format!("            return 200 '{body}';\n")
            }
        };
        let _ = writeln!(conf, "    server {{");
        let _ = writeln!(conf, "        listen {};", self.listen);
        conf += "        location / {\n";
        conf += &location;
        conf += "        }\n    }\n}\n";
        conf
    }
}

/// nginx's arguments for a prefix, configuration and error log in `dir` (the configuration
/// written there as [`CONF`]).
pub fn args(dir: &Path) -> [OsString; 6] {
    [
        "-p".into(),
        dir.into(),
        "-c".into(),
        dir.join(CONF).into(),
        "-e".into(),
        dir.join(ERROR_LOG).into(),
    ]
}
