//! What a watched port is to this host (`--watch PORT=ROLE`): the gateway's or the model
//! server's.

use std::{fmt, str::FromStr};

use observer_common::role;

/// What a watched port is to this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Upstream,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Upstream => "upstream",
        }
    }

    /// 0 or 1, for per-role arrays.
    pub fn index(self) -> usize {
        match self {
            Role::Gateway => 0,
            Role::Upstream => 1,
        }
    }

    pub fn to_kernel(self) -> u32 {
        match self {
            Role::Gateway => role::GATEWAY,
            Role::Upstream => role::UPSTREAM,
        }
    }

    pub fn from_kernel(value: u32) -> Option<Role> {
        match value {
            role::GATEWAY => Some(Role::Gateway),
            role::UPSTREAM => Some(Role::Upstream),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--watch PORT=ROLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WatchedPort {
    pub port: u16,
    pub role: Role,
}

impl WatchedPort {
    /// The product's defaults: the gateway on 18789, Ollama on 11434.
    pub fn defaults() -> Vec<WatchedPort> {
        vec![
            WatchedPort {
                port: 18789,
                role: Role::Gateway,
            },
            WatchedPort {
                port: 11434,
                role: Role::Upstream,
            },
        ]
    }
}

impl FromStr for WatchedPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, role) = s
            .split_once('=')
            .ok_or_else(|| format!("expected PORT=ROLE, got {s:?}"))?;
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| format!("{port:?} is not a port number"))?;
        if port == 0 {
            return Err("port 0 cannot be watched".into());
        }
        let role = match role.trim() {
            "gateway" => Role::Gateway,
            "upstream" => Role::Upstream,
            other => return Err(format!("role {other:?} is neither gateway nor upstream")),
        };
        Ok(WatchedPort { port, role })
    }
}

/// `18789=gateway, 11434=upstream`.
pub fn watch_list(watch: &[WatchedPort]) -> String {
    watch
        .iter()
        .map(|w| format!("{}={}", w.port, w.role))
        .collect::<Vec<_>>()
        .join(", ")
}
