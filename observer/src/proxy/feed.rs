//! The proxy's tap: the bytes its connections move, as the kernel would have seen them, sent to
//! one task that runs them through the same [`Pipeline`] as `observer run` (engine, metrics,
//! correlation).
//!
//! Each client connection and its upstream connection form a pair: the client side is the
//! `gateway` role's server end, the upstream side the `upstream` role's client end, and both
//! carry the pair's number as their `tgid`, so correlation pairs exactly the exchanges of one
//! client connection. Each connection gathers its events and sends them as one message per
//! exchange (or per [`BATCH`] events): one channel operation and at most one wake-up of the
//! pipeline task per request, not four. The channel is bounded: a slow pipeline slows
//! forwarding rather than losing events or growing memory.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{
    admin::StatusBoard,
    capture::{
        Role,
        decode::{Direction, Side},
        seed::monotonic_ns,
    },
    engine::ConnMeta,
    pipeline::Pipeline,
};

/// Batches waiting for the pipeline task.
const QUEUE: usize = 2048;
/// Events a connection gathers before it sends them on, even mid-exchange (long streams).
pub const BATCH: usize = 64;
/// Batches handled between two pipeline flushes.
const BATCHES: usize = 64;
/// How often the pipeline flushes without traffic (correlation waits, in-flight gauges).
const IDLE_FLUSH: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug)]
pub enum FeedEvent {
    Open(ConnMeta, u64),
    Data(ConnMeta, Direction, u64, Bytes),
    Close(u64, Role),
}

/// The two ends the proxy forwards between, as the pipeline sees them.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub client: ConnMeta,
    pub upstream: ConnMeta,
}

impl Pair {
    /// The `n`th pair: client end on the proxy's `listen_port`, upstream end to `upstream_port`.
    pub fn new(n: u64, listen_port: u16, upstream_port: u16) -> Pair {
        Pair {
            client: ConnMeta {
                conn_id: n << 1,
                role: Role::Gateway,
                side: Side::Server,
                port: listen_port,
                tgid: n as u32,
            },
            upstream: ConnMeta {
                conn_id: n << 1 | 1,
                role: Role::Upstream,
                side: Side::Client,
                port: upstream_port,
                tgid: n as u32,
            },
        }
    }
}

/// Where a connection sends what it sees; each clone gathers its own events.
#[derive(Debug)]
pub struct Feed {
    sender: mpsc::Sender<Vec<FeedEvent>>,
    pending: std::sync::Mutex<Vec<FeedEvent>>,
}

impl Clone for Feed {
    fn clone(&self) -> Feed {
        Feed {
            sender: self.sender.clone(),
            pending: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Feed {
    pub async fn open(&self, meta: ConnMeta) {
        self.send(FeedEvent::Open(meta, monotonic_ns())).await;
    }

    pub async fn data(&self, meta: ConnMeta, direction: Direction, bytes: Bytes) {
        self.data_at(meta, direction, monotonic_ns(), bytes).await;
    }

    /// Bytes moved at `ts` (the capture clock, [`monotonic_ns`]), reported afterwards.
    pub async fn data_at(&self, meta: ConnMeta, direction: Direction, ts: u64, bytes: Bytes) {
        if !bytes.is_empty() {
            self.send(FeedEvent::Data(meta, direction, ts, bytes)).await;
        }
    }

    pub async fn close(&self, meta: ConnMeta) {
        self.send(FeedEvent::Close(meta.conn_id, meta.role)).await;
        self.flush().await;
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<FeedEvent>> {
        // Only this connection's task uses it; a poisoned buffer still holds good events.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(&self, event: FeedEvent) {
        let full = {
            let mut pending = self.pending();
            pending.push(event);
            pending.len() >= BATCH
        };
        if full {
            self.flush().await;
        }
    }

    /// Sends what this connection gathered (at the end of an exchange).
    pub async fn flush(&self) {
        let batch = std::mem::take(&mut *self.pending());
        if !batch.is_empty() {
            // Fails only after the pipeline task ended (shutdown): nothing left to count.
            let _ = self.sender.send(batch).await;
        }
    }
}

/// Starts the pipeline task; it ends when every [`Feed`] is dropped.
pub fn spawn(
    mut pipeline: Pipeline,
    status: Arc<StatusBoard>,
) -> (Feed, tokio::task::JoinHandle<()>) {
    let (sender, mut events) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        let mut batches = Vec::with_capacity(BATCHES);
        let mut reported = crate::pipeline::Totals::default();
        loop {
            let received =
                tokio::time::timeout(IDLE_FLUSH, events.recv_many(&mut batches, BATCHES)).await;
            if received == Ok(0) {
                break;
            }
            for event in batches.drain(..).flatten() {
                match event {
                    FeedEvent::Open(meta, ts) => pipeline.on_open(meta, ts, false),
                    FeedEvent::Data(meta, direction, ts, bytes) => {
                        pipeline.on_data(meta, direction, ts, bytes.len() as u64, &bytes, &[])
                    }
                    FeedEvent::Close(conn_id, role) => pipeline.on_close(conn_id, role),
                }
            }
            pipeline.flush(monotonic_ns(), |_| {});
            let totals = pipeline.totals();
            status.add_exchanges(totals.exchanges - reported.exchanges);
            status.set_connections_open(totals.connections as u64);
            reported = totals;
        }
    });
    (
        Feed {
            sender,
            pending: std::sync::Mutex::new(Vec::new()),
        },
        task,
    )
}
