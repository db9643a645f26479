//! The capture's side of the hand-over to the [`Pipeline`]: decoded kernel events become
//! opens, bytes and closes; the kernel's connection table, walked every second ([`Sweep`]),
//! settles what lost events left out of step; the kernel's loss counters become
//! `ebpf_events_lost_total`. The pipeline never sees an eBPF record, a sweep or a counter:
//! the proxy feeds it the same opens, bytes and closes without any of them.
//!
//! Owns the bookkeeping of that hand-over (connections suspected closed or unknown, counters
//! already reported) and nothing else; it does no I/O.

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use super::{KernelCounters, Sweep, decode::Event};
use crate::base::Role;
use crate::metrics::{EbpfEventKind, Metrics};
use crate::pipeline::Pipeline;

/// What one [`KernelFeed::reconcile`] changed: connections closed whose close event was lost,
/// connections taken as open whose every event was lost, connections put back in step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub closed: usize,
    pub opened: usize,
    pub resynced: usize,
}

impl Reconciled {
    pub fn any(&self) -> bool {
        *self != Reconciled::default()
    }
}

/// Kernel events into one pipeline; see the module docs.
#[derive(Debug, Default)]
pub struct KernelFeed {
    /// Events by kind (data, open, close) not yet added to `ebpf_events_total`.
    unpublished: [u64; 3],
    /// Every event handed over.
    events: u64,
    /// Connections missing from the kernel's table at the last reconcile: closed there, their
    /// close event not seen yet.
    suspects: HashSet<u64>,
    /// Connections in the kernel's table but not in the pipeline at the last reconcile.
    unknown: HashSet<u64>,
    reported_kernel: KernelCounters,
    reported_undecodable: u64,
}

impl KernelFeed {
    pub fn new() -> KernelFeed {
        KernelFeed::default()
    }

    /// One decoded event into the pipeline.
    pub fn on_event(&mut self, pipeline: &mut Pipeline, event: &Event) {
        self.events += 1;
        match event {
            Event::Data(d) => {
                self.unpublished[EbpfEventKind::Data as usize] += 1;
                pipeline.on_data(d.into(), d.direction, d.ts_ns, d.len, &d.head, &d.tail);
            }
            Event::Open(c) => {
                self.unpublished[EbpfEventKind::Open as usize] += 1;
                pipeline.on_conn_open(c);
            }
            Event::Close(c) => {
                self.unpublished[EbpfEventKind::Close as usize] += 1;
                pipeline.on_close(c.conn_id, c.role);
            }
        }
    }

    /// Events handed over so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Adds the events handed over since the last call to `ebpf_events_total` (once per
    /// batch: one shared counter update per kind, not one per event).
    pub fn publish(&mut self, metrics: &Metrics) {
        for kind in [
            EbpfEventKind::Data,
            EbpfEventKind::Open,
            EbpfEventKind::Close,
        ] {
            let n = std::mem::take(&mut self.unpublished[kind as usize]);
            if n > 0 {
                metrics.add_ebpf_events(kind, n);
            }
        }
    }

    /// Brings the pipeline's connections in step with the kernel's connection table after
    /// events were lost (the ring buffer was full), from one [`Sweep`]:
    /// - a connection held in the pipeline but missing from the table was closed, and its
    ///   close event is either still in the ring buffer or lost: one missing at two sweeps in a
    ///   row (a chore interval apart, the ring read in between) is closed; its open exchanges
    ///   end as aborted and the connection and in-flight gauges drop it;
    /// - a connection the kernel marked as having lost an event is put back in step
    ///   ([`Pipeline::resync`]): requests whose responses were lost no longer stay in flight
    ///   nor take the next responses;
    /// - a connection in the table unknown to the pipeline at two sweeps in a row is taken as
    ///   open, mid-stream.
    pub fn reconcile(&mut self, pipeline: &mut Pipeline, sweep: &Sweep) -> Reconciled {
        let live = &sweep.live;
        let mut done = Reconciled::default();
        let mut missing: HashMap<u64, Role> = HashMap::new();
        missing.extend(pipeline.held().filter(|(id, _)| !live.contains_key(id)));
        let mut suspects = HashSet::with_capacity(missing.len());
        for (id, role) in missing {
            if self.suspects.contains(&id) {
                pipeline.on_close(id, role);
                done.closed += 1;
            } else {
                suspects.insert(id);
            }
        }
        self.suspects = suspects;

        for &id in &sweep.lost {
            if pipeline.resync(id) {
                done.resynced += 1;
            }
        }

        let mut unknown = HashSet::new();
        for (&id, record) in live {
            if pipeline.holds(id) {
                continue;
            }
            if self.unknown.contains(&id) && !pipeline.is_full() {
                pipeline.on_conn_open(record);
                done.opened += 1;
            } else {
                unknown.insert(id);
            }
        }
        self.unknown = unknown;
        done
    }

