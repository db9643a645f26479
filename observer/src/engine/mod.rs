//! The HTTP exchange engine (docs/DESIGN.md#exchange-engine): ordered byte events of each
//! connection in, finished [`Exchange`]s out. It knows nothing about where the bytes came from
//! (eBPF or the proxy) and nothing about metrics.
//!
//! - [`http`]: framing of one direction (heads, bodies, gaps, resynchronisation).
//! - `conn`: one connection: requests paired with responses, pipelining.
//! - `llm`: model, stream flag, tokens and chunk timing from the bodies.
//! - [`correlate`]: gateway exchanges paired with the upstream exchanges they caused.
//! - [`ws`]: WebSocket frames and messages after a `101`; [`rpc`]: the calls made with them
//!   (OpenClaw's gateway protocol).
//!
//! Memory is bounded: connections (`max_conns`, the least recently active is evicted), a
//! head buffer per direction, [`conn::MAX_PIPELINE`] waiting requests, one line buffer per
//! response. Every limit hit is counted in [`Engine::errors`].

mod conn;
pub mod correlate;
mod exchange;
pub mod http;
mod llm;
pub mod rpc;
pub mod ws;

use crate::base::{Direction, Role};
use foldhash::{HashMap, HashMapExt as _};

pub use conn::MAX_PIPELINE;
pub use exchange::{ConnMeta, Exchange, LlmFields, MAX_PATH, Method, Outcome, Timestamps};
pub use llm::Rejection;
pub use rpc::{Call, CallOutcome};
pub use ws::{MessageKind, Unread, WsCounts};

use conn::{Conn, Output};

/// Why bytes could not be read as planned. Counted per role; the label of
/// `http_parse_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// A connection first seen in the middle of a message: bytes skipped to the next one.
    MidStream,
    /// Bytes that are not an HTTP head where one was due (garbage, another protocol).
    BadHead,
    /// A head longer than the buffer or with too many headers.
    HeadTooLarge,
    /// Capture left a gap inside a head: its first lines were used, framing fell back.
    TruncatedHead,
    /// A malformed chunk size or chunk end.
    BadChunk,
    /// A gap hid framing bytes: the message end was inferred.
    FramingFallback,
    /// A response with no request waiting for it.
    UnmatchedResponse,
    /// More pipelined requests than [`MAX_PIPELINE`].
    PipelineOverflow,
    /// More connections than the engine keeps: the least recently active was dropped.
    ConnLimit,
}

impl ErrorReason {
    pub const COUNT: usize = 9;
    pub const ALL: [ErrorReason; ErrorReason::COUNT] = [
        ErrorReason::MidStream,
        ErrorReason::BadHead,
        ErrorReason::HeadTooLarge,
        ErrorReason::TruncatedHead,
        ErrorReason::BadChunk,
        ErrorReason::FramingFallback,
        ErrorReason::UnmatchedResponse,
        ErrorReason::PipelineOverflow,
        ErrorReason::ConnLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::MidStream => "mid_stream",
            ErrorReason::BadHead => "bad_head",
            ErrorReason::HeadTooLarge => "head_too_large",
            ErrorReason::TruncatedHead => "truncated_head",
            ErrorReason::BadChunk => "bad_chunk",
            ErrorReason::FramingFallback => "framing_fallback",
            ErrorReason::UnmatchedResponse => "unmatched_response",
            ErrorReason::PipelineOverflow => "pipeline_overflow",
            ErrorReason::ConnLimit => "conn_limit",
        }
    }

    /// Whether the message it happened in is no longer framed exactly.
    fn loses_framing(self) -> bool {
        matches!(
            self,
            ErrorReason::TruncatedHead | ErrorReason::BadChunk | ErrorReason::FramingFallback
        )
    }
}

/// Errors so far, by role, bucket (server side, client side, relay hops' server and client
/// sides) and reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    counts: [[[u64; ErrorReason::COUNT]; BUCKETS]; 2],
}

/// Connections are counted apart by side, and relay hops apart from both, by side too (see
/// [`Engine::set_relay`]): a request through a relay is in flight on both of its ends.
const BUCKETS: usize = 4;
const RELAY_SERVER_BUCKET: usize = 2;

