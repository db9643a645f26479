//! Debian's nginx as the benchmarks run it (testkit's launcher): the fast upstream (one worker
//! answering every request at once) and the gateway (a plain reverse proxy with upstream
//! keep-alive, as on an Ollama host), each from a temporary directory of its own and stopped
//! when it drops.

use std::net::SocketAddr;

use anyhow::bail;
use testkit::{
    http,
    nginx::{Config, Nginx, Serve},
};

/// Connections of each worker, and the requests a client connection may carry (lifted, so
/// that nginx, like the observer proxy, never closes a connection itself; as Ollama's Go
/// server does not).
const WORKER_CONNECTIONS: u32 = 4096;
const KEEPALIVE: (u64, u64) = (1_000_000, 600);

/// Any port on the loopback: a free one is chosen at start.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The fast upstream: one worker answering every request at once, and never closing a
/// keep-alive connection on its own.
pub fn upstream_conf() -> Config {
    Config {
        workers: 1,
        worker_connections: WORKER_CONNECTIONS,
        client_keepalive: Some(KEEPALIVE),
        serve: Serve::Json(r#"{"status":"ok"}"#.to_owned()),
        ..Config::gateway(loopback(), loopback())
    }
}

/// nginx as a plain reverse proxy to `upstream` with upstream keep-alive, one worker per core,
/// buffering as nginx does by default.
pub fn gateway_conf(upstream: SocketAddr) -> Config {
    Config {
        worker_connections: WORKER_CONNECTIONS,
        client_keepalive: Some(KEEPALIVE),
        serve: Serve::Proxy {
            upstream,
            keepalive: 64,
            keepalive_requests: Some(KEEPALIVE.0),
            buffering: true,
            read_timeout: None,
        },
        ..Config::gateway(loopback(), upstream)
    }
}

/// nginx with `config`, once it answers `GET` [`super::PATH`] with 200.
pub fn start(name: &str, config: Config) -> anyhow::Result<Nginx> {
    let nginx = Nginx::start(name, config)?;
    match http::get(nginx.addr, super::PATH) {
        Ok((200, _)) => Ok(nginx),
        answer => bail!(
            "nginx ({name}) on {} answers {answer:?}: {}",
            nginx.addr,
            nginx.error_log()
        ),
    }
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
        let upstream = start("upstream", upstream_conf())?;
        let gateway = start("gateway", gateway_conf(upstream.addr))?;
        println!(
            "gateway nginx {} → upstream nginx {}",
            gateway.addr, upstream.addr
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
