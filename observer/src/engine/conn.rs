//! One connection's state: the two directions' parsers, the requests waiting for their
//! responses (pipelining, bounded), and the response being read. Pairs each response with its
//! request and emits the finished [`Exchange`].

use std::collections::VecDeque;

use super::ErrorReason;
use super::exchange::{ConnMeta, Exchange, Method, Outcome, Timestamps};
use super::http::{BodyRule, Head, Kind, MessageParser, Sink};
use super::llm::{RequestScan, ResponseScan};
use super::rpc::{Call, CallOutcome};
use super::ws::{Session, SessionOutput, WsCounts};
use crate::base::{Direction, Side};

/// Requests kept waiting for responses on one connection; more are counted and not tracked.
pub const MAX_PIPELINE: usize = 16;

/// A request seen, its response not finished.
#[derive(Debug)]
struct Pending {
    seq: u64,
    method: Method,
    path: String,
    ts: Timestamps,
    request_done: bool,
    request_body_bytes: u64,
    scan: RequestScan,
    exact: bool,
    trace_id: Option<u128>,
}

/// The final response being read.
#[derive(Debug)]
struct Response {
    /// The request it answers; `None` for a response nobody asked for (counted, dropped).
    seq: Option<u64>,
    status: u16,
    first: u64,
    body_bytes: u64,
    scan: ResponseScan,
    exact: bool,
    /// A 1xx: no exchange ends with it.
    interim: bool,
}

/// What the engine keeps of one connection.
#[derive(Debug)]
pub struct Conn {
    pub meta: ConnMeta,
    /// A relay hop ([`super::Engine::set_relay`]).
    pub relay: bool,
    requests: MessageParser,
    responses: MessageParser,
    state: Exchanges,
    pub last_ts: u64,
}

/// Everything but the parsers, so a parser can be fed with the rest as its sink.
#[derive(Debug, Default)]
struct Exchanges {
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// The request whose bytes are arriving.
    receiving: Option<u64>,
    /// Boxed: most connections are idle between exchanges most of the time.
    response: Option<Box<Response>>,
    upgraded: bool,
    /// After a `101` to WebSocket: its frames and calls.
    ws: Option<Box<Session>>,
}

/// Where a connection's findings go: finished exchanges and errors by reason.
pub struct Output<'a> {
    pub exchanges: &'a mut Vec<Exchange>,
    pub errors: &'a mut [u64; ErrorReason::COUNT],
    pub calls: &'a mut Vec<Call>,
    pub ws: &'a mut WsCounts,
}

impl Output<'_> {
    /// Where a WebSocket session's findings go.
    fn session(&mut self) -> SessionOutput<'_> {
        SessionOutput {
            counts: self.ws,
            calls: self.calls,
        }
    }
}

impl Conn {
    /// `mid_stream`: the connection existed before it was seen (seeded, or its open was
    /// missed), so its first bytes may be anywhere in a message.
    pub fn new(meta: ConnMeta, ts: u64, mid_stream: bool) -> Conn {
        let parser = if mid_stream {
            MessageParser::resyncing
        } else {
            MessageParser::new
        };
        Conn {
            meta,
            relay: false,
            requests: parser(Kind::Request),
            responses: parser(Kind::Response),
            state: Exchanges::default(),
            last_ts: ts,
        }
    }

    /// Where its in-flight requests and errors are counted: 0 server side, 1 client side, 2
    /// and 3 the server and client sides of a relay hop.
    pub fn bucket(&self) -> usize {
        match (self.relay, self.meta.side) {
            (false, Side::Server) => 0,
            (false, Side::Client) => 1,
            (true, Side::Server) => 2,
            (true, Side::Client) => 3,
        }
    }

    /// Requests seen whose responses are not finished.
    pub fn in_flight(&self) -> usize {
        self.state.pending.len()
    }

    fn is_request(&self, direction: Direction) -> bool {
        matches!(
            (self.meta.side, direction),
            (Side::Server, Direction::Ingress) | (Side::Client, Direction::Egress)
        )
    }

    pub fn segment(
        &mut self,
        direction: Direction,
        ts: u64,
        len: u64,
        head: &[u8],
        tail: &[u8],
        mut out: Output<'_>,
    ) {
        self.last_ts = self.last_ts.max(ts);
        let is_request = self.is_request(direction);
        if let Some(ws) = &mut self.state.ws {
            ws.segment(self.meta, is_request, ts, len, head, tail, out.session());
            return;
        }
        let mut sink = ConnSink {
            meta: self.meta,
            state: &mut self.state,
            out,
            kind: Kind::Request,
        };
        if is_request {
            // A new request ends a response whose end could not be framed.
            if super::http::looks_like_start(Kind::Request, head) {
                sink.kind = Kind::Response;
                self.responses.end_unframed(&mut sink);
            }
            sink.kind = Kind::Request;
            self.requests.segment(ts, len, head, tail, &mut sink);
        } else {
            // A response begins: the request it answers has ended, framed or not, even one
            // whose head never finished.
            sink.kind = Kind::Request;
            if sink.state.pending.is_empty() {
                self.requests.end_partial_head(&mut sink);
            }
            self.requests.end_unframed(&mut sink);
            sink.kind = Kind::Response;
            self.responses.segment(ts, len, head, tail, &mut sink);
        }
        if self.state.upgraded {
            self.requests.set_opaque();
            self.responses.set_opaque();
        }
    }

