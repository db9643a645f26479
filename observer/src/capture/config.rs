//! Capture configuration: watched ports and their roles (`--watch PORT=ROLE`), payload
//! capture sizes, and map sizes. Validated before anything is loaded into the kernel.

use crate::base::WatchedPort;
use anyhow::bail;
use observer_common::{HEAD_MAX, TAIL_MAX};

/// Flags that size and aim the kernel capture; `observer trace` and `observer run` share them.
#[derive(Debug, Clone, clap::Args)]
pub struct CaptureArgs {
    /// A watched port and its role (`gateway` or `upstream`); repeatable.
    #[arg(long = "watch", value_name = "PORT=ROLE", default_values = ["18789=gateway", "11434=upstream"])]
    pub watch: Vec<WatchedPort>,
    /// Bytes captured from the start of each send or receive (at most 1024).
    #[arg(long, value_name = "N", default_value_t = CaptureConfig::default().head_bytes)]
    pub head_bytes: u32,
    /// Bytes captured from the end of each send or receive (at most 256).
    #[arg(long, value_name = "N", default_value_t = CaptureConfig::default().tail_bytes)]
    pub tail_bytes: u32,
    /// Size of the kernel ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "N", default_value_t = CaptureConfig::default().ring_bytes)]
    pub ring_bytes: u32,
    /// Most connections tracked at once.
    #[arg(long, value_name = "N", default_value_t = CaptureConfig::default().max_conns)]
    pub max_conns: u32,
    /// Most (process, fd) holders of watched listeners tracked at once.
    #[arg(long, value_name = "N", default_value_t = CaptureConfig::default().max_listeners)]
    pub max_listeners: u32,
    /// Also capture this process's own sockets.
    #[arg(long)]
    pub include_self: bool,
}

impl CaptureArgs {
    pub fn to_config(&self) -> CaptureConfig {
        CaptureConfig {
            watch: self.watch.clone(),
            head_bytes: self.head_bytes,
            tail_bytes: self.tail_bytes,
            ring_bytes: self.ring_bytes,
            max_conns: self.max_conns,
            max_listeners: self.max_listeners,
            exclude_self: !self.include_self,
        }
    }
}

/// How the kernel side is sized and what it watches.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub watch: Vec<WatchedPort>,
    /// Bytes captured from the start of each buffer (≤ HEAD_MAX).
    pub head_bytes: u32,
    /// Bytes captured from the end of each buffer (≤ TAIL_MAX).
    pub tail_bytes: u32,
    /// Ring buffer size in bytes: a power of two, at least a page.
    pub ring_bytes: u32,
    /// Most connections tracked at once.
    pub max_conns: u32,
    /// Most (process, fd) holders of watched listeners tracked at once.
    pub max_listeners: u32,
    /// Leave this process's own sockets (the readiness probe) out.
    pub exclude_self: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            watch: WatchedPort::defaults(),
            head_bytes: HEAD_MAX as u32,
            tail_bytes: TAIL_MAX as u32,
            ring_bytes: 8 * 1024 * 1024,
            max_conns: 65_536,
            max_listeners: 4096,
            exclude_self: true,
        }
    }
}

impl CaptureConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.watch.is_empty() {
            bail!("no port to watch");
        }
        for (i, watched) in self.watch.iter().enumerate() {
            if let Some(other) = self.watch[..i].iter().find(|w| w.port == watched.port) {
                bail!(
                    "port {} is watched twice (as {} and as {})",
                    watched.port,
                    other.role,
                    watched.role
                );
            }
        }
        if self.head_bytes as usize > HEAD_MAX {
            bail!(
                "head capture of {} bytes exceeds the maximum of {HEAD_MAX}",
                self.head_bytes
            );
        }
        if self.tail_bytes as usize > TAIL_MAX {
            bail!(
                "tail capture of {} bytes exceeds the maximum of {TAIL_MAX}",
                self.tail_bytes
            );
        }
        if !self.ring_bytes.is_power_of_two() || self.ring_bytes < 4096 {
            bail!(
                "ring buffer size {} is not a power of two of at least 4096",
                self.ring_bytes
            );
        }
        if self.max_conns == 0 {
            bail!("the connection table needs at least one entry");
        }
        if self.max_listeners == 0 {
            bail!("the listener table needs at least one entry");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Role;

    #[test]
    fn watch_flag_parses_port_and_role() {
        assert_eq!(
            "18789=gateway".parse(),
            Ok(WatchedPort {
                port: 18789,
                role: Role::Gateway
            })
        );
        assert_eq!(
            "11434=upstream".parse(),
            Ok(WatchedPort {
                port: 11434,
                role: Role::Upstream
            })
        );
    }

    #[test]
    fn watch_flag_rejects_bad_input() {
        assert!(
            "18789"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("PORT=ROLE")
        );
        assert!(
            "http=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            "0=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            "70000=gateway"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            "80=proxy"
                .parse::<WatchedPort>()
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn config_validation_catches_bad_sizes() {
        let ok = CaptureConfig::default();
        assert!(ok.validate().is_ok());
        let head = CaptureConfig {
            head_bytes: HEAD_MAX as u32 + 1,
            ..ok.clone()
        };
        assert!(head.validate().is_err());
        let ring = CaptureConfig {
            ring_bytes: 5000,
            ..ok.clone()
        };
        assert!(ring.validate().is_err());
        let twice = CaptureConfig {
            watch: vec![
                "80=gateway".parse().unwrap(),
                "80=upstream".parse().unwrap(),
            ],
            ..ok.clone()
        };
        assert!(
            twice
                .validate()
                .unwrap_err()
                .to_string()
                .contains("watched twice")
        );
        let none = CaptureConfig {
            watch: vec![],
            ..ok
        };
        assert!(none.validate().is_err());
    }
}
