//! Gateway ↔ upstream correlation (docs/DESIGN.md#engine-gateway-overhead): a gateway exchange (the
//! gateway's server side) is paired with the upstream exchange (the gateway's client side of an
//! upstream connection) that the same gateway process sent while the gateway exchange was open. The
//! gateway adds `gateway duration − upstream duration` to a request, and `gateway TTFB − upstream
//! TTFB` to its first byte.
//!
//! Exchanges arrive in the order they finish, and an upstream exchange finishes before the
//! gateway exchange that relays it; a gateway exchange still waits up to [`GATEWAY_WAIT_NS`]
//! for its upstream exchange. Upstream exchanges nobody claims within [`UPSTREAM_KEEP_NS`] are
//! counted unmatched, as are gateway exchanges that find none. Bounded: at most
//! [`MAX_WAITING`] exchanges wait on each side.
//!
//! Turns over WebSocket (an `agent` or `chat.send` call, see [`super::rpc`]) are paired the
//! same way, but with every upstream exchange of the gateway process inside the turn (a turn
//! may call the model several times: tools, retries): the gateway's own time in a turn is its
//! duration minus the time covered by those calls.
//!
//! Upstream exchanges wait by gateway process, ordered by the time they ended: a gateway
//! exchange looks only at those of its own process that ended while it was open (a binary
//! search bounds them), not at every waiting one (under load hundreds wait at each resolve).

use std::collections::VecDeque;

use super::exchange::Exchange;
use super::rpc::Call;
use crate::base::{Role, Side};

/// How long a finished gateway exchange waits for its upstream exchange.
pub const GATEWAY_WAIT_NS: u64 = 1_000_000_000;
/// How long a finished upstream exchange waits to be claimed.
pub const UPSTREAM_KEEP_NS: u64 = 5_000_000_000;
/// Exchanges waiting on each side; the oldest is counted unmatched beyond it.
pub const MAX_WAITING: usize = 4096;

/// The times of an exchange that correlation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    tgid: u32,
    path: String,
    request_first: u64,
    request_last: u64,
    response_first: u64,
    response_last: u64,
    trace_id: Option<u128>,
}

impl Span {
    fn of(ex: Exchange) -> Option<Span> {
        Some(Span {
            tgid: ex.conn.tgid,
            path: ex.path,
            request_first: ex.ts.request_first,
            request_last: ex.ts.request_last,
            response_first: ex.ts.response_first?,
            response_last: ex.ts.response_last?,
            trace_id: ex.trace_id,
        })
    }

    fn contains(&self, inner: &Span) -> bool {
        self.tgid == inner.tgid
            && inner.request_first >= self.request_first
            && inner.response_last <= self.response_last
    }
}

/// What the gateway added to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Overhead {
    /// The gateway exchange's path (for the route label).
    pub path: String,
    pub overhead_s: f64,
    pub first_byte_overhead_s: f64,
}

/// What the gateway added to one turn over WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOverhead {
    pub method: String,
    /// The turn's duration minus the time covered by the upstream exchanges inside it.
    pub overhead_s: f64,
    /// Upstream exchanges inside the turn.
    pub upstream: u32,
}

/// Results of one [`Correlator::resolve`].
#[derive(Debug, Default, PartialEq)]
pub struct Resolved {
    pub overheads: Vec<Overhead>,
    pub unmatched_gateway: u64,
    pub unmatched_upstream: u64,
    pub turns: Vec<TurnOverhead>,
    /// Methods of turns in which no upstream exchange fell.
    pub unpaired_turns: Vec<String>,
}

/// A turn waiting for its upstream exchanges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Turn {
    tgid: u32,
    method: String,
    start: u64,
    end: u64,
    trace_id: Option<u128>,
}