    /// The connection is gone: close-delimited bodies end, anything else in progress is
    /// emitted with `outcome` (aborted by a close, evicted by the engine).
    pub fn close(mut self, outcome: Outcome, out: Output<'_>) {
        let mut sink = ConnSink {
            meta: self.meta,
            state: &mut self.state,
            out,
            kind: Kind::Request,
        };
        self.requests.close(&mut sink);
        sink.kind = Kind::Response;
        self.responses.close(&mut sink);
        let ConnSink {
            meta, state, out, ..
        } = sink;
        if let Some(ws) = &mut state.ws {
            let outcome = match outcome {
                Outcome::Evicted => CallOutcome::Evicted,
                _ => CallOutcome::Aborted,
            };
            ws.close(outcome, out.calls);
        }
        // What was seen last, not the close, is the last byte of a cut-short exchange.
        let last = self.last_ts;
        if let Some(response) = state.response.take()
            && !response.interim
            && let Some(seq) = response.seq
            && let Some(at) = state.pending.iter().position(|p| p.seq == seq)
            && let Some(pending) = state.pending.remove(at)
        {
            out.exchanges
                .push(finish(meta, pending, Some(response), last, outcome));
        }
        for pending in state.pending.drain(..) {
            out.exchanges
                .push(finish(meta, pending, None, last, outcome));
        }
    }
}

struct ConnSink<'a, 'o> {
    meta: ConnMeta,
    state: &'a mut Exchanges,
    out: Output<'o>,
    kind: Kind,
}

impl ConnSink<'_, '_> {
    fn receiving(&mut self) -> Option<&mut Pending> {
        let seq = self.state.receiving?;
        self.state.pending.iter_mut().rev().find(|p| p.seq == seq)
    }

    fn request_head(&mut self, head: &Head, ts: u64) -> BodyRule {
        if self.state.pending.len() >= MAX_PIPELINE {
            self.error(ErrorReason::PipelineOverflow);
            self.state.receiving = None;
            return BodyRule::Framed;
        }
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        self.state.receiving = Some(seq);
        // One request at a time is the rule (pipelining is rare): no room for four.
        self.state.pending.reserve_exact(1);
        self.state.pending.push_back(Pending {
            seq,
            method: head.method,
            path: head.path.clone(),
            ts: Timestamps {
                request_first: ts,
                request_last: ts,
                ..Timestamps::default()
            },
            request_done: false,
            request_body_bytes: 0,
            scan: RequestScan::default(),
            exact: head.complete,
            trace_id: head.trace_id,
        });
        if head.method == Method::Connect {
            BodyRule::Opaque
        } else {
            BodyRule::Framed
        }
    }

    fn response_head(&mut self, head: &Head, ts: u64) -> BodyRule {
        let interim = (100..200).contains(&head.status) && head.status != 101;
        // The oldest request without a finished response is the one answered, unless the
        // response began before it: then it answers a request that was missed (a connection
        // picked up mid-stream), and taking this one would shift every later pairing.
        let answered = self
            .state
            .pending
            .front()
            .filter(|p| p.ts.request_first <= ts);
        let seq = answered.map(|p| p.seq);
        let method = answered.map(|p| p.method);
        if seq.is_none() && !interim {
            self.error(ErrorReason::UnmatchedResponse);
        }
        self.state.response = Some(Box::new(Response {
            seq,
            status: head.status,
            first: ts,
            body_bytes: 0,
            scan: ResponseScan::new(head.body_type),
            exact: head.complete,
            interim,
        }));
        if head.status == 101 {
            // The exchange is the handshake: it ends with this head. What follows is another
            // protocol; WebSocket is read on.
            self.state.upgraded = true;
            if head.websocket {
                self.state.ws = Some(Box::new(Session::new(head.deflate)));
            } else {
                self.out.ws.unread[super::ws::Unread::OtherProtocol as usize] += 1;
            }
            self.response_end(ts);
            return BodyRule::Opaque;
        }
        if method == Some(Method::Connect) && head.status / 100 == 2 {
            self.state.upgraded = true;
            return BodyRule::Opaque;
        }
        if interim || head.status == 204 || head.status == 304 || method == Some(Method::Head) {
            BodyRule::None
        } else {
            BodyRule::Framed
        }
    }

