//! Asynchronous ring buffer reader: waits on the ring buffer's fd with tokio's `AsyncFd`, then
//! drains every available record and decodes it. Decode errors are counted by reason, never
//! dropped in silence and never fatal.

use std::collections::BTreeMap;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::decode::{Event, decode};

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    decode_errors: BTreeMap<&'static str, u64>,
    records: u64,
}

impl EventReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<EventReader> {
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
        // as the RingBuf lives, and the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
        Ok(EventReader {
            ring,
            decode_errors: BTreeMap::new(),
            records: 0,
        })
    }

    /// Waits until at least one record is available, then appends every available event to
    /// `out`. Returns the number of records consumed (decoded or not).
    pub async fn read_batch(&mut self, out: &mut Vec<Event>) -> std::io::Result<usize> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let mut consumed = 0;
            while let Some(record) = guard.get_inner_mut().next() {
                consumed += 1;
                match decode(&record) {
                    Ok(event) => out.push(event),
                    Err(err) => {
                        tracing::debug!("undecodable ring buffer record: {err}");
                        *self.decode_errors.entry(err.reason()).or_default() += 1;
                    }
                }
            }
            // Tokio only clears readiness if no new wake-up arrived while we were draining.
            guard.clear_ready();
            if consumed > 0 {
                self.records += consumed as u64;
                return Ok(consumed);
            }
        }
    }

    /// Records consumed so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Decode errors so far, by reason.
    pub fn decode_errors(&self) -> &BTreeMap<&'static str, u64> {
        &self.decode_errors
    }
}

/// Forwards kernel-side log records (rare conditions only) into the daemon's logs until the
/// task is aborted.
pub fn forward_kernel_logs(
    logger: super::KernelLogger,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns its map fd for as long as it lives, and the AsyncFd owns it.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
