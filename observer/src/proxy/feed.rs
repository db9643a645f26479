//! The proxy's tap: the bytes a connection pair moves, as the kernel would have seen them, run
//! through the same [`Pipeline`] as `observer run` (engine, metrics, correlation) as they move.
//!
//! Each client connection and its upstream connection form a pair: the client side is the
//! `gateway` role's server end, the upstream side the `upstream` role's client end, and both
//! carry the pair's number as their `tgid`. Each pair has a pipeline of its own, fed inline by
//! the connection's task: no copy, no channel, no other thread woken, and the engine work of
//! many connections spreads over the runtime's workers. The pipelines share one [`Metrics`]
//! (gauges move by deltas). Correlation needs nothing across pairs: a gateway exchange is
//! paired with the upstream exchange of its own pair.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use crate::base::{Direction, Role, Side, clock::monotonic_ns};
use crate::{
    admin::StatusBoard,
    engine::{ConnMeta, EngineConfig},
    metrics::Metrics,
    pipeline::Pipeline,
};

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

/// How often a busy pair publishes its metrics at most; every scrape and the pair's end
/// publish them too.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// What every pair's tap shares: the metrics, the status board, and the taps alive now, which
/// publish their observations before each scrape.
#[derive(Clone)]
pub struct Shared {
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    live: Arc<Mutex<HashMap<u64, Weak<Mutex<Inner>>>>>,
}

impl Shared {
    pub fn new(metrics: Arc<Metrics>, status: Arc<StatusBoard>) -> Shared {
        let live: Arc<Mutex<HashMap<u64, Weak<Mutex<Inner>>>>> = Arc::default();
        let taps = Arc::downgrade(&live);
        metrics.before_gather(Box::new(move || {
            let Some(taps) = taps.upgrade() else {
                return;
            };
            // Not holding the list while publishing: new connections need it.
            let alive: Vec<_> = lock(&taps).values().filter_map(Weak::upgrade).collect();
            for inner in alive {
                lock(&inner).pipeline.publish();
            }
        }));
        Shared {
            metrics,
            status,
            live,
        }
    }
}

/// One pair's pipeline. The connection's request and response halves run concurrently within
/// its task and both feed it; the lock is taken by nothing else but a scrape, and never held
/// across an await.
pub struct Tap {
    inner: Arc<Mutex<Inner>>,
    status: Arc<StatusBoard>,
    live: Arc<Mutex<HashMap<u64, Weak<Mutex<Inner>>>>>,
    id: u64,
}

struct Inner {
    pipeline: Pipeline,
    /// Exchanges already added to the status board.
    reported: u64,
}

impl Inner {
    fn report(&mut self, status: &StatusBoard) {
        let exchanges = self.pipeline.totals().exchanges;
        status.add_exchanges(exchanges - self.reported);
        self.reported = exchanges;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock still guards good state: counts and the engine's bounded buffers.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Tap {
    /// The tap of pair number `id`.
    pub fn new(shared: &Shared, id: u64) -> Tap {
        // Two connections: the pair's ends.
        let mut pipeline = Pipeline::new(shared.metrics.clone(), EngineConfig { max_conns: 2 });
        pipeline.publish_every(PUBLISH_EVERY);
        let inner = Arc::new(Mutex::new(Inner {
            pipeline,
            reported: 0,
        }));
        lock(&shared.live).insert(id, Arc::downgrade(&inner));
        Tap {
            inner,
            status: shared.status.clone(),
            live: shared.live.clone(),
            id,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn open(&self, meta: ConnMeta) {
        self.inner().pipeline.on_open(meta, monotonic_ns(), false);
        self.status.add_connections_open(1);
    }

    pub fn data(&self, meta: ConnMeta, direction: Direction, bytes: &[u8]) {
        self.data_at(meta, direction, monotonic_ns(), bytes);
    }

    /// Bytes moved at `ts` (the capture clock, [`monotonic_ns`]), reported afterwards.
    pub fn data_at(&self, meta: ConnMeta, direction: Direction, ts: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.inner()
                .pipeline
                .on_data(meta, direction, ts, bytes.len() as u64, bytes, &[]);
        }
    }

    pub fn close(&self, meta: ConnMeta) {
        self.inner().pipeline.on_close(meta.conn_id, meta.role);
        self.status.add_connections_open(-1);
    }

    /// After a request was forwarded or an exchange ended: finished exchanges into the
    /// metrics, correlation and gauges brought up to date (published at most every
    /// [`PUBLISH_EVERY`]).
    pub fn flush(&self) {
        let mut inner = self.inner();
        inner.pipeline.flush(monotonic_ns(), |_| {});
        inner.report(&self.status);
    }

    /// After both ends closed: what still waits for correlation is settled, and published.
    pub fn finish(&self) {
        let mut inner = self.inner();
        inner.pipeline.finish();
        inner.report(&self.status);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        lock(&self.live).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ExpositionFormat, MetricsConfig};

    fn gateway_requests(text: &str) -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("observer_http_requests_total{") && l.contains("role=\"gateway\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn a_scrape_sees_what_a_busy_pair_has_not_published_yet() {
        let metrics = Arc::new(Metrics::new(MetricsConfig::default()).unwrap());
        let status = Arc::new(StatusBoard::new("proxy", Vec::new()));
        let shared = Shared::new(metrics.clone(), status.clone());
        let pair = Pair::new(1, 18789, 11434);
        let tap = Tap::new(&shared, 1);
        tap.open(pair.client);
        tap.open(pair.upstream);
        let request = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        for _ in 0..2 {
            tap.data(pair.client, Direction::Ingress, request);
            tap.data(pair.upstream, Direction::Egress, request);
            tap.data(pair.upstream, Direction::Ingress, response);
            tap.data(pair.client, Direction::Egress, response);
            tap.flush();
        }
        // The first flush published; the second came within PUBLISH_EVERY and did not.
        let registry_only: u64 = metrics
            .registry()
            .gather()
            .iter()
            .filter(|f| f.name() == "observer_http_requests_total")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_counter().value() as u64)
            .sum();
        assert_eq!(registry_only, 2, "one gateway and one upstream exchange");
        // A scrape publishes every live pair first.
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert_eq!(gateway_requests(&text), 2, "{text}");
        assert!(text.contains("observer_gateway_overhead_seconds_count{route=\"/api/tags\"} 2"));
        tap.close(pair.upstream);
        tap.close(pair.client);
        tap.finish();
        drop(tap);
        assert!(lock(&shared.live).is_empty());
        let (_, text) = metrics.encode(ExpositionFormat::Text);
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("observer_tcp_connections_active{role=\"gateway\"} 0"),
            "{text}"
        );
        assert_eq!(status.snapshot()["exchanges"], 4, "{}", status.snapshot());
    }
}
