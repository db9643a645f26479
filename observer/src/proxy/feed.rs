//! The proxy's tap: the bytes its connections move, as the kernel would have seen them, sent to
//! one task that runs them through the same [`Pipeline`] as `observer run` (engine, metrics,
//! correlation).
//!
//! Each client connection and its upstream connection form a pair: the client side is the
//! `gateway` role's server end, the upstream side the `upstream` role's client end, and both
//! carry the pair's number as their `tgid`, so correlation pairs exactly the exchanges of one
//! client connection. The channel is bounded: a slow pipeline slows forwarding rather than
//! losing events or growing memory.

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

/// Events waiting for the pipeline task.
const QUEUE: usize = 8192;
/// Events handled between two flushes.
const BATCH: usize = 1024;
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

/// Where connections send what they see.
#[derive(Debug, Clone)]
pub struct Feed(mpsc::Sender<FeedEvent>);

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
    }

    async fn send(&self, event: FeedEvent) {
        // Fails only after the pipeline task ended (shutdown): nothing left to count.
        let _ = self.0.send(event).await;
    }
}

/// Starts the pipeline task; it ends when every [`Feed`] is dropped.
pub fn spawn(
    mut pipeline: Pipeline,
    status: Arc<StatusBoard>,
) -> (Feed, tokio::task::JoinHandle<()>) {
    let (sender, mut events) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        let mut reported = crate::pipeline::Totals::default();
        loop {
            let received =
                tokio::time::timeout(IDLE_FLUSH, events.recv_many(&mut batch, BATCH)).await;
            if received == Ok(0) {
                break;
            }
            for event in batch.drain(..) {
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
    (Feed(sender), task)
}
