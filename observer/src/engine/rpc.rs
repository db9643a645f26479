//! Calls over WebSocket: OpenClaw's gateway protocol (v4), JSON text messages of three types.
//!
//! - `{"type":"req","id":…,"method":…,"params":…}` from the client starts a call;
//! - `{"type":"res","id":…,"ok":…,"payload"|"error":…}` from the server answers it. A `res`
//!   whose `payload.status` is `"accepted"` is an acknowledgement (an `agent` turn gets one at
//!   once, and its result later under the same id): the call goes on;
//! - `{"type":"event","event":…,"payload":…}` from the server: `agent` events whose
//!   `payload.stream` is `"assistant"` and `chat` events whose `payload.state` is `"delta"`
//!   carry the model's text, and the first of them after a call began is its first delta. An
//!   event names its run (`payload.runId`, given in the acceptance); one that names none goes
//!   to the oldest turn still waiting for its first delta whose run is not known either, one
//!   that names a run no call has is ignored.
//!
//! A call ends with its final `res`: outcome `ok`, or the error's `code`; tokens from the
//! `usage` object (`input`, `output`) where the captured bytes hold it, else output tokens
//! from the last `agent` event of the run whose `payload.stream` is `"usage"`
//! (`data.outputTokens`). Calls still open when
//! the connection closes end `aborted`. Messages are read from their captured head and tail
//! (see [`super::ws`]); one whose type cannot be read is not a call.

use std::collections::VecDeque;

use super::exchange::ConnMeta;
use super::llm::{bool_value, keys, number_value, string_value, trim_start};
use super::ws::{Message, MessageKind};

/// Calls kept waiting for their results on one connection; beyond, the oldest ends `evicted`.
pub const MAX_PENDING_CALLS: usize = 64;
/// Longest method name or error code kept.
const MAX_NAME: usize = 48;
/// Longest id or run id kept (OpenClaw's are UUIDs).
const MAX_ID: usize = 64;

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// `ok:false`: the error's `code` (`error` when it has none).
    Error(String),
    /// The connection closed first.
    Aborted,
    /// The engine dropped the connection (its limit) or stopped, or more than
    /// [`MAX_PENDING_CALLS`] calls waited on it and this was the oldest.
    Evicted,
}

impl CallOutcome {
    pub fn as_str(&self) -> &str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Error(code) => code,
            CallOutcome::Aborted => "aborted",
            CallOutcome::Evicted => "evicted",
        }
    }
}

/// One finished call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub conn: ConnMeta,
    pub method: String,
    pub outcome: CallOutcome,
    /// The request's first and last bytes.
    pub request_first: u64,
    pub request_last: u64,
    /// The acknowledgement (`payload.status:"accepted"`), if one came.
    pub accepted: Option<u64>,
    /// The first event carrying model text.
    pub first_delta: Option<u64>,
    /// The final answer's last bytes (for an aborted call, the last bytes seen).
    pub end: u64,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// The trace id of the request's `traceparent` (OpenClaw runs the call in a child trace
    /// of it, and its model calls carry that trace in their `traceparent` header).
    pub trace_id: Option<u128>,
}

impl Call {
    pub fn duration_ns(&self) -> u64 {
        self.end.saturating_sub(self.request_first)
    }

    pub fn time_to_first_delta_ns(&self) -> Option<u64> {
        Some(self.first_delta?.saturating_sub(self.request_last))
    }
}

#[derive(Debug)]
struct Pending {
    id: String,
    run_id: Option<String>,
    /// Output tokens an `agent` `usage` event reported, for a result whose usage was not
    /// captured.
    usage_event_output: Option<u64>,
    call: Call,
}

/// The calls of one WebSocket connection.
#[derive(Debug, Default)]
pub struct Calls {
    pending: VecDeque<Pending>,
    last_ts: u64,
}

/// The top-level fields of a message that decide what it is.
#[derive(Debug, Default)]
struct Fields<'a> {
    kind: Option<&'a [u8]>,
    id: Option<String>,
    method: Option<String>,
    event: Option<String>,
    ok: Option<bool>,
    trace_id: Option<u128>,
}

