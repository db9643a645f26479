//! `observer proxy` as the bench runs it (nginx, the upstream and the gateway it is measured
//! against, is in `crate::common::nginx`); stopped when its guard drops.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::common::http::{free_port, http_get, stop_child};
use crate::observer_run::{metric_sum, settled};

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
        if !body.contains("observer_http_requests_total{") {
            bail!("/metrics has no observer_http_requests_total series");
        }
        Ok(metric_sum(
            &body,
            "observer_http_requests_total",
            &[("role", "gateway")],
        ) as u64)
    }

    /// The gateway count once it stops changing: the engine may still be finishing the last
    /// exchanges when wrk exits.
    pub fn settled_gateway_requests(&self) -> anyhow::Result<u64> {
        settled(|| self.gateway_requests())
    }
}

impl Drop for ObserverProxy {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}
