//! The chat path that the accuracy benchmark and the soak drive, as on an Ollama host: nginx
//! (the gateway, [`gateway`]) in front of `observer sim` (a simulated Ollama, [`sim`]), and a
//! client ([`client`]) that sends Ollama and OpenAI chat requests on keep-alive connections
//! with testkit's HTTP/1 client, which times each exchange at its socket.

pub mod client;

use std::{net::SocketAddr, path::Path};

pub use client::{Api, ChatClient, ChatRequest};
pub use testkit::http::{Exchange, Outcome};
use testkit::{
    nginx::{self, Nginx},
    observer::{self, Sim},
};

/// nginx as the gateway of an Ollama host, in front of `upstream` on a free port: a reverse
/// proxy with upstream keep-alive and unbuffered responses (so streams reach the client line
/// by line, as Ollama's docs advise), two workers of 4,096 connections, nginx's defaults
/// elsewhere (keep-alive timeouts and request limits).
pub fn gateway(name: &str, upstream: SocketAddr) -> anyhow::Result<Nginx> {
    let config = nginx::Config {
        worker_connections: 4096,
        ..nginx::Config::gateway(SocketAddr::from(([127, 0, 0, 1], 0)), upstream)
    };
    Nginx::start(name, config)
}

/// `binary sim` on a free port with `flags`: its parallel slots, unless the flags set them,
/// are 256, since load generators send requests at once and mean them to run at once.
pub fn sim(binary: &Path, flags: &[&str]) -> anyhow::Result<Sim> {
    let parallel = observer::parallel_unless_set(flags, &[], 256);
    let flags: Vec<&str> = flags
        .iter()
        .copied()
        .chain(parallel.iter().map(String::as_str))
        .collect();
    Sim::start(binary, "127.0.0.1:0", &flags)
}