#[derive(Debug, Default)]
pub struct Correlator {
    gateway: VecDeque<Span>,
    turns: VecDeque<Turn>,
    /// Upstream exchanges by the gateway process that sent them, each queue ordered by
    /// `response_last`.
    upstream: foldhash::HashMap<u32, VecDeque<Span>>,
    /// Upstream exchanges waiting, all processes.
    upstream_len: usize,
    unmatched_gateway: u64,
    unmatched_upstream: u64,
    unpaired_turns: Vec<String>,
}

impl Correlator {
    pub fn new() -> Correlator {
        Correlator::default()
    }

    /// Takes note of a finished exchange if it is one correlation uses: a gateway's server
    /// side, or an upstream client side. Exchanges without a response are not correlated.
    pub fn add(&mut self, ex: Exchange) {
        if ex.status == Some(101) {
            // A protocol switch (WebSocket): what follows on the connection is not this
            // exchange's response, and it relayed no upstream exchange of its own.
            return;
        }
        let role = match (ex.conn.role, ex.conn.side) {
            (Role::Gateway, Side::Server) => Role::Gateway,
            (Role::Upstream, Side::Client) => Role::Upstream,
            _ => return,
        };
        let Some(span) = Span::of(ex) else {
            if role == Role::Gateway {
                self.unmatched_gateway += 1;
            }
            return;
        };
        if role == Role::Gateway {
            if self.gateway.len() >= MAX_WAITING {
                self.gateway.pop_front();
                self.unmatched_gateway += 1;
            }
            self.gateway.push_back(span);
            return;
        }
        if self.upstream_len >= MAX_WAITING {
            self.drop_oldest_upstream();
        }
        let queue = self.upstream.entry(span.tgid).or_default();
        // Exchanges arrive nearly in the order they end: this is the end of the queue but for
        // the few that overtook each other.
        let at = queue.partition_point(|up| up.response_last <= span.response_last);
        queue.insert(at, span);
        self.upstream_len += 1;
    }

    /// Takes note of a finished call over WebSocket if it is a turn on the gateway's server
    /// side (`agent`, `chat.send`) that got its result.
    pub fn add_call(&mut self, call: &Call) {
        let turn = matches!(call.method.as_str(), "agent" | "chat.send");
        let answered = matches!(
            call.outcome,
            super::rpc::CallOutcome::Ok | super::rpc::CallOutcome::Error(_)
        );
        if !turn || !answered || (call.conn.role, call.conn.side) != (Role::Gateway, Side::Server) {
            return;
        }
        if self.turns.len() >= MAX_WAITING
            && let Some(old) = self.turns.pop_front()
        {
            self.unpaired_turns.push(old.method);
        }
        self.turns.push_back(Turn {
            tgid: call.conn.tgid,
            method: call.method.clone(),
            start: call.request_first,
            end: call.end,
            trace_id: call.trace_id,
        });
    }

    /// Counts unmatched the upstream exchange that ended first, of all processes.
    fn drop_oldest_upstream(&mut self) {
        let oldest = self
            .upstream
            .iter()
            .filter_map(|(&tgid, queue)| Some((queue.front()?.response_last, tgid)))
            .min();
        if let Some((_, tgid)) = oldest
            && let Some(queue) = self.upstream.get_mut(&tgid)
            && queue.pop_front().is_some()
        {
            self.upstream_len -= 1;
            self.unmatched_upstream += 1;
            if queue.is_empty() {
                self.upstream.remove(&tgid);
            }
        }
    }

    /// Pairs what can be paired; `now_ns` (the capture clock) expires what waited too long.
    pub fn resolve(&mut self, now_ns: u64) -> Resolved {
        let mut resolved = Resolved::default();
        self.resolve_into(now_ns, &mut resolved);
        resolved
    }

