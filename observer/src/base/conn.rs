//! Connections as every layer names them: which end the observed process is ([`Side`]),
//! which way bytes go ([`Direction`]), and what is known of one connection when it opens or
//! closes ([`ConnRecord`]), whoever saw it (the kernel capture, `/proc`, the proxy).

use std::net::SocketAddr;

use super::Role;

/// Which end of the connection the observed process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Server,
    Client,
}

/// Direction of bytes as seen by the observed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Received by the process.
    Ingress,
    /// Sent by the process.
    Egress,
}

/// A watched connection opened or closed (or found open in `/proc` at start: `seeded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub ts_ns: u64,
    pub conn_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    pub side: Side,
    pub fd: u32,
    pub port: u16,
    /// What the kernel side knows of this end: the listener's address for the server side;
    /// for the client side its own port (chosen inside connect(), read from the socket) with
    /// an unspecified address, or unknown where the kernel's BTF did not say how to read it.
    pub local: Option<SocketAddr>,
    /// The peer: from accept()'s sockaddr for the server side (when the caller asked for
    /// it), the connect() target for the client side.
    pub remote: Option<SocketAddr>,
    pub seeded: bool,
}
