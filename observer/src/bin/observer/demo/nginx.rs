//! nginx as the demo's gateway: the project's one nginx configuration
//! (`observer_sim::nginx::Config::gateway`: everything proxied to the upstream unbuffered, so
//! streams stay streams, with keep-alive towards it as a production configuration would have),
//! written into the demo's directory (pid, logs and temp files there too) and started under the
//! demo's own process handling.

use std::{net::SocketAddr, path::Path, process::Command};

use anyhow::Context as _;
use observer_sim::nginx::{self, CONF, Config, NGINX, Serve};

use super::children::{Child, Stdout};

/// Whether nginx is installed.
pub fn installed() -> bool {
    nginx::installed()
}

/// Starts nginx in front of `upstream` on `listen`, its files in `dir`.
pub fn start(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Child> {
    let mut config = Config::gateway(listen, upstream);
    // A stream may pause longer than nginx's default of 60 s between two reads.
    if let Serve::Proxy { read_timeout, .. } = &mut config.serve {
        *read_timeout = Some(300);
    }
    let conf = dir.join(CONF);
    std::fs::write(&conf, config.render(dir))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut command = Command::new(NGINX);
    command.args(nginx::args(dir));
    Child::spawn("nginx", command, &dir.join("nginx.log"), Stdout::Logged)
}