impl Calls {
    /// A text message from the client (`from_client`) or the server.
    pub fn message(
        &mut self,
        conn: ConnMeta,
        from_client: bool,
        message: &Message,
        out: &mut Vec<Call>,
    ) {
        if message.kind != MessageKind::Text || message.compressed {
            return;
        }
        self.last_ts = self.last_ts.max(message.last_ts);
        let fields = top_level(&message.head);
        match (fields.kind, from_client) {
            (Some(b"req"), true) => self.request(conn, fields, message, out),
            (Some(b"res"), false) => self.response(fields, message, out),
            (Some(b"event"), false) => self.event(fields, message),
            _ => {}
        }
    }

    /// The connection is gone: calls still open end with `outcome`.
    pub fn close(&mut self, outcome: CallOutcome, out: &mut Vec<Call>) {
        for pending in self.pending.drain(..) {
            out.push(ended(pending, outcome.clone(), self.last_ts));
        }
    }

    /// Calls waiting for their results.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn request(
        &mut self,
        conn: ConnMeta,
        fields: Fields<'_>,
        message: &Message,
        out: &mut Vec<Call>,
    ) {
        let (Some(id), Some(method)) = (fields.id, fields.method) else {
            return;
        };
        if self.pending.len() >= MAX_PENDING_CALLS
            && let Some(oldest) = self.pending.pop_front()
        {
            out.push(ended(oldest, CallOutcome::Evicted, self.last_ts));
        }
        self.pending.push_back(Pending {
            id,
            run_id: None,
            usage_event_output: None,
            call: Call {
                conn,
                method,
                outcome: CallOutcome::Ok,
                request_first: message.first_ts,
                request_last: message.last_ts,
                accepted: None,
                first_delta: None,
                end: message.last_ts,
                input_tokens: None,
                output_tokens: None,
                trace_id: fields.trace_id,
            },
        });
    }

    fn response(&mut self, fields: Fields<'_>, message: &Message, out: &mut Vec<Call>) {
        let Some(id) = fields.id else { return };
        let Some(at) = self.pending.iter().position(|p| p.id == id) else {
            return;
        };
        let payload = after_key(&message.head, b"payload");
        let status = payload.and_then(|p| first_string(p, b"status", MAX_NAME));
        if fields.ok == Some(true) && status.as_deref() == Some("accepted") {
            let pending = &mut self.pending[at];
            pending.call.accepted.get_or_insert(message.first_ts);
            if pending.run_id.is_none() {
                pending.run_id = payload.and_then(|p| first_string(p, b"runId", MAX_ID));
            }
            return;
        }
        let Some(mut pending) = self.pending.remove(at) else {
            return;
        };
        let call = &mut pending.call;
        // Never before its request (timestamps of two threads' system calls can cross).
        call.end = message.last_ts.max(call.request_last);
        call.outcome = match fields.ok {
            Some(false) => CallOutcome::Error(
                after_key(&message.head, b"error")
                    .and_then(|e| first_string(e, b"code", MAX_NAME))
                    .unwrap_or_else(|| "error".to_string()),
            ),
            _ => CallOutcome::Ok,
        };
        // Usage sits near the end of a long result: the tail first, then the head.
        let usage = [&message.tail[..], &message.head[..]]
            .into_iter()
            .find_map(|bytes| last_after_key(bytes, b"usage"));
        if let Some(usage) = usage {
            call.input_tokens = first_number(usage, b"input");
            call.output_tokens = first_number(usage, b"output");
        }
        if call.output_tokens.is_none() {
            call.output_tokens = pending.usage_event_output;
        }
        out.push(pending.call);
    }

    fn event(&mut self, fields: Fields<'_>, message: &Message) {
        let Some(payload) = after_key(&message.head, b"payload") else {
            return;
        };
        let (delta, usage) = match fields.event.as_deref() {
            Some("agent") => match first_string(payload, b"stream", MAX_NAME).as_deref() {
                Some("assistant") => (true, false),
                Some("usage") => (false, true),
                _ => (false, false),
            },
            Some("chat") => (
                first_string(payload, b"state", MAX_NAME).as_deref() == Some("delta"),
                false,
            ),
            _ => (false, false),
        };
        let run_id = first_string(payload, b"runId", MAX_ID);
        if usage {
            // `{"stream":"usage","data":{"outputTokens":N}}`: the run's output so far.
            if let Some(run) = &run_id
                && let Some(pending) = self
                    .pending
                    .iter_mut()
                    .find(|p| p.run_id.as_ref() == Some(run))
                && let Some(n) = first_number(payload, b"outputTokens")
            {
                pending.usage_event_output = Some(n);
            }
            return;
        }
        if !delta {
            return;
        }
        let by_run = run_id.as_ref().and_then(|run| {
            self.pending
                .iter()
                .position(|p| p.run_id.as_ref() == Some(run))
        });
        // An event that names no run goes to the oldest turn still waiting that knows none
        // either; one that names a run no call has is another's.
        let at = by_run.or_else(|| {
            run_id.is_none().then_some(())?;
            self.pending.iter().position(|p| {
                p.run_id.is_none() && p.call.first_delta.is_none() && takes_deltas(&p.call.method)
            })
        });
        if let Some(at) = at
            && message.first_ts >= self.pending[at].call.request_first
        {
            self.pending[at]
                .call
                .first_delta
                .get_or_insert(message.first_ts);
        }
    }
}