    /// [`Correlator::resolve`] into `out`, whose overheads must have been taken (its vector is
    /// reused: no allocation per call).
    pub fn resolve_into(&mut self, now_ns: u64, out: &mut Resolved) {
        // Each waiting gateway exchange once; those still waiting go back in order.
        for _ in 0..self.gateway.len() {
            let Some(gateway) = self.gateway.pop_front() else {
                break;
            };
            match self.claim(&gateway) {
                Some(upstream) => out.overheads.push(overhead(gateway, &upstream)),
                None if now_ns.saturating_sub(gateway.response_last) > GATEWAY_WAIT_NS => {
                    self.unmatched_gateway += 1;
                }
                None => self.gateway.push_back(gateway),
            }
        }
        for _ in 0..self.turns.len() {
            let Some(turn) = self.turns.pop_front() else {
                break;
            };
            match self.claim_turn(&turn) {
                Some(overhead) => out.turns.push(overhead),
                None if now_ns.saturating_sub(turn.end) > GATEWAY_WAIT_NS => {
                    out.unpaired_turns.push(turn.method);
                }
                None => self.turns.push_back(turn),
            }
        }
        out.unpaired_turns.append(&mut self.unpaired_turns);
        let mut expired = 0;
        self.upstream.retain(|_, queue| {
            while let Some(front) = queue.front() {
                if now_ns.saturating_sub(front.response_last) <= UPSTREAM_KEEP_NS {
                    break;
                }
                queue.pop_front();
                expired += 1;
            }
            !queue.is_empty()
        });
        self.upstream_len -= expired;
        self.unmatched_upstream += expired as u64;
        out.unmatched_gateway = std::mem::take(&mut self.unmatched_gateway);
        out.unmatched_upstream = std::mem::take(&mut self.unmatched_upstream);
    }

    /// The upstream exchange a gateway exchange relayed: of those it contains, the one in the
    /// same trace (`traceparent`, where the gateway passes it on) first, then the same path,
    /// then the one that ended last (a retry's final attempt).
    fn claim(&mut self, gateway: &Span) -> Option<Span> {
        let queue = self.upstream.get_mut(&gateway.tgid)?;
        // Only those that ended while the gateway exchange was open can be inside it (an
        // exchange ends after it starts).
        let from = queue.partition_point(|up| up.response_last < gateway.request_first);
        let to = queue.partition_point(|up| up.response_last <= gateway.response_last);
        let best = queue
            .range(from..to.max(from))
            .enumerate()
            .filter(|(_, up)| gateway.contains(up))
            .max_by_key(|(_, up)| {
                (
                    gateway.trace_id.is_some() && up.trace_id == gateway.trace_id,
                    up.path == gateway.path,
                    up.response_last,
                )
            })
            .map(|(at, _)| from + at)?;
        let span = queue.remove(best)?;
        self.upstream_len -= 1;
        if queue.is_empty() {
            self.upstream.remove(&gateway.tgid);
        }
        Some(span)
    }

    /// Every upstream exchange of the turn's process inside the turn, taken: those in the
    /// turn's trace where the turn has one and any of them does (concurrent turns of one
    /// process are told apart), else all; `None` when there is none (yet).
    fn claim_turn(&mut self, turn: &Turn) -> Option<TurnOverhead> {
        let queue = self.upstream.get_mut(&turn.tgid)?;
        let from = queue.partition_point(|up| up.response_last < turn.start);
        let to = queue.partition_point(|up| up.response_last <= turn.end);
        let window = from..to.max(from);
        let inside_turn = |up: &Span| up.request_first >= turn.start;
        let by_trace = turn.trace_id.is_some()
            && queue
                .range(window.clone())
                .any(|up| inside_turn(up) && up.trace_id == turn.trace_id);
        // The taken exchanges' (first, last) byte times.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let (mut at, mut end) = (window.start, window.end);
        while at < end {
            let up = &queue[at];
            if inside_turn(up) && (!by_trace || up.trace_id == turn.trace_id) {
                spans.push((up.request_first, up.response_last));
                queue.remove(at);
                end -= 1;
            } else {
                at += 1;
            }
        }
        if queue.is_empty() {
            self.upstream.remove(&turn.tgid);
        }
        if spans.is_empty() {
            return None;
        }
        self.upstream_len -= spans.len();
        // The time they cover (their union: they may overlap); taken in order of their ends,
        // sorted by their starts for the union.
        spans.sort_unstable();
        let mut covered = 0u64;
        let mut reach = 0u64;
        for &(start, end) in &spans {
            let start = start.max(reach);
            if end > start {
                covered += end - start;
            }
            reach = reach.max(end);
        }
        let duration = turn.end.saturating_sub(turn.start);
        Some(TurnOverhead {
            method: turn.method.clone(),
            overhead_s: duration.saturating_sub(covered) as f64 / 1e9,
            upstream: spans.len() as u32,
        })
    }