impl ErrorCounts {
    /// On both sides and relay hops.
    pub fn get(&self, role: Role, reason: ErrorReason) -> u64 {
        self.counts[role.index()]
            .iter()
            .map(|side| side[reason as usize])
            .sum()
    }

    /// On connections of one side: a loopback connection's error is seen from both ends, and
    /// the pipeline counts one of them (the side whose exchanges it counts).
    pub fn on_side(&self, role: Role, side: crate::base::Side, reason: ErrorReason) -> u64 {
        self.counts[role.index()][side_index_of(side)][reason as usize]
    }

    fn slot(&mut self, role: Role, bucket: usize) -> &mut [u64; ErrorReason::COUNT] {
        &mut self.counts[role.index()][bucket]
    }

    /// Every non-zero count.
    pub fn iter(&self) -> impl Iterator<Item = (Role, ErrorReason, u64)> + '_ {
        [Role::Gateway, Role::Upstream]
            .into_iter()
            .flat_map(move |role| {
                ErrorReason::ALL
                    .into_iter()
                    .map(move |reason| (role, reason, self.get(role, reason)))
                    .filter(|&(_, _, n)| n > 0)
            })
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().flatten().sum()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Connections kept at once.
    pub max_conns: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_conns: 65_536 }
    }
}

/// Connections by id, and what they produced since the last drain.
pub struct Engine {
    config: EngineConfig,
    conns: HashMap<u64, Conn>,
    finished: Vec<Exchange>,
    calls: Vec<Call>,
    errors: ErrorCounts,
    /// WebSocket messages and unread bytes by role and bucket.
    ws: [[WsCounts; BUCKETS]; 2],
    /// Requests in flight by role and bucket (side, or relay hop).
    in_flight: [[usize; BUCKETS]; 2],
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config,
            conns: HashMap::new(),
            finished: Vec::new(),
            calls: Vec::new(),
            errors: ErrorCounts::default(),
            ws: Default::default(),
            in_flight: [[0; BUCKETS]; 2],
        }
    }

    /// A connection was opened (`mid_stream`: found already open, e.g. seeded from /proc).
    /// A connection id seen again replaces the old one, which is closed first.
    pub fn open(&mut self, meta: ConnMeta, ts: u64, mid_stream: bool) {
        if self.conns.contains_key(&meta.conn_id) {
            self.close(meta.conn_id);
        }
        self.insert(meta, ts, mid_stream);
    }

    /// Bytes of one send or receive: `len` moved, `head` and `tail` captured.
    pub fn data(
        &mut self,
        meta: ConnMeta,
        direction: Direction,
        ts: u64,
        len: u64,
        head: &[u8],
        tail: &[u8],
    ) {
        if !self.conns.contains_key(&meta.conn_id) {
            // Its open was missed (before the daemon, or lost): pick it up mid-stream.
            self.insert(meta, ts, true);
        }
        let Some(conn) = self.conns.get_mut(&meta.conn_id) else {
            return;
        };
        // The process doing the I/O now (a forked child serving what its parent accepted):
        // its exchanges are correlated with its own.
        conn.meta.tgid = meta.tgid;
        let before = conn.in_flight();
        let bucket = conn.bucket();
        let errors = self.errors.slot(conn.meta.role, bucket);
        conn.segment(
            direction,
            ts,
            len,
            head,
            tail,
            Output {
                exchanges: &mut self.finished,
                errors,
                calls: &mut self.calls,
                ws: &mut self.ws[conn.meta.role.index()][bucket],
            },
        );
        let after = conn.in_flight();
        let slot = &mut self.in_flight[conn.meta.role.index()][bucket];
        *slot = (*slot + after).saturating_sub(before);
    }

    /// Marks a connection as a relay hop (or not): the end of a process that forwards the
    /// port's traffic to another server of the same port. Its requests in flight and its
    /// errors are then kept apart from those of its side ([`Engine::in_flight_relay`]).
    pub fn set_relay(&mut self, conn_id: u64, relay: bool) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.relay == relay {
            return;
        }
        let role = conn.meta.role.index();
        let n = conn.in_flight();
        let from = conn.bucket();
        self.in_flight[role][from] = self.in_flight[role][from].saturating_sub(n);
        conn.relay = relay;
        self.in_flight[role][conn.bucket()] += n;
    }

    /// Requests in flight on the server ends of relay hops of this role.
    pub fn in_flight_relay(&self, role: Role) -> usize {
        self.in_flight[role.index()][RELAY_SERVER_BUCKET]
    }

    /// The connection closed; exchanges still open end as aborted.
    pub fn close(&mut self, conn_id: u64) {
        self.remove(conn_id, Outcome::Aborted);
    }

    /// Some of the connection's bytes were lost (the capture could not deliver them): its open
    /// exchanges end as aborted and it starts over as one picked up mid-stream, at the next
    /// request line. False when the connection is not kept.
    pub fn resync(&mut self, conn_id: u64) -> bool {
        let Some(conn) = self.conns.get(&conn_id) else {
            return false;
        };
        let (meta, ts) = (conn.meta, conn.last_ts);
        self.remove(conn_id, Outcome::Aborted);
        self.insert(meta, ts, true);
        true
    }

    /// Whether the connection is kept.
    pub fn holds(&self, conn_id: u64) -> bool {
        self.conns.contains_key(&conn_id)
    }

    /// Whether a new connection would evict the least recently active one.
    pub fn is_full(&self) -> bool {
        self.conns.len() >= self.config.max_conns
    }

    fn remove(&mut self, conn_id: u64, outcome: Outcome) {
        let Some(conn) = self.conns.remove(&conn_id) else {
            return;
        };
        let slot = &mut self.in_flight[conn.meta.role.index()][conn.bucket()];
        *slot = slot.saturating_sub(conn.in_flight());
        let errors = self.errors.slot(conn.meta.role, conn.bucket());
        let ws = &mut self.ws[conn.meta.role.index()][conn.bucket()];
        conn.close(
            outcome,
            Output {
                exchanges: &mut self.finished,
                errors,
                calls: &mut self.calls,
                ws,
            },
        );
    }

    fn insert(&mut self, meta: ConnMeta, ts: u64, mid_stream: bool) {
        if self.conns.len() >= self.config.max_conns {
            let oldest = self
                .conns
                .values()
                .min_by_key(|conn| conn.last_ts)
                .map(|conn| conn.meta);
            if let Some(meta) = oldest {
                let id = meta.conn_id;
                self.errors.slot(meta.role, side_index_of(meta.side))
                    [ErrorReason::ConnLimit as usize] += 1;
                self.remove(id, Outcome::Evicted);
            }
        }
        self.conns
            .insert(meta.conn_id, Conn::new(meta, ts, mid_stream));
    }

    /// Exchanges finished since the last call, in the order they finished.
    pub fn drain_finished(&mut self) -> std::vec::Drain<'_, Exchange> {
        self.finished.drain(..)
    }

    pub fn errors(&self) -> &ErrorCounts {
        &self.errors
    }

    /// Calls over WebSocket finished since the last call, in the order they finished.
    pub fn drain_calls(&mut self) -> std::vec::Drain<'_, Call> {
        self.calls.drain(..)
    }

    /// WebSocket messages and unread bytes on connections of this role and side (relay hops'
    /// apart).
    pub fn ws_counts(&self, role: Role, side: crate::base::Side) -> &WsCounts {
        &self.ws[role.index()][side_index_of(side)]
    }

    /// Requests seen whose responses have not finished, on connections of this role and side.
    pub fn in_flight(&self, role: Role, side: crate::base::Side) -> usize {
        self.in_flight[role.index()][side_index_of(side)]
    }

    /// The connections kept: id and role of each.
    pub fn conn_roles(&self) -> impl Iterator<Item = (u64, Role)> + '_ {
        self.conns
            .values()
            .map(|conn| (conn.meta.conn_id, conn.meta.role))
    }

    /// Connections kept.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Ends every connection (daemon shutdown): open exchanges come out as evicted.
    pub fn close_all(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.remove(id, Outcome::Evicted);
        }
    }
}

fn side_index_of(side: crate::base::Side) -> usize {
    match side {
        crate::base::Side::Server => 0,
        crate::base::Side::Client => 1,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod ws_tests;