    fn response_end(&mut self, ts: u64) {
        let Some(response) = self.state.response.take() else {
            return;
        };
        if response.interim {
            return;
        }
        let Some(seq) = response.seq else { return };
        if let Some(at) = self.state.pending.iter().position(|p| p.seq == seq)
            && let Some(pending) = self.state.pending.remove(at)
        {
            if self.state.receiving == Some(seq) {
                self.state.receiving = None;
            }
            self.out.exchanges.push(finish(
                self.meta,
                pending,
                Some(response),
                ts,
                Outcome::Complete,
            ));
        }
    }
}

impl Sink for ConnSink<'_, '_> {
    fn head(&mut self, head: &Head, ts: u64) -> BodyRule {
        match self.kind {
            Kind::Request => self.request_head(head, ts),
            Kind::Response => self.response_head(head, ts),
        }
    }

    fn body(&mut self, bytes: &[u8], ts: u64) {
        match self.kind {
            Kind::Request => {
                if let Some(pending) = self.receiving() {
                    pending.request_body_bytes += bytes.len() as u64;
                    pending.ts.request_last = ts;
                    pending.scan.body(bytes);
                }
            }
            Kind::Response => {
                if let Some(response) = &mut self.state.response {
                    response.body_bytes += bytes.len() as u64;
                    response.scan.body(bytes, ts);
                }
            }
        }
    }

    fn body_gap(&mut self, n: u64) {
        match self.kind {
            Kind::Request => {
                if let Some(pending) = self.receiving() {
                    pending.request_body_bytes += n;
                    pending.scan.gap();
                }
            }
            Kind::Response => {
                if let Some(response) = &mut self.state.response {
                    response.body_bytes += n;
                    response.scan.gap();
                }
            }
        }
    }

    fn end(&mut self, ts: u64) {
        match self.kind {
            Kind::Request => {
                if let Some(pending) = self.receiving() {
                    pending.request_done = true;
                    pending.ts.request_last = ts;
                }
                self.state.receiving = None;
            }
            Kind::Response => self.response_end(ts),
        }
    }

    fn upgraded(&mut self, bytes: &[u8], ts: u64) {
        if let Some(ws) = &mut self.state.ws {
            ws.bytes(
                self.meta,
                self.kind == Kind::Request,
                ts,
                bytes,
                self.out.session(),
            );
        }
    }

    fn upgraded_gap(&mut self, n: u64) {
        if let Some(ws) = &mut self.state.ws {
            ws.gap(self.meta, self.kind == Kind::Request, n, self.out.session());
        }
    }

    fn error(&mut self, reason: ErrorReason) {
        self.out.errors[reason as usize] += 1;
        if reason.loses_framing() {
            match self.kind {
                Kind::Request => {
                    if let Some(pending) = self.receiving() {
                        pending.exact = false;
                    }
                }
                Kind::Response => {
                    if let Some(response) = &mut self.state.response {
                        response.exact = false;
                    }
                }
            }
        }
    }
}

fn finish(
    conn: ConnMeta,
    pending: Pending,
    response: Option<Box<Response>>,
    last_ts: u64,
    outcome: Outcome,
) -> Exchange {
    let Pending {
        method,
        path,
        mut ts,
        request_done,
        request_body_bytes,
        scan: request,
        mut exact,
        trace_id,
        ..
    } = pending;
    let mut status = None;
    let mut response_body_bytes = 0;
    let mut llm = Default::default();
    let mut streamed = None;
    if !request_done && outcome == Outcome::Complete {
        // Answered before its body was all seen (an early error, or a cut capture).
        exact = false;
    }
    if let Some(response) = response {
        status = Some(response.status);
        ts.response_first = Some(response.first);
        ts.response_last = Some(last_ts);
        response_body_bytes = response.body_bytes;
        exact &= response.exact;
        streamed = Some(response.scan.is_stream());
        let (fields, first_chunk) = response.scan.finish(last_ts, outcome == Outcome::Complete);
        llm = fields;
        ts.first_chunk = first_chunk;
    }
    let RequestScan { model, stream, .. } = request;
    if super::llm::is_model_call(&path) {
        llm.model = model;
        llm.stream = stream
            .or(streamed)
            .or(Some(matches!(path.as_str(), "/api/chat" | "/api/generate")));
        if outcome != Outcome::Complete && llm.model.is_some() && llm.done_reason.is_none() {
            llm.done_reason = Some("incomplete".to_string());
        }
    } else {
        // Model management and listing (`/api/show`, `/v1/models` …): an HTTP exchange only,
        // whatever model its body names. No model output, so no first chunk either.
        llm = Default::default();
        ts.first_chunk = None;
    }
    Exchange {
        conn,
        method,
        path,
        status,
        ts,
        request_body_bytes,
        response_body_bytes,
        outcome,
        exact,
        llm,
        trace_id,
    }
}