    /// The kernel's loss counters (cumulative) into `ebpf_events_lost_total`, and decode
    /// errors of the ring buffer reader (cumulative). Every kind gets its series at the first
    /// call, at 0 when nothing was lost, so that `increase()` sees the first loss too.
    pub fn kernel_counters(
        &mut self,
        metrics: &Metrics,
        counters: &KernelCounters,
        undecodable: u64,
    ) {
        let before = self.reported_kernel;
        let pairs = [
            ("data", counters.lost_data, before.lost_data),
            ("conn", counters.lost_conn, before.lost_conn),
            ("conn_table_full", counters.conns_full, before.conns_full),
            (
                "listener_table_full",
                counters.listeners_full,
                before.listeners_full,
            ),
            (
                "read_failed",
                counters.read_user_failed,
                before.read_user_failed,
            ),
            (
                "kernel_read_failed",
                counters.read_kernel_failed,
                before.read_kernel_failed,
            ),
            (
                "map_update_failed",
                counters.map_update_failed,
                before.map_update_failed,
            ),
            ("undecodable", undecodable, self.reported_undecodable),
        ];
        for (kind, now, then) in pairs {
            metrics.add_ebpf_lost(kind, now.saturating_sub(then));
        }
        if counters.tgids_full > 0 && before.tgids_full == 0 {
            tracing::warn!(
                "the kernel side's table of processes holding watched sockets is full: it now looks at every process's data calls (nothing is missed; each costs a connection lookup)"
            );
        }
        self.reported_kernel = *counters;
        self.reported_undecodable = undecodable;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::{ConnRecord, Direction, Side};
    use crate::engine::ConnMeta;
    use crate::metrics::ExpositionFormat;
    use crate::pipeline::tests::{exchange, meta, pipeline, requests, sample};

    #[test]
    fn every_loss_kind_is_exported_from_the_first_counters_on() {
        let (metrics, _) = pipeline();
        let mut feed = KernelFeed::new();
        let lost = |kind: &str| {
            let (_, text) = metrics.encode(ExpositionFormat::Text);
            let prefix = format!("observer_ebpf_events_lost_total{{kind=\"{kind}\"}} ");
            String::from_utf8(text)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse::<u64>().unwrap()))
        };
        assert_eq!(lost("data"), None, "no series before the first counters");
        feed.kernel_counters(&metrics, &KernelCounters::default(), 0);
        for kind in [
            "data",
            "conn",
            "conn_table_full",
            "listener_table_full",
            "read_failed",
            "kernel_read_failed",
            "map_update_failed",
            "undecodable",
        ] {
            assert_eq!(lost(kind), Some(0), "{kind}");
        }
        let counters = KernelCounters {
            lost_data: 5,
            ..KernelCounters::default()
        };
        feed.kernel_counters(&metrics, &counters, 2);
        feed.kernel_counters(&metrics, &counters, 2);
        assert_eq!(lost("data"), Some(5));
        assert_eq!(lost("undecodable"), Some(2));
        assert_eq!(lost("conn"), Some(0));
    }

    /// A sweep that found these connections in the kernel's table, `lost` of them marked.
    fn sweep(conns: &[ConnMeta], lost: &[u64]) -> Sweep {
        let live = conns
            .iter()
            .map(|m| {
                let record = ConnRecord {
                    ts_ns: 1,
                    conn_id: m.conn_id,
                    tgid: m.tgid,
                    pid: m.tgid,
                    comm: String::new(),
                    role: m.role,
                    side: m.side,
                    fd: 3,
                    port: m.port,
                    local: None,
                    remote: None,
                    seeded: true,
                };
                (m.conn_id, record)
            })
            .collect();
        Sweep {
            closed: Vec::new(),
            live,
            lost: lost.to_vec(),
        }
    }

    #[test]
    fn connections_whose_close_event_was_lost_are_closed_at_the_second_sweep_without_them() {
        let (metrics, mut p) = pipeline();
        let mut feed = KernelFeed::new();
        let active = "observer_tcp_connections_active{role=\"gateway\"}";
        let in_flight = "observer_http_requests_in_flight{role=\"gateway\"}";
        let conns: Vec<ConnMeta> = (1..=3)
            .map(|id| meta(id, Role::Gateway, Side::Server, 18789))
            .collect();
        for &conn in &conns {
            p.on_open(conn, 1, false);
        }
        // A request without its response on connection 2: in flight.
        let request = b"POST /api/chat HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        p.on_data(
            conns[1],
            Direction::Ingress,
            5,
            request.len() as u64,
            request,
            &[],
        );
        exchange(&mut p, conns[2], 6);
        p.flush(10, |_| {});
        assert_eq!(sample(&metrics, active), 3);
        assert_eq!(sample(&metrics, in_flight), 1);

        // The kernel closed 2 and 3; only 3's close event arrives.
        let live = sweep(&conns[..1], &[]);
        assert_eq!(
            feed.reconcile(&mut p, &live).closed,
            0,
            "a first miss may be a close still in the ring"
        );
        p.on_close(3, Role::Gateway);
        p.flush(20, |_| {});
        assert_eq!(sample(&metrics, active), 2);
        assert_eq!(
            feed.reconcile(&mut p, &live).closed,
            1,
            "connection 2 missed twice"
        );
        p.flush(30, |_| {});
        assert_eq!(sample(&metrics, active), 1);
        assert_eq!(sample(&metrics, in_flight), 0);
        // Its request ended without a response; the exchange on 3 counted once.
        assert_eq!(requests(&metrics, "gateway"), 2);
        let closed = "observer_tcp_connections_closed_total{role=\"gateway\"}";
        assert_eq!(sample(&metrics, closed), 2);
        // The late close event of 2 changes nothing; 1 is still open.
        p.on_close(2, Role::Gateway);
        p.flush(40, |_| {});
        assert_eq!(sample(&metrics, closed), 2);
        assert!(!feed.reconcile(&mut p, &live).any());
        assert!(!feed.reconcile(&mut p, &live).any());
        assert_eq!(sample(&metrics, active), 1);
    }

    #[test]
    fn a_connection_back_in_the_kernel_table_is_no_longer_suspected() {
        let (_, mut p) = pipeline();
        let mut feed = KernelFeed::new();
        let conn = meta(1, Role::Upstream, Side::Server, 11434);
        p.on_open(conn, 1, false);
        let none = sweep(&[], &[]);
        assert_eq!(feed.reconcile(&mut p, &none).closed, 0);
        assert_eq!(feed.reconcile(&mut p, &sweep(&[conn], &[])).closed, 0);
        assert_eq!(
            feed.reconcile(&mut p, &none).closed,
            0,
            "missed once since it came back"
        );
        assert_eq!(feed.reconcile(&mut p, &none).closed, 1);
    }

    #[test]
    fn a_connection_that_lost_a_response_is_put_back_in_step() {
        let (metrics, mut p) = pipeline();
        let mut feed = KernelFeed::new();
        let conn = meta(1, Role::Upstream, Side::Server, 11434);
        p.on_open(conn, 1, false);
        // The response to this request was lost in the kernel.
        let lost = b"GET /api/version HTTP/1.1\r\n\r\n";
        p.on_data(conn, Direction::Ingress, 5, lost.len() as u64, lost, &[]);
        p.flush(6, |_| {});
        let in_flight = "observer_http_requests_in_flight{role=\"upstream\"}";
        assert_eq!(sample(&metrics, in_flight), 1);
        let done = feed.reconcile(&mut p, &sweep(&[conn], &[1]));
        assert_eq!(done.resynced, 1);
        p.flush(7, |_| {});
        assert_eq!(sample(&metrics, in_flight), 0);
        // The next exchange is its own, not answered by the response of the next one.
        let mut routes = Vec::new();
        exchange(&mut p, conn, 10);
        p.flush(20, |ex| routes.push((ex.path.clone(), ex.status)));
        assert_eq!(routes, [("/api/tags".to_owned(), Some(200))]);
        assert_eq!(sample(&metrics, in_flight), 0);
    }

    #[test]
    fn a_connection_whose_every_event_was_lost_is_taken_as_open_at_the_second_sweep() {
        let (metrics, mut p) = pipeline();
        let mut feed = KernelFeed::new();
        let conn = meta(9, Role::Gateway, Side::Server, 18789);
        let live = sweep(&[conn], &[]);
        assert_eq!(
            feed.reconcile(&mut p, &live).opened,
            0,
            "its open event may still be in the ring"
        );
        assert_eq!(feed.reconcile(&mut p, &live).opened, 1);
        assert!(!feed.reconcile(&mut p, &live).any());
        p.flush(10, |_| {});
        let active = "observer_tcp_connections_active{role=\"gateway\"}";
        assert_eq!(sample(&metrics, active), 1);
        exchange(&mut p, conn, 20);
        p.flush(30, |_| {});
        assert_eq!(requests(&metrics, "gateway"), 1);
    }
}