    /// Exchanges waiting (gateway, upstream).
    pub fn waiting(&self) -> (usize, usize) {
        (self.gateway.len() + self.turns.len(), self.upstream_len)
    }
}

fn overhead(gateway: Span, upstream: &Span) -> Overhead {
    let duration = |s: &Span| s.response_last.saturating_sub(s.request_first) as i128;
    let ttfb = |s: &Span| s.response_first.saturating_sub(s.request_last) as i128;
    let seconds = |ns: i128| ns.max(0) as f64 / 1e9;
    Overhead {
        overhead_s: seconds(duration(&gateway) - duration(upstream)),
        first_byte_overhead_s: seconds(ttfb(&gateway) - ttfb(upstream)),
        path: gateway.path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ConnMeta, LlmFields, Method, Outcome, Timestamps};

    fn exchange(role: Role, side: Side, tgid: u32, times: [u64; 4]) -> Exchange {
        Exchange {
            conn: ConnMeta {
                conn_id: 1,
                role,
                side,
                port: 1,
                tgid,
            },
            method: Method::Post,
            path: "/api/chat".into(),
            status: Some(200),
            ts: Timestamps {
                request_first: times[0],
                request_last: times[1],
                response_first: Some(times[2]),
                first_chunk: None,
                response_last: Some(times[3]),
            },
            request_body_bytes: 0,
            response_body_bytes: 0,
            outcome: Outcome::Complete,
            exact: true,
            llm: LlmFields::default(),
            trace_id: None,
        }
    }

    #[test]
    fn pairs_a_gateway_exchange_with_the_upstream_exchange_inside_it() {
        let mut c = Correlator::new();
        c.add(exchange(
            Role::Upstream,
            Side::Client,
            7,
            [110, 120, 300, 900],
        ));
        c.add(exchange(
            Role::Gateway,
            Side::Server,
            7,
            [100, 105, 310, 950],
        ));
        let r = c.resolve(1000);
        assert_eq!(r.overheads.len(), 1);
        let o = &r.overheads[0];
        // (950-100) - (900-110) = 60 ns; (310-105) - (300-120) = 25 ns.
        assert!((o.overhead_s - 60e-9).abs() < 1e-15, "{o:?}");
        assert!((o.first_byte_overhead_s - 25e-9).abs() < 1e-15, "{o:?}");
        assert_eq!((r.unmatched_gateway, r.unmatched_upstream), (0, 0));
        assert_eq!(c.waiting(), (0, 0));
    }

    #[test]
    fn concurrent_exchanges_of_one_worker_pair_by_containment() {
        let mut c = Correlator::new();
        // B [10,50] nested in A [0,100]; B finishes first.
        c.add(exchange(Role::Upstream, Side::Client, 7, [11, 12, 20, 49]));
        c.add(exchange(Role::Gateway, Side::Server, 7, [10, 11, 21, 50]));
        c.add(exchange(Role::Upstream, Side::Client, 7, [1, 2, 30, 99]));
        c.add(exchange(Role::Gateway, Side::Server, 7, [0, 1, 31, 100]));
        let r = c.resolve(100);
        let got: Vec<f64> = r.overheads.iter().map(|o| o.overhead_s * 1e9).collect();
        assert_eq!(got.len(), 2);
        assert!(
            (got[0] - 2.0).abs() < 1e-6 && (got[1] - 2.0).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn other_processes_and_late_arrivals() {
        let mut c = Correlator::new();
        c.add(exchange(Role::Gateway, Side::Server, 7, [0, 1, 2, 100]));
        // Another process's upstream exchange is not this gateway's.
        c.add(exchange(Role::Upstream, Side::Client, 8, [10, 11, 20, 90]));
        let r = c.resolve(200);
        assert!(r.overheads.is_empty());
        assert_eq!(c.waiting(), (1, 1));
        // The right one arrives late but within the wait.
        c.add(exchange(Role::Upstream, Side::Client, 7, [10, 11, 20, 90]));
        let r = c.resolve(300);
        assert_eq!(r.overheads.len(), 1);
        // The stranger expires unclaimed.
        let r = c.resolve(90 + UPSTREAM_KEEP_NS + 1);
        assert_eq!((r.unmatched_gateway, r.unmatched_upstream), (0, 1));
    }

    #[test]
    fn upstream_exchanges_arriving_out_of_order_and_the_bound() {
        let mut c = Correlator::new();
        // Two upstream exchanges of one worker arrive in the reverse order of their ends.
        c.add(exchange(Role::Upstream, Side::Client, 7, [30, 31, 40, 80]));
        c.add(exchange(Role::Upstream, Side::Client, 7, [10, 11, 20, 50]));
        c.add(exchange(Role::Gateway, Side::Server, 7, [9, 10, 21, 51]));
        c.add(exchange(Role::Gateway, Side::Server, 7, [29, 30, 41, 81]));
        let r = c.resolve(100);
        let got: Vec<f64> = r.overheads.iter().map(|o| o.overhead_s * 1e9).collect();
        assert_eq!(got, [2.0, 2.0], "each with the one inside it");
        assert_eq!(c.waiting(), (0, 0));
        // Past the bound, the upstream exchange that ended first goes, whichever process.
        for i in 0..MAX_WAITING as u64 {
            let tgid = 7 + (i % 3) as u32;
            c.add(exchange(
                Role::Upstream,
                Side::Client,
                tgid,
                [i, i, i, 1_000 + i],
            ));
        }
        c.add(exchange(Role::Upstream, Side::Client, 9, [0, 0, 0, 999]));
        assert_eq!(c.waiting(), (0, MAX_WAITING));
        let r = c.resolve(2_000);
        assert_eq!(r.unmatched_upstream, 1);
        // The one that ended at 1,000 (tgid 7) went; the late one that ended at 999 stays.
        c.add(exchange(Role::Gateway, Side::Server, 9, [0, 0, 0, 999]));
        assert_eq!(c.resolve(2_000).overheads.len(), 1);
        c.add(exchange(Role::Gateway, Side::Server, 7, [0, 0, 0, 1_000]));
        assert!(c.resolve(2_000).overheads.is_empty());
    }

    #[test]
    fn a_protocol_switch_is_never_paired() {
        let mut c = Correlator::new();
        // A WebSocket upgrade open for a whole turn, and the turn's upstream call inside it.
        let mut upgrade = exchange(Role::Gateway, Side::Server, 7, [0, 1, 2, 1_000]);
        upgrade.status = Some(101);
        c.add(upgrade);
        c.add(exchange(Role::Upstream, Side::Client, 7, [10, 11, 20, 900]));
        let r = c.resolve(1_000);
        assert!(r.overheads.is_empty(), "{:?}", r.overheads);
        assert_eq!(
            r.unmatched_gateway, 0,
            "the upgrade is no gateway exchange waiting"
        );
        assert_eq!(
            c.waiting(),
            (0, 1),
            "the upstream call stays for its real caller"
        );
    }

    fn turn(tgid: u32, method: &str, start: u64, end: u64) -> Call {
        Call {
            conn: ConnMeta {
                conn_id: 2,
                role: Role::Gateway,
                side: Side::Server,
                port: 18789,
                tgid,
            },
            method: method.into(),
            outcome: crate::engine::CallOutcome::Ok,
            request_first: start,
            request_last: start,
            accepted: None,
            first_delta: None,
            end,
            input_tokens: None,
            output_tokens: None,
            trace_id: None,
        }
    }

    #[test]
    fn a_turn_takes_every_upstream_exchange_inside_it() {
        let mut c = Correlator::new();
        // Two model calls (a tool round) overlapping a little, one of another process, one
        // after the turn.
        c.add(exchange(
            Role::Upstream,
            Side::Client,
            7,
            [100, 110, 200, 400],
        ));
        c.add(exchange(
            Role::Upstream,
            Side::Client,
            7,
            [350, 360, 500, 700],
        ));
        c.add(exchange(
            Role::Upstream,
            Side::Client,
            8,
            [150, 160, 200, 300],
        ));
        c.add(exchange(
            Role::Upstream,
            Side::Client,
            7,
            [1_100, 1_110, 1_200, 1_300],
        ));
        c.add_call(&turn(7, "agent", 50, 1_000));
        // A connect is no turn; a turn with nothing inside waits, then is unpaired.
        c.add_call(&turn(7, "connect", 0, 2_000));
        c.add_call(&turn(9, "chat.send", 0, 2_000));
        let r = c.resolve(2_000);
        assert_eq!(
            r.turns,
            [TurnOverhead {
                method: "agent".into(),
                // 950 long, 100..700 covered: 350 ns the gateway's own.
                overhead_s: 350e-9,
                upstream: 2,
            }]
        );
        assert!(r.unpaired_turns.is_empty());
        assert_eq!(c.waiting(), (1, 2));
        let r = c.resolve(2_001 + GATEWAY_WAIT_NS);
        assert_eq!(r.unpaired_turns, ["chat.send"]);
        // The other process's call and the one after the turn wait for their own callers.
        assert_eq!(c.waiting(), (0, 2));
    }

    #[test]
    fn concurrent_turns_of_one_process_are_told_apart_by_trace() {
        let mut c = Correlator::new();
        let traced = |times, trace| {
            let mut up = exchange(Role::Upstream, Side::Client, 7, times);
            up.trace_id = Some(trace);
            up
        };
        // Two overlapping turns, each calling the model once in its own trace.
        c.add(traced([100, 110, 200, 300], 0xa));
        c.add(traced([150, 160, 250, 400], 0xb));
        let mut a = turn(7, "agent", 50, 500);
        a.trace_id = Some(0xa);
        let mut b = turn(7, "agent", 60, 600);
        b.trace_id = Some(0xb);
        c.add_call(&a);
        c.add_call(&b);
        let r = c.resolve(1_000);
        let got: Vec<(u32, f64)> = r
            .turns
            .iter()
            .map(|t| (t.upstream, t.overhead_s * 1e9))
            .collect();
        // a: 450 long, 100..300 its call: 250; b: 540 long, 150..400: 290.
        assert_eq!(got.len(), 2, "{got:?}");
        assert!((got[0].1 - 250.0).abs() < 1e-6 && got[0].0 == 1, "{got:?}");
        assert!((got[1].1 - 290.0).abs() < 1e-6 && got[1].0 == 1, "{got:?}");
    }

    #[test]
    fn a_gateway_exchange_with_no_upstream_is_unmatched_after_the_wait() {
        let mut c = Correlator::new();
        c.add(exchange(Role::Gateway, Side::Server, 7, [0, 1, 2, 100]));
        assert_eq!(c.resolve(100 + GATEWAY_WAIT_NS).unmatched_gateway, 0);
        assert_eq!(c.resolve(101 + GATEWAY_WAIT_NS).unmatched_gateway, 1);
        // Server-side upstream exchanges (the model server's view) are not correlated.
        c.add(exchange(Role::Upstream, Side::Server, 7, [0, 1, 2, 100]));
        assert_eq!(c.waiting(), (0, 0));
    }
}
