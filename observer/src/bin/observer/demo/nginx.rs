//! nginx as the demo's gateway: Debian's binary with a configuration of our own in the demo's
//! directory (pid, logs and temp files there too), so it touches nothing under `/etc/nginx`
//! and runs as root or as a plain user alike. It proxies everything to the upstream without
//! buffering, so streams stay streams, with keep-alive towards the upstream as a production
//! configuration would have.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::Context as _;

use super::children::{Child, Stdout};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// Whether nginx is installed.
pub fn installed() -> bool {
    Path::new(NGINX).is_file()
}

/// The configuration: `listen` → `upstream`, two workers, everything under `dir`.
pub fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, root: bool) -> String {
    let d = dir.display();
    // As root, nginx would switch its workers to `nobody`, who cannot write to our directory.
    let user = if root { "user root;\n" } else { "" };
    format!(
        r#"worker_processes 2;
daemon off;
master_process on;
{user}pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream ollama {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
    )
}

/// Starts nginx with [`config`] written into `dir`.
pub fn start(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Child> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(dir, listen, upstream, root))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut command = Command::new(NGINX);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    Child::spawn("nginx", command, &dir.join("nginx.log"), Stdout::Logged)
}