/// A call that ends without its result: with `outcome`, at the last bytes seen.
fn ended(pending: Pending, outcome: CallOutcome, last_ts: u64) -> Call {
    let mut call = pending.call;
    call.outcome = outcome;
    call.end = last_ts.max(call.request_last);
    call
}

/// Methods whose results stream model text as events.
fn takes_deltas(method: &str) -> bool {
    matches!(method, "agent" | "chat.send")
}

/// The top-level `type`, `id`, `method`, `event` and `ok` of a JSON object (keys inside
/// nested values are skipped).
fn top_level(bytes: &[u8]) -> Fields<'_> {
    let mut fields = Fields::default();
    let mut depth = 0u32;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' if depth == 1 => {
                // A string at depth 1: a key when a colon follows it.
                let rest = &bytes[i + 1..];
                let Some(close) = closing_quote(rest) else {
                    break;
                };
                let key = &rest[..close];
                let after = trim_start(&rest[close + 1..]);
                if let Some(value) = after.strip_prefix(b":").map(trim_start) {
                    match key {
                        b"type" => fields.kind = string_slice(value),
                        b"id" => fields.id = id_value(value),
                        b"method" => fields.method = string_value(value, MAX_NAME),
                        b"event" => fields.event = string_value(value, MAX_NAME),
                        b"ok" => fields.ok = bool_value(value),
                        b"traceparent" => {
                            fields.trace_id = string_slice(value).and_then(super::http::trace_id)
                        }
                        _ => {}
                    }
                    i = bytes.len() - value.len();
                    continue;
                }
                // A string value: skip it whole.
                i += close + 2;
                continue;
            }
            b'"' => in_string = true,
            _ => {}
        }
        i += 1;
    }
    fields
}

/// An id: a string or a number, as text.
fn id_value(value: &[u8]) -> Option<String> {
    if value.first() == Some(&b'"') {
        return string_value(value, MAX_ID);
    }
    number_value(value).map(|n| n.to_string())
}

/// A string value's raw bytes (no escapes in the short type names this reads).
fn string_slice(value: &[u8]) -> Option<&[u8]> {
    let body = value.strip_prefix(b"\"")?;
    let close = closing_quote(body)?;
    Some(&body[..close])
}

/// Where the string whose body starts `bytes` ends: its closing quote, escaped quotes skipped.
fn closing_quote(bytes: &[u8]) -> Option<usize> {
    let mut escaped = false;
    for (at, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(at),
            _ => {}
        }
    }
    None
}

/// What follows the first `"key":` anywhere in `bytes`.
fn after_key<'a>(bytes: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    keys(bytes).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// What follows the last `"key":` anywhere in `bytes`.
fn last_after_key<'a>(bytes: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    keys(bytes)
        .filter(|(k, _)| *k == key)
        .last()
        .map(|(_, v)| v)
}

fn first_string(bytes: &[u8], key: &[u8], limit: usize) -> Option<String> {
    after_key(bytes, key).and_then(|v| string_value(v, limit))
}

fn first_number(bytes: &[u8], key: &[u8]) -> Option<u64> {
    after_key(bytes, key).and_then(number_value)
}

#[cfg(test)]
mod tests;
