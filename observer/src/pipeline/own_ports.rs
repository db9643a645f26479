//! The local ports of the daemon's own outgoing connections (the readiness probe's), so that
//! the far end of them is not observed either.
//!
//! The kernel programs skip every socket of the daemon's process, but when the daemon connects
//! to a watched port on this host, the server's end of that connection belongs to the server
//! (Ollama) and is captured like any client's. The daemon therefore binds its client sockets
//! before connecting, registers the port here, and the pipeline ignores a server-side
//! connection whose peer port is registered. Binding first means the port is known before the
//! server can accept, so there is no race with the capture.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How long a port stays listed after its connection closed: the server's open event may still
/// be in the ring buffer. The port stays bound in TIME_WAIT for longer than this, so no other
/// process's connection can take it meanwhile.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default)]
pub struct OwnPorts(Arc<Mutex<HashMap<u16, Option<Instant>>>>);

/// Keeps a port listed while the connection lives (and [`GRACE`] after).
#[derive(Debug)]
pub struct OwnPort {
    ports: OwnPorts,
    port: u16,
}

impl Drop for OwnPort {
    fn drop(&mut self) {
        self.ports
            .lock()
            .insert(self.port, Some(Instant::now() + GRACE));
    }
}

impl OwnPorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Option<Instant>>> {
        // Every change is one insert or retain; a panic cannot leave half of one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists `port` until the returned guard is dropped (plus the grace period).
    pub fn register(&self, port: u16) -> OwnPort {
        let now = Instant::now();
        let mut ports = self.lock();
        ports.retain(|_, until| until.is_none_or(|t| t > now));
        ports.insert(port, None);
        OwnPort {
            ports: self.clone(),
            port,
        }
    }

    /// Whether a connection from `port` is one of the daemon's own.
    pub fn contains(&self, port: u16) -> bool {
        self.lock()
            .get(&port)
            .is_some_and(|until| until.is_none_or(|t| t > Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_listed_while_held_and_for_the_grace_period() {
        let ports = OwnPorts::default();
        assert!(!ports.contains(40000));
        let guard = ports.register(40000);
        assert!(ports.contains(40000));
        assert!(!ports.contains(40001));
        drop(guard);
        assert!(
            ports.contains(40000),
            "still listed during the grace period"
        );
        // Expired entries are pruned on the next registration.
        ports.lock().insert(40000, Some(Instant::now()));
        let _other = ports.register(40001);
        assert!(!ports.contains(40000));
        assert_eq!(ports.lock().len(), 1);
    }
}
