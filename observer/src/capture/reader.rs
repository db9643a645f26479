//! Asynchronous ring buffer reader: waits on the ring buffer's fd with tokio's `AsyncFd` or
//! for a short timer (the kernel side wakes the reader only once a batch is waiting), then
//! drains every available record and decodes it. Decode errors are counted by reason, never
//! dropped in silence and never fatal.

use std::{collections::BTreeMap, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::decode::{Event, decode};

/// How often the reader looks for events that did not wake it. Timestamps come from the
/// kernel, so this delays delivery, never measurements.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Records decoded per batch at most: a full ring is drained in several batches, so the
/// memory a batch holds stays small whatever the ring's size.
pub const MAX_BATCH: usize = 1024;

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    decode_errors: BTreeMap<&'static str, u64>,
    records: u64,
    /// The last drain stopped at [`MAX_BATCH`] with records left.
    backlog: bool,
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
            backlog: false,
        })
    }

    /// Waits until at least one record is available, then appends the available events (at
    /// most [`MAX_BATCH`]) to `out`, copied out of the ring. Returns the number of records
    /// consumed (decoded or not). For tools and tests; the daemon uses [`Self::drain`].
    pub async fn read_batch(&mut self, out: &mut Vec<Event<'static>>) -> std::io::Result<usize> {
        loop {
            let consumed = self.drain(|event| out.push(event.into_owned()));
            if consumed > 0 {
                return Ok(consumed);
            }
            self.ready().await?;
        }
    }

    /// Returns once records may be waiting: at once when the last drain stopped at
    /// [`MAX_BATCH`], else when the ring's fd is readable or after [`POLL_INTERVAL`].
    pub async fn ready(&mut self) -> std::io::Result<()> {
        if self.backlog {
            return Ok(());
        }
        tokio::select! {
            ready = self.ring.readable_mut() => ready?.clear_ready(),
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
        Ok(())
    }

    /// Decodes the records available now (at most [`MAX_BATCH`]) and hands each event to
    /// `each`, borrowed from the ring buffer: its bytes are not copied. Returns the number of
    /// records consumed (decoded or not).
    pub fn drain(&mut self, mut each: impl FnMut(Event<'_>)) -> usize {
        let ring = self.ring.get_mut();
        let mut consumed = 0;
        while consumed < MAX_BATCH
            && let Some(record) = ring.next()
        {
            consumed += 1;
            match decode(&record) {
                Ok(event) => each(event),
                Err(err) => {
                    tracing::debug!("undecodable ring buffer record: {err}");
                    *self.decode_errors.entry(err.reason()).or_default() += 1;
                }
            }
        }
        self.records += consumed as u64;
        self.backlog = consumed == MAX_BATCH;
        consumed
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
